"""Updates deferred into the next forward, as Intel Caffe's FW_OVERLAP_OPT.

After backward the solver does not wait: it records the update of every parameter. Just before layer k
runs forward in the next iteration, the parameters layer k owns are waited for, updated and their
gradients cleared; layers further on whose reduction has already finished are updated on the way. So
communication overlaps the rest of backward and the next forward. The weights each layer sees are the
same as with the update applied right after backward.
"""
from ..kernels.solver_update import fill_zero


class DeferredUpdates:
    def __init__(self, session, net, update):
        """``update(index, rate)`` updates learnable parameter ``index`` from its reduced gradient."""
        self.session = session
        self.net = net
        self.update = update
        index_of = {id(blob): i for i, blob in enumerate(net.learnable_params)}
        self.params_of_layer = {}
        for layer_index, layer in enumerate(net.layers):
            owned = [index_of[id(b)] for b in layer.blobs if id(b) in index_of]
            if owned:
                self.params_of_layer[layer_index] = owned
        self.pending = {}
        self.rate = None

    def defer(self, rate):
        self.rate = rate
        self.pending = dict(self.params_of_layer)

    def before_forward(self, layer_index):
        """The net's hook: run just before layer ``layer_index``'s forward."""
        if not self.pending:
            return
        self.session.progress()
        params = self.pending.pop(layer_index, None)
        if params:
            self._apply(params)
        for later in [k for k in self.pending if k > layer_index]:
            if all(self.session.param_set_done(i) for i in self.pending[later]):
                self._apply(self.pending.pop(later))

    def flush(self):
        for layer_index in sorted(self.pending):
            self._apply(self.pending.pop(layer_index))

    def _apply(self, params):
        for i in params:
            self.session.wait_param(i)
            self.update(i, self.rate)
            blob = self.net.learnable_params[i]
            fill_zero(blob.diff.reshape(-1))

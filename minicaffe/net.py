"""Net: builds a layer graph from a NetParameter and runs it forward and backward, as Caffe's net.cpp.

Building a net: filter layers by the NetState's include/exclude rules, turn the deprecated
``input``/``input_shape`` fields into an Input layer, insert Split layers where a blob feeds several
layers, create each layer from the registry, wire bottoms and tops (a top named like its bottom runs
in place), set up and reshape every layer, and decide which layers need a backward pass.
"""
import collections
import functools
import os

import numpy as np

from . import hdf5_io, prototxt
from .precision import policy as precision_policy
from .blob import Blob
from .errors import MinicaffeError
from .kernels.solver_update import fill_zero
from .layer import create_layer, layer_class
from .proto import minicaffe_pb2 as pb
from .threads import blas_single_threaded

TRAIN = pb.TRAIN
TEST = pb.TEST


class Net:
    """A network of layers. ``Net(path_or_param, weights=None, phase=TEST, level=0, stages=())``.

    As in pycaffe, ``Net(prototxt, phase)`` and ``Net(prototxt, weights, phase)`` also work.
    ``precision`` (FP32, BF16, DFP16: a name or a Precision value) and ``precision_param`` replace
    the net-level precision settings; ``precision_stats_interval`` prints each reduced-precision
    layer's statistics every that many training iterations.
    """

    def __init__(self, model, weights=None, phase=None, level=0, stages=(), precision=None,
                 precision_param=None, precision_stats_interval=0):
        if isinstance(weights, int) and phase is None:
            weights, phase = None, weights
        phase = TEST if phase is None else phase
        if isinstance(model, (str, os.PathLike)):
            parsed = prototxt.read_net(model)
            param, self.source, layer_lines = parsed.param, str(model), parsed.layer_lines
        else:
            param, self.source, layer_lines = model, None, None
        self.name = param.name
        self.phase = phase
        state = pb.NetState()
        state.CopyFrom(param.state)
        state.phase = phase
        state.level = level or state.level
        state.stage.extend(s for s in stages if s not in state.stage)
        self.state = state
        self.debug_info = param.debug_info

        layer_params = _with_input_layer(param)
        lines = [None] * (len(layer_params) - len(param.layer)) + _layer_lines(param, layer_lines)
        kept = [(lp, line) for lp, line in zip(layer_params, lines) if _state_includes(state, lp, self._where(line))]
        kept = _insert_splits(kept)
        self._build(kept, param.force_backward)
        self._find_fused_chains()
        self._assign_precision([lp for lp, _ in kept], param, precision, precision_param,
                               precision_stats_interval)
        if weights is not None:
            self.copy_from(weights)

    # -- construction ------------------------------------------------------------------------------
    def _where(self, line):
        if self.source is None:
            return ""
        return f"{self.source}:{line}" if line else self.source

    def _build(self, kept, force_backward):
        self.layers = []
        self.layer_names = []
        self.bottom_vecs = []
        self.top_vecs = []
        self.bottom_need_backward = []
        self.layer_need_backward = []
        self.blobs = collections.OrderedDict()
        self.params = collections.OrderedDict()
        # learnable_params: one entry per distinct parameter blob (owners of shared parameters only).
        self.learnable_params = []
        self.params_lr = []
        self.params_weight_decay = []
        self._param_owner_by_name = {}
        self._layer_lines = []
        self.loss_terms = []
        blob_need_backward = {}
        # Blobs produced and not yet consumed, in order: what is left at the end are the outputs
        # (an in-place top puts back the blob its bottom took, as in Caffe).
        available = {}

        for lp, line in kept:
            where = self._where(line)
            lp.phase = self.phase
            layer_class(lp.type, lp.name, where)
            layer = create_layer(lp, self.phase)
            bottoms = []
            for name in lp.bottom:
                if name not in self.blobs:
                    raise MinicaffeError(f"{where + ': ' if where else ''}layer '{lp.name}' ({lp.type}): "
                                         f"bottom '{name}' is not produced by any earlier layer")
                bottoms.append(self.blobs[name])
                available.pop(name, None)
            tops = []
            for name in lp.top:
                if name in lp.bottom:
                    tops.append(self.blobs[name])
                elif name in self.blobs:
                    raise MinicaffeError(f"{where + ': ' if where else ''}layer '{lp.name}': top '{name}' "
                                         f"is produced twice (only in-place layers may reuse a blob name)")
                else:
                    blob = Blob(name=name)
                    self.blobs[name] = blob
                    tops.append(blob)
            try:
                layer.layer_setup(bottoms, tops)
            except MinicaffeError as err:
                raise MinicaffeError(f"{where}: {err}" if where else str(err)) from None
            self._setup_loss_weights(layer, lp, tops, where)
            self._append_params(layer, lp, where)

            need_backward = False
            bottom_need = []
            for i, name in enumerate(lp.bottom):
                need = blob_need_backward.get(name, False)
                if i < len(lp.propagate_down):
                    need = need and lp.propagate_down[i]
                bottom_need.append(need)
                need_backward |= need
            layer.param_propagate_down = [self._param_lr(layer, lp, j) != 0 for j in range(len(layer.blobs))]
            need_backward |= any(layer.param_propagate_down)
            for name in lp.top:
                blob_need_backward[name] = need_backward
                available[name] = True

            self.layers.append(layer)
            self.layer_names.append(lp.name)
            self.bottom_vecs.append(bottoms)
            self.top_vecs.append(tops)
            self.bottom_need_backward.append(bottom_need)
            self.layer_need_backward.append(need_backward)
            self._layer_lines.append(line)

        self._prune_backward_outside_loss()
        if force_backward:
            # As Caffe: every layer runs backward, to each bottom the layer allows (never to labels).
            for i, layer in enumerate(self.layers):
                self.layer_need_backward[i] = True
                layer.param_propagate_down = [True] * len(layer.blobs)
                self.bottom_need_backward[i] = [need or layer.allow_force_backward(j)
                                                for j, need in enumerate(self.bottom_need_backward[i])]
        self.layer_dict = collections.OrderedDict(zip(self.layer_names, self.layers))
        self.outputs = list(available)
        self.inputs = [top.name for layer, tops in zip(self.layers, self.top_vecs)
                       if layer.type_name == "Input" for top in tops]
        # Loss layers' top diffs hold their loss weights, as in Caffe's Layer::SetLossWeights.
        self.loss_terms = [(top, w) for layer, tops in zip(self.layers, self.top_vecs)
                           for top, w in zip(tops, layer.loss_weights) if w != 0]

    def _assign_precision(self, layer_params, param, precision, precision_param, stats_interval):
        """Gives each Convolution and InnerProduct its resolved precision (rules in precision/policy.py)."""
        try:
            mode = precision_policy.parse_precision(precision)
        except ValueError as err:
            raise MinicaffeError(f"net '{self.name}': {err}") from None
        settings = precision_policy.resolve_net_precision(layer_params, param, mode, precision_param,
                                                          stats_interval if self.phase == TRAIN else 0)
        for layer, setting in zip(self.layers, settings):
            if setting is not None and hasattr(layer, "set_precision"):
                layer.set_precision(setting)

    def _setup_loss_weights(self, layer, lp, tops, where):
        weights = list(lp.loss_weight)
        if not weights and layer.is_loss and tops:
            weights = [1.0] + [0.0] * (len(tops) - 1)
        if weights and len(weights) != len(tops):
            raise MinicaffeError(f"{where + ': ' if where else ''}layer '{lp.name}': loss_weight must be given "
                                 f"once per top ({len(tops)}), got {len(weights)}")
        layer.loss_weights = weights + [0.0] * (len(tops) - len(weights))

    def _param_lr(self, layer, lp, j):
        return lp.param[j].lr_mult if j < len(lp.param) else 1.0

    def _append_params(self, layer, lp, where):
        if not layer.blobs:
            return
        if len(lp.param) > len(layer.blobs):
            raise MinicaffeError(f"{where + ': ' if where else ''}layer '{lp.name}': {len(lp.param)} param specs "
                                 f"for {len(layer.blobs)} parameter blobs")
        for j, blob in enumerate(layer.blobs):
            spec = lp.param[j] if j < len(lp.param) else pb.ParamSpec()
            blob.name = f"{lp.name}.{j}"
            owner = self._param_owner_by_name.get(spec.name) if spec.name else None
            if owner is None:
                if spec.name:
                    self._param_owner_by_name[spec.name] = (blob, spec)
                self.learnable_params.append(blob)
                self.params_lr.append(spec.lr_mult if spec.HasField("lr_mult") else 1.0)
                self.params_weight_decay.append(spec.decay_mult if spec.HasField("decay_mult") else 1.0)
                continue
            owner_blob, owner_spec = owner
            strict = spec.share_mode != pb.ParamSpec.PERMISSIVE
            if (strict and owner_blob.shape != blob.shape) or owner_blob.count != blob.count:
                raise MinicaffeError(
                    f"{where + ': ' if where else ''}layer '{lp.name}': shared parameter '{spec.name}' has shape "
                    f"{blob.shape} here but {owner_blob.shape} in its owner")
            if spec.HasField("lr_mult") and owner_spec.HasField("lr_mult") and spec.lr_mult != owner_spec.lr_mult:
                raise MinicaffeError(f"{where + ': ' if where else ''}layer '{lp.name}': shared parameter "
                                     f"'{spec.name}' has lr_mult {spec.lr_mult}, its owner {owner_spec.lr_mult}")
            blob.share_data(owner_blob)
            blob.share_diff(owner_blob)
        self.params[lp.name] = layer.blobs

    def _find_fused_chains(self):
        """Runs of layers executed as one kernel each way when a forward or backward range holds the
        whole run: BatchNorm -> Scale (-> ReLU) in place on one blob (layers/normalization.py:
        BatchNormChain) and Eltwise SUM -> ReLU (-> the Split of its top, whose backward sums into
        the same pass; layers/structure.py: EltwiseReLUChain). Each has first, last, fuses_backward,
        forward() and backward()."""
        from .layers.normalization import find_batch_norm_chains
        from .layers.structure import find_eltwise_relu_chains
        graph = (self.layers, self.bottom_vecs, self.top_vecs, self.layer_need_backward, self.bottom_need_backward)
        self.fused_chains = find_batch_norm_chains(*graph) + find_eltwise_relu_chains(*graph)
        self._chain_from = {chain.first: chain for chain in self.fused_chains}
        self._chain_to = {chain.last: chain for chain in self.fused_chains if chain.fuses_backward}

    def _prune_backward_outside_loss(self):
        """Skips backward where it cannot matter, as Caffe's Net::Init does.

        A layer whose outputs never reach a loss skips backward, and so does a layer none of whose
        outputs are back-propagated into by any consumer (after ``propagate_down: false``, say).
        """
        under_loss, skip_backprop = set(), set()
        for i in reversed(range(len(self.layers))):
            layer, tops = self.layers[i], self.top_vecs[i]
            contributes = any(w != 0 for w in layer.loss_weights) or any(t.name in under_loss for t in tops)
            skip = all(t.name in skip_backprop for t in tops)
            if not contributes or skip:
                self.layer_need_backward[i] = False
                self.bottom_need_backward[i] = [False] * len(self.bottom_vecs[i])
            for bottom, need in zip(self.bottom_vecs[i], self.bottom_need_backward[i]):
                if contributes:
                    under_loss.add(bottom.name)
                if not need:
                    skip_backprop.add(bottom.name)

    # -- running -----------------------------------------------------------------------------------
    def reshape(self):
        for layer, bottoms, tops in zip(self.layers, self.bottom_vecs, self.top_vecs):
            layer.reshape(bottoms, tops)

    # Called with a layer's index just before it runs forward: the communicator's deferred updates.
    before_forward = None

    def forward_units(self, start=0, end=None):
        """The forward pass over layers [start, end] as (first, last, run) steps: a fused chain
        (``fused_chains``) that lies wholly in the range is one step, every other layer its own."""
        end = len(self.layers) - 1 if end is None else end
        i = start
        while i <= end:
            chain = self._chain_from.get(i)
            if chain is not None and chain.last <= end:
                yield i, chain.last, chain.forward
            else:
                yield i, i, functools.partial(self.layers[i].forward, self.bottom_vecs[i], self.top_vecs[i])
            i = (chain.last if chain is not None and chain.last <= end else i) + 1

    def backward_units(self, start=None, end=0):
        """The backward pass over layers [end, start], in reverse, as (last, first, run) steps; run is
        None for a layer that needs no backward."""
        start = len(self.layers) - 1 if start is None else start
        i = start
        while i >= end:
            chain = self._chain_to.get(i)
            if chain is not None and chain.first >= end:
                yield i, chain.first, chain.backward
                i = chain.first - 1
                continue
            run = (functools.partial(self.layers[i].backward, self.top_vecs[i], self.bottom_need_backward[i],
                                     self.bottom_vecs[i]) if self.layer_need_backward[i] else None)
            yield i, i, run
            i -= 1

    def forward_layers(self, start=0, end=None):
        """Runs layers [start, end] forward and returns the weighted loss, as Caffe's ForwardFromTo."""
        with blas_single_threaded():
            for first, last, run in self.forward_units(start, end):
                if self.before_forward is not None:
                    for j in range(first, last + 1):
                        self.before_forward(j)
                run()
        return self.current_loss()

    def seed_loss_diffs(self):
        """Writes each loss top's weight into its diff: the gradient of the total loss w.r.t. it."""
        for top, w in self.loss_terms:
            top.diff[...] = w

    def blob_bytes(self):
        """Bytes held by the net's blobs and parameters, data and diff (shared buffers counted once)."""
        buffers = {}
        for blob in list(self.blobs.values()) + [b for blobs in self.params.values() for b in blobs]:
            for buf in (blob._data_owner._data_buf, blob._diff_owner._diff_buf):
                buffers[id(buf)] = buf.nbytes
        return sum(buffers.values())

    def batch_size(self):
        """The leading dimension of the first layer's first top (the data batch)."""
        for tops in self.top_vecs:
            if tops and tops[0].shape:
                return tops[0].shape[0]
        return 0

    def current_loss(self):
        return float(sum(float(np.sum(top.data)) * w for top, w in self.loss_terms))

    def backward_layers(self, start=None, end=0, on_layer_done=None):
        """Runs layers [end, start] backward, in reverse.

        ``on_layer_done(layer_index, layer)`` is called as soon as a layer's parameter gradients are
        final; the communicator hooks in here to start that layer's gradient allreduce.
        """
        self.seed_loss_diffs()
        with blas_single_threaded():
            for last, first, run in self.backward_units(start, end):
                if run is None:
                    continue
                run()
                if on_layer_done is not None:
                    for j in range(last, first - 1, -1):
                        if self.layers[j].blobs:
                            on_layer_done(j, self.layers[j])

    def forward(self, blobs=None, start=None, end=None, **inputs):
        """pycaffe's ``net.forward(**inputs)``: sets input blobs, runs, returns the output blobs' data."""
        arrays = {}
        for name, value in inputs.items():
            if name not in self.blobs:
                raise MinicaffeError(f"net '{self.name}' has no blob named '{name}'")
            arrays[name] = np.asarray(value, dtype=self.blobs[name].dtype)
        reshaped = [name for name, a in arrays.items() if a.shape != self.blobs[name].shape]
        for name in reshaped:
            self.blobs[name].reshape(arrays[name].shape)
        if reshaped:
            self.reshape()
        for name, a in arrays.items():
            self.blobs[name].data[...] = a
        start_i = self.layer_names.index(start) if start else 0
        end_i = self.layer_names.index(end) if end else len(self.layers) - 1
        self.forward_layers(start_i, end_i)
        names = [t.name for t in self.top_vecs[end_i]] if end else list(self.outputs)
        names += [b for b in (blobs or []) if b not in names]
        return {name: self.blobs[name].data for name in names}

    def backward(self, diffs=None, start=None, end=None, on_layer_done=None, **output_diffs):
        """pycaffe's ``net.backward(**diffs)``: sets output diffs, runs backward, returns input diffs.

        Without output diffs, loss layers seed the backward pass with their loss weights.
        """
        start_i = self.layer_names.index(start) if start else len(self.layers) - 1
        end_i = self.layer_names.index(end) if end else 0
        if output_diffs:
            for name, value in output_diffs.items():
                if name not in self.blobs:
                    raise MinicaffeError(f"net '{self.name}' has no blob named '{name}'")
                self.blobs[name].diff[...] = value
            saved, self.loss_terms = self.loss_terms, []
            try:
                self.backward_layers(start_i, end_i, on_layer_done)
            finally:
                self.loss_terms = saved
        else:
            self.backward_layers(start_i, end_i, on_layer_done)
        names = list(self.inputs) + [b for b in (diffs or []) if b not in self.inputs]
        return {name: self.blobs[name].diff for name in names}

    def forward_backward(self, on_layer_done=None):
        loss = self.forward_layers()
        self.backward_layers(on_layer_done=on_layer_done)
        return loss

    def clear_param_diffs(self):
        for blob in self.learnable_params:
            fill_zero(blob.diff.reshape(-1))

    # -- weights -----------------------------------------------------------------------------------
    def to_proto(self, write_diff=False):
        param = pb.NetParameter(name=self.name)
        for layer in self.layers:
            lp = param.layer.add()
            lp.CopyFrom(layer.param)
            del lp.blobs[:]
            for blob in layer.blobs:
                blob.to_proto(lp.blobs.add(), write_diff)
        return param

    def save(self, path, write_diff=False):
        """Writes the weights atomically: in Caffe's HDF5 layout when ``path`` ends in .h5, otherwise as
        a binary .caffemodel; BVLC Caffe reads both."""
        if os.fspath(path).endswith(".h5"):
            hdf5_io.save_net_hdf5(self, path, write_diff)
        else:
            prototxt.write_binary_atomic(path, self.to_proto(write_diff))

    def copy_from(self, source, require_all=False):
        """Loads weights from a .caffemodel path or a NetParameter, matching layers by name.

        Layers of the file that the net lacks are ignored, as in Caffe. With ``require_all`` (used when
        resuming) every layer of the net that has parameters must be found in the file.
        """
        if isinstance(source, (str, os.PathLike)) and hdf5_io.is_hdf5_file(source):
            hdf5_io.load_net_hdf5(self, source, require_all)
            return
        if isinstance(source, (str, os.PathLike)):
            where = str(source)
            source = prototxt.read_binary(where, pb.NetParameter(), "caffemodel")
        else:
            where = "weights"
        if require_all:
            found = {lp.name for lp in source.layer if lp.blobs}
            missing = [name for name in self.params if name not in found]
            if missing:
                raise MinicaffeError(f"{where}: has no weights for layer(s) {', '.join(missing)}")
        for lp in source.layer:
            if lp.name not in self.layer_dict or not lp.blobs:
                continue
            target = self.layer_dict[lp.name]
            if len(lp.blobs) != len(target.blobs):
                raise MinicaffeError(f"{where}: layer '{lp.name}' has {len(lp.blobs)} blobs in the file but "
                                     f"{len(target.blobs)} in the net")
            for j, (blob_proto, blob) in enumerate(zip(lp.blobs, target.blobs)):
                blob.from_proto(blob_proto, reshape=False, what=f"{where}: layer '{lp.name}' blob {j}")

    def set_input_arrays(self, data, labels):
        """pycaffe's ``net.set_input_arrays``: feeds the arrays to the first MemoryData layer (its reset)."""
        memory_data = next((layer for layer in self.layers if layer.type_name == "MemoryData"), None)
        if memory_data is None:
            raise MinicaffeError(f"net '{self.name}': set_input_arrays needs a MemoryData layer")
        memory_data.reset(data, labels)

    def share_weights_from(self, other):
        """Makes same-named layers use ``other``'s parameter data (Caffe's ShareTrainedLayersWith)."""
        for name, blobs in other.params.items():
            if name not in self.layer_dict:
                continue
            mine = self.layer_dict[name].blobs
            if len(mine) != len(blobs):
                raise MinicaffeError(f"layer '{name}' has {len(mine)} parameter blobs in net '{self.name}' "
                                     f"({'TRAIN' if self.phase == TRAIN else 'TEST'}) but {len(blobs)} in the other")
            for target, source in zip(mine, blobs):
                if target.shape != source.shape:
                    raise MinicaffeError(f"layer '{name}': parameter shape {target.shape} differs from "
                                         f"{source.shape} in the net it shares weights with")
                target.share_data(source)

    def set_data_position(self, batch_index):
        """Makes every data layer produce batch number ``batch_index`` next (used when resuming)."""
        for layer in self.layers:
            if hasattr(layer, "set_position"):
                layer.set_position(batch_index)

    def close(self):
        """Stops background work (data prefetch threads)."""
        for layer in self.layers:
            if hasattr(layer, "close"):
                layer.close()

    def __repr__(self):
        return f"Net({self.name!r}, {len(self.layers)} layers, phase={'TRAIN' if self.phase == TRAIN else 'TEST'})"


def _layer_lines(param, layer_lines):
    if layer_lines and len(layer_lines) == len(param.layer):
        return list(layer_lines)
    return [None] * len(param.layer)


def _with_input_layer(param):
    """Turns the deprecated net-level ``input`` fields into an Input layer, as Caffe's UpgradeNetInput."""
    layers = list(param.layer)
    if not param.input:
        return layers
    lp = pb.LayerParameter(name="input", type="Input")
    lp.top.extend(param.input)
    if param.input_shape:
        for shape in param.input_shape:
            lp.input_param.shape.add().CopyFrom(shape)
    elif param.input_dim:
        if len(param.input_dim) != 4 * len(param.input):
            raise MinicaffeError(f"net '{param.name}': input_dim needs 4 values per input")
        for i in range(len(param.input)):
            lp.input_param.shape.add().dim.extend(param.input_dim[4 * i: 4 * i + 4])
    return [lp] + layers


def _rule_met(state, rule):
    if rule.HasField("phase") and rule.phase != state.phase:
        return False
    if rule.HasField("min_level") and state.level < rule.min_level:
        return False
    if rule.HasField("max_level") and state.level > rule.max_level:
        return False
    if any(stage not in state.stage for stage in rule.stage):
        return False
    return not any(stage in state.stage for stage in rule.not_stage)


def _state_includes(state, lp, where):
    if lp.include and lp.exclude:
        raise MinicaffeError(f"{where + ': ' if where else ''}layer '{lp.name}': specify either include or "
                             f"exclude rules, not both")
    if lp.include:
        return any(_rule_met(state, rule) for rule in lp.include)
    return not any(_rule_met(state, rule) for rule in lp.exclude)


def _insert_splits(kept):
    """Inserts a Split layer after every top that feeds more than one consumer (Caffe's InsertSplits).

    A top that carries a loss weight and also feeds another layer counts the loss as one consumer.
    """
    producer = {}           # blob name -> (layer index, top index) of its latest producer
    consumers = collections.Counter()
    bottom_source = {}      # (layer index, bottom index) -> producer key
    for i, (lp, _) in enumerate(kept):
        for j, name in enumerate(lp.bottom):
            if name in producer:
                key = producer[name]
                bottom_source[(i, j)] = key
                consumers[key] += 1
        for k, name in enumerate(lp.top):
            producer[name] = (i, k)
            if k < len(lp.loss_weight) and lp.loss_weight[k] != 0:
                consumers[(i, k)] += 1

    if all(n <= 1 for n in consumers.values()):
        return kept
    result = []
    next_split_use = collections.Counter()
    for i, (lp, line) in enumerate(kept):
        lp_new = pb.LayerParameter()
        lp_new.CopyFrom(lp)
        for j, name in enumerate(lp.bottom):
            key = bottom_source.get((i, j))
            if key is not None and consumers[key] > 1:
                src_layer = kept[key[0]][0]
                lp_new.bottom[j] = _split_blob_name(src_layer.name, name, key[1], next_split_use[key])
                next_split_use[key] += 1
        result.append((lp_new, line))
        for k, name in enumerate(lp.top):
            n = consumers[(i, k)]
            if n <= 1:
                continue
            split = pb.LayerParameter(name=f"{name}_{lp.name}_{k}_split", type="Split")
            split.bottom.append(name)
            split.top.extend(_split_blob_name(lp.name, name, k, s) for s in range(n))
            if k < len(lp.loss_weight) and lp.loss_weight[k] != 0:
                # The loss moves to the split's first output, which no layer consumes.
                split.loss_weight.extend([lp.loss_weight[k]] + [0.0] * (n - 1))
                lp_new.loss_weight[k] = 0
                next_split_use[(i, k)] = 1
            result.append((split, line))
    return result


def _split_blob_name(layer_name, blob_name, top_index, split_index):
    return f"{blob_name}_{layer_name}_{top_index}_split_{split_index}"

"""Solver base class: the iteration loop, testing, display, lr policies, snapshot and restore.

This follows Caffe's solver.cpp and sgd_solver.cpp, so that logs and snapshots look the same. A
subclass owns one thing: the update rule for one parameter blob (``compute_update_value``). The
order of operations per iteration is Caffe's: clip by global norm, normalize by iter_size, regularize
(L2 or L1 times decay_mult), compute the update, apply it.
"""
import math
import os
import signal
import time

import numpy as np

from .. import hdf5_io, prototxt, rng
from ..comm import CommConfig, create_distribution, create_session, environment
from ..comm.data_parallel import broadcast_weights, setup_data_parallel
from ..comm.deferred import DeferredUpdates
from ..errors import MinicaffeError
from ..log import close_progress_bar, fmt, get_logger, output_line, progress_bar
from ..net import Net
from ..proto import minicaffe_pb2 as pb

log = get_logger()

_SOLVERS = {}
# Caffe's deprecated solver_type enum, by value.
_LEGACY_TYPES = {0: "SGD", 1: "Nesterov", 2: "AdaGrad", 3: "RMSProp", 4: "AdaDelta", 5: "Adam"}


def register_solver(type_name):
    def decorate(cls):
        _SOLVERS[type_name] = cls
        cls.type_name = type_name
        return cls
    return decorate


def get_solver(solver, source=None, comm_config=None):
    """Builds the solver a SolverParameter (or a solver prototxt path) asks for.

    ``source`` names the file a SolverParameter came from, for messages and relative net paths;
    ``comm_config`` (a CommConfig) says how gradients are reduced when mpiexec started several ranks.
    """
    from . import sgd  # noqa: F401  (registers the built-in solvers)
    if isinstance(solver, (str, os.PathLike)):
        source = str(solver)
        solver = prototxt.read_solver(source)
    type_name = solver.type
    if not solver.HasField("type") and solver.HasField("solver_type"):
        type_name = _LEGACY_TYPES[solver.solver_type]
    cls = _SOLVERS.get(type_name)
    if cls is None:
        raise MinicaffeError(f"{source or 'solver'}: solver type '{type_name}' is not available in minicaffe "
                             f"(available: {', '.join(sorted(_SOLVERS))})")
    return cls(solver, source=source, comm_config=comm_config)


class StopRequest:
    """What a signal asks of the training loop; Caffe's SolverAction."""
    NONE, STOP, SNAPSHOT = "none", "stop", "snapshot"


class Solver:
    type_name = "Solver"

    def __init__(self, param, source=None, comm_config=None):
        self.param = param
        self.source = source
        self.iter = 0
        self.current_step = 0
        self.requested_early_exit = False
        self._pending_action = StopRequest.NONE
        self.sigint_effect = StopRequest.STOP
        self.sighup_effect = StopRequest.SNAPSHOT
        self._losses = []
        self.smoothed_loss = 0.0
        if param.random_seed >= 0:
            rng.set_seed(param.random_seed)
        self._check_param()
        self.comm_config = (comm_config or CommConfig()).check()
        self.env = environment()
        self.dist = create_distribution(self.env, self.comm_config.timeout_s)
        self.net = self._build_train_net()
        self.test_nets = self._build_test_nets()
        for net in self.test_nets:
            net.share_weights_from(self.net)
        self.history = [np.zeros(p.shape, dtype=np.float32) for p in self.net.learnable_params]
        if self.dist.size > 1:
            setup_data_parallel([self.net, *self.test_nets], self.dist)
            # Ranks must start from the same weights even when no random_seed makes their fills equal
            # and the caller steps without solve(); solve() broadcasts again after restore or finetune.
            broadcast_weights(self.net, self.dist)
        self.comm = create_session(self.net, self.dist, self.comm_config, self.env)
        self._deferred = (DeferredUpdates(self.comm, self.net, self._update_param)
                          if self.comm.defers_updates else None)

    # -- building ----------------------------------------------------------------------------------
    def _where(self):
        return self.source or "solver"

    def _check_param(self):
        p = self.param
        if p.average_loss < 1:
            raise MinicaffeError(f"{self._where()}: average_loss must be at least 1")
        if p.iter_size < 1:
            raise MinicaffeError(f"{self._where()}: iter_size must be at least 1")
        if p.lr_policy not in LR_POLICIES:
            raise MinicaffeError(f"{self._where()}: unknown lr_policy '{p.lr_policy}' "
                                 f"(known: {', '.join(sorted(LR_POLICIES))})")

    def _resolve(self, path):
        """Caffe resolves net paths against the working directory; we also try the solver's folder."""
        if os.path.exists(path) or self.source is None:
            return path
        beside = os.path.join(os.path.dirname(self.source), path)
        return beside if os.path.exists(beside) else path

    def _read_net(self, path):
        return prototxt.read_net(self._resolve(path))

    def _net_from(self, param_or_path, state):
        stages = list(state.stage)
        p = self.param
        # The solver's precision settings replace the nets' own; debug_info prints the statistics.
        precision = dict(precision=p.precision if p.HasField("precision") else None,
                         precision_param=p.precision_param if p.HasField("precision_param") else None,
                         precision_stats_interval=p.display if p.debug_info or p.precision_param.precision_stats
                         else 0)
        if isinstance(param_or_path, str):
            return Net(self._resolve(param_or_path), phase=state.phase, level=state.level, stages=stages,
                       **precision)
        return Net(param_or_path, phase=state.phase, level=state.level, stages=stages, **precision)

    def _build_train_net(self):
        p = self.param
        sources = [f for f in ("train_net_param", "train_net", "net_param", "net") if p.HasField(f)]
        if len(sources) != 1:
            raise MinicaffeError(f"{self._where()}: exactly one train net must be given with one of net, "
                                 f"net_param, train_net, train_net_param (found: {', '.join(sources) or 'none'})")
        state = pb.NetState(phase=pb.TRAIN)
        state.MergeFrom(p.train_state)
        state.phase = pb.TRAIN
        field = sources[0]
        log.info(f"Creating training net from {field}" + (f" file: {getattr(p, field)}" if field in ("net", "train_net") else ""))
        return self._net_from(getattr(p, field), state)

    def _build_test_nets(self):
        p = self.param
        specs = [param for param in p.test_net_param] + [path for path in p.test_net]
        generic = p.net_param if p.HasField("net_param") else (p.net if p.HasField("net") else None)
        if generic is not None:
            specs += [generic] * max(0, len(p.test_iter) - len(specs))
        if len(specs) != len(p.test_iter):
            raise MinicaffeError(f"{self._where()}: test_iter must be given once per test net "
                                 f"({len(specs)} test nets, {len(p.test_iter)} test_iter)")
        if p.test_state and len(p.test_state) != len(specs):
            raise MinicaffeError(f"{self._where()}: test_state must be given once per test net")
        nets = []
        for i, spec in enumerate(specs):
            state = pb.NetState(phase=pb.TEST)
            if p.test_state:
                state.MergeFrom(p.test_state[i])
            state.phase = pb.TEST
            log.info(f"Creating test net (#{i}) specified by " + ("net file" if isinstance(spec, str) else "net_param"))
            nets.append(self._net_from(spec, state))
        return nets

    # -- the loop ----------------------------------------------------------------------------------
    def solve(self, resume_file=None):
        log.info(f"Solving {self.net.name}")
        log.info(f"Learning Rate Policy: {self.param.lr_policy}")
        if resume_file:
            log.info(f"Restoring previous solver status from {resume_file}")
            self.restore(resume_file)
        if self.dist.size > 1:
            broadcast_weights(self.net, self.dist)
            log.info(f"Data parallel over {self.dist.size} ranks: each reads its shard of a global batch of "
                     f"{self.dist.size} x batch_size; gradients are averaged over the ranks")
        with _signal_actions(self):
            self.step(self.param.max_iter - self.iter)
        p = self.param
        if p.snapshot_after_train and (not p.snapshot or self.iter % p.snapshot != 0):
            self.snapshot()
        if self.requested_early_exit:
            log.info("Optimization stopped early.")
            return
        if p.display and self.iter % p.display == 0:
            loss = self.net.forward_layers()
            self._update_smoothed_loss(loss, self.iter, p.average_loss)
            log.info(f"Iteration {self.iter}, loss = {fmt(self._mean_over_ranks(self.smoothed_loss))}")
        if p.test_interval and self.iter % p.test_interval == 0:
            self.test_all()
        if self.comm.statistics is not None:
            self.comm.statistics.report(log, per_layer=self.comm_config.stats)
        log.info("Optimization Done.")

    def step(self, iters):
        p = self.param
        start_iter = self.iter
        stop_iter = self.iter + iters
        self._losses = []
        self.smoothed_loss = 0.0
        last_display_iter, last_display_time = self.iter, time.perf_counter()
        bar = progress_bar(total=p.max_iter or stop_iter, initial=self.iter)
        deferred = self._deferred
        if deferred is not None:
            self.net.before_forward = deferred.before_forward
        try:
            while self.iter < stop_iter:
                if deferred is None or not deferred.pending:
                    # Deferred updates clear each layer's gradients right after updating it instead.
                    self.net.clear_param_diffs()
                if p.test_interval and self.iter % p.test_interval == 0 and (self.iter > 0 or p.test_initialization):
                    self.test_all()
                    if self.requested_early_exit:
                        break
                display = p.display and self.iter % p.display == 0
                loss = 0.0
                for k in range(p.iter_size):
                    loss += self._forward_backward(last=k == p.iter_size - 1)
                loss /= p.iter_size
                self._update_smoothed_loss(loss, start_iter, p.average_loss)
                if display:
                    now = time.perf_counter()
                    lapse = now - last_display_time
                    per_s = (self.iter - last_display_iter) / lapse if lapse > 0 else 0.0
                    log.info(f"Iteration {self.iter} ({fmt(per_s)} iter/s, {fmt(lapse)}s/{p.display} iters), "
                             f"loss = {fmt(self._mean_over_ranks(self.smoothed_loss))}")
                    last_display_iter, last_display_time = self.iter, now
                    self._log_outputs(self.net, "Train")
                self.apply_update(display)
                self.iter += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{self.smoothed_loss:.4g}", refresh=False)
                action = self._agreed_action()
                if (p.snapshot and self.iter % p.snapshot == 0) or action == StopRequest.SNAPSHOT:
                    self.snapshot()
                if action == StopRequest.STOP:
                    self.requested_early_exit = True
                    break
            self.finish_updates()
        finally:
            self.net.before_forward = None
            close_progress_bar(bar)

    def _forward_backward(self, last):
        """One forward and backward; the last of an iteration starts each layer's gradient reduction."""
        return self.net.forward_backward(on_layer_done=self.comm.on_layer_done if last else None)

    def finish_updates(self):
        """Applies updates still deferred into the next forward (before testing, snapshotting, returning)."""
        if self._deferred is not None:
            self._deferred.flush()

    def _mean_over_ranks(self, value):
        if self.dist.size == 1:
            return value
        return float(self.dist.sum_across_ranks([value], "mean of the loss")[0]) / self.dist.size

    def _agreed_action(self):
        """This rank's signal action, or, under MPI, the strongest any rank got (so all ranks agree)."""
        action = self._take_action()
        if self.dist.size == 1:
            return action
        votes = self.dist.sum_across_ranks([action == StopRequest.STOP, action == StopRequest.SNAPSHOT],
                                           "agreement on stop/snapshot requests")
        return StopRequest.STOP if votes[0] else StopRequest.SNAPSHOT if votes[1] else StopRequest.NONE

    def _update_smoothed_loss(self, loss, start_iter, average_loss):
        if len(self._losses) < average_loss:
            self._losses.append(loss)
            n = len(self._losses)
            self.smoothed_loss = (self.smoothed_loss * (n - 1) + loss) / n
        else:
            idx = (self.iter - start_iter) % average_loss
            self.smoothed_loss += (loss - self._losses[idx]) / average_loss
            self._losses[idx] = loss

    def _log_outputs(self, net, label):
        index = 0
        weights = {top.name: w for top, w in net.loss_terms}
        means = {}
        if self.dist.size > 1:
            local = [net.blobs[name].data.ravel() for name in net.outputs]
            total = self.dist.sum_across_ranks(np.concatenate(local) if local else [], "mean of the outputs")
            for name, part in zip(net.outputs, np.split(total / self.dist.size, np.cumsum([v.size for v in local]))):
                means[name] = part
        for name in net.outputs:
            values = means[name] if means else net.blobs[name].data.ravel()
            w = weights.get(name, 0.0)
            for value in values:
                log.info(f"    {label} net output #{index}: {output_line(name, value, w)}")
                index += 1

    # -- testing -----------------------------------------------------------------------------------
    def test_all(self):
        self.finish_updates()
        return [self.test(i) for i in range(len(self.test_nets))]

    def test(self, test_net_id=0):
        """Runs test_iter forward passes of a test net and logs the mean of each output."""
        log.info(f"Iteration {self.iter}, Testing net (#{test_net_id})")
        net = self.test_nets[test_net_id]
        iterations = self.param.test_iter[test_net_id]
        ranks = self.dist.size
        # test_iter counts batches of one process; the ranks share them, each reading its own shard.
        local_iterations = -(-iterations // ranks)
        if local_iterations * ranks != iterations:
            log.warning(f"test_iter {iterations} is not a multiple of the {ranks} ranks: testing "
                        f"{local_iterations * ranks} batches")
        sums = {}
        loss = 0.0
        for _ in range(local_iterations):
            if ranks == 1 and self._take_action() == StopRequest.STOP:
                self.requested_early_exit = True
                log.info("Test interrupted.")
                return None
            loss += net.forward_layers()
            for name in net.outputs:
                values = net.blobs[name].data.astype(np.float64).ravel()
                sums[name] = sums.get(name, 0.0) + values
        if ranks > 1:
            loss, sums, iterations = self._summed_over_ranks(loss, sums, local_iterations)
        if self.param.test_compute_loss:
            log.info(f"Test loss: {fmt(loss / iterations)}")
        weights = {top.name: w for top, w in net.loss_terms}
        scores = {}
        index = 0
        for name in net.outputs:
            means = sums[name] / iterations
            w = weights.get(name, 0.0)
            for value in means:
                log.info(f"    Test net output #{index}: {output_line(name, value, w)}")
                index += 1
            scores[name] = float(means[0]) if means.size == 1 else means
        return scores

    def _summed_over_ranks(self, loss, sums, local_iterations):
        """Test loss and output sums over every rank's shard, and the number of batches they cover."""
        names = list(sums)
        total = self.dist.sum_across_ranks(np.concatenate([[loss], *[sums[n] for n in names]]),
                                           "reduction of the test outputs")
        parts = np.split(total[1:], np.cumsum([sums[n].size for n in names])[:-1]) if names else []
        return float(total[0]), dict(zip(names, parts)), local_iterations * self.dist.size

    # -- the update --------------------------------------------------------------------------------
    def learning_rate(self):
        return LR_POLICIES[self.param.lr_policy](self)

    def apply_update(self, display=False):
        """Caffe's ApplyUpdate, one parameter at a time so that each waits only for its own reduction.

        Clipping needs the norm of all reduced gradients, so it waits for all of them first; with
        deferred updates (--comm_overlap=forward) the per-parameter part runs in the next forward.
        """
        rate = self.learning_rate()
        if display:
            log.info(f"Iteration {self.iter}, lr = {fmt(rate)}")
        self.comm.gradients_ready()
        if self.param.clip_gradients >= 0:
            self.comm.wait_all()
            self.clip_gradients()
        if self._deferred is not None:
            self._deferred.defer(rate)
            return
        # Output side first: those reductions were issued first in backward, so they finish first.
        for i in reversed(range(len(self.net.learnable_params))):
            self.comm.wait_param(i)
            self._update_param(i, rate)

    def _update_param(self, i, rate):
        """Normalize, regularize, compute the update value, apply it: for parameter ``i`` alone.

        A subclass may override this with a fused kernel that does the same steps in one pass.
        """
        blob = self.net.learnable_params[i]
        self.normalize(blob)
        self.regularize(i, blob)
        self.compute_update_value(i, blob, rate)
        np.subtract(blob.data, blob.diff, out=blob.data)

    def clip_gradients(self):
        clip = self.param.clip_gradients
        if clip < 0:
            return
        sumsq = sum(float(np.dot(b.diff.ravel(), b.diff.ravel())) for b in self.net.learnable_params)
        l2norm = math.sqrt(sumsq)
        if l2norm > clip:
            scale = clip / l2norm
            log.info(f"Gradient clipping: scaling down gradients (L2 norm {fmt(l2norm)} > {fmt(clip)}) "
                     f"by scale factor {fmt(scale)}")
            for b in self.net.learnable_params:
                b.diff[...] *= np.float32(scale)

    def normalize(self, blob):
        if self.param.iter_size > 1:
            blob.diff[...] *= np.float32(1.0 / self.param.iter_size)

    def local_decay(self, i):
        """Parameter ``i``'s weight decay, rounded to float32 as Caffe's Dtype, and the regularization type."""
        decay = np.float32(self.param.weight_decay * self.net.params_weight_decay[i])
        kind = self.param.regularization_type
        if decay and kind not in ("L1", "L2"):
            raise MinicaffeError(f"{self._where()}: unknown regularization_type '{kind}' (L1 or L2)")
        return decay, kind

    def regularize(self, i, blob):
        decay, kind = self.local_decay(i)
        if not decay:
            return
        if kind == "L2":
            blob.diff[...] += decay * blob.data
        else:
            blob.diff[...] += decay * np.sign(blob.data)

    def compute_update_value(self, i, blob, rate):
        raise NotImplementedError

    # -- snapshots ---------------------------------------------------------------------------------
    def snapshot_filename(self, extension):
        return f"{self.param.snapshot_prefix}_iter_{self.iter}{extension}"

    def snapshot(self):
        """Writes the weights and the solver state (rank 0 only; every rank holds the same)."""
        if not self.param.snapshot_prefix:
            raise MinicaffeError(f"{self._where()}: snapshot needs snapshot_prefix")
        self.finish_updates()
        if self.dist.rank != 0:
            return None, None
        folder = os.path.dirname(self.param.snapshot_prefix)
        if folder:
            os.makedirs(folder, exist_ok=True)
        hdf5 = self.param.snapshot_format == pb.SolverParameter.HDF5
        kind, suffix = ("HDF5", ".h5") if hdf5 else ("binary proto", "")
        model = self.snapshot_filename(".caffemodel" + suffix)
        log.info(f"Snapshotting to {kind} file {model}")
        self.net.save(model, write_diff=self.param.snapshot_diff)
        state_file = self.snapshot_filename(".solverstate" + suffix)
        log.info(f"Snapshotting solver state to {kind} file {state_file}")
        if hdf5:
            hdf5_io.save_solver_state_hdf5({"iter": self.iter, "learned_net": model,
                                            "current_step": self.current_step, "history": self.history},
                                           state_file)
        else:
            state = pb.SolverState(iter=self.iter, learned_net=model, current_step=self.current_step)
            for h in self.history:
                proto = state.history.add()
                proto.shape.dim.extend(h.shape)
                proto.data.extend(h.ravel())
            prototxt.write_binary_atomic(state_file, state)
        return model, state_file

    def restore(self, state_file):
        if str(state_file).endswith(".h5"):
            state = hdf5_io.load_solver_state_hdf5(state_file)
            history = state["history"]
            self.iter, self.current_step, learned = state["iter"], state["current_step"], state["learned_net"]
        else:
            state = prototxt.read_binary(state_file, pb.SolverState(), "solverstate")
            history = [np.asarray(proto.data, dtype=np.float32) for proto in state.history]
            self.iter, self.current_step, learned = state.iter, state.current_step, state.learned_net
        if learned:
            if not os.path.exists(learned):
                beside = os.path.join(os.path.dirname(str(state_file)), os.path.basename(learned))
                learned = beside if os.path.exists(beside) else learned
            self.net.copy_from(learned, require_all=True)
        if len(history) != len(self.history):
            raise MinicaffeError(f"{state_file}: holds {len(history)} history blobs, the net has "
                                 f"{len(self.history)} learnable parameters")
        for i, (h, values) in enumerate(zip(self.history, history)):
            if values.size != h.size:
                raise MinicaffeError(f"{state_file}: history blob {i} has {values.size} values, "
                                     f"the parameter has {h.size}")
            h[...] = values.reshape(h.shape)
        self.net.set_data_position(self.iter * self.param.iter_size)

    def close(self):
        self.comm.close()
        for net in [self.net, *self.test_nets]:
            net.close()

    # -- signals -----------------------------------------------------------------------------------
    def request(self, action):
        self._pending_action = action

    def _take_action(self):
        action, self._pending_action = self._pending_action, StopRequest.NONE
        return action


class _signal_actions:
    """While training, SIGINT and SIGHUP ask the loop to stop or snapshot (Caffe's --sigint_effect)."""

    def __init__(self, solver):
        self.solver = solver
        self.saved = {}

    def __enter__(self):
        effects = {signal.SIGINT: self.solver.sigint_effect, signal.SIGHUP: self.solver.sighup_effect}
        for sig, effect in effects.items():
            if effect == StopRequest.NONE:
                continue
            try:
                self.saved[sig] = signal.signal(sig, lambda *_ , e=effect: self.solver.request(e))
            except ValueError:  # not the main thread: signals stay with the caller
                pass
        return self

    def __exit__(self, *exc):
        for sig, handler in self.saved.items():
            signal.signal(sig, handler)


# -- learning-rate policies, computed with Caffe's float/double promotions --------------------------
def _lr_fixed(s):
    return float(np.float32(s.param.base_lr))


def _lr_step(s):
    p = s.param
    if p.stepsize <= 0:
        raise MinicaffeError(f"{s._where()}: lr_policy 'step' needs a positive stepsize")
    s.current_step = s.iter // p.stepsize
    return float(np.float32(p.base_lr * math.pow(p.gamma, s.current_step)))


def _lr_exp(s):
    p = s.param
    return float(np.float32(p.base_lr * math.pow(p.gamma, s.iter)))


def _lr_inv(s):
    p = s.param
    f32 = np.float32
    base = f32(1) + f32(p.gamma) * f32(s.iter)
    return float(f32(p.base_lr) * np.power(base, f32(-p.power)))


def _lr_multistep(s):
    p = s.param
    if s.current_step < len(p.stepvalue) and s.iter >= p.stepvalue[s.current_step]:
        s.current_step += 1
        log.info(f"MultiStep Status: Iteration {s.iter}, step = {s.current_step}")
    return float(np.float32(p.base_lr * math.pow(p.gamma, s.current_step)))


def _lr_poly(s):
    p = s.param
    if p.max_iter <= 0:
        raise MinicaffeError(f"{s._where()}: lr_policy 'poly' needs a positive max_iter")
    f32 = np.float32
    remaining = f32(1) - f32(s.iter) / f32(p.max_iter)
    return float(f32(p.base_lr) * np.power(remaining, f32(p.power)))


def _lr_sigmoid(s):
    p = s.param
    f32 = np.float32
    z = -f32(p.gamma) * (f32(s.iter) - f32(p.stepsize))
    return float(f32(p.base_lr) * (f32(1) / (f32(1) + np.exp(z))))


LR_POLICIES = {"fixed": _lr_fixed, "step": _lr_step, "exp": _lr_exp, "inv": _lr_inv,
               "multistep": _lr_multistep, "poly": _lr_poly, "sigmoid": _lr_sigmoid}

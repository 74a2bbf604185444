"""The gradient-reduction session: one ParameterSet per learnable layer, fused into buckets.

Backward calls ``on_layer_done(i, layer)`` as soon as layer i's parameter gradients are final; its
ParameterSet then starts (``start_gradient_comm``). A bucket fuses the gradients of consecutive layers
(in backward order) until it holds ``bucket_mb``; when its last layer has started, its values are packed
into one float32 buffer and a non-blocking allreduce is issued, while backward goes on with the layers
below. The solver waits for a parameter (``wait_param``) just before it updates it; the reduced sum is
divided by the rank count there, so the update sees the gradient of the global batch.

Progress: MPI moves a non-blocking collective forward only inside MPI calls. ``progress='test'`` tests
the requests in flight between layers (in backward, and in the next forward when updates are deferred);
``progress='thread'`` has a thread test them every ``poll_s`` (needs MPI_THREAD_MULTIPLE).

Priority: buckets become ready from the output side first. MPI needs every rank to issue its
collectives in the same order, so the order may not depend on when a rank sees a collective finish
(a rank-local priority queue driven by completions mismatches collectives or deadlocks). With
``priority`` the first ``max_in_flight`` buckets of a backward pass go out as soon as they are ready and
the others are held until backward ends, then issued nearest-the-input first (the ones the next
forward needs first, as MLSL_MSG_PRIORITY intends); without it every bucket goes out when ready.
"""
import dataclasses
import heapq
import threading
import time

import numpy as np

from ..errors import MinicaffeError
from .compression import make_codec
from .distribution import CommTimeout
from .statistics import Statistics

OVERLAP_MODES = ("none", "backward", "forward")
PROGRESS_MODES = ("test", "thread")
COMPRESSION = ("none", "bf16", "int8")


@dataclasses.dataclass
class CommConfig:
    """What the user chose (the ``--comm_*`` flags)."""
    overlap: str = "backward"        # none: blocking allreduce after backward; forward: FW_OVERLAP_OPT
    bucket_mb: float = 4.0
    priority: bool = False
    max_in_flight: int = 1           # with priority: buckets issued during backward, the rest held
    compress: str = "none"
    progress: str = "test"
    poll_s: float = 100e-6           # the progress thread's period
    timeout_s: float = 300.0
    stats: bool = False

    def check(self):
        for field, value, allowed in (("comm_overlap", self.overlap, OVERLAP_MODES),
                                      ("comm_progress", self.progress, PROGRESS_MODES),
                                      ("comm_compress", self.compress, COMPRESSION)):
            if value not in allowed:
                raise MinicaffeError(f"--{field}={value}: expected one of {', '.join(allowed)}")
        if self.bucket_mb < 0:
            raise MinicaffeError("--comm_bucket_mb must not be negative")
        if self.timeout_s <= 0:
            raise MinicaffeError("--comm_timeout must be positive")
        return self


class LocalSession:
    """The single-process session: nothing to reduce, every call returns at once."""

    distributed = False
    rank, size = 0, 1
    statistics = None
    on_layer_done = None
    defers_updates = False

    def gradients_ready(self):
        pass

    def wait_param(self, index):
        pass

    def wait_all(self):
        pass

    def progress(self):
        pass

    def close(self):
        pass


class ParameterSet:
    """The parameter blobs a learnable layer owns, with MLSL's gradient-communication calls."""

    def __init__(self, session, layer_index, layer_name, param_indices, blobs):
        self.session = session
        self.layer_index = layer_index
        self.layer_name = layer_name
        self.param_indices = param_indices
        self.blobs = blobs
        self.count = sum(b.count for b in blobs)
        self.bucket = None
        self.started_at = None
        self.stats = session.statistics.layer(layer_name)

    @property
    def started(self):
        return self.started_at is not None

    def start_gradient_comm(self):
        # Packing and issuing a bucket (when this is its last member) hold up compute: they count as
        # exposed communication, like the wait.
        self.started_at = time.perf_counter()
        self.bucket.member_started(self.session)
        self.stats.exposed_s += time.perf_counter() - self.started_at

    def test_gradient_comm(self):
        """True once the reduced gradients are in the blobs' diffs."""
        self.session.progress()
        return self.bucket.done

    def wait_gradient_comm(self):
        if not self.started:
            return
        t = time.perf_counter()
        self.session.wait_bucket(self.bucket)
        self.stats.exposed_s += time.perf_counter() - t
        self.stats.in_flight_s += self.bucket.transferred_at - self.bucket.issued_at
        self.stats.iterations += 1
        self.started_at = None


class Bucket:
    """Consecutive ParameterSets whose gradients travel in one collective."""

    def __init__(self, index, param_sets, distribution, compress):
        self.index = index
        self.param_sets = param_sets
        self.first_layer = min(ps.layer_index for ps in param_sets)
        self.dist = distribution
        self.blobs = [b for ps in param_sets for b in ps.blobs]
        count = sum(b.count for b in self.blobs)
        self.buffer = np.empty(count, np.float32)
        self.codec = make_codec(compress, count)
        if self.codec is not None:
            self.payload = np.empty(self.codec.payload_bytes(count), np.uint8)
            self.gathered = np.empty((distribution.size, self.payload.size), np.uint8)
            self.scratch = np.empty(count, np.float32)
        wire = self.codec.payload_bytes(count) if self.codec else 4 * count
        for ps in param_sets:
            ps.bucket = self
            ps.stats.float32_bytes_per_iter = 4 * ps.count
            ps.stats.bytes_per_iter = round(wire * ps.count / count) if count else 0
        self.started_members = 0
        self.request = None
        self.issued_at = None
        self.transferred = threading.Event()
        self.transferred_at = None
        self.done = False

    def member_started(self, session):
        if self.started_members == 0:
            self.done = False
        self.started_members += 1
        if self.started_members == len(self.param_sets):
            session.ready(self)

    def issue(self):
        offset = 0
        for blob in self.blobs:
            self.buffer[offset: offset + blob.count] = blob.diff.reshape(-1)
            offset += blob.count
        self.transferred.clear()
        self.issued_at = time.perf_counter()
        if self.codec is None:
            self.request = self.dist.start_allreduce(self.buffer)
        else:
            self.codec.encode(self.buffer, self.payload)
            self.request = self.dist.start_allgather(self.payload, self.gathered)

    def mark_transferred(self):
        self.transferred_at = time.perf_counter()
        self.transferred.set()

    def unpack(self):
        """Writes the mean over ranks into the blobs' diffs."""
        if self.codec is not None:
            self.buffer[...] = 0
            for payload in self.gathered:
                self.codec.add_decoded(payload, self.buffer, self.scratch)
        inverse = np.float32(1.0 / self.dist.size)
        offset = 0
        for blob in self.blobs:
            np.multiply(self.buffer[offset: offset + blob.count], inverse, out=blob.diff.reshape(-1))
            offset += blob.count
        self.request = None
        self.started_members = 0
        self.done = True


class Session:
    """Data-parallel gradient reduction for one net (MLSL's Session with its ParameterSets)."""

    distributed = True

    def __init__(self, net, distribution, config, env=None):
        self.net = net
        self.dist = distribution
        self.config = config
        self.rank, self.size = distribution.rank, distribution.size
        self.statistics = Statistics()
        self.param_sets = _parameter_sets(self, net)
        self.param_set_of = {i: ps for ps in self.param_sets for i in ps.param_indices}
        self._by_layer = {ps.layer_index: ps for ps in self.param_sets}
        self.buckets = _plan_buckets(self.param_sets, config.bucket_mb * 2**20, distribution, config.compress)
        self.in_flight = []
        self._busy_since = None
        self._held = []
        self._issued_in_backward = 0
        self.progress_thread = None
        if config.progress == "thread" and env is not None and env.thread_multiple:
            self.progress_thread = ProgressThread(config.poll_s)
        self.on_layer_done = None if config.overlap == "none" else self._on_layer_done
        self.defers_updates = config.overlap == "forward"

    # -- starting ----------------------------------------------------------------------------------
    def _on_layer_done(self, layer_index, layer):
        ps = self._by_layer.get(layer_index)
        if ps is not None and not ps.started:
            ps.start_gradient_comm()
        self.progress()

    def gradients_ready(self):
        """Backward is over: starts whatever has not started (all of it without overlap), then issues
        the held buckets nearest the input first."""
        for ps in self.param_sets:
            if not ps.started:
                ps.start_gradient_comm()
        while self._held:
            self._issue(heapq.heappop(self._held)[1])
        self._issued_in_backward = 0
        self.progress()
        if self.config.overlap == "none":
            # The control: a blocking allreduce of everything after backward, before any update.
            self.wait_all()

    def ready(self, bucket):
        if self.config.priority and self._issued_in_backward >= self.config.max_in_flight:
            heapq.heappush(self._held, (bucket.first_layer, bucket))
        else:
            self._issued_in_backward += 1
            self._issue(bucket)

    def _issue(self, bucket):
        bucket.issue()
        if not self.in_flight:
            self._busy_since = bucket.issued_at
        self.in_flight.append(bucket)
        if self.progress_thread is not None:
            self.progress_thread.watch(bucket)

    # -- progress and completion -------------------------------------------------------------------
    def progress(self):
        """Tests the collectives in flight and unpacks the finished ones."""
        if self.progress_thread is None:
            for bucket in self.in_flight:
                if not bucket.transferred.is_set() and bucket.request.Test():
                    bucket.mark_transferred()
        else:
            self.progress_thread.check()
        finished = [b for b in self.in_flight if b.transferred.is_set()]
        if finished:
            # Not a second is_set() test: the progress thread may mark a bucket between the two, which
            # would then leave in_flight without being unpacked.
            self.in_flight = [b for b in self.in_flight if b not in finished]
            if not self.in_flight:
                # Wall time with at least one collective in flight: buckets in flight together count once.
                self.statistics.collectives_in_flight_s += max(b.transferred_at for b in finished) - self._busy_since
            for bucket in finished:
                bucket.unpack()

    def wait_bucket(self, bucket):
        self.progress()
        while not bucket.done:
            if bucket not in self.in_flight:
                raise RuntimeError(f"bucket {bucket.index} is waited on before it was issued")
            target = bucket
            what = f"gradient allreduce of layer(s) {', '.join(ps.layer_name for ps in target.param_sets)}"
            if self.progress_thread is None:
                self.dist.wait(target.request, what)
                target.mark_transferred()
            elif not target.transferred.wait(self.config.timeout_s):
                self.progress_thread.check()
                raise CommTimeout(f"{what}: the other ranks did not answer within {self.config.timeout_s:g} s")
            self.progress()

    def wait_param(self, index):
        ps = self.param_set_of.get(index)
        if ps is not None:
            ps.wait_gradient_comm()

    def wait_all(self):
        for ps in self.param_sets:
            ps.wait_gradient_comm()

    def param_set_done(self, index):
        """True when parameter ``index`` needs no more waiting (reduced, or never communicated)."""
        ps = self.param_set_of.get(index)
        return ps is None or not ps.started or ps.bucket.done

    def close(self):
        if self.progress_thread is not None:
            self.progress_thread.close()


class ProgressThread:
    """Tests the requests in flight every ``poll_s`` seconds, so MPI progresses while kernels run."""

    def __init__(self, poll_s):
        self.poll_s = poll_s
        self._watched = []
        self._cond = threading.Condition()
        self._closed = False
        self._error = None
        self._thread = threading.Thread(target=self._run, name="minicaffe-comm-progress", daemon=True)
        self._thread.start()

    def watch(self, bucket):
        with self._cond:
            self._watched.append(bucket)
            self._cond.notify()

    def check(self):
        if self._error is not None:
            raise MinicaffeError(f"communication progress thread failed: {self._error}")

    def _run(self):
        try:
            while True:
                with self._cond:
                    while not self._watched and not self._closed:
                        self._cond.wait()
                    if self._closed:
                        return
                    watched = list(self._watched)
                finished = [b for b in watched if b.request.Test()]
                for bucket in finished:
                    bucket.mark_transferred()
                if finished:
                    with self._cond:
                        self._watched = [b for b in self._watched if b not in finished]
                time.sleep(self.poll_s)
        except Exception as err:  # noqa: BLE001  (reported to the main thread by check())
            self._error = err

    def close(self):
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout=5)


def _parameter_sets(session, net):
    """One ParameterSet per layer that owns parameters with a gradient to reduce, in layer order.

    Shared parameters belong to their first layer (Net's owner); parameters with lr_mult 0 and layers
    that skip backward have no gradient, so they are not sent at all.
    """
    index_of = {id(blob): i for i, blob in enumerate(net.learnable_params)}
    param_sets = []
    for layer_index, (name, layer) in enumerate(zip(net.layer_names, net.layers)):
        if not net.layer_need_backward[layer_index]:
            continue
        indices, blobs = [], []
        for j, blob in enumerate(layer.blobs):
            i = index_of.get(id(blob))
            if i is None or not net.params_lr[i] or not layer.param_propagate_down[j]:
                continue
            indices.append(i)
            blobs.append(blob)
        if blobs:
            param_sets.append(ParameterSet(session, layer_index, name, indices, blobs))
    return param_sets


def _plan_buckets(param_sets, bucket_bytes, distribution, compress):
    """Fuses consecutive ParameterSets, in backward order, until a bucket holds ``bucket_bytes``.

    A bucket is also kept to a quarter of the model, so that a small net still gets several buckets
    and its first reductions can start while backward goes on.
    """
    bucket_bytes = min(bucket_bytes, sum(4 * ps.count for ps in param_sets) / 4)
    buckets, members, size = [], [], 0
    for ps in sorted(param_sets, key=lambda ps: -ps.layer_index):
        members.append(ps)
        size += 4 * ps.count
        if size >= bucket_bytes:
            buckets.append(Bucket(len(buckets), members, distribution, compress))
            members, size = [], 0
    if members:
        buckets.append(Bucket(len(buckets), members, distribution, compress))
    return buckets

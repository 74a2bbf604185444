"""Which records each batch holds, and a thread that prepares batches ahead of the net.

Batch contents are a pure function of (seed, batch index), never of how many batches were read
before: that is what lets a resumed run (``start(batch_index)``) see exactly the batches that an
uninterrupted run would have seen, and lets data-parallel ranks split every global batch without
talking to each other.
"""
import queue
import threading
import time
import weakref

import numpy as np

# Tags that keep the seed streams of the different random choices apart.
_EPOCH_ORDER, _AUGMENTATION, _SKIP = 0, 1, 2


class RecordSchedule:
    """Maps a batch index to the indices of its records, for one rank of a data-parallel job.

    The records form one endless stream: epoch after epoch of the ``count`` records, in key order
    (wrapping around, as Caffe does) or, with ``shuffle``, in a permutation seeded by (seed, epoch).
    The stream starts ``skip`` records in (Caffe's ``rand_skip``, drawn from the seed). Global batch b
    is the ``batch_size * num_ranks`` records from position ``b * batch_size * num_ranks``; rank r
    takes the r-th slice of ``batch_size`` of them.
    """

    def __init__(self, count, batch_size, seed, shuffle=False, rand_skip=0, rank=0, num_ranks=1):
        if not 0 <= rank < num_ranks:
            raise ValueError(f"rank {rank} is not in [0, {num_ranks})")
        self.count = count
        self.batch_size = batch_size
        self.seed = seed
        self.shuffle = shuffle
        self.rank = rank
        self.num_ranks = num_ranks
        self.skip = int(np.random.default_rng([seed, _SKIP]).integers(rand_skip)) if rand_skip else 0
        self._orders = {}

    @property
    def global_batch_size(self):
        return self.batch_size * self.num_ranks

    @property
    def shard(self):
        """This rank's slice of a global batch."""
        return slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)

    def records(self, batch_index):
        start = self.skip + batch_index * self.global_batch_size + self.rank * self.batch_size
        positions = np.arange(start, start + self.batch_size, dtype=np.int64)
        epochs, offsets = np.divmod(positions, self.count)
        if not self.shuffle:
            return offsets
        records = np.empty_like(offsets)
        for epoch in np.unique(epochs):
            in_epoch = epochs == epoch
            records[in_epoch] = self.epoch_order(int(epoch))[offsets[in_epoch]]
        return records

    def epoch_order(self, epoch):
        """The permutation of the records for ``epoch``; the last two are kept, a batch spans at most two."""
        order = self._orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.seed, _EPOCH_ORDER, epoch]).permutation(self.count)
            if len(self._orders) >= 2:
                del self._orders[min(self._orders)]
            self._orders[epoch] = order
        return order

    def augmentation_rng(self, batch_index):
        """The generator for the random choices of global batch ``batch_index``, the same on every rank."""
        return np.random.default_rng([self.seed, _AUGMENTATION, batch_index])


class Prefetcher:
    """Runs ``produce(batch_index, buffer)`` in a background thread, ``depth`` batches ahead.

    The ``depth`` buffers (tuples of arrays from ``make_buffer()``) are made once and reused, as
    Caffe's prefetch_free / prefetch_full queues do. An exception raised by ``produce`` is re-raised,
    unchanged, by the next ``fetch_into``. With depth 0 batches are produced on demand, in the
    caller's thread. The thread holds only a weak reference to ``produce``'s owner and ends when that
    owner is collected, or on ``stop()``.
    """

    def __init__(self, produce, make_buffer, depth):
        self.depth = depth
        self.wait_seconds = 0.0
        self._produce = weakref.WeakMethod(produce)
        self._buffers = [make_buffer() for _ in range(max(depth, 1))]
        self._thread = None
        self._next_index = 0
        self._error = None

    def start(self, batch_index):
        """(Re)starts production so that the next ``fetch_into`` returns batch ``batch_index``."""
        self.stop()
        self._next_index = batch_index
        self._error = None
        if self.depth == 0:
            return
        self._stop_event = threading.Event()
        self._free = queue.Queue()
        self._full = queue.Queue()
        for buffer in self._buffers:
            self._free.put(buffer)
        self._thread = threading.Thread(
            target=_produce_batches, name="minicaffe-prefetch", daemon=True,
            args=(self._produce, batch_index, self._stop_event, self._free, self._full))
        self._thread.start()
        self._finalizer = weakref.finalize(self, _signal_stop, self._stop_event, self._free)

    def fetch_into(self, targets):
        """Copies the next batch into ``targets`` (one array or None per buffer array); returns its index."""
        if self.depth == 0:
            buffer = self._buffers[0]
            self._produce()(self._next_index, buffer)
        else:
            if self._error is not None:
                raise self._error
            if self._thread is None:
                raise RuntimeError("Prefetcher.fetch_into before start")
            waited_since = time.perf_counter()
            index, buffer, error = self._full.get()
            self.wait_seconds += time.perf_counter() - waited_since
            if error is not None:
                self._error = error
                raise error
            assert index == self._next_index
        for target, array in zip(targets, buffer):
            if target is not None:
                target[...] = array
        if self.depth:
            self._free.put(buffer)
        self._next_index += 1
        return self._next_index - 1

    @property
    def next_index(self):
        return self._next_index

    def stop(self):
        if self._thread is None:
            return
        self._finalizer.detach()
        _signal_stop(self._stop_event, self._free)
        self._thread.join()
        self._thread = None


def _signal_stop(stop_event, free):
    stop_event.set()
    free.put(None)  # wakes the thread if it waits for a free buffer


def _produce_batches(produce_ref, batch_index, stop_event, free, full):
    while True:
        buffer = free.get()
        if buffer is None or stop_event.is_set():
            return
        error = _produce_one(produce_ref, batch_index, buffer)
        if error is _OWNER_GONE:
            return
        full.put((batch_index, None if error else buffer, error))
        if error:
            return
        batch_index += 1


_OWNER_GONE = object()


def _produce_one(produce_ref, batch_index, buffer):
    """Runs one ``produce`` call and returns the exception it raised, if any."""
    produce = produce_ref()
    if produce is None:
        return _OWNER_GONE
    try:
        produce(batch_index, buffer)
    except BaseException as exc:  # noqa: BLE001  handed to the consumer thread, which re-raises it
        return exc
    return None

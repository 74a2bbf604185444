"""Layers that produce the net's input: Input (shapes only), DummyData (fillers) and Data (records).

A Data layer's batch number b is a pure function of (the layer's seed, b) and of its shard of the
global batch; ``set_position(b)`` restarts it at batch b, which is how a resumed run reads exactly
what an uninterrupted one would have read.
"""
from functools import partial

import numpy as np

from .. import rng
from ..data import open_source
from ..data.prefetch import Prefetcher, RecordSchedule
from ..data.transformer import DataTransformer
from ..filler import fill_blob
from ..kernels import random as random_fill
from ..kernels.parallel import num_threads
from ..layer import Layer, register
from ..proto import minicaffe_pb2 as pb


@register("Input")
class InputLayer(Layer):
    """Tops whose contents the caller sets (pycaffe's ``net.blobs['data'].data[...] = ...``)."""

    exact_num_bottom = 0
    min_top = 1

    def setup(self, bottom, top):
        shapes = self.param.input_param.shape
        if len(shapes) not in (0, 1, len(top)):
            raise self.error(f"input_param has {len(shapes)} shapes for {len(top)} tops; give one "
                             "shape for all tops or one per top")
        for i, blob in enumerate(top):
            if shapes:
                blob.reshape(_checked_dims(self, shapes[0] if len(shapes) == 1 else shapes[i]))

    def reshape(self, bottom, top):
        """Shapes are set once in setup; a caller may reshape the tops itself afterwards."""

    def forward(self, bottom, top):
        """The caller has already written the tops."""


@register("DummyData")
class DummyDataLayer(Layer):
    """Tops filled by fillers; only tops with a non-constant filler are refilled at each forward.

    Constant tops are filled once, at setup. The others are first filled by the first forward: setup
    draws nothing from the framework RNG, so the weights of the layers after this one are the same
    as without it. Uniform and (non-sparse) gaussian refills run the counter-based kernels of
    minicaffe/kernels/random.pyx on all threads, keyed by one draw from the framework RNG per top
    and forward, so ``random_seed`` still repeats them; the rarer fillers refill through fill_blob.
    """

    exact_num_bottom = 0
    min_top = 1

    def setup(self, bottom, top):
        param = self.param.dummy_data_param
        num_top = len(top)
        self._where = f"layer '{self.name}' ({self.type_name}): dummy_data_param.data_filler"
        fillers = list(param.data_filler) or [pb.FillerParameter(type="constant", value=0)]
        if len(fillers) not in (1, num_top):
            raise self.error(f"dummy_data_param has {len(fillers)} data_filler for {num_top} tops; "
                             "give none, one for all tops, or one per top")
        self._fillers = fillers * num_top if len(fillers) == 1 else fillers
        self._refills = [self._refill_for(filler) for filler in self._fillers]
        shapes = self._shapes(param, num_top)
        for blob, shape, filler, refill in zip(top, shapes, self._fillers, self._refills):
            blob.reshape(shape)
            if refill is None:
                fill_blob(blob, filler, self._where)

    def _refill_for(self, filler):
        """The function that refills a top with ``filler`` at each forward; None for constant."""
        if filler.type == "constant":
            return None
        # fill_blob refuses sparse on any filler but gaussian, and applies it there.
        if filler.type == "uniform" and filler.sparse < 0:
            return partial(_kernel_refill, random_fill.fill_uniform, filler.min, filler.max)
        if filler.type == "gaussian" and filler.sparse < 0:
            if filler.std < 0:
                raise self.error(f"dummy_data_param.data_filler: gaussian std must not be negative, "
                                 f"got {filler.std:g}")
            return partial(_kernel_refill, random_fill.fill_normal, filler.mean, filler.std)
        return partial(fill_blob, filler_param=filler, where=self._where)

    def _shapes(self, param, num_top):
        legacy = {"num": param.num, "channels": param.channels, "height": param.height,
                  "width": param.width}
        if any(len(values) for values in legacy.values()):
            if len(param.shape):
                raise self.error("dummy_data_param: give either shape or num/channels/height/width, "
                                 "not both")
            for field, values in legacy.items():
                if len(values) not in (1, num_top):
                    raise self.error(f"dummy_data_param.{field} has {len(values)} values for "
                                     f"{num_top} tops; give one for all tops or one per top")
            return [tuple(values[0] if len(values) == 1 else values[i] for values in legacy.values())
                    for i in range(num_top)]
        if len(param.shape) not in (1, num_top):
            raise self.error(f"dummy_data_param has {len(param.shape)} shapes for {num_top} tops; give "
                             "one shape for all tops or one per top")
        shapes = param.shape if len(param.shape) == num_top else [param.shape[0]] * num_top
        return [_checked_dims(self, shape) for shape in shapes]

    def reshape(self, bottom, top):
        """Shapes are fixed in setup."""

    def forward(self, bottom, top):
        for blob, refill in zip(top, self._refills):
            if refill is not None:
                refill(blob)


def _kernel_refill(kernel, first, second, blob):
    if blob.count:
        key = rng.generator().integers(2**64, dtype=np.uint64)
        kernel(blob.data.reshape(-1), first, second, int(key), num_threads())


@register("Data")
class DataLayer(Layer):
    """Batches of records from an LMDB database, an IDX file pair or a named dataset.

    Tops: data [batch_size, C, H, W] and, optionally, label [batch_size], both float.
    """

    exact_num_bottom = 0
    min_top = 1
    max_top = 2

    def setup(self, bottom, top):
        self.source = self._open_source(top)
        # The same seed on every rank keeps the shards of a global batch disjoint.
        self.seed = rng.derive_seed()
        self._schedule = self._new_schedule(rank=0, num_ranks=1)
        # Caffe's prefetching layers all take their queue depth from data_param.prefetch.
        self._prefetcher = Prefetcher(self._load_batch, self._new_buffer, self.param.data_param.prefetch)
        self._prefetcher.start(0)

    def _open_source(self, top):
        """Checks the parameters, sets ``batch_size`` and the transformer, returns the record source.

        Subclasses with another kind of source (image lists, HDF5 files) override this.
        """
        param = self.param.data_param
        if param.batch_size == 0:
            raise self.error("data_param.batch_size must be set to a positive number")
        self.batch_size = param.batch_size
        source = open_source(param, where=f"layer '{self.name}' ({self.type_name})")
        self._prepare_transform(source)
        return source

    def _prepare_transform(self, source):
        self.transformer = DataTransformer(self.param.transform_param, self.phase, source.item_shape,
                                           error=self.error)
        self._raw_images = np.empty((self.batch_size,) + tuple(source.item_shape), source.dtype)

    def reshape(self, bottom, top):
        top[0].reshape((self.batch_size,) + self.transformer.output_shape)
        if len(top) > 1:
            top[1].reshape((self.batch_size,))

    def forward(self, bottom, top):
        labels = top[1].data if len(top) > 1 else None
        self._prefetcher.fetch_into((top[0].data, labels))

    # -- position and sharding ---------------------------------------------------------------------
    @property
    def position(self):
        """The number of the batch the next forward produces."""
        return self._prefetcher.next_index

    def set_position(self, batch_index):
        self._prefetcher.start(batch_index)

    def set_shard(self, rank, num_ranks, seed=None):
        """Reads the rank-th of ``num_ranks`` disjoint slices of every global batch of
        ``batch_size * num_ranks`` records, keeping the position.

        The slices are disjoint only if every rank has the same seed: pass one (e.g. broadcast from
        rank 0) unless the solver's random_seed already made them equal.
        """
        if not 0 <= rank < num_ranks:
            raise self.error(f"shard {rank} of {num_ranks} does not exist")
        position = self.position
        self._prefetcher.stop()
        if seed is not None:
            self.seed = seed
        self._schedule = self._new_schedule(rank, num_ranks)
        self._prefetcher.start(position)

    def close(self):
        self._prefetcher.stop()

    # -- producing a batch (in the prefetch thread) ------------------------------------------------
    def _new_schedule(self, rank, num_ranks):
        param = self.param.data_param
        return RecordSchedule(self.source.count, self.batch_size, self.seed, shuffle=param.shuffle,
                              rand_skip=param.rand_skip, rank=rank, num_ranks=num_ranks)

    def _new_buffer(self):
        return (np.empty((self.batch_size,) + self.transformer.output_shape, np.float32),
                np.empty(self.batch_size, np.float32))

    def _load_batch(self, batch_index, buffer):
        images, labels = buffer
        schedule = self._schedule
        self.source.gather(schedule.records(batch_index), self._raw_images, labels)
        # Drawn for the whole global batch so that a rank's share is augmented as in one process.
        choices = self.transformer.draw(schedule.augmentation_rng(batch_index), schedule.global_batch_size)
        self.transformer.apply(self._raw_images, images, choices[schedule.shard])


def _checked_dims(layer, shape):
    dims = tuple(shape.dim)
    if any(d < 0 for d in dims):
        raise layer.error(f"negative dimension in shape {dims}")
    return dims

"""Making N ranks train one model on one global batch: shards, seeds and identical start weights.

- Every layer with ``set_shard`` (Data, ImageData, HDF5Data) reads the rank-th slice of each global batch
  of ``batch_size * ranks`` records; its seed comes from rank 0 so the slices are disjoint.
- Layers whose randomness must differ per rank (Dropout masks, stochastic pooling) get rank 0's seed
  mixed with the rank, and so does the framework generator (DummyData, Python layers).
- Rank 0's learnable parameters are broadcast, so every rank starts from the same weights whether or
  not the solver's random_seed was set.
"""
import numpy as np

from .. import rng


def _mixed(seed, rank):
    return int(np.random.SeedSequence([int(seed), rank]).generate_state(1, np.uint64)[0] >> 1)


def setup_data_parallel(nets, distribution):
    """Shards the data layers and decorrelates the random layers of ``nets`` (train and test)."""
    layers = [layer for net in nets for layer in net.layers]
    sharded = [layer for layer in layers if hasattr(layer, "set_shard")]
    randomized = [layer for layer in layers if not hasattr(layer, "set_shard")
                  and (isinstance(getattr(layer, "seed", None), int) or hasattr(layer, "sampler"))]
    seeds = np.array([layer.seed for layer in sharded]
                     + [layer.seed if isinstance(getattr(layer, "seed", None), int) else rng.derive_seed()
                        for layer in randomized]
                     + [rng.derive_seed()], dtype=np.int64)
    distribution.broadcast(seeds, "broadcast of the random seeds")
    rank, size = distribution.rank, distribution.size
    for layer, seed in zip(sharded, seeds):
        layer.set_shard(rank, size, seed=int(seed))
    for layer, seed in zip(randomized, seeds[len(sharded):]):
        if isinstance(getattr(layer, "seed", None), int):
            layer.seed = _mixed(seed, rank)
        else:
            layer.sampler = np.random.default_rng(_mixed(seed, rank))
    rng.set_seed(_mixed(seeds[-1], rank))
    return len(sharded)


def broadcast_weights(net, distribution):
    """Makes every rank's learnable parameters rank 0's."""
    for blob in net.learnable_params:
        data = np.ascontiguousarray(blob.data)
        distribution.broadcast(data, f"broadcast of the weights of {blob.name}")
        if data is not blob.data:
            blob.data[...] = data

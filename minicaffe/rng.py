"""The framework's random number generator, as Caffe's ``Caffe::rng_stream``.

``set_seed`` (the solver's ``random_seed``) makes fillers, data shuffling, augmentation and dropout
repeatable: each consumer draws its own seed from this generator when it is set up.
"""
import numpy as np

_generator = np.random.default_rng()


def set_seed(seed):
    global _generator
    _generator = np.random.default_rng(seed)


def generator():
    return _generator


def derive_seed():
    """A fresh seed for a component that needs its own independent stream."""
    return int(_generator.integers(0, 2**63 - 1))

# Counter-based random words for other Cython code:  from minicaffe.kernels.random cimport ...
from libc.stdint cimport uint64_t

cdef extern from "random_fill.h":
    # SplitMix64's output function: a bijective 64-bit mix.
    uint64_t mix64 "mc_mix64"(uint64_t z) noexcept nogil
    # Word ``counter`` of the SplitMix64 stream seeded with ``key``.
    uint64_t random_word "mc_random_word"(uint64_t key, uint64_t counter) noexcept nogil

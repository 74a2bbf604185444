"""DFP16 (dynamic fixed point): an int16 tensor q sharing one exponent e, so that x ≈ q * 2^e.

The exponent follows libxsmm's FPHW path (papers/SPECS.md §1.2): with m = max|x| and
frexp(m) = (f, E), f in [0.5, 1), e = E - (15 - headroom), so the largest element maps to
|q| ≤ 2^(15 - headroom). A tensor of zeros gets e = 0 (any e would do: every q is 0). libxsmm's
``scf`` is our -e.

Rounding is to nearest with ties to even, by an AVX-512 loop (include/dfp16.h) where the CPU has
AVX512-BW, chosen at import, or by a portable loop GCC vectorizes (identical results; ``set_variant``
switches, tests run both). Or it is stochastic: q = floor(v) + 1 with probability frac(v), v = x * 2^-e, which is unbiased. Its uniform
numbers come from a keyed integer hash of (seed, element index), so a given seed gives the same q
whatever the thread count or blocking. Callers pass a fresh seed per tensor and iteration.

A maximum within half a step of 2^128 rounds up to 2^(13 + e) = 2^128, which dequantizes to inf.

Saturation is symmetric, to ±32767, and counted (headroom ≥ 1 never saturates with the exponent
chosen here). Nonzero inputs that round to 0, denormals included, are counted as flushed. An inf or
NaN anywhere raises NonFiniteError.

Scaling by 2^-e goes through two FP32 factors, each a normal float: e ranges over about [-163, 127]
(denormal maxima to FP32's largest), beyond a single float's exponent range. Multiplying by a power
of two is exact, so q is the correctly rounded x * 2^-e.

The Python-level functions split tensors into fixed blocks handed out statically to the threads
(minicaffe.kernels.parallel.num_threads()); block results are combined in block order, so results do
not depend on the thread count. dfp16.pxd exports the single-threaded block kernels.
"""
from collections import namedtuple

import numpy as np

from cython.parallel cimport prange
from libc.math cimport fabsf, frexp, ldexpf, nearbyintf
from libc.stdint cimport int16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc

from minicaffe.kernels.parallel cimport team_size
from minicaffe.kernels.parallel import num_threads

# Elements per work item: large enough to amortize the scheduling, small enough to balance threads.
cdef Py_ssize_t BLOCK = 16384
# The exponents whose scale 2^-e splits into two normal FP32 factors.
MIN_EXPONENT, MAX_EXPONENT = -250, 250
MAX_HEADROOM = 14
cdef enum:
    Q_MAX = 32767
    # |x| as FP32 bits: ordered like the magnitudes, inf the smallest non-finite value. GCC
    # vectorizes an integer max reduction but not a float one (NaN semantics), hence the bits.
    ABS_MASK = 0x7fffffff
    INF_BITS = 0x7f800000
    # Elements one pass counts in 32-bit lanes (half the vector work of 64-bit counters); longer
    # blocks are cut into pieces.
    PIECE = 1 << 30

cdef extern from "bf16_convert.h":
    uint32_t float_bits "mc_float_bits"(float f) noexcept nogil
    float bits_float "mc_bits_float"(uint32_t bits) noexcept nogil

QuantStats = namedtuple("QuantStats", "exponent max_abs flushed clipped")
QuantStats.__doc__ = """What quantizing one tensor did: x ≈ q * 2^exponent; max_abs = max|x|;
flushed = nonzero inputs that became 0; clipped = inputs saturated to ±32767."""


class NonFiniteError(ValueError):
    """A tensor to quantize holds inf or NaN; ``first_index`` is the multi-index of the first one."""

    def __init__(self, count, first_index, first_value):
        super().__init__(f"{count} non-finite value{'s' if count != 1 else ''} "
                         f"(the first, {first_value}, at index {first_index})")
        self.count = count
        self.first_index = first_index
        self.first_value = first_value


cdef inline void add_counts(QuantCounts* c, uint32_t max_bits, int nonfinite, int flushed,
                            int clipped) noexcept nogil:
    if max_bits > float_bits(c.max_abs):
        c.max_abs = bits_float(max_bits)
    c.nonfinite += nonfinite
    c.flushed += flushed
    c.clipped += clipped


cdef inline QuantCounts no_counts() noexcept nogil:
    cdef QuantCounts c
    c.max_abs, c.nonfinite, c.flushed, c.clipped = 0, 0, 0, 0
    return c


cdef void scan_piece(const float* x, int n, QuantCounts* c) noexcept nogil:
    cdef int i, nonfinite = 0
    cdef uint32_t a, m = 0
    for i in range(n):
        a = float_bits(x[i]) & ABS_MASK
        nonfinite += a >= INF_BITS
        m = a if a > m else m
    add_counts(c, m, nonfinite, 0, 0)


cdef QuantCounts scan_block(const float* x, Py_ssize_t n) noexcept nogil:
    """max|x| and the count of inf and NaN elements, in one pass."""
    cdef QuantCounts c = no_counts()
    cdef Py_ssize_t start = 0
    while start < n:
        scan_piece(x + start, <int>min(<Py_ssize_t>PIECE, n - start), &c)
        start += PIECE
    return c


cdef int exponent_for_max_abs(float max_abs, int headroom) noexcept nogil:
    cdef int e
    if not (max_abs > 0):
        return 0
    frexp(max_abs, &e)
    return e - (15 - headroom)


cdef inline void scale_factors(int power, float* first, float* second) noexcept nogil:
    """first * second == 2^power, both normal floats, first as close to 2^power as one float gets."""
    cdef int p = min(max(power, -126), 127)
    first[0] = ldexpf(1, p)
    second[0] = ldexpf(1, power - p)


cdef extern from "dfp16.h":
    ctypedef struct mc_dfp16_counts:
        uint32_t max_bits
        int nonfinite, flushed, clipped
    void quantize_portable "mc_dfp16_quantize_portable"(const float* x, int n, float s1, float s2,
                                                        int16_t* q, mc_dfp16_counts* c) noexcept nogil
    void quantize_avx512 "mc_dfp16_quantize_avx512"(const float* x, int n, float s1, float s2,
                                                    int16_t* q, mc_dfp16_counts* c) noexcept nogil
    int cpu_has_avx512bw "mc_cpu_has_avx512bw"() noexcept nogil

ctypedef void (*QuantizeNearest)(const float*, int, float, float, int16_t*,
                                 mc_dfp16_counts*) noexcept nogil
cdef QuantizeNearest nearest_kernel = quantize_portable
cdef str active_variant = "portable"


def variants():
    """The round-to-nearest quantization variants this CPU runs, the preferred one first."""
    return ["avx512", "portable"] if cpu_has_avx512bw() else ["portable"]


def variant():
    """The round-to-nearest quantization variant in use."""
    return active_variant


def set_variant(str name):
    """Selects a round-to-nearest variant from ``variants()`` (all give identical results)."""
    global nearest_kernel, active_variant
    if name not in variants():
        raise ValueError(f"DFP16 variant {name!r} is not available here; choose from {variants()}")
    nearest_kernel = quantize_avx512 if name == "avx512" else quantize_portable
    active_variant = name


set_variant(variants()[0])


cdef void quantize_piece(const float* x, int n, float s1, float s2, int16_t* q,
                         QuantCounts* c) noexcept nogil:
    cdef mc_dfp16_counts piece
    piece.max_bits, piece.nonfinite, piece.flushed, piece.clipped = 0, 0, 0, 0
    nearest_kernel(x, n, s1, s2, q, &piece)
    add_counts(c, piece.max_bits, piece.nonfinite, piece.flushed, piece.clipped)


cdef QuantCounts quantize_block(const float* x, Py_ssize_t n, int exponent,
                                int16_t* q) noexcept nogil:
    """q = x * 2^-exponent rounded to nearest even, saturated to ±32767; exponent in [-250, 250]."""
    cdef QuantCounts c = no_counts()
    cdef float s1, s2
    cdef Py_ssize_t start = 0
    scale_factors(-exponent, &s1, &s2)
    while start < n:
        quantize_piece(x + start, <int>min(<Py_ssize_t>PIECE, n - start), s1, s2, q + start, &c)
        start += PIECE
    return c


cdef inline uint32_t mix32(uint32_t h) noexcept nogil:
    # An invertible avalanche mixer (Wellons' "lowbias32" constants).
    h ^= h >> 16
    h *= 0x7feb352dU
    h ^= h >> 15
    h *= 0x846ca68bU
    h ^= h >> 16
    return h


cdef inline uint64_t splitmix64(uint64_t z) noexcept nogil:
    z += 0x9e3779b97f4a7c15ULL
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL
    return z ^ (z >> 31)


cdef void stochastic_piece(const float* x, int n, float s1, float s2, uint32_t key_lo,
                           uint32_t key_hi, uint32_t counter, int16_t* q, QuantCounts* c) noexcept nogil:
    # Element i draws u from hash(counter + i); the caller keeps counter + i from wrapping.
    cdef float v, scaled, low, r, u, unit = ldexpf(1, -24)
    cdef uint32_t a, m = 0
    cdef int i, nonfinite = 0, flushed = 0, clipped = 0
    for i in range(n):
        v = x[i]
        a = float_bits(v) & ABS_MASK
        nonfinite += a >= INF_BITS
        m = a if a > m else m
        scaled = v * s1 * s2
        low = nearbyintf(scaled)  # floor, via the one rounding GCC vectorizes without -fno-trapping-math
        low = low - <float>1 if low > scaled else low
        u = <float>(mix32(mix32((counter + <uint32_t>i) ^ key_lo) ^ key_hi) >> 8) * unit
        r = low + <float>1 if u < scaled - low else low  # P(up) = frac(scaled), to within 2^-24
        clipped += fabsf(r) > Q_MAX
        r = Q_MAX if not (r <= Q_MAX) else r
        r = -Q_MAX if r < -Q_MAX else r
        flushed += (r == 0) & (v != 0)
        q[i] = <int16_t>r
    add_counts(c, m, nonfinite, flushed, clipped)


cdef QuantCounts quantize_block_stochastic(const float* x, Py_ssize_t n, int exponent, uint64_t seed,
                                           uint64_t first_index, int16_t* q) noexcept nogil:
    """Stochastic rounding of x[i] (global index first_index + i) with the random stream of seed."""
    cdef QuantCounts c = no_counts()
    cdef float s1, s2
    cdef uint64_t key = splitmix64(seed), index = first_index, until_wrap
    cdef Py_ssize_t done = 0, run
    scale_factors(-exponent, &s1, &s2)
    while done < n:
        # The 32-bit counter covers a run up to the next multiple of 2^32; the high half keys it.
        until_wrap = (<uint64_t>1 << 32) - (index & 0xffffffffULL)
        run = min(n - done, <Py_ssize_t>PIECE)
        run = run if <uint64_t>run < until_wrap else <Py_ssize_t>until_wrap
        stochastic_piece(x + done, <int>run, s1, s2, <uint32_t>key,
                         <uint32_t>(key >> 32) ^ mix32(<uint32_t>(index >> 32)), <uint32_t>index,
                         q + done, &c)
        done += run
        index += <uint64_t>run
    return c


cdef void dequantize_block(const int16_t* q, Py_ssize_t n, int exponent, float* out) noexcept nogil:
    cdef float s1, s2
    cdef Py_ssize_t i
    scale_factors(exponent, &s1, &s2)
    for i in range(n):
        out[i] = <float>q[i] * s1 * s2


def flat_view(a, dtype, str what):
    """A 1-D view of ``a``, which must be a C-contiguous ndarray of ``dtype``."""
    if not isinstance(a, np.ndarray) or a.dtype != dtype or not a.flags.c_contiguous:
        raise ValueError(f"{what} must be a C-contiguous {np.dtype(dtype).name} array")
    return a.reshape(-1)


def _pair(x, q):
    xf, qf = flat_view(x, np.float32, "x"), flat_view(q, np.int16, "the int16 tensor")
    if xf.shape[0] != qf.shape[0]:
        raise ValueError(f"x has {xf.shape[0]} elements, the int16 tensor {qf.shape[0]}")
    return xf, qf


cdef QuantCounts combine(QuantCounts* parts, Py_ssize_t count) noexcept nogil:
    cdef QuantCounts total
    cdef Py_ssize_t b
    total.max_abs, total.nonfinite, total.flushed, total.clipped = 0, 0, 0, 0
    for b in range(count):
        total.max_abs = max(total.max_abs, parts[b].max_abs)
        total.nonfinite += parts[b].nonfinite
        total.flushed += parts[b].flushed
        total.clipped += parts[b].clipped
    return total


cdef QuantCounts* new_parts(Py_ssize_t blocks) except NULL:
    """Room for one block's counts per block; at least one, as malloc(0) may return NULL."""
    cdef QuantCounts* parts = <QuantCounts*>malloc(max(blocks, 1) * sizeof(QuantCounts))
    if parts == NULL:
        raise MemoryError()
    return parts


cdef QuantCounts parallel_scan(const float[::1] x) except *:
    cdef Py_ssize_t n = x.shape[0], blocks = (n + BLOCK - 1) // BLOCK, b
    cdef int threads = num_threads()
    cdef QuantCounts* parts = new_parts(blocks)
    try:
        with nogil:
            for b in prange(blocks, schedule="static", num_threads=team_size(blocks, threads)):
                parts[b] = scan_block(&x[b * BLOCK], min(BLOCK, n - b * BLOCK))
        return combine(parts, blocks)
    finally:
        free(parts)


cdef QuantCounts parallel_quantize(const float[::1] x, int exponent, bint stochastic, uint64_t seed,
                                   int16_t[::1] q) except *:
    cdef Py_ssize_t n = x.shape[0], blocks = (n + BLOCK - 1) // BLOCK, b, start
    cdef int threads = num_threads()
    cdef QuantCounts* parts = new_parts(blocks)
    try:
        with nogil:
            for b in prange(blocks, schedule="static", num_threads=team_size(blocks, threads)):
                start = b * BLOCK
                if stochastic:
                    parts[b] = quantize_block_stochastic(&x[start], min(BLOCK, n - start), exponent,
                                                         seed, <uint64_t>start, &q[start])
                else:
                    parts[b] = quantize_block(&x[start], min(BLOCK, n - start), exponent, &q[start])
        return combine(parts, blocks)
    finally:
        free(parts)


def _nonfinite_error(x, Py_ssize_t count):
    flat = x.reshape(-1)
    first = int(np.argmax(~np.isfinite(flat)))
    index = tuple(int(i) for i in np.unravel_index(first, x.shape))
    return NonFiniteError(count, index, float(flat[first]))


def _check_headroom(int headroom):
    if not 0 <= headroom <= MAX_HEADROOM:
        raise ValueError(f"headroom must be in [0, {MAX_HEADROOM}] bits, got {headroom}")


def _check_exponent(int exponent):
    if not MIN_EXPONENT <= exponent <= MAX_EXPONENT:
        raise ValueError(f"exponent must be in [{MIN_EXPONENT}, {MAX_EXPONENT}], got {exponent}")


def exponent_for(x, int headroom=2):
    """The shared exponent e of float32 array x: max|x| * 2^-e < 2^(15 - headroom); 0 for all zeros."""
    _check_headroom(headroom)
    cdef QuantCounts c = parallel_scan(flat_view(x, np.float32, "x"))
    if c.nonfinite:
        raise _nonfinite_error(x, c.nonfinite)
    return exponent_for_max_abs(c.max_abs, headroom)


def quantize(x, out, int headroom=2, bint stochastic=False, uint64_t seed=0):
    """Quantizes float32 x into int16 ``out`` (same size) with the exponent of exponent_for(x, headroom).

    Returns QuantStats. Raises NonFiniteError (before writing ``out``) when x holds inf or NaN.
    """
    _check_headroom(headroom)
    xf, qf = _pair(x, out)
    cdef QuantCounts c = parallel_scan(xf)
    if c.nonfinite:
        raise _nonfinite_error(x, c.nonfinite)
    cdef int exponent = exponent_for_max_abs(c.max_abs, headroom)
    c = parallel_quantize(xf, exponent, stochastic, seed, qf)
    return QuantStats(exponent, float(c.max_abs), int(c.flushed), int(c.clipped))


def quantize_with_exponent(x, out, int exponent, bint stochastic=False, uint64_t seed=0):
    """Quantizes float32 x into int16 ``out`` with a given exponent, in a single pass.

    Values beyond ±32767 * 2^exponent saturate and are counted in ``clipped``. Raises
    NonFiniteError when x holds inf or NaN (``out`` is then partly written).
    """
    _check_exponent(exponent)
    xf, qf = _pair(x, out)
    cdef QuantCounts c = parallel_quantize(xf, exponent, stochastic, seed, qf)
    if c.nonfinite:
        raise _nonfinite_error(x, c.nonfinite)
    return QuantStats(exponent, float(c.max_abs), int(c.flushed), int(c.clipped))


def dequantize(q, int exponent, out):
    """out = q * 2^exponent: int16 q into float32 ``out`` of the same size; returns ``out``."""
    _check_exponent(exponent)
    cdef const int16_t[::1] qf = flat_view(q, np.int16, "q")
    cdef float[::1] of = flat_view(out, np.float32, "out")
    cdef Py_ssize_t n = qf.shape[0], blocks = (n + BLOCK - 1) // BLOCK, b, start
    cdef int threads = num_threads()
    if of.shape[0] != n:
        raise ValueError(f"q has {n} elements, out {of.shape[0]}")
    with nogil:
        for b in prange(blocks, schedule="static", num_threads=team_size(blocks, threads)):
            start = b * BLOCK
            dequantize_block(&qf[start], min(BLOCK, n - start), exponent, &of[start])
    return out

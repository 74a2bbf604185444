"""BF16 conversions: FP32 to BF16 with round-to-nearest-even (and truncation, the negative control),
BF16 back to FP32, and the "emulation" mode that rounds FP32 tensors to BF16-representable FP32
values so ops can run on FP32 hardware (papers/SPECS.md §2).

BF16 tensors are uint16 arrays of bit patterns. RNE keeps NaNs NaN (quieted, sign kept), leaves ±inf
and ±0 alone, carries the largest finite values into inf and rounds denormals by the same bit recipe.
Truncation chops the low half but quiets NaNs the same way.

FP32-to-BF16 RNE has two bit-identical variants (include/bf16_convert.h): AVX512-BF16
(vcvtneps2bf16 with a denormal patch), chosen at import where the CPU has it, and a portable loop.
``set_variant`` switches between them (tests run both).

The Python-level functions split tensors into fixed blocks handed out statically to
minicaffe.kernels.parallel.num_threads() threads; every element is converted on its own, so results
do not depend on the thread count.
"""
import numpy as np

from cython.parallel cimport prange

from minicaffe.kernels.dfp16 import flat_view
from minicaffe.kernels.parallel cimport team_size
from minicaffe.kernels.parallel import num_threads

cdef extern from "bf16_convert.h":
    void fp32_to_bf16_portable "mc_fp32_to_bf16_portable"(const float* x, long n,
                                                          uint16_t* out) noexcept nogil
    void fp32_to_bf16_avx512bf16 "mc_fp32_to_bf16_avx512bf16"(const float* x, long n,
                                                              uint16_t* out) noexcept nogil
    void round_to_bf16_portable "mc_round_to_bf16_portable"(const float* x, long n,
                                                            float* out) noexcept nogil
    void round_to_bf16_avx512bf16 "mc_round_to_bf16_avx512bf16"(const float* x, long n,
                                                                float* out) noexcept nogil
    int cpu_has_avx512bf16 "mc_cpu_has_avx512bf16"() noexcept nogil

# Elements per work item: large enough to amortize the scheduling, small enough to balance threads.
cdef Py_ssize_t BLOCK = 16384

ctypedef void (*ToBf16)(const float*, long, uint16_t*) noexcept nogil
ctypedef void (*RoundToBf16)(const float*, long, float*) noexcept nogil
cdef ToBf16 to_bf16_kernel = fp32_to_bf16_portable
cdef RoundToBf16 round_kernel = round_to_bf16_portable
cdef str active_variant = "portable"


def variants():
    """The FP32-to-BF16 RNE variants this CPU runs, the preferred one first."""
    return ["avx512bf16", "portable"] if cpu_has_avx512bf16() else ["portable"]


def variant():
    """The FP32-to-BF16 RNE variant in use."""
    return active_variant


def set_variant(str name):
    """Selects an FP32-to-BF16 RNE variant from ``variants()`` (both give identical bits)."""
    global to_bf16_kernel, round_kernel, active_variant
    if name not in variants():
        raise ValueError(f"BF16 variant {name!r} is not available here; choose from {variants()}")
    if name == "avx512bf16":
        to_bf16_kernel, round_kernel = fp32_to_bf16_avx512bf16, round_to_bf16_avx512bf16
    else:
        to_bf16_kernel, round_kernel = fp32_to_bf16_portable, round_to_bf16_portable
    active_variant = name


set_variant(variants()[0])


cdef void fp32_to_bf16_block(const float* x, Py_ssize_t n, uint16_t* out) noexcept nogil:
    to_bf16_kernel(x, n, out)


cdef void fp32_to_bf16_truncate_block(const float* x, Py_ssize_t n, uint16_t* out) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = bf16_truncate(float_bits(x[i]))


cdef void bf16_to_fp32_block(const uint16_t* h, Py_ssize_t n, float* out) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = bits_float(<uint32_t>h[i] << 16)


cdef void round_to_bf16_block(const float* x, Py_ssize_t n, float* out) noexcept nogil:
    round_kernel(x, n, out)


cdef void truncate_to_bf16_block(const float* x, Py_ssize_t n, float* out) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = bits_float(<uint32_t>bf16_truncate(float_bits(x[i])) << 16)


cdef enum Conversion:
    TO_BF16, TO_BF16_TRUNCATE, FROM_BF16, ROUND, TRUNCATE


cdef void convert_blocks(Conversion kind, const unsigned char* src, unsigned char* dst, Py_ssize_t n,
                         int num_threads) noexcept nogil:
    cdef Py_ssize_t blocks = (n + BLOCK - 1) // BLOCK, b, start, count
    for b in prange(blocks, schedule="static", num_threads=team_size(blocks, num_threads)):
        start = b * BLOCK
        count = min(BLOCK, n - start)
        if kind == TO_BF16:
            fp32_to_bf16_block(<const float*>src + start, count, <uint16_t*>dst + start)
        elif kind == TO_BF16_TRUNCATE:
            fp32_to_bf16_truncate_block(<const float*>src + start, count, <uint16_t*>dst + start)
        elif kind == FROM_BF16:
            bf16_to_fp32_block(<const uint16_t*>src + start, count, <float*>dst + start)
        elif kind == ROUND:
            round_to_bf16_block(<const float*>src + start, count, <float*>dst + start)
        else:
            truncate_to_bf16_block(<const float*>src + start, count, <float*>dst + start)


cdef convert(Conversion kind, source, source_dtype, target, target_dtype):
    src = flat_view(source, source_dtype, "the input")
    dst = flat_view(target, target_dtype, "out")
    if src.shape[0] != dst.shape[0]:
        raise ValueError(f"the input has {src.shape[0]} elements, out {dst.shape[0]}")
    cdef Py_ssize_t n = src.shape[0]
    if n == 0:
        return target
    # Byte views carry both element types; the kinds cast the pointers back.
    cdef const unsigned char[::1] src_bytes = src.view(np.uint8)
    cdef unsigned char[::1] dst_bytes = dst.view(np.uint8)
    cdef int threads = num_threads()
    with nogil:
        convert_blocks(kind, &src_bytes[0], &dst_bytes[0], n, threads)
    return target


def fp32_to_bf16(x, out):
    """out (uint16 BF16 bits) = x (float32) rounded to nearest even; returns ``out``."""
    return convert(TO_BF16, x, np.float32, out, np.uint16)


def fp32_to_bf16_truncate(x, out):
    """out (uint16 BF16 bits) = x (float32) with its low 16 bits chopped (NaNs quieted)."""
    return convert(TO_BF16_TRUNCATE, x, np.float32, out, np.uint16)


def bf16_to_fp32(h, out):
    """out (float32) = the BF16 values whose bits are in h (uint16), exactly; returns ``out``."""
    return convert(FROM_BF16, h, np.uint16, out, np.float32)


def round_to_bf16(x, out=None):
    """Rounds float32 x to the nearest BF16-representable values (RNE), in place or into ``out``."""
    return convert(ROUND, x, np.float32, x if out is None else out, np.float32)


def truncate_to_bf16(x, out=None):
    """Chops float32 x to BF16-representable values (the negative control), in place or into ``out``."""
    return convert(TRUNCATE, x, np.float32, x if out is None else out, np.float32)

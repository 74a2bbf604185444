# Single-threaded BF16 block kernels for other Cython code:  from minicaffe.kernels.bf16 cimport ...
# BF16 values travel as uint16 bit patterns (the high half of an FP32). In the float-to-float
# (emulation) kernels ``out`` may be ``x``.
from libc.stdint cimport uint16_t, uint32_t

cdef extern from "bf16_convert.h":
    # One value, from its FP32 bits: round-to-nearest-even; a NaN stays a NaN (quieted, sign kept).
    uint16_t bf16_rne "mc_bf16_rne"(uint32_t bits) noexcept nogil
    uint16_t bf16_truncate "mc_bf16_truncate"(uint32_t bits) noexcept nogil
    uint32_t float_bits "mc_float_bits"(float f) noexcept nogil
    float bits_float "mc_bits_float"(uint32_t bits) noexcept nogil


cdef void fp32_to_bf16_block(const float* x, Py_ssize_t n, uint16_t* out) noexcept nogil
cdef void fp32_to_bf16_truncate_block(const float* x, Py_ssize_t n, uint16_t* out) noexcept nogil
cdef void bf16_to_fp32_block(const uint16_t* h, Py_ssize_t n, float* out) noexcept nogil
cdef void round_to_bf16_block(const float* x, Py_ssize_t n, float* out) noexcept nogil
cdef void truncate_to_bf16_block(const float* x, Py_ssize_t n, float* out) noexcept nogil

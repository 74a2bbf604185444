# C-level im2col/col2im for other kernels:  from minicaffe.kernels.im2col cimport ...
from cython cimport floating
from libc.stdint cimport int16_t, uint16_t

# What im2col moves: FP32/FP64 values, DFP16 int16 values and BF16 bit patterns.
ctypedef fused pixel:
    float
    double
    int16_t
    uint16_t


cdef struct Geometry:
    # One image [channels, height, width] convolved with a [kernel_h, kernel_w] window.
    int channels, height, width
    int kernel_h, kernel_w, pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w
    int out_h, out_w


cdef Geometry make_geometry(int channels, int height, int width, int kernel_h, int kernel_w,
                            int pad_h, int pad_w, int stride_h, int stride_w,
                            int dilation_h, int dilation_w) except *

cdef void im2col_channels(const pixel* image, const Geometry* geom, int c_begin, int c_end,
                          pixel* col) noexcept nogil

cdef void col2im_channels(const floating* col, const Geometry* geom, int c_begin, int c_end,
                          floating* image) noexcept nogil

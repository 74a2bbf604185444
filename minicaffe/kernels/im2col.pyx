"""im2col and col2im with Caffe's semantics (padding, stride, dilation). im2col moves float32, float64
and the 16-bit reduced-precision tensors (DFP16 int16 values, BF16 uint16 bit patterns); col2im, which
adds, takes float32 and float64.

im2col lays every [kernel_h, kernel_w] window of an image [C, H, W] out as one column of
col[C*kernel_h*kernel_w, OH*OW]: row (c, i, j) holds the input pixel at
(oh*stride_h - pad_h + i*dilation_h, ow*stride_w - pad_w + j*dilation_w) for every output (oh, ow),
zero where that falls in the padding. col2im is its adjoint: each column entry is added back to the
pixel it came from, so overlapping windows sum, and padding entries are dropped.

For each kernel offset the range of outputs that read inside the image is computed once. At
stride_w 1 (nearly every convolution) the rows are moved by C kernels with AVX-512 masked loads
when the build targets it, and col2im gathers: each image row sums its taps and is written once.
Other strides use plain loops (for float32 in C, with a vector permute at stride 2). Both
functions split channels across threads, each channel's rows and pixels being written by one thread
only.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memset

from minicaffe.kernels.parallel import num_threads


def output_size(int size, int kernel, int pad, int stride, int dilation):
    """Caffe's convolution output size: (size + 2*pad - (dilation*(kernel-1)+1)) // stride + 1."""
    return (size + 2 * pad - (dilation * (kernel - 1) + 1)) // stride + 1


cdef Geometry make_geometry(int channels, int height, int width, int kernel_h, int kernel_w,
                            int pad_h, int pad_w, int stride_h, int stride_w,
                            int dilation_h, int dilation_w) except *:
    if min(kernel_h, kernel_w, stride_h, stride_w, dilation_h, dilation_w) < 1 or min(pad_h, pad_w) < 0:
        raise ValueError("kernel, stride and dilation must be positive and padding non-negative")
    cdef Geometry g
    g.channels, g.height, g.width = channels, height, width
    g.kernel_h, g.kernel_w = kernel_h, kernel_w
    g.pad_h, g.pad_w = pad_h, pad_w
    g.stride_h, g.stride_w = stride_h, stride_w
    g.dilation_h, g.dilation_w = dilation_h, dilation_w
    g.out_h = output_size(height, kernel_h, pad_h, stride_h, dilation_h)
    g.out_w = output_size(width, kernel_w, pad_w, stride_w, dilation_w)
    if g.out_h < 1 or g.out_w < 1:
        raise ValueError(f"a {kernel_h}x{kernel_w} kernel (dilation {dilation_h}x{dilation_w}) does "
                         f"not fit a {height}x{width} input padded by {pad_h}x{pad_w}")
    return g


cdef extern from *:
    """
    /* Stride-1 rows with AVX-512: each run of 16 floats (8 doubles, 32 16-bit values) is one masked
       load, the mask marking the pixels inside the image, so padding costs no branches and
       masked-off lanes are never read. Masked stores are slow on this hardware, so im2col stores
       full vectors and lets a row's spill-over be overwritten by the rows after it, masking only
       where a store would run past the block (into memory another thread may own).
       col2im gathers: every image row sums its kernel taps in registers and is stored once, which
       avoids the read-modify-write of a scatter (stalls where shifted stores and loads overlap). */
    #include <stdint.h>
    #include <string.h>
    #ifdef __AVX512F__
    #include <immintrin.h>
    static inline unsigned lanes_between(int first, int last, int width) {
        first = first < 0 ? 0 : (first > width ? width : first);
        last = last < first ? first : (last > width ? width : last);
        return (unsigned)(((1ull << last) - 1) & ~((1ull << first) - 1));
    }
    #define LOWER_ROWS(T, LANES, SUFFIX, MASK)                                                      \
    /* dst[r][j] = src[r*src_stride + offset + j] for j in [first, last), 0 elsewhere in [0, n). */ \
    static void lower_rows_##SUFFIX(T *dst, const T *src, long src_stride, int offset, int n,       \
                                    int first, int last, int rows) {                                \
        if (n <= 0 || rows <= 0) return;                                                           \
        if (n <= LANES) {  /* a row is one vector: the common small-image case, kept lean */        \
            MASK valid = (MASK)lanes_between(first, last, LANES);                                   \
            MASK row = (MASK)lanes_between(0, n, LANES);                                            \
            int unmasked = rows - (LANES - 1) / n;  /* rows whose full store stays in the block */  \
            for (int r = 0; r < rows; r++) {                                                       \
                __m512##SUFFIX##_T v = _mm512_maskz_loadu_##SUFFIX(valid, src + r * src_stride + offset); \
                if (r < unmasked)                                                                   \
                    _mm512_storeu_##SUFFIX(dst + (long)r * n, v);                                   \
                else                                                                                \
                    _mm512_mask_storeu_##SUFFIX(dst + (long)r * n, row, v);                         \
            }                                                                                       \
            return;                                                                                 \
        }                                                                                           \
        int chunks = (n + LANES - 1) / LANES;                                                      \
        MASK valid[chunks];  /* the same for every row */                                          \
        for (int c = 0; c < chunks; c++)                                                           \
            valid[c] = (MASK)lanes_between(first - c * LANES, last - c * LANES, LANES);            \
        MASK tail = (MASK)lanes_between(0, n - (chunks - 1) * LANES, LANES);                        \
        long end = (long)rows * n;                                                                 \
        for (int r = 0; r < rows; r++) {                                                           \
            T *d = dst + (long)r * n;                                                              \
            const T *s = src + r * src_stride + offset;                                             \
            for (int c = 0; c < chunks; c++) {                                                     \
                __m512##SUFFIX##_T v = _mm512_maskz_loadu_##SUFFIX(valid[c], s + c * LANES);       \
                if ((long)r * n + (long)(c + 1) * LANES <= end)                                     \
                    _mm512_storeu_##SUFFIX(d + c * LANES, v);                                       \
                else                                                                                \
                    _mm512_mask_storeu_##SUFFIX(d + c * LANES, tail, v);                            \
            }                                                                                       \
        }                                                                                           \
    }
    #define RAISE_PLANE(T, LANES, SUFFIX, MASK)                                                     \
    /* image[h][w] = sum of the column entries that im2col took from it, for one channel. */       \
    static void raise_plane_##SUFFIX(const T *col, T *image, int height, int width, int out_h,     \
                                     int out_w, int kernel_h, int kernel_w, int pad_h, int pad_w,   \
                                     int stride_h, int dilation_h, int dilation_w) {               \
        int chunks = (width + LANES - 1) / LANES;                                                  \
        long block = (long)out_h * out_w;                                                          \
        MASK masks[kernel_w * chunks];                                                             \
        for (int kj = 0; kj < kernel_w; kj++) {                                                    \
            int shift = pad_w - kj * dilation_w;  /* output column = image column + shift */       \
            int end = out_w - shift < width ? out_w - shift : width;                               \
            for (int c = 0; c < chunks; c++)                                                       \
                masks[kj * chunks + c] = (MASK)lanes_between(-shift - c * LANES, end - c * LANES, LANES); \
        }                                                                                           \
        const T *tap_rows[kernel_h];                                                               \
        for (int h = 0; h < height; h++) {                                                         \
            int taps_in_row = 0;  /* kernel rows whose window covers image row h */                \
            for (int ki = 0; ki < kernel_h; ki++) {                                                \
                int t = h + pad_h - ki * dilation_h, oh = stride_h == 1 ? t : t / stride_h;        \
                if (t >= 0 && oh < out_h && (stride_h == 1 || t % stride_h == 0))                  \
                    tap_rows[taps_in_row++] = col + (long)ki * kernel_w * block + (long)oh * out_w + pad_w; \
            }                                                                                       \
            for (int c = 0; c < chunks; c++) {                                                     \
                __m512##SUFFIX##_T acc = _mm512_setzero_##SUFFIX();                                 \
                for (int i = 0; i < taps_in_row; i++) {                                            \
                    const T *taps = tap_rows[i] + c * LANES;                                       \
                    for (int kj = 0; kj < kernel_w; kj++)                                          \
                        acc = _mm512_add_##SUFFIX(acc, _mm512_maskz_loadu_##SUFFIX(                 \
                            masks[kj * chunks + c], taps + kj * (block - dilation_w)));            \
                }                                                                                   \
                _mm512_mask_storeu_##SUFFIX(image + (long)h * width + c * LANES,                   \
                                            (MASK)lanes_between(0, width - c * LANES, LANES), acc); \
            }                                                                                       \
        }                                                                                           \
    }
    typedef __m512 __m512ps_T;
    typedef __m512d __m512pd_T;
    LOWER_ROWS(float, 16, ps, __mmask16)
    LOWER_ROWS(double, 8, pd, __mmask8)
    RAISE_PLANE(float, 16, ps, __mmask16)
    RAISE_PLANE(double, 8, pd, __mmask8)
    #endif
    #define SCALAR_LOWER_ROWS(T, SUFFIX)                                                            \
    static void lower_rows_##SUFFIX(T *dst, const T *src, long src_stride, int offset, int n,       \
                                    int first, int last, int rows) {                                \
        for (int r = 0; r < rows; r++) {                                                           \
            T *d = dst + (long)r * n;                                                              \
            const T *s = src + r * src_stride + offset;                                             \
            for (int j = 0; j < first; j++) d[j] = 0;                                              \
            for (int j = first; j < last; j++) d[j] = s[j];                                        \
            for (int j = last; j < n; j++) d[j] = 0;                                               \
        }                                                                                           \
    }
    #define SCALAR_RAISE_PLANE(T, SUFFIX)                                                           \
    static void raise_plane_##SUFFIX(const T *col, T *image, int height, int width, int out_h,     \
                                     int out_w, int kernel_h, int kernel_w, int pad_h, int pad_w,   \
                                     int stride_h, int dilation_h, int dilation_w) {               \
        long block = (long)out_h * out_w;                                                          \
        for (int h = 0; h < height; h++)                                                           \
            for (int w = 0; w < width; w++) {                                                      \
                T acc = 0;                                                                         \
                for (int ki = 0; ki < kernel_h; ki++) {                                            \
                    int t = h + pad_h - ki * dilation_h;                                           \
                    if (t < 0 || t % stride_h || t / stride_h >= out_h) continue;                  \
                    const T *taps = col + (long)ki * kernel_w * block + (long)(t / stride_h) * out_w; \
                    for (int kj = 0; kj < kernel_w; kj++) {                                        \
                        int ow = w + pad_w - kj * dilation_w;                                      \
                        if (ow >= 0 && ow < out_w) acc += taps[kj * block + ow];                   \
                    }                                                                               \
                }                                                                                   \
                image[(long)h * width + w] = acc;                                                  \
            }                                                                                       \
    }
    /* dst[r][j] = src[r*src_stride + offset + j*stride] for j in [first, last), 0 elsewhere in [0, n).
       With AVX-512, at stride 2 (ResNet's conv1 and strided projections) 16 outputs are two loads
       (masked in a row's last chunk, so that nothing past its last wanted value is read) and one
       two-source permute, and the rows are prefetched 8 ahead: the hardware did not follow rows read
       every other one. One image from a cold cache: ResNet-50's conv1 0.66 -> 0.37 ms, its 1x1
       stride-2 layer on 256 x 56 x 56 0.155 -> 0.126 ms. At stride 4 (AlexNet's conv1) four loads
       and three permutes, or the prefetch, gained nothing over the plain loop. */
    static void lower_strided_rows_ps(float *dst, const float *src, long src_stride, int offset, int stride,
                                      int n, int first, int last, int rows) {
        for (int r = 0; r < rows; r++) {
            float *d = dst + (long)r * n;
            const float *s = src + r * src_stride + offset;
            int j = first;
            for (int k = 0; k < first; k++) d[k] = 0;
    #ifdef __AVX512F__
            const __m512i evens = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
            /* The row 8 ahead, past the last row too: the next call's rows (prefetches never fault). */
            for (int line = 0; stride == 2 && line < 2 * (last - first); line += 16)
                _mm_prefetch((const char *)(s + 8 * src_stride + 2 * first + line), _MM_HINT_T0);
            for (; stride == 2 && j < last; j += 16) {
                const float *p = s + 2L * j;
                if (j + 16 < last) {  /* p[31] is still before the row's last wanted value */
                    _mm512_storeu_ps(d + j, _mm512_permutex2var_ps(_mm512_loadu_ps(p), evens,
                                                                   _mm512_loadu_ps(p + 16)));
                } else {
                    int count = last - j, needed = 2 * count - 1;
                    __m512 low = _mm512_maskz_loadu_ps((__mmask16)lanes_between(0, needed, 16), p);
                    __m512 high = _mm512_maskz_loadu_ps((__mmask16)lanes_between(0, needed - 16, 16), p + 16);
                    _mm512_mask_storeu_ps(d + j, (__mmask16)lanes_between(0, count, 16),
                                          _mm512_permutex2var_ps(low, evens, high));
                }
            }
    #endif
            for (; j < last; j++) d[j] = s[(long)j * stride];
            for (int k = last; k < n; k++) d[k] = 0;
        }
    }
    #ifndef __AVX512F__
    SCALAR_LOWER_ROWS(float, ps)
    SCALAR_LOWER_ROWS(double, pd)
    SCALAR_RAISE_PLANE(float, ps)
    SCALAR_RAISE_PLANE(double, pd)
    #endif
    /* 16-bit values (DFP16 int16, BF16 bits) move as uint16: im2col only copies them. */
    #ifdef __AVX512BW__
    typedef __m512i __m512epi16_T;
    LOWER_ROWS(uint16_t, 32, epi16, __mmask32)
    #else
    SCALAR_LOWER_ROWS(uint16_t, epi16)
    #endif
    """
    void lower_rows_ps(float* dst, const float* src, long src_stride, int offset, int n, int first,
                       int last, int rows) noexcept nogil
    void lower_strided_rows_ps(float* dst, const float* src, long src_stride, int offset, int stride,
                               int n, int first, int last, int rows) noexcept nogil
    void lower_rows_pd(double* dst, const double* src, long src_stride, int offset, int n, int first,
                       int last, int rows) noexcept nogil
    void lower_rows_epi16(uint16_t* dst, const uint16_t* src, long src_stride, int offset, int n,
                          int first, int last, int rows) noexcept nogil
    void raise_plane_ps(const float* col, float* image, int height, int width, int out_h, int out_w,
                        int kernel_h, int kernel_w, int pad_h, int pad_w, int stride_h,
                        int dilation_h, int dilation_w) noexcept nogil
    void raise_plane_pd(const double* col, double* image, int height, int width, int out_h, int out_w,
                        int kernel_h, int kernel_w, int pad_h, int pad_w, int stride_h,
                        int dilation_h, int dilation_w) noexcept nogil


cdef inline void valid_outputs(int offset, int stride, int size, int out_size,
                               int* first, int* last) noexcept nogil:
    """[first, last): the outputs o whose input o*stride + offset lies in [0, size)."""
    if stride == 1:  # the common case, without the divisions
        first[0] = max(-offset, 0)
        last[0] = max(size - offset, 0)
    else:
        first[0] = 0 if offset >= 0 else (-offset + stride - 1) // stride
        last[0] = 0 if size - offset <= 0 else (size - offset + stride - 1) // stride
    first[0] = min(first[0], out_size)
    last[0] = max(first[0], min(last[0], out_size))


cdef void im2col_channels(const pixel* image, const Geometry* geom, int c_begin, int c_end,
                          pixel* col) noexcept nogil:
    cdef int kh = geom.kernel_h, kw = geom.kernel_w, sh = geom.stride_h, sw = geom.stride_w
    cdef int height = geom.height, width = geom.width, oh_n = geom.out_h, ow_n = geom.out_w
    cdef int c, ki, kj, oh, ow, row_offset, col_offset, oh_first, oh_last, ow_first, ow_last
    cdef const pixel* src
    cdef pixel* rows
    cdef pixel* dst
    for c in range(c_begin, c_end):
        for ki in range(kh):
            row_offset = ki * geom.dilation_h - geom.pad_h
            valid_outputs(row_offset, sh, height, oh_n, &oh_first, &oh_last)
            for kj in range(kw):
                col_offset = kj * geom.dilation_w - geom.pad_w
                valid_outputs(col_offset, sw, width, ow_n, &ow_first, &ow_last)
                rows = col + (<long>(c * kh + ki) * kw + kj) * oh_n * ow_n
                src = image + (<long>c * height + oh_first * sh + row_offset) * width
                if oh_first > 0:
                    memset(rows, 0, <size_t>oh_first * ow_n * sizeof(pixel))
                if sw == 1:
                    if pixel is float:
                        lower_rows_ps(rows + <long>oh_first * ow_n, src, <long>sh * width,
                                      col_offset, ow_n, ow_first, ow_last, oh_last - oh_first)
                    elif pixel is double:
                        lower_rows_pd(rows + <long>oh_first * ow_n, src, <long>sh * width,
                                      col_offset, ow_n, ow_first, ow_last, oh_last - oh_first)
                    else:
                        lower_rows_epi16(<uint16_t*>rows + <long>oh_first * ow_n, <const uint16_t*>src,
                                         <long>sh * width, col_offset, ow_n, ow_first, ow_last,
                                         oh_last - oh_first)
                elif pixel is float:
                    lower_strided_rows_ps(rows + <long>oh_first * ow_n, src, <long>sh * width, col_offset,
                                          sw, ow_n, ow_first, ow_last, oh_last - oh_first)
                else:
                    for oh in range(oh_first, oh_last):
                        dst = rows + <long>oh * ow_n
                        for ow in range(ow_first):
                            dst[ow] = 0
                        for ow in range(ow_first, ow_last):
                            dst[ow] = src[ow * sw + col_offset]
                        for ow in range(ow_last, ow_n):
                            dst[ow] = 0
                        src += sh * width
                if oh_last < oh_n:
                    memset(rows + <long>oh_last * ow_n, 0, <size_t>(oh_n - oh_last) * ow_n * sizeof(pixel))


cdef void col2im_channels(const floating* col, const Geometry* geom, int c_begin, int c_end,
                          floating* image) noexcept nogil:
    cdef int kh = geom.kernel_h, kw = geom.kernel_w, sh = geom.stride_h, sw = geom.stride_w
    cdef int height = geom.height, width = geom.width, oh_n = geom.out_h, ow_n = geom.out_w
    cdef int c, ki, kj, oh, ow, row_offset, col_offset, oh_first, oh_last, ow_first, ow_last
    cdef long plane_size = <long>height * width, block = <long>oh_n * ow_n
    cdef floating* dst
    cdef const floating* src
    if sw == 1:
        for c in range(c_begin, c_end):
            if floating is float:
                raise_plane_ps(col + c * kh * kw * block, image + c * plane_size, height, width,
                               oh_n, ow_n, kh, kw, geom.pad_h, geom.pad_w, sh, geom.dilation_h,
                               geom.dilation_w)
            else:
                raise_plane_pd(col + c * kh * kw * block, image + c * plane_size, height, width,
                               oh_n, ow_n, kh, kw, geom.pad_h, geom.pad_w, sh, geom.dilation_h,
                               geom.dilation_w)
        return
    memset(image + c_begin * plane_size, 0, <size_t>(c_end - c_begin) * plane_size * sizeof(floating))
    for c in range(c_begin, c_end):
        for ki in range(kh):
            row_offset = ki * geom.dilation_h - geom.pad_h
            valid_outputs(row_offset, sh, height, oh_n, &oh_first, &oh_last)
            for kj in range(kw):
                col_offset = kj * geom.dilation_w - geom.pad_w
                valid_outputs(col_offset, sw, width, ow_n, &ow_first, &ow_last)
                for oh in range(oh_first, oh_last):
                    src = col + (<long>(c * kh + ki) * kw + kj) * block + <long>oh * ow_n
                    dst = image + c * plane_size + <long>(oh * sh + row_offset) * width + col_offset
                    for ow in range(ow_first, ow_last):
                        dst[ow * sw] += src[ow]


cdef Geometry _checked_geometry(tuple image_shape, tuple col_shape, int kernel_h, int kernel_w,
                                int pad_h, int pad_w, int stride_h, int stride_w,
                                int dilation_h, int dilation_w) except *:
    cdef Geometry g = make_geometry(image_shape[0], image_shape[1], image_shape[2], kernel_h,
                                    kernel_w, pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w)
    expected = (g.channels * kernel_h * kernel_w, g.out_h * g.out_w)
    if col_shape != expected:
        raise ValueError(f"col has shape {col_shape}, this geometry needs {expected}")
    return g


def im2col(const pixel[:, :, ::1] x, int kernel_h, int kernel_w, int pad_h, int pad_w,
           int stride_h, int stride_w, int dilation_h, int dilation_w, pixel[:, ::1] col):
    """Writes the windows of image x[C, H, W] into col[C*kernel_h*kernel_w, OH*OW]."""
    cdef Geometry g = _checked_geometry((x.shape[0], x.shape[1], x.shape[2]),
                                        (col.shape[0], col.shape[1]), kernel_h, kernel_w,
                                        pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w)
    cdef int c, threads = max(1, min(<int>num_threads(), g.channels))
    with nogil:
        for c in prange(g.channels, num_threads=threads, schedule='static'):
            im2col_channels(&x[0, 0, 0], &g, c, c + 1, &col[0, 0])


def col2im(const floating[:, ::1] col, int kernel_h, int kernel_w, int pad_h, int pad_w,
           int stride_h, int stride_w, int dilation_h, int dilation_w, floating[:, :, ::1] x):
    """Overwrites image x[C, H, W] with the sum of the windows in col (the adjoint of im2col)."""
    cdef Geometry g = _checked_geometry((x.shape[0], x.shape[1], x.shape[2]),
                                        (col.shape[0], col.shape[1]), kernel_h, kernel_w,
                                        pad_h, pad_w, stride_h, stride_w, dilation_h, dilation_w)
    cdef int c, threads = max(1, min(<int>num_threads(), g.channels))
    with nogil:
        for c in prange(g.channels, num_threads=threads, schedule='static'):
            col2im_channels(&col[0, 0], &g, c, c + 1, &x[0, 0, 0])

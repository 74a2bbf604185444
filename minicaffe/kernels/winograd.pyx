"""Winograd F(2x2, 3x3) and F(4x4, 3x3) for 3x3 stride-1 convolutions (planned and called by conv.pyx).

A 3x3 stride-1 convolution computes each t x t output tile (t = 2 or 4) from an a x a input window d
(a = t + 2) as A^T [(G g G^T) * (B^T d B)] A: a^2 multiplications per tile and channel pair instead
of 9 t^2 (16 for 36 with t = 2, 36 for 144 with t = 4). Over a block of tiles the a^2 element-wise
products become a^2 GEMMs, U[k] (out x in) @ V[k] (in x tiles), where U holds the transformed
filters and V the transformed windows; the transforms are linear passes over the data, and the
larger tile also moves fewer bytes through them (a^2 / t^2: 4 values per output for t = 2, 2.25 for
t = 4). Backward uses the same machinery: dx is the convolution of dy with the filters rotated by
180 degrees and transposed (padding 2 - pad), and dW follows from the chain rule through the same
factorization, dU[k] = (A dy A^T)[k] @ V[k]^T and dW = G^T dU G.
Blocks of tiles span images, so the GEMMs are wide even for small late-layer images, and the a^2
GEMMs are split over the threads (fixed assignment: bit-identical runs for a thread count).

The matrices are Lavin and Gray's (arXiv:1509.09308), F(4x4, 3x3) with interpolation points
0, +-1, +-2 and infinity; every transform below is one of them applied down columns, then across rows.
"""
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.string cimport memcpy, memset

from minicaffe.kernels.blas cimport gemm
from minicaffe.kernels.parallel cimport team_size


cdef TileGrid make_grid(int batch, int channels, int height, int width, int out_channels, int out_h,
                        int out_w, int pad_h, int pad_w, int tile) noexcept nogil:
    cdef TileGrid g
    g.batch, g.channels, g.height, g.width = batch, channels, height, width
    g.out_channels, g.out_h, g.out_w, g.pad_h, g.pad_w = out_channels, out_h, out_w, pad_h, pad_w
    g.tile, g.alpha = tile, tile + 2
    g.tiles_h, g.tiles_w = (out_h + tile - 1) // tile, (out_w + tile - 1) // tile
    g.tiles_per_image = <long>g.tiles_h * g.tiles_w
    g.tiles = g.tiles_per_image * batch
    return g


cdef long plane_stride(long elements) noexcept nogil:
    """Where the next of the alpha^2 planes of a transformed array starts, given one plane's elements.

    The transforms write (or read) all the planes at once, one stream each; planes a power of two
    apart, as channel counts and blocks make them, would all fall in the same cache sets and evict
    each other (measured: the F(4x4) filter transform took 7x the GEMMs' time). Rounding the plane
    up to 4 KB and adding one cache line puts the streams in consecutive sets."""
    return (elements + 1023) // 1024 * 1024 + 16


cdef long scratch_elements(int tile, int widest) noexcept nogil:
    """Per-thread row scratch of the transforms for rows of up to ``widest`` outputs or inputs: the
    window transform's padded rows and their column transforms, the largest of the three users."""
    cdef long run = (widest + tile - 1) // tile
    return 2 * (tile + 2) * (tile * run + 2)


cdef inline void padded_rows(const floating* plane, int height, int width, int h0, int w0, int rows,
                             int length, floating* out) noexcept nogil:
    """out[a][i] = plane[h0 + a, w0 + i] for a < rows, i < length, zero outside the plane."""
    cdef int a, i, first = max(0, -w0), last = min(length, width - w0)
    cdef floating* row
    for a in range(rows):
        row = out + <long>a * length
        if h0 + a < 0 or h0 + a >= height or last <= first:
            memset(row, 0, length * sizeof(floating))
            continue
        for i in range(first):
            row[i] = 0
        memcpy(row + first, plane + <long>(h0 + a) * width + w0 + first, (last - first) * sizeof(floating))
        for i in range(last, length):
            row[i] = 0


cdef extern from "winograd_rows.h" nogil:
    void mc_wino_input_columns_f(int tile, const float* d, Py_ssize_t step, float* r, Py_ssize_t n)
    void mc_wino_input_columns_d(int tile, const double* d, Py_ssize_t step, double* r, Py_ssize_t n)
    void mc_wino_input_row_f(int tile, const float* s, float* o, Py_ssize_t o_step, Py_ssize_t count)
    void mc_wino_input_row_d(int tile, const double* s, double* o, Py_ssize_t o_step, Py_ssize_t count)
    void mc_wino_output_columns_f(int tile, const float* m, Py_ssize_t step, float* r, Py_ssize_t r_step,
                                  Py_ssize_t n)
    void mc_wino_output_columns_d(int tile, const double* m, Py_ssize_t step, double* r, Py_ssize_t r_step,
                                  Py_ssize_t n)
    void mc_wino_output_row_f(int tile, const float* c, Py_ssize_t step, float bias, float* out,
                              Py_ssize_t count)
    void mc_wino_output_row_d(int tile, const double* c, Py_ssize_t step, double bias, double* out,
                              Py_ssize_t count)
    void mc_wino_grad_columns_f(int tile, const float* y, Py_ssize_t step, float* r, Py_ssize_t n)
    void mc_wino_grad_columns_d(int tile, const double* y, Py_ssize_t step, double* r, Py_ssize_t n)
    void mc_wino_grad_row_f(int tile, const float* s, float* o, Py_ssize_t o_step, Py_ssize_t count)
    void mc_wino_grad_row_d(int tile, const double* s, double* o, Py_ssize_t o_step, Py_ssize_t count)
    void mc_wino_filters_f(int tile, const float* w, Py_ssize_t w_step, bint rotate, float* u,
                           Py_ssize_t k_stride, Py_ssize_t n)
    void mc_wino_filters_d(int tile, const double* w, Py_ssize_t w_step, bint rotate, double* u,
                           Py_ssize_t k_stride, Py_ssize_t n)
    void mc_wino_add_filter_grads_f(int tile, const float* du, Py_ssize_t k_stride, float* dw, Py_ssize_t n)
    void mc_wino_add_filter_grads_d(int tile, const double* du, Py_ssize_t k_stride, double* dw, Py_ssize_t n)


# The row loops of winograd_rows.h for either element type: the rows a 1-D transform reads (d, m,
# y) and writes (r) lie ``step`` apart, across a row the outputs of a window ``o_step`` apart.

cdef inline void input_columns(int tile, const floating* d, long step, floating* r, long n) noexcept nogil:
    """r_b = (B^T d)_b row by row; d and r each hold tile + 2 rows, ``step`` apart."""
    if floating is float:
        mc_wino_input_columns_f(tile, d, step, r, n)
    else:
        mc_wino_input_columns_d(tile, d, step, r, n)


cdef inline void input_row(int tile, const floating* s, floating* o, long o_step, long count) noexcept nogil:
    if floating is float:
        mc_wino_input_row_f(tile, s, o, o_step, count)
    else:
        mc_wino_input_row_d(tile, s, o, o_step, count)


cdef inline void output_columns(int tile, const floating* m, long step, floating* r, long r_step,
                                long n) noexcept nogil:
    """r_a = (A^T m)_a: tile + 2 rows of m ``step`` apart to ``tile`` rows of r ``r_step`` apart."""
    if floating is float:
        mc_wino_output_columns_f(tile, m, step, r, r_step, n)
    else:
        mc_wino_output_columns_d(tile, m, step, r, r_step, n)


cdef inline void output_row(int tile, const floating* c, long step, floating bias, floating* out,
                            long count) noexcept nogil:
    if floating is float:
        mc_wino_output_row_f(tile, c, step, bias, out, count)
    else:
        mc_wino_output_row_d(tile, c, step, bias, out, count)


cdef inline void grad_columns(int tile, const floating* y, long step, floating* r, long n) noexcept nogil:
    """r_b = (A y)_b: ``tile`` rows of y to tile + 2 rows of r, each ``step`` apart."""
    if floating is float:
        mc_wino_grad_columns_f(tile, y, step, r, n)
    else:
        mc_wino_grad_columns_d(tile, y, step, r, n)


cdef inline void grad_row(int tile, const floating* s, floating* o, long o_step, long count) noexcept nogil:
    if floating is float:
        mc_wino_grad_row_f(tile, s, o, o_step, count)
    else:
        mc_wino_grad_row_d(tile, s, o, o_step, count)


# -- transforms over runs of tiles along a tile row ------------------------------------------------

cdef inline void tile_position(const TileGrid* g, long tile, int* n, int* ty, int* tx) noexcept nogil:
    """Image n, tile row ty and tile column tx of tile number ``tile``; the channel loops below walk
    the tiles a run (to the end of a tile row) at a time."""
    cdef long within = tile % g.tiles_per_image
    n[0] = <int>(tile // g.tiles_per_image)
    ty[0] = <int>(within // g.tiles_w)
    tx[0] = <int>(within % g.tiles_w)


cdef void input_channel(const TileGrid* g, const floating* x, int c, long t0, int count, floating* v,
                        long ld, floating* scratch) noexcept nogil:
    """V[k][c][i] (at v + k * plane_stride(channels * ld) + c * ld + i) for tiles t0 + i, i < count,
    of channel c."""
    cdef long k_stride = plane_stride(<long>g.channels * ld), tile = t0, end = t0 + count
    cdef floating* out = v + <long>c * ld
    cdef floating* columns
    cdef int n, ty, tx, run, a, length, t = g.tile
    while tile < end:
        tile_position(g, tile, &n, &ty, &tx)
        run = <int>min(<long>(g.tiles_w - tx), end - tile)
        length = t * run + 2
        padded_rows(x + (<long>n * g.channels + c) * g.height * g.width, g.height, g.width,
                    t * ty - g.pad_h, t * tx - g.pad_w, g.alpha, length, scratch)
        columns = scratch + g.alpha * length
        input_columns(t, scratch, length, columns, length)
        for a in range(g.alpha):
            input_row(t, columns + a * length, out + g.alpha * a * k_stride, k_stride, run)
        out += run
        tile += run


cdef void output_channel(const TileGrid* g, const floating* mo, int m, long t0, int count, long ld,
                         floating bias, floating* y, floating* scratch) noexcept nogil:
    """y[n, m] tiles t0 .. t0 + count = A^T M A + bias, M[k][m][i] laid out as V in input_channel.

    Per run of tiles along a row: A^T down the columns into c[i][b][j] (tile x (tile + 2) rows of
    ``run``), then across into ``tile`` output rows, copied into y where they fall inside it."""
    cdef long k_stride = plane_stride(<long>g.out_channels * ld), tile = t0, end = t0 + count, row_length
    cdef const floating* src = mo + <long>m * ld
    cdef floating* columns = scratch
    cdef floating* rows
    cdef floating* plane
    cdef int n, ty, tx, run, a, b, oh, width, t = g.tile, alpha = g.alpha
    while tile < end:
        tile_position(g, tile, &n, &ty, &tx)
        run = <int>min(<long>(g.tiles_w - tx), end - tile)
        row_length = t * run
        rows = scratch + <long>t * alpha * run
        for b in range(alpha):
            output_columns(t, src + b * k_stride, alpha * k_stride, columns + b * run, <long>alpha * run, run)
        for a in range(t):
            output_row(t, columns + <long>a * alpha * run, run, bias, rows + a * row_length, run)
        plane = y + (<long>n * g.out_channels + m) * g.out_h * g.out_w
        width = min(t * run, g.out_w - t * tx)
        for a in range(t):
            oh = t * ty + a
            if oh >= g.out_h:
                break
            memcpy(plane + <long>oh * g.out_w + t * tx, rows + a * row_length, width * sizeof(floating))
        src += run
        tile += run


cdef void output_grad_channel(const TileGrid* g, const floating* dy, int m, long t0, int count,
                              floating* z, long ld, floating* scratch) noexcept nogil:
    """Z[k][m][i] = (A dy A^T)[k] for the tiles t0 + i of dy[n, m] (zero beyond the output)."""
    cdef long k_stride = plane_stride(<long>g.out_channels * ld), tile = t0, end = t0 + count
    cdef floating* out = z + <long>m * ld
    cdef floating* columns
    cdef int n, ty, tx, run, a, length, t = g.tile, alpha = g.alpha
    while tile < end:
        tile_position(g, tile, &n, &ty, &tx)
        run = <int>min(<long>(g.tiles_w - tx), end - tile)
        length = t * run
        padded_rows(dy + (<long>n * g.out_channels + m) * g.out_h * g.out_w, g.out_h, g.out_w,
                    t * ty, t * tx, t, length, scratch)
        columns = scratch + <long>t * length
        grad_columns(t, scratch, length, columns, length)
        for a in range(alpha):
            grad_row(t, columns + <long>a * length, out + alpha * a * k_stride, k_stride, run)
        out += run
        tile += run


cdef void filter_row(const floating* w, int row, int in_channels, int out_channels, bint adjoint, int tile,
                     floating* u) noexcept nogil:
    """Row ``row`` of the transformed filters, planes plane_stride(in * out) apart as in every
    transformed array below: u[k][m][c] = (G g G^T)[k] with g = w[m, c] for every c (m = row), or
    for the adjoint u[k][c][m] with g = w[m, c] rotated by 180 degrees for every m (c = row). Either
    way each plane gets one contiguous run."""
    cdef long k_stride = plane_stride(<long>in_channels * out_channels)
    cdef const floating* first = w + <long>row * (9 if adjoint else 9 * in_channels)
    cdef long w_step = 9 * in_channels if adjoint else 9
    cdef int n = out_channels if adjoint else in_channels
    u += <long>row * n
    if floating is float:
        mc_wino_filters_f(tile, first, w_step, adjoint, u, k_stride, n)
    else:
        mc_wino_filters_d(tile, first, w_step, adjoint, u, k_stride, n)


cdef void add_filter_grad_row(const floating* du, int m, int out_channels, int in_channels, int tile,
                              floating* dw) noexcept nogil:
    """dw[m, c] += G^T dU[m, c] G for every c, dU[k][m][c] at du + k * plane_stride(out * in) + m * in + c."""
    cdef long k_stride = plane_stride(<long>out_channels * in_channels)
    if floating is float:
        mc_wino_add_filter_grads_f(tile, du + <long>m * in_channels, k_stride, dw + <long>m * in_channels * 9,
                                   in_channels)
    else:
        mc_wino_add_filter_grads_d(tile, du + <long>m * in_channels, k_stride, dw + <long>m * in_channels * 9,
                                   in_channels)


cdef void winograd_apply(const TileGrid* g, const floating* x, const floating* u, const floating* bias,
                         floating* y, floating* v, floating* mo, int block, floating* scratch,
                         long scratch_size, int threads) noexcept nogil:
    """y = the 3x3 convolution of x whose transformed filters are u (alpha^2 planes of [out][in]),
    plus bias."""
    cdef long t0
    cdef int count, c, k, m
    cdef int cin = g.channels, cout = g.out_channels, products = g.alpha * g.alpha
    t0 = 0
    while t0 < g.tiles:
        count = <int>min(<long>block, g.tiles - t0)
        for c in prange(cin, num_threads=team_size(cin, threads), schedule='static'):
            input_channel(g, x, c, t0, count, v, block, scratch + threadid() * scratch_size)
        for k in prange(products, num_threads=threads, schedule='static'):
            gemm(False, False, cout, count, cin, <floating>1, u + k * plane_stride(<long>cout * cin), cin,
                 v + k * plane_stride(<long>cin * block), block, <floating>0,
                 mo + k * plane_stride(<long>cout * block), block)
        for m in prange(cout, num_threads=team_size(cout, threads), schedule='static'):
            output_channel(g, mo, m, t0, count, block, bias[m] if bias != NULL else 0, y,
                           scratch + threadid() * scratch_size)
        t0 += block

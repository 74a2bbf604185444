"""Winograd F(2x2, 3x3) for 3x3 stride-1 convolutions (planned and called by conv.pyx).

A 3x3 stride-1 convolution computes each 2x2 output tile from a 4x4 input window d as
A^T [(G g G^T) * (B^T d B)] A: 16 multiplications per tile and channel pair instead of 36. Over a
block of tiles the 16 element-wise products become 16 GEMMs, U[k] (out x in) @ V[k] (in x tiles),
where U holds the transformed filters and V the transformed windows; the transforms are linear
passes over the data. Backward uses the same machinery: dx is the convolution of dy with the
filters rotated by 180 degrees and transposed (padding 2 - pad), and dW follows from the chain rule
through the same factorization, dU[k] = (A dy A^T)[k] @ V[k]^T and dW = G^T dU G.
Blocks of tiles span images, so the GEMMs are wide even for small late-layer images, and the 16
GEMMs are split over the threads (fixed assignment: bit-identical runs for a thread count).
"""
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.string cimport memcpy, memset

from minicaffe.kernels.blas cimport gemm
from minicaffe.kernels.parallel cimport team_size


cdef TileGrid make_grid(int batch, int channels, int height, int width, int out_channels, int out_h,
                        int out_w, int pad_h, int pad_w) noexcept nogil:
    cdef TileGrid g
    g.batch, g.channels, g.height, g.width = batch, channels, height, width
    g.out_channels, g.out_h, g.out_w, g.pad_h, g.pad_w = out_channels, out_h, out_w, pad_h, pad_w
    g.tiles_h, g.tiles_w = (out_h + 1) // 2, (out_w + 1) // 2
    g.tiles_per_image = <long>g.tiles_h * g.tiles_w
    g.tiles = g.tiles_per_image * batch
    return g


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


cdef inline void input_row_transform(floating* p, int length, int count, floating* out,
                                     long k_stride) noexcept nogil:
    """``count`` tiles of B^T d B from four padded rows p[4][length] (window j at column 2j):
    first the column transform in place, then the row transform into out[k * k_stride + j]."""
    cdef int i, j, a
    cdef floating* p0 = p
    cdef floating* p1 = p + length
    cdef floating* p2 = p + 2 * length
    cdef floating* p3 = p + 3 * length
    cdef floating v1, v2
    for i in range(length):
        v1, v2 = p1[i], p2[i]
        p0[i] = p0[i] - v2
        p3[i] = v1 - p3[i]
        p1[i] = v1 + v2
        p2[i] = v2 - v1
    cdef floating* s
    cdef floating* o0
    cdef floating* o1
    for a in range(4):
        s = p + <long>a * length
        o0 = out + (4 * a) * k_stride
        o1 = out + (4 * a + 1) * k_stride
        for j in range(count):
            o0[j] = s[2 * j] - s[2 * j + 2]
            o1[j] = s[2 * j + 1] + s[2 * j + 2]
        o0 = out + (4 * a + 2) * k_stride
        o1 = out + (4 * a + 3) * k_stride
        for j in range(count):
            o0[j] = s[2 * j + 2] - s[2 * j + 1]
            o1[j] = s[2 * j + 1] - s[2 * j + 3]


cdef inline void tile_position(const TileGrid* g, long tile, int* n, int* ty, int* tx) noexcept nogil:
    """Image n, tile row ty and tile column tx of tile number ``tile``; the channel loops below walk
    the tiles a run (to the end of a tile row) at a time."""
    cdef long within = tile % g.tiles_per_image
    n[0] = <int>(tile // g.tiles_per_image)
    ty[0] = <int>(within // g.tiles_w)
    tx[0] = <int>(within % g.tiles_w)


cdef void input_channel(const TileGrid* g, const floating* x, int c, long t0, int count, floating* v,
                        long ld, floating* scratch) noexcept nogil:
    """V[k][c][i] (at v + (k * channels + c) * ld + i) for tiles t0 + i, i < count, of channel c."""
    cdef long k_stride = <long>g.channels * ld, tile = t0, end = t0 + count
    cdef floating* out = v + <long>c * ld
    cdef int n, ty, tx, run
    while tile < end:
        tile_position(g, tile, &n, &ty, &tx)
        run = <int>min(<long>(g.tiles_w - tx), end - tile)
        padded_rows(x + (<long>n * g.channels + c) * g.height * g.width, g.height, g.width,
                    2 * ty - g.pad_h, 2 * tx - g.pad_w, 4, 2 * run + 2, scratch)
        input_row_transform(scratch, 2 * run + 2, run, out, k_stride)
        out += run
        tile += run


cdef void output_channel(const TileGrid* g, const floating* mo, int m, long t0, int count, long ld,
                         floating bias, floating* y, floating* scratch) noexcept nogil:
    """y[n, m] tiles t0 .. t0 + count = A^T M A + bias, M[k] at mo + (k * out_channels + m) * ld + i.

    Per run of tiles along a row: A^T down the columns into t[a][b][j] (2 x 4 rows of ``run``),
    then across into two output rows, copied into y where they fall inside it."""
    cdef long k_stride = <long>g.out_channels * ld, tile = t0, end = t0 + count
    cdef const floating* src = mo + <long>m * ld
    cdef const floating* s0
    cdef const floating* s1
    cdef const floating* s2
    cdef const floating* s3
    cdef floating* plane
    cdef floating* t
    cdef floating* row
    cdef int n, ty, tx, run, j, a, b, oh, width
    while tile < end:
        tile_position(g, tile, &n, &ty, &tx)
        run = <int>min(<long>(g.tiles_w - tx), end - tile)
        for b in range(4):
            s0, s1 = src + b * k_stride, src + (4 + b) * k_stride
            s2, s3 = src + (8 + b) * k_stride, src + (12 + b) * k_stride
            t = scratch + b * run
            for j in range(run):
                t[j] = s0[j] + s1[j] + s2[j]
            t = scratch + (4 + b) * run
            for j in range(run):
                t[j] = s1[j] - s2[j] - s3[j]
        plane = y + (<long>n * g.out_channels + m) * g.out_h * g.out_w
        width = min(2 * run, g.out_w - 2 * tx)
        row = scratch + 8 * run
        for a in range(2):
            oh = 2 * ty + a
            if oh >= g.out_h:
                break
            t = scratch + 4 * a * run
            for j in range(run):
                row[2 * j] = t[j] + t[run + j] + t[2 * run + j] + bias
                row[2 * j + 1] = t[run + j] - t[2 * run + j] - t[3 * run + j] + bias
            memcpy(plane + <long>oh * g.out_w + 2 * tx, row, width * sizeof(floating))
        src += run
        tile += run


cdef void output_grad_channel(const TileGrid* g, const floating* dy, int m, long t0, int count,
                              floating* z, long ld, floating* scratch) noexcept nogil:
    """Z[k][m][i] = (A dy A^T)[k] for the 2x2 tiles t0 + i of dy[n, m] (zero beyond the output)."""
    cdef long k_stride = <long>g.out_channels * ld, tile = t0, end = t0 + count
    cdef floating* out = z + <long>m * ld
    cdef floating* p0
    cdef floating* p1
    cdef floating* t
    cdef floating* o0
    cdef floating* o1
    cdef floating v0, v1
    cdef int n, ty, tx, run, i, j, a, length
    while tile < end:
        tile_position(g, tile, &n, &ty, &tx)
        run = <int>min(<long>(g.tiles_w - tx), end - tile)
        length = 2 * run
        padded_rows(dy + (<long>n * g.out_channels + m) * g.out_h * g.out_w, g.out_h, g.out_w,
                    2 * ty, 2 * tx, 2, length, scratch)
        # A dy down the columns: rows dy0, dy0 + dy1, dy0 - dy1, -dy1 (scratch rows 2 to 5).
        p0, p1 = scratch, scratch + length
        for i in range(length):
            v0, v1 = p0[i], p1[i]
            scratch[2 * length + i] = v0
            scratch[3 * length + i] = v0 + v1
            scratch[4 * length + i] = v0 - v1
            scratch[5 * length + i] = -v1
        for a in range(4):
            t = scratch + (2 + a) * length
            o0, o1 = out + (4 * a) * k_stride, out + (4 * a + 1) * k_stride
            for j in range(run):
                o0[j] = t[2 * j]
                o1[j] = t[2 * j] + t[2 * j + 1]
            o0, o1 = out + (4 * a + 2) * k_stride, out + (4 * a + 3) * k_stride
            for j in range(run):
                o0[j] = t[2 * j] - t[2 * j + 1]
                o1[j] = -t[2 * j + 1]
        out += run
        tile += run


cdef void filter_row(const floating* w, int m, int in_channels, int out_channels, bint rotate,
                     floating* u) noexcept nogil:
    """u[k][m][c] = (G g G^T)[k], g = w[m, c] (or for the adjoint, u[k][c][m] with g rotated 180)."""
    cdef int c, a, b
    cdef floating g[9]
    cdef floating t[12]
    cdef const floating* src
    cdef long k_stride = <long>in_channels * out_channels, at
    for c in range(in_channels):
        src = w + (<long>m * in_channels + c) * 9
        for a in range(9):
            g[a] = src[8 - a] if rotate else src[a]
        for b in range(3):
            t[b], t[3 + b] = g[b], (g[b] + g[3 + b] + g[6 + b]) * <floating>0.5
            t[6 + b], t[9 + b] = (g[b] - g[3 + b] + g[6 + b]) * <floating>0.5, g[6 + b]
        at = <long>c * out_channels + m if rotate else <long>m * in_channels + c
        for a in range(4):
            u[(4 * a) * k_stride + at] = t[3 * a]
            u[(4 * a + 1) * k_stride + at] = (t[3 * a] + t[3 * a + 1] + t[3 * a + 2]) * <floating>0.5
            u[(4 * a + 2) * k_stride + at] = (t[3 * a] - t[3 * a + 1] + t[3 * a + 2]) * <floating>0.5
            u[(4 * a + 3) * k_stride + at] = t[3 * a + 2]


cdef void add_filter_grad_row(const floating* du, int m, int out_channels, int in_channels,
                              floating* dw) noexcept nogil:
    """dw[m, c] += G^T dU[m, c] G for every c, dU[k][m][c] at du + k * out * in + m * in + c."""
    cdef int c, a, b
    cdef floating d[16]
    cdef floating t[12]
    cdef floating* dst
    cdef long k_stride = <long>out_channels * in_channels
    for c in range(in_channels):
        for a in range(16):
            d[a] = du[a * k_stride + <long>m * in_channels + c]
        # G^T dU (3 x 4), then (G^T dU) G (3 x 3).
        for b in range(4):
            t[b] = d[b] + (d[4 + b] + d[8 + b]) * <floating>0.5
            t[4 + b] = (d[4 + b] - d[8 + b]) * <floating>0.5
            t[8 + b] = (d[4 + b] + d[8 + b]) * <floating>0.5 + d[12 + b]
        dst = dw + (<long>m * in_channels + c) * 9
        for a in range(3):
            dst[3 * a] += t[4 * a] + (t[4 * a + 1] + t[4 * a + 2]) * <floating>0.5
            dst[3 * a + 1] += (t[4 * a + 1] - t[4 * a + 2]) * <floating>0.5
            dst[3 * a + 2] += (t[4 * a + 1] + t[4 * a + 2]) * <floating>0.5 + t[4 * a + 3]


cdef void winograd_apply(const TileGrid* g, const floating* x, const floating* u, const floating* bias,
                         floating* y, floating* v, floating* mo, int block, floating* scratch,
                         long scratch_size, int threads) noexcept nogil:
    """y = the 3x3 convolution of x whose transformed filters are u ([16][out][in]), plus bias."""
    cdef long t0
    cdef int count, c, k, m
    cdef int cin = g.channels, cout = g.out_channels
    t0 = 0
    while t0 < g.tiles:
        count = <int>min(<long>block, g.tiles - t0)
        for c in prange(cin, num_threads=team_size(cin, threads), schedule='static'):
            input_channel(g, x, c, t0, count, v, block, scratch + threadid() * scratch_size)
        for k in prange(16, num_threads=threads, schedule='static'):
            gemm(False, False, cout, count, cin, <floating>1, u + <long>k * cout * cin, cin,
                 v + <long>k * cin * block, block, <floating>0, mo + <long>k * cout * block, block)
        for m in prange(cout, num_threads=team_size(cout, threads), schedule='static'):
            output_channel(g, mo, m, t0, count, block, bias[m] if bias != NULL else 0, y,
                           scratch + threadid() * scratch_size)
        t0 += block

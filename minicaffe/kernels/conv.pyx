"""2-D convolution forward and backward (Caffe's semantics: groups, padding, stride, dilation).

Each image is lowered with im2col into col[C*kh*kw, OH*OW], and each group is one GEMM:
y_g = W_g @ col_g. Backward recomputes the columns: dW_g += dy_g @ col_g^T (or, for small weights
with many columns, dW_g^T += col_g @ dy_g^T, transposed into dW at the end), and
dx = col2im(W_g^T @ dy_g). A 1x1 kernel with stride 1 and no padding needs no lowering: the image
itself is the column matrix.

Work is split two ways, both with a fixed assignment of work to workers so that, for a given thread
count, results are bit-identical from run to run:

* across images: worker t takes a contiguous run of images with its own column buffer and its own
  partial bias and weight gradients (worker 0 adds its weight gradients straight into dW, unless
  they are transposed), added into db and dW in worker order at the end;
* inside one image, for the images left over when the batch does not divide among the threads (and
  for every image when per-thread column buffers would exceed COL_BUDGET_BYTES): im2col and col2im
  split over channels, the GEMMs over output columns (y, dx) or output channels (dW, db).

Two other algorithms take the shapes where they measured faster (``make_plan`` chooses, from the
thresholds below): Winograd F(4x4, 3x3) or F(2x2, 3x3) for wide 3x3 stride-1 layers, and, for
small images with large weights, the batch lowered side by side into one wide column matrix. Both
are also bit-identical from run to run for a thread count.

All scratch memory is one caller-owned ``workspace`` of ``conv_workspace_size(...)`` elements, so a
layer allocates it once and the calls themselves never allocate.
"""
from cython cimport floating
from cython.parallel cimport prange, threadid
from libc.string cimport memcpy, memset

from minicaffe.kernels.blas cimport gemm
from minicaffe.kernels.im2col cimport Geometry, make_geometry, im2col_channels, col2im_channels
from minicaffe.kernels.parallel cimport team_size
from minicaffe.kernels.parallel import num_threads
from minicaffe.kernels.winograd cimport (TileGrid, make_grid, plane_stride, scratch_elements, filter_row,
                                         winograd_apply, input_channel, output_grad_channel,
                                         add_filter_grad_row)

# Per-thread column buffers larger than this in total (a big image on many threads) switch every
# image to the inside-one-image split, which needs a single buffer.
COL_BUDGET_BYTES = 256 << 20
# 3x3 stride-1 convolutions with at least WINOGRAD_MIN_CHANNELS input and output channels, or at
# least WINOGRAD_LARGE_IMAGE_MIN_CHANNELS on images of at least WINOGRAD_LARGE_IMAGE output
# positions, and with WINOGRAD_MIN_SPATIAL output positions per image and WINOGRAD_MIN_TILES 2x2
# output tiles over the batch, run as Winograd (see its section). Elsewhere the transforms of the
# tiles and filters, which are bound by memory and gain little from a second thread, cost more than
# the GEMM time saved. The tiles are 4x4 (F(4x4, 3x3): 36 products per 16 outputs) where they cover
# at most WINOGRAD_F4_MAX_COVER times the output area that 2x2 tiles cover, else 2x2 (16 per 4): on
# 14x14 and 7x7 images the 4x4 tiles' padding and narrower GEMMs lost what their fewer products saved.
# Measured at 2 threads, forward + backward, one process, interleaved: ResNet-50 1431 -> 1332 ms
# against F(2x2) on 256+ channels only (machine under load; its 128-channel 28x28 layers 143 -> 93
# ms, 64-channel 56x56 126 -> 120), GoogLeNet 631 -> 574 ms, VGG-16 1864 -> 1492 ms. Still slower
# than im2col + GEMM: the 16-64-channel layers of the Fashion-MNIST ResNet, and layers with few tiles
# (VGG-16's conv5 at batch 4 as F(4x4), ResNet-50's res5 at 7x7 as either).
WINOGRAD_MIN_CHANNELS = 128
WINOGRAD_LARGE_IMAGE = 56 * 56
WINOGRAD_LARGE_IMAGE_MIN_CHANNELS = 64
WINOGRAD_MIN_SPATIAL = 144
WINOGRAD_MIN_TILES = 256
WINOGRAD_F4_MAX_COVER = 1.1
# Winograd tiles go through the transforms and the GEMMs in blocks whose transformed windows take
# about this many bytes (but at least WINOGRAD_MIN_BLOCK tiles, so that the GEMMs stay wide).
WINOGRAD_BLOCK_BYTES = 8 << 20
WINOGRAD_MIN_BLOCK = 128
# Convolutions with at most this many output positions per image and at least this many weights run
# as one wide GEMM over a chunk of images (see its section) rather than one GEMM per image
# (measured: ResNet-50's 7x7 layers ran 25-35% faster; 14x14 and 28x28 images, and small weights
# such as CIFAR-10's, 5-20% slower).
WIDE_MAX_SPATIAL = 100
WIDE_MIN_WEIGHTS = 1 << 18
# Outside the wide path, the weight gradient is accumulated transposed, dW^T = col @ dy^T, where its
# rows outnumber its columns (kg > mg) and the batch has at least this many output positions;
# elsewhere dW = dy @ col^T goes straight into dW. The GEMM with the more rows runs faster (ResNet-20
# on Fashion-MNIST, its convolutions' backward at 2 threads: 99 ms transposed, 121 ms not), but the
# transposition into dW is a strided pass over the weights that repays itself only with many columns
# per weight (it took up to 40% of the weight-gradient time of ResNet-50's 7x7 layers).
DW_TRANSPOSED_MIN_COLUMNS = 4096


cdef struct Plan:
    Geometry geom
    int batch, out_channels, group
    int out_per_group       # output channels per group (rows of W_g)
    int k_per_group         # (C / group) * kh * kw: rows of col_g, columns of W_g
    int spatial             # OH * OW: columns of col and y
    bint pointwise          # 1x1, stride 1, no padding: the image is its own column matrix
    int threads             # OpenMP threads
    int workers             # image-splitting workers: threads, or 0 when every image is split inside
    long col_size           # elements of one column buffer (0 when pointwise)
    long weight_size
    bint winograd           # 3x3, stride 1: Winograd F(tile x tile, 3x3) instead of im2col and GEMM
    int wino_tile           # output tile side, 2 or 4
    int wino_products       # (wino_tile + 2)^2: element-wise products per tile, GEMMs per block
    int wino_block          # tiles per Winograd block
    long wino_scratch       # elements of each thread's row scratch for the Winograd transforms
    bint wide               # small images: chunks of images lowered side by side, one GEMM each
    int wide_chunk          # images per chunk
    bint dw_transposed      # the weight gradient accumulated as dW^T [group * kg, mg]


cdef inline int tile_cover(int extent, int tile) noexcept nogil:
    """The extent that whole tiles of this size cover."""
    return (extent + tile - 1) // tile * tile


cdef int make_plan(Plan* p, tuple x_shape, tuple w_shape, tuple pad, tuple stride, tuple dilation,
                   int group, int threads, Py_ssize_t itemsize) except -1:
    cdef int n, c, h, w_, m, cg, kh, kw
    n, c, h, w_ = x_shape
    m, cg, kh, kw = w_shape
    if group < 1 or c % group or m % group or cg * group != c:
        raise ValueError(f"weights {w_shape} with group {group} do not fit input {x_shape}")
    p.geom = make_geometry(c, h, w_, kh, kw, pad[0], pad[1], stride[0], stride[1],
                           dilation[0], dilation[1])
    p.batch, p.out_channels, p.group = n, m, group
    p.out_per_group = m // group
    p.k_per_group = cg * kh * kw
    p.spatial = p.geom.out_h * p.geom.out_w
    p.pointwise = kh == 1 and kw == 1 and tuple(pad) == (0, 0) and tuple(stride) == (1, 1)
    p.threads = max(1, threads)
    p.col_size = 0 if p.pointwise else <long>c * kh * kw * p.spatial
    p.weight_size = <long>m * p.k_per_group
    p.workers = p.threads
    if p.threads > 1 and p.threads * p.col_size * itemsize > COL_BUDGET_BYTES:
        p.workers = 0
    p.winograd = (kh == 3 and kw == 3 and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1)
                  and group == 1 and 0 <= pad[0] <= 2 and 0 <= pad[1] <= 2
                  and (min(c, m) >= WINOGRAD_MIN_CHANNELS
                       or (min(c, m) >= WINOGRAD_LARGE_IMAGE_MIN_CHANNELS and p.spatial >= WINOGRAD_LARGE_IMAGE))
                  and p.spatial >= WINOGRAD_MIN_SPATIAL
                  and n * ((p.geom.out_h + 1) // 2) * ((p.geom.out_w + 1) // 2) >= WINOGRAD_MIN_TILES)
    if p.winograd:
        cover_4 = tile_cover(p.geom.out_h, 4) * tile_cover(p.geom.out_w, 4)
        cover_2 = tile_cover(p.geom.out_h, 2) * tile_cover(p.geom.out_w, 2)
        t = p.wino_tile = 4 if cover_4 <= WINOGRAD_F4_MAX_COVER * cover_2 else 2
        p.wino_products = (t + 2) * (t + 2)
        tiles = n * max(((p.geom.out_h + t - 1) // t) * ((p.geom.out_w + t - 1) // t),
                        ((h + t - 1) // t) * ((w_ + t - 1) // t))
        window_bytes = p.wino_products * max(c, m) * itemsize
        p.wino_block = max(1, min(tiles, max(WINOGRAD_MIN_BLOCK, WINOGRAD_BLOCK_BYTES // window_bytes)))
        p.wino_scratch = scratch_elements(t, max(p.geom.out_w, w_))
    p.wide = (not p.winograd and n > 1 and p.spatial <= WIDE_MAX_SPATIAL
              and p.weight_size >= WIDE_MIN_WEIGHTS)
    if p.wide:
        p.wide_chunk = max(1, min(n, COL_BUDGET_BYTES // ((c * kh * kw + m) * p.spatial * itemsize)))
    p.dw_transposed = (not p.winograd and not p.wide and p.k_per_group > p.out_per_group
                       and <long>n * p.spatial >= DW_TRANSPOSED_MIN_COLUMNS)
    return 0


cdef long wide_elements(const Plan* p) noexcept nogil:
    """The wide path's buffers: columns and outputs (or output gradients) of a chunk, staging."""
    return ((<long>p.geom.channels * p.geom.kernel_h * p.geom.kernel_w + p.out_channels)
            * p.wide_chunk * p.spatial + p.threads * p.col_size)


cdef long workspace_elements(const Plan* p) noexcept:
    """Winograd: transformed filters and their gradient, two blocks of transformed tiles, per-thread
    rows. Wide: its buffers, then db.
    Otherwise per buffer set (one per worker, at least one): columns, db; then the partial dW^T of
    every set or, with dW itself, of every set after the first."""
    cdef long widest = max(p.geom.channels, p.out_channels)
    if p.winograd:
        return (2 * p.wino_products * (plane_stride(p.weight_size // 9) + plane_stride(widest * p.wino_block))
                + p.threads * p.wino_scratch)
    if p.wide:
        return wide_elements(p) + p.out_channels
    cdef int sets = max(p.workers, 1)
    return sets * (p.col_size + p.out_channels) + (sets if p.dw_transposed else sets - 1) * p.weight_size


def conv_workspace_size(tuple x_shape, tuple w_shape, tuple pad, tuple stride, tuple dilation,
                        int group=1, dtype_size=4, threads=None):
    """Elements of workspace that conv_forward/conv_backward need for these shapes and threads."""
    cdef Plan p
    make_plan(&p, x_shape, w_shape, pad, stride, dilation, group,
              num_threads() if threads is None else threads, dtype_size)
    return workspace_elements(&p)


cdef int check_call(Plan* p, tuple x_shape, tuple w_shape, tuple y_shape, tuple pad, tuple stride,
                    tuple dilation, int group, Py_ssize_t workspace_size,
                    Py_ssize_t itemsize) except -1:
    make_plan(p, x_shape, w_shape, pad, stride, dilation, group, num_threads(), itemsize)
    expected = (p.batch, p.out_channels, p.geom.out_h, p.geom.out_w)
    if y_shape != expected:
        raise ValueError(f"output has shape {y_shape}, input {x_shape} and weights {w_shape} give {expected}")
    if workspace_size < workspace_elements(p):
        raise ValueError(f"workspace holds {workspace_size} elements, {workspace_elements(p)} needed")
    return 0


cdef tuple dims(const Py_ssize_t* shape):
    return (shape[0], shape[1], shape[2], shape[3])


# -- the steps, each over a slice of one image -------------------------------------------------------

cdef inline void lower(const Plan* p, const floating* image, floating* col, int c_begin,
                       int c_end) noexcept nogil:
    if not p.pointwise:
        im2col_channels(image, &p.geom, c_begin, c_end, col)


cdef void forward_columns(const Plan* p, const floating* col, const floating* w, const floating* bias,
                          floating* y, long ld, int j_begin, int j_end) noexcept nogil:
    """y[:, j_begin:j_end] = W_g @ col_g[:, j_begin:j_end] (+ bias) for every group g; col and y have
    row stride ld."""
    cdef int g, row, j, mg = p.out_per_group, kg = p.k_per_group
    cdef floating b
    cdef floating* y_row
    if j_end <= j_begin:
        return
    for g in range(p.group):
        gemm(False, False, mg, j_end - j_begin, kg, <floating>1, w + <long>g * mg * kg, kg,
             col + <long>g * kg * ld + j_begin, ld, <floating>0, y + <long>g * mg * ld + j_begin, ld)
    if bias != NULL:
        for row in range(p.out_channels):
            b = bias[row]
            y_row = y + <long>row * ld
            for j in range(j_begin, j_end):
                y_row[j] += b


cdef inline long block_begin(long extent, int blocks, int index) noexcept nogil:
    """Start of block ``index`` when [0, extent) is cut into ``blocks`` near-equal contiguous blocks."""
    return extent * index // blocks


cdef void add_parts(const floating* parts, int count, long part_size, long begin, long end,
                    floating* total) noexcept nogil:
    """total[begin:end] += parts[0][begin:end], then parts[1][begin:end], ... (parts part_size apart)."""
    cdef int b
    cdef long i
    cdef const floating* part
    for b in range(count):
        part = parts + b * part_size
        for i in range(begin, end):
            total[i] += part[i]


cdef inline void add_row_sums(const floating* rows, int n_rows, int n_cols, floating* out) noexcept nogil:
    """out[r] += sum of row r, with eight independent partial sums (vectorizable, fixed order)."""
    cdef int r, j, lane
    cdef floating acc[8]
    cdef const floating* row
    for r in range(n_rows):
        row = rows + <long>r * n_cols
        for lane in range(8):
            acc[lane] = 0
        j = 0
        while j + 8 <= n_cols:
            for lane in range(8):
                acc[lane] += row[j + lane]
            j += 8
        for lane in range(n_cols - j):
            acc[lane] += row[j + lane]
        out[r] += ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]))


cdef void weight_grad_block(const Plan* p, const floating* col, const floating* dy, int columns, long ld,
                            floating* dw, int m_begin, int m_end, int k_begin, int k_end) noexcept nogil:
    """dW[m_begin:m_end, k_begin:k_end] += dy_g @ col_g^T over the first ``columns`` columns of col and
    dy (row stride ld), each row m in its group g = m // mg."""
    cdef int g, first, last, mg = p.out_per_group, kg = p.k_per_group
    if m_end <= m_begin or k_end <= k_begin:
        return
    for g in range(m_begin // mg, (m_end - 1) // mg + 1):
        first = max(m_begin, g * mg)
        last = min(m_end, (g + 1) * mg)
        gemm(False, True, last - first, k_end - k_begin, columns, <floating>1, dy + <long>first * ld, ld,
             col + (<long>g * kg + k_begin) * ld, ld, <floating>1, dw + <long>first * kg + k_begin, kg)


cdef inline void weight_grad_share(const Plan* p, const floating* col, const floating* dy, int columns,
                                   long ld, floating* dw, int t, int threads) noexcept nogil:
    """Thread t's share of weight_grad_block over all of dW: a block of its rows or, when dW has more
    columns than rows, of its columns."""
    cdef int m = p.out_channels, kg = p.k_per_group
    if m >= kg:
        weight_grad_block(p, col, dy, columns, ld, dw, block_begin(m, threads, t),
                          block_begin(m, threads, t + 1), 0, kg)
    else:
        weight_grad_block(p, col, dy, columns, ld, dw, 0, m, block_begin(kg, threads, t),
                          block_begin(kg, threads, t + 1))


cdef void weight_grad_transposed_rows(const Plan* p, const floating* col, const floating* dy, int columns,
                                      long ld, floating* dw_t, int r_begin, int r_end) noexcept nogil:
    """Rows [r_begin, r_end) of dW^T (all groups stacked, [group * kg, mg]) += col_g @ dy_g^T over the
    first ``columns`` columns of col and dy (row stride ld)."""
    cdef int g, first, last, mg = p.out_per_group, kg = p.k_per_group
    if r_end <= r_begin:
        return
    for g in range(r_begin // kg, (r_end - 1) // kg + 1):
        first = max(r_begin, g * kg)
        last = min(r_end, (g + 1) * kg)
        gemm(False, True, last - first, mg, columns, <floating>1, col + <long>first * ld, ld,
             dy + <long>g * mg * ld, ld, <floating>1, dw_t + <long>first * mg, mg)


cdef void add_transposed_parts(const Plan* p, const floating* parts, int sets, int row_begin, int row_end,
                               floating* dw) noexcept nogil:
    """Rows [row_begin, row_end) of dW: dW[row, k] += the sum over the sets of dW^T[group * kg + k,
    row % mg], in set order."""
    cdef int row, k, b, mg = p.out_per_group, kg = p.k_per_group
    cdef const floating* column
    cdef floating total
    for row in range(row_begin, row_end):
        column = parts + <long>(row // mg) * kg * mg + row % mg
        for k in range(kg):
            total = dw[<long>row * kg + k]
            for b in range(sets):
                total = total + column[b * p.weight_size + <long>k * mg]
            dw[<long>row * kg + k] = total


cdef void input_grad_columns(const Plan* p, const floating* w, const floating* dy, floating* col,
                             long ld, int j_begin, int j_end) noexcept nogil:
    """col_g[:, j_begin:j_end] = W_g^T @ dy_g[:, j_begin:j_end] for every group g; dy and col have
    row stride ld."""
    cdef int g, mg = p.out_per_group, kg = p.k_per_group
    if j_end <= j_begin:
        return
    for g in range(p.group):
        gemm(True, False, kg, j_end - j_begin, mg, <floating>1, w + <long>g * mg * kg, kg,
             dy + <long>g * mg * ld + j_begin, ld, <floating>0, col + <long>g * kg * ld + j_begin, ld)


cdef inline void raise_to_image(const Plan* p, const floating* col, floating* image, int c_begin,
                                int c_end) noexcept nogil:
    if not p.pointwise:
        col2im_channels(col, &p.geom, c_begin, c_end, image)


# -- Winograd F(4x4, 3x3) and F(2x2, 3x3) ----------------------------------------------------------
# The tile grid and the transforms are in winograd.pyx; here the workspace is cut up for them.

cdef void winograd_forward(const Plan* p, const floating* x, const floating* w, const floating* bias,
                           floating* y, floating* workspace) noexcept nogil:
    cdef int m, cin = p.geom.channels, cout = p.out_channels, threads = p.threads
    cdef long filters = p.wino_products * plane_stride(<long>cout * cin)
    cdef long block_size = p.wino_products * plane_stride(<long>max(cin, cout) * p.wino_block)
    cdef floating* u = workspace
    cdef TileGrid g = make_grid(p.batch, cin, p.geom.height, p.geom.width, cout, p.geom.out_h,
                                p.geom.out_w, p.geom.pad_h, p.geom.pad_w, p.wino_tile)
    for m in prange(cout, num_threads=team_size(cout, threads), schedule='static'):
        filter_row(w, m, cin, cout, False, p.wino_tile, u)
    winograd_apply(&g, x, u, bias, y, workspace + 2 * filters, workspace + 2 * filters + block_size,
                   p.wino_block, workspace + 2 * filters + 2 * block_size, p.wino_scratch, threads)


cdef void winograd_backward(const Plan* p, const floating* x, const floating* w, const floating* dy,
                            floating* dx, floating* dw, floating* db, floating* workspace) noexcept nogil:
    cdef int m, c, k, n, count, cin = p.geom.channels, cout = p.out_channels, threads = p.threads
    cdef int block = p.wino_block
    cdef long t0, filters = p.wino_products * plane_stride(<long>cout * cin)
    cdef long block_size = p.wino_products * plane_stride(<long>max(cin, cout) * block)
    cdef floating* u = workspace
    cdef floating* du = workspace + filters
    cdef floating* v = workspace + 2 * filters
    cdef floating* z = v + block_size
    cdef floating* scratch = z + block_size
    cdef long scratch_size = p.wino_scratch
    cdef TileGrid forward_grid = make_grid(p.batch, cin, p.geom.height, p.geom.width, cout, p.geom.out_h,
                                           p.geom.out_w, p.geom.pad_h, p.geom.pad_w, p.wino_tile)
    cdef TileGrid adjoint_grid = make_grid(p.batch, cout, p.geom.out_h, p.geom.out_w, cin, p.geom.height,
                                           p.geom.width, 2 - p.geom.pad_h, 2 - p.geom.pad_w, p.wino_tile)
    if dx != NULL:
        # Row c of the adjoint's filters is a run over m: one contiguous store per plane.
        for c in prange(cin, num_threads=team_size(cin, threads), schedule='static'):
            filter_row(w, c, cin, cout, True, p.wino_tile, u)
        winograd_apply(&adjoint_grid, dy, u, NULL, dx, v, z, block, scratch, scratch_size, threads)
    if db != NULL:
        for m in prange(cout, num_threads=team_size(cout, threads), schedule='static'):
            for n in range(p.batch):
                add_row_sums(dy + (<long>n * cout + m) * p.spatial, 1, p.spatial, db + m)
    if dw == NULL:
        return
    memset(du, 0, filters * sizeof(floating))
    t0 = 0
    while t0 < forward_grid.tiles:
        count = <int>min(<long>block, forward_grid.tiles - t0)
        for c in prange(cin, num_threads=team_size(cin, threads), schedule='static'):
            input_channel(&forward_grid, x, c, t0, count, v, block, scratch + threadid() * scratch_size)
        for m in prange(cout, num_threads=team_size(cout, threads), schedule='static'):
            output_grad_channel(&forward_grid, dy, m, t0, count, z, block,
                                scratch + threadid() * scratch_size)
        for k in prange(p.wino_products, num_threads=threads, schedule='static'):
            gemm(False, True, cout, cin, count, <floating>1, z + k * plane_stride(<long>cout * block), block,
                 v + k * plane_stride(<long>cin * block), block, <floating>1,
                 du + k * plane_stride(<long>cout * cin), cin)
        t0 += block
    for m in prange(cout, num_threads=team_size(cout, threads), schedule='static'):
        add_filter_grad_row(du, m, cout, cin, p.wino_tile, dw)


# -- small images: the batch as one wide GEMM --------------------------------------------------------
#
# With few output positions per image (ResNet's and GoogLeNet's late layers: 7x7, 14x14), one GEMM
# per image is narrow and the weight gradient is a stream of rank-S updates to a large dW; the
# GEMMs run far below peak. Here the columns of a chunk of images sit side by side in one wide
# matrix, [C*kh*kw, images*S], so each pass is a single GEMM per group, split over the threads by
# output columns (y, dx) or by rows or columns of dW, and every element is still computed by one call.

cdef inline void copy_rows(const floating* src, long src_ld, floating* dst, long dst_ld, int rows,
                           int cols) noexcept nogil:
    cdef int r
    for r in range(rows):
        memcpy(dst + r * dst_ld, src + r * src_ld, cols * sizeof(floating))


cdef void wide_lower(const Plan* p, const floating* x, int first, int count, floating* wide, long ld,
                     floating* staging) noexcept nogil:
    """Columns of images first .. first + count into wide[:, i * S ...], im2col staged per thread."""
    cdef long x_image = <long>p.geom.channels * p.geom.height * p.geom.width
    cdef int i, s = p.spatial, rows = p.geom.channels * p.geom.kernel_h * p.geom.kernel_w
    cdef floating* own
    for i in prange(count, num_threads=team_size(count, p.threads), schedule='static'):
        if p.pointwise:
            copy_rows(x + (first + i) * x_image, s, wide + <long>i * s, ld, rows, s)
        else:
            own = staging + threadid() * p.col_size
            im2col_channels(x + (first + i) * x_image, &p.geom, 0, p.geom.channels, own)
            copy_rows(own, s, wide + <long>i * s, ld, rows, s)


cdef void wide_forward(const Plan* p, const floating* x, const floating* w, const floating* bias,
                       floating* y, floating* workspace) noexcept nogil:
    cdef int first, count, t, i, threads = p.threads, s = p.spatial
    cdef long ld = <long>p.wide_chunk * s, y_image = <long>p.out_channels * s
    cdef floating* wide = workspace
    cdef floating* out = wide + ld * p.group * p.k_per_group
    cdef floating* staging = out + ld * p.out_channels
    first = 0
    while first < p.batch:
        count = min(p.wide_chunk, p.batch - first)
        wide_lower(p, x, first, count, wide, ld, staging)
        for t in prange(threads, num_threads=threads, schedule='static', chunksize=1):
            forward_columns(p, wide, w, bias, out, ld, block_begin(count * s, threads, t),
                            block_begin(count * s, threads, t + 1))
        for i in prange(count, num_threads=team_size(count, threads), schedule='static'):
            copy_rows(out + <long>i * s, ld, y + (first + i) * y_image, s, p.out_channels, s)
        first += count


cdef void wide_backward(const Plan* p, const floating* x, const floating* w, const floating* dy,
                        floating* dx, floating* dw, floating* db, floating* workspace) noexcept nogil:
    """dx (overwritten), dW (+=) and db (+=) for the whole batch."""
    cdef int first, count, t, i, row, threads = p.threads, s = p.spatial
    cdef int col_rows = p.group * p.k_per_group
    cdef long ld = <long>p.wide_chunk * s, x_image = <long>p.geom.channels * p.geom.height * p.geom.width
    cdef long y_image = <long>p.out_channels * s
    cdef floating* wide = workspace
    cdef floating* grads = wide + ld * col_rows
    cdef floating* staging = grads + ld * p.out_channels
    cdef floating* own
    first = 0
    while first < p.batch:
        count = min(p.wide_chunk, p.batch - first)
        for i in prange(count, num_threads=team_size(count, threads), schedule='static'):
            copy_rows(dy + (first + i) * y_image, s, grads + <long>i * s, ld, p.out_channels, s)
        if db != NULL:
            for row in prange(p.out_channels, num_threads=team_size(p.out_channels, threads),
                              schedule='static'):
                add_row_sums(grads + row * ld, 1, count * s, db + row)
        if dw != NULL:
            wide_lower(p, x, first, count, wide, ld, staging)
            for t in prange(threads, num_threads=threads, schedule='static', chunksize=1):
                weight_grad_share(p, wide, grads, count * s, ld, dw, t, threads)
        if dx != NULL:
            for t in prange(threads, num_threads=threads, schedule='static', chunksize=1):
                input_grad_columns(p, w, grads, wide, ld, block_begin(count * s, threads, t),
                                   block_begin(count * s, threads, t + 1))
            for i in prange(count, num_threads=team_size(count, threads), schedule='static'):
                if p.pointwise:
                    copy_rows(wide + <long>i * s, ld, dx + (first + i) * x_image, s, col_rows, s)
                else:
                    own = staging + threadid() * p.col_size
                    copy_rows(wide + <long>i * s, ld, own, s, col_rows, s)
                    col2im_channels(own, &p.geom, 0, p.geom.channels, dx + (first + i) * x_image)
        first += count


# -- forward -----------------------------------------------------------------------------------------

cdef void forward_impl(const Plan* p, const floating* x, const floating* w, const floating* bias,
                       floating* y, floating* workspace) noexcept nogil:
    cdef long x_image = <long>p.geom.channels * p.geom.height * p.geom.width
    cdef long y_image = <long>p.out_channels * p.spatial
    cdef int workers = p.workers, threads = p.threads
    cdef int per_worker = p.batch // workers if workers > 0 else 0
    cdef int t, n, c, split_from = per_worker * workers
    cdef floating* col
    cdef const floating* source
    if p.winograd:
        winograd_forward(p, x, w, bias, y, workspace)
        return
    if p.wide:
        wide_forward(p, x, w, bias, y, workspace)
        return
    if per_worker > 0:
        for t in prange(workers, num_threads=workers, schedule='static', chunksize=1):
            col = workspace + t * p.col_size
            for n in range(t * per_worker, (t + 1) * per_worker):
                source = x + n * x_image
                lower(p, source, col, 0, p.geom.channels)
                forward_columns(p, <const floating*>col if not p.pointwise else source, w, bias,
                                y + n * y_image, p.spatial, 0, p.spatial)
    col = workspace
    for n in range(split_from, p.batch):
        source = x + n * x_image
        if not p.pointwise:
            for c in prange(p.geom.channels, num_threads=threads, schedule='static'):
                lower(p, source, col, c, c + 1)
        for t in prange(threads, num_threads=threads, schedule='static', chunksize=1):
            forward_columns(p, <const floating*>col if not p.pointwise else source, w, bias,
                            y + n * y_image, p.spatial, block_begin(p.spatial, threads, t),
                            block_begin(p.spatial, threads, t + 1))


def conv_forward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w,
                 const floating[::1] bias, floating[:, :, :, ::1] y, tuple pad, tuple stride,
                 tuple dilation, int group, floating[::1] workspace):
    """y[N, M, OH, OW] = conv(x[N, C, H, W], w[M, C/group, kh, kw]) + bias[M] (bias may be None)."""
    cdef Plan p
    check_call(&p, dims(x.shape), dims(w.shape), dims(y.shape), pad, stride, dilation,
               group, workspace.shape[0], sizeof(floating))
    if bias is not None and bias.shape[0] != p.out_channels:
        raise ValueError(f"bias has {bias.shape[0]} elements, expected {p.out_channels}")
    if p.batch == 0:
        return
    with nogil:
        forward_impl(&p, &x[0, 0, 0, 0], &w[0, 0, 0, 0], &bias[0] if bias is not None else NULL,
                     &y[0, 0, 0, 0], &workspace[0])


# -- backward ----------------------------------------------------------------------------------------

cdef void backward_impl(const Plan* p, const floating* x, const floating* w, const floating* dy,
                        floating* dx, floating* dw, floating* db, floating* workspace) noexcept nogil:
    cdef long x_image = <long>p.geom.channels * p.geom.height * p.geom.width
    cdef long y_image = <long>p.out_channels * p.spatial
    cdef int workers = p.workers, threads = p.threads, m = p.out_channels
    cdef int buffers = 1 if p.wide else max(workers, 1)
    cdef int per_worker = p.batch // workers if workers > 0 and not p.wide else 0
    cdef int sets_used = workers if per_worker > 0 else 1
    cdef int t, n, c, split_from = per_worker * workers
    cdef floating* db_parts = workspace + (wide_elements(p) if p.wide else buffers * p.col_size)
    cdef floating* dw_parts = db_parts + buffers * m
    cdef floating* col
    cdef floating* dw_own
    cdef floating* db_own
    cdef int dw_rows = p.group * p.k_per_group
    cdef floating* x_col
    cdef floating* dx_col
    if p.winograd:
        winograd_backward(p, x, w, dy, dx, dw, db, workspace)
        return
    if per_worker == 0:
        memset(db_parts, 0, m * sizeof(floating))
    if p.wide:
        wide_backward(p, x, w, dy, dx, dw, db_parts if db != NULL else NULL, workspace)
        split_from = p.batch
    elif per_worker > 0:
        for t in prange(workers, num_threads=workers, schedule='static', chunksize=1):
            col = workspace + t * p.col_size
            dw_own = dw_parts + t * p.weight_size if p.dw_transposed else (
                dw if t == 0 else dw_parts + (t - 1) * p.weight_size)
            db_own = db_parts + t * m
            if dw_own != dw and dw != NULL:
                memset(dw_own, 0, p.weight_size * sizeof(floating))
            memset(db_own, 0, m * sizeof(floating))
            for n in range(t * per_worker, (t + 1) * per_worker):
                x_col = <floating*>(x + n * x_image) if p.pointwise else col
                dx_col = dx + n * x_image if p.pointwise else col
                if dw != NULL:
                    lower(p, x + n * x_image, col, 0, p.geom.channels)
                    if p.dw_transposed:
                        weight_grad_transposed_rows(p, x_col, dy + n * y_image, p.spatial, p.spatial,
                                                    dw_own, 0, dw_rows)
                    else:
                        weight_grad_block(p, x_col, dy + n * y_image, p.spatial, p.spatial, dw_own, 0, m,
                                          0, p.k_per_group)
                if db != NULL:
                    add_row_sums(dy + n * y_image, m, p.spatial, db_own)
                if dx != NULL:
                    input_grad_columns(p, w, dy + n * y_image, dx_col, p.spatial, 0, p.spatial)
                    raise_to_image(p, col, dx + n * x_image, 0, p.geom.channels)
    # Images left over after an even split go one at a time, each split across all threads,
    # adding into dW (or the first dW^T) and the first bias buffer.
    if dw != NULL and per_worker == 0 and p.dw_transposed:
        memset(dw_parts, 0, p.weight_size * sizeof(floating))
    col = workspace
    for n in range(split_from, p.batch):
        x_col = <floating*>(x + n * x_image) if p.pointwise else col
        dx_col = dx + n * x_image if p.pointwise else col
        if dw != NULL and not p.pointwise:
            for c in prange(p.geom.channels, num_threads=threads, schedule='static'):
                lower(p, x + n * x_image, col, c, c + 1)
        if dw != NULL or db != NULL:
            for t in prange(threads, num_threads=threads, schedule='static', chunksize=1):
                if dw != NULL and p.dw_transposed:
                    weight_grad_transposed_rows(p, x_col, dy + n * y_image, p.spatial, p.spatial, dw_parts,
                                                block_begin(dw_rows, threads, t),
                                                block_begin(dw_rows, threads, t + 1))
                elif dw != NULL:
                    weight_grad_share(p, x_col, dy + n * y_image, p.spatial, p.spatial, dw, t, threads)
                if db != NULL:
                    add_row_sums(dy + n * y_image + <long>block_begin(m, threads, t) * p.spatial,
                                 block_begin(m, threads, t + 1) - block_begin(m, threads, t),
                                 p.spatial, db_parts + block_begin(m, threads, t))
        if dx != NULL:
            for t in prange(threads, num_threads=threads, schedule='static', chunksize=1):
                input_grad_columns(p, w, dy + n * y_image, dx_col, p.spatial,
                                   block_begin(p.spatial, threads, t), block_begin(p.spatial, threads, t + 1))
            if not p.pointwise:
                for c in prange(p.geom.channels, num_threads=threads, schedule='static'):
                    raise_to_image(p, col, dx + n * x_image, c, c + 1)
    if dw != NULL and p.dw_transposed:
        for t in prange(threads, num_threads=threads, schedule='static', chunksize=1):
            add_transposed_parts(p, dw_parts, sets_used, block_begin(m, threads, t),
                                 block_begin(m, threads, t + 1), dw)
    elif dw != NULL and sets_used > 1:
        for t in prange(threads, num_threads=threads, schedule='static', chunksize=1):
            add_parts(dw_parts, sets_used - 1, p.weight_size, block_begin(p.weight_size, threads, t),
                      block_begin(p.weight_size, threads, t + 1), dw)
    if db != NULL:
        add_parts(db_parts, sets_used, m, 0, m, db)


def conv_backward(const floating[:, :, :, ::1] x, const floating[:, :, :, ::1] w,
                  const floating[:, :, :, ::1] dy, floating[:, :, :, ::1] dx,
                  floating[:, :, :, ::1] dw, floating[::1] db, tuple pad, tuple stride,
                  tuple dilation, int group, floating[::1] workspace):
    """Gradients of conv_forward: overwrites dx, adds into dw and db; any of the three may be None."""
    cdef Plan p
    check_call(&p, dims(x.shape), dims(w.shape), dims(dy.shape), pad, stride,
               dilation, group, workspace.shape[0], sizeof(floating))
    if dx is not None and dims(dx.shape) != dims(x.shape):
        raise ValueError(f"dx has shape {dims(dx.shape)}, x has {dims(x.shape)}")
    if dw is not None and dims(dw.shape) != dims(w.shape):
        raise ValueError(f"dw has shape {dims(dw.shape)}, w has {dims(w.shape)}")
    if db is not None and db.shape[0] != p.out_channels:
        raise ValueError(f"db has {db.shape[0]} elements, expected {p.out_channels}")
    if p.batch == 0:
        return
    with nogil:
        backward_impl(&p, &x[0, 0, 0, 0], &w[0, 0, 0, 0], &dy[0, 0, 0, 0],
                      &dx[0, 0, 0, 0] if dx is not None else NULL,
                      &dw[0, 0, 0, 0] if dw is not None else NULL,
                      &db[0] if db is not None else NULL, &workspace[0])

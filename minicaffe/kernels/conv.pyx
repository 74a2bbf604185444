"""2-D convolution forward and backward (Caffe's semantics: groups, padding, stride, dilation).

Each image is lowered with im2col into col[C*kh*kw, OH*OW], and each group is one GEMM:
y_g = W_g @ col_g. Backward recomputes the columns: dW_g^T += col_g @ dy_g^T (accumulated
transposed, then added into dW), and dx = col2im(W_g^T @ dy_g). A 1x1 kernel with stride 1 and no
padding needs no lowering: the image itself is the column matrix.

Work is split two ways, both with a fixed assignment of work to workers so that, for a given thread
count, results are bit-identical from run to run:

* across images: worker t takes a contiguous run of images with its own column buffer and its own
  partial weight/bias gradients, which are added into dW and db in worker order at the end;
* inside one image, for the images left over when the batch does not divide among the threads (and
  for every image when per-thread column buffers would exceed COL_BUDGET_BYTES): im2col and col2im
  split over channels, the GEMMs over output columns (y, dx) or output channels (dW, db).

All scratch memory is one caller-owned ``workspace`` of ``conv_workspace_size(...)`` elements, so a
layer allocates it once and the calls themselves never allocate.
"""
from cython cimport floating
from cython.parallel cimport prange
from libc.string cimport memset

from minicaffe.kernels.blas cimport gemm
from minicaffe.kernels.im2col cimport Geometry, make_geometry, im2col_channels, col2im_channels
from minicaffe.kernels.parallel import num_threads

# Per-thread column buffers larger than this in total (a big image on many threads) switch every
# image to the inside-one-image split, which needs a single buffer.
COL_BUDGET_BYTES = 256 << 20


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
    return 0


cdef long workspace_elements(const Plan* p) noexcept:
    """Per buffer set (one per worker, at least one): columns, transposed dW, db."""
    return max(p.workers, 1) * (p.col_size + p.weight_size + p.out_channels)


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
                          floating* y, int j_begin, int j_end) noexcept nogil:
    """y[:, j_begin:j_end] = W_g @ col_g[:, j_begin:j_end] (+ bias) for every group g."""
    cdef int g, row, j, mg = p.out_per_group, kg = p.k_per_group, s = p.spatial
    cdef floating b
    cdef floating* y_row
    if j_end <= j_begin:
        return
    for g in range(p.group):
        gemm(False, False, mg, j_end - j_begin, kg, <floating>1, w + <long>g * mg * kg, kg,
             col + <long>g * kg * s + j_begin, s, <floating>0, y + <long>g * mg * s + j_begin, s)
    if bias != NULL:
        for row in range(p.out_channels):
            b = bias[row]
            y_row = y + <long>row * s
            for j in range(j_begin, j_end):
                y_row[j] += b


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


cdef void weight_grad_rows(const Plan* p, const floating* col, const floating* dy, floating* dw_t,
                           int r_begin, int r_end) noexcept nogil:
    """Rows [r_begin, r_end) of dW^T (all groups stacked, [group * kg, mg]) += col_g @ dy_g^T.

    dW^T rather than dW: BLAS runs this shape (a long inner dimension, a small output) markedly
    faster as col @ dy^T than as dy @ col^T.
    """
    cdef int g, first, last, mg = p.out_per_group, kg = p.k_per_group, s = p.spatial
    if r_end <= r_begin:
        return
    for g in range(r_begin // kg, (r_end - 1) // kg + 1):
        first = max(r_begin, g * kg)
        last = min(r_end, (g + 1) * kg)
        gemm(False, True, last - first, mg, s, <floating>1, col + <long>first * s, s,
             dy + <long>g * mg * s, s, <floating>1, dw_t + <long>first * mg, mg)


cdef void input_grad_columns(const Plan* p, const floating* w, const floating* dy, floating* col,
                             int j_begin, int j_end) noexcept nogil:
    """col_g[:, j_begin:j_end] = W_g^T @ dy_g[:, j_begin:j_end] for every group g."""
    cdef int g, mg = p.out_per_group, kg = p.k_per_group, s = p.spatial
    if j_end <= j_begin:
        return
    for g in range(p.group):
        gemm(True, False, kg, j_end - j_begin, mg, <floating>1, w + <long>g * mg * kg, kg,
             dy + <long>g * mg * s + j_begin, s, <floating>0, col + <long>g * kg * s + j_begin, s)


cdef inline void raise_to_image(const Plan* p, const floating* col, floating* image, int c_begin,
                                int c_end) noexcept nogil:
    if not p.pointwise:
        col2im_channels(col, &p.geom, c_begin, c_end, image)


cdef inline int block_begin(int extent, int blocks, int index) noexcept nogil:
    """Start of block ``index`` when [0, extent) is cut into ``blocks`` near-equal contiguous blocks."""
    return <int>(<long>extent * index // blocks)


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
    if per_worker > 0:
        for t in prange(workers, num_threads=workers, schedule='static', chunksize=1):
            col = workspace + t * p.col_size
            for n in range(t * per_worker, (t + 1) * per_worker):
                source = x + n * x_image
                lower(p, source, col, 0, p.geom.channels)
                forward_columns(p, <const floating*>col if not p.pointwise else source, w, bias,
                                y + n * y_image, 0, p.spatial)
    col = workspace
    for n in range(split_from, p.batch):
        source = x + n * x_image
        if not p.pointwise:
            for c in prange(p.geom.channels, num_threads=threads, schedule='static'):
                lower(p, source, col, c, c + 1)
        for t in prange(threads, num_threads=threads, schedule='static', chunksize=1):
            forward_columns(p, <const floating*>col if not p.pointwise else source, w, bias,
                            y + n * y_image, block_begin(p.spatial, threads, t),
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
    cdef int buffers = max(workers, 1), mg = p.out_per_group, kg = p.k_per_group
    cdef int dw_rows = p.group * kg
    cdef int per_worker = p.batch // workers if workers > 0 else 0
    cdef int sets_used = workers if per_worker > 0 else 1
    cdef int t, n, c, b, row, k, split_from = per_worker * workers
    cdef floating* dw_parts = workspace + buffers * p.col_size
    cdef floating* db_parts = dw_parts + buffers * p.weight_size
    cdef floating* col
    cdef floating* dw_part
    cdef floating* db_part
    cdef floating* x_col
    cdef floating* dx_col
    cdef const floating* column
    cdef floating total
    if per_worker == 0:
        memset(dw_parts, 0, p.weight_size * sizeof(floating))
        memset(db_parts, 0, m * sizeof(floating))
    else:
        for t in prange(workers, num_threads=workers, schedule='static', chunksize=1):
            col = workspace + t * p.col_size
            dw_part = dw_parts + t * p.weight_size
            db_part = db_parts + t * m
            memset(dw_part, 0, p.weight_size * sizeof(floating))
            memset(db_part, 0, m * sizeof(floating))
            for n in range(t * per_worker, (t + 1) * per_worker):
                x_col = <floating*>(x + n * x_image) if p.pointwise else col
                dx_col = dx + n * x_image if p.pointwise else col
                if dw != NULL:
                    lower(p, x + n * x_image, col, 0, p.geom.channels)
                    weight_grad_rows(p, x_col, dy + n * y_image, dw_part, 0, dw_rows)
                if db != NULL:
                    add_row_sums(dy + n * y_image, m, p.spatial, db_part)
                if dx != NULL:
                    input_grad_columns(p, w, dy + n * y_image, dx_col, 0, p.spatial)
                    raise_to_image(p, col, dx + n * x_image, 0, p.geom.channels)
    # Images left over after an even split go one at a time, each split across all threads,
    # adding into the first buffer set.
    col = workspace
    for n in range(split_from, p.batch):
        x_col = <floating*>(x + n * x_image) if p.pointwise else col
        dx_col = dx + n * x_image if p.pointwise else col
        if dw != NULL and not p.pointwise:
            for c in prange(p.geom.channels, num_threads=threads, schedule='static'):
                lower(p, x + n * x_image, col, c, c + 1)
        if dw != NULL or db != NULL:
            for t in prange(threads, num_threads=threads, schedule='static', chunksize=1):
                if dw != NULL:
                    weight_grad_rows(p, x_col, dy + n * y_image, dw_parts,
                                     block_begin(dw_rows, threads, t), block_begin(dw_rows, threads, t + 1))
                if db != NULL:
                    add_row_sums(dy + n * y_image + <long>block_begin(m, threads, t) * p.spatial,
                                 block_begin(m, threads, t + 1) - block_begin(m, threads, t),
                                 p.spatial, db_parts + block_begin(m, threads, t))
        if dx != NULL:
            for t in prange(threads, num_threads=threads, schedule='static', chunksize=1):
                input_grad_columns(p, w, dy + n * y_image, dx_col, block_begin(p.spatial, threads, t),
                                   block_begin(p.spatial, threads, t + 1))
            if not p.pointwise:
                for c in prange(p.geom.channels, num_threads=threads, schedule='static'):
                    raise_to_image(p, col, dx + n * x_image, c, c + 1)
    # dW[row, k] += sum over buffer sets, in buffer order, of dW^T[group * kg + k, row % mg].
    if dw != NULL:
        for t in prange(threads, num_threads=threads, schedule='static', chunksize=1):
            for row in range(block_begin(m, threads, t), block_begin(m, threads, t + 1)):
                column = dw_parts + <long>(row // mg) * kg * mg + row % mg
                for k in range(kg):
                    total = dw[<long>row * kg + k]
                    for b in range(sets_used):
                        total = total + column[b * p.weight_size + <long>k * mg]
                    dw[<long>row * kg + k] = total
    if db != NULL:
        for row in range(m):
            total = db[row]
            for b in range(sets_used):
                total = total + db_parts[b * m + row]
            db[row] = total


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

"""2-D convolution with 16-bit GEMM operands: DFP16 (int16, INT32 accumulation in chunks, scaled to
FP32) or BF16 (uint16 bit patterns, FP32 accumulation). Outputs, input gradients and weight gradients
are FP32; the caller quantizes x, w and dy (once per pass) and passes each tensor's scale.

Images are spread over the threads (static assignment: image n always goes to the same worker for a
given thread count, so results are bit-identical from run to run). Each worker lowers its image with
im2col on the 16-bit values (half the bytes of FP32 columns) into its own column buffer and calls the
16-bit GEMM single-threaded, one call per group; its weight-gradient partial sums are added into dw in
worker order at the end. A 1x1 kernel with stride 1 and no padding needs no lowering. The weights,
the same for every image, are packed for the GEMM once per call, before the workers start.

Backward-data has two forms. (1) W^T @ dy into FP32 columns, summed back into dx by col2im: a GEMM
with the short K = M/group whose output, C*kh*kw*OH*OW FP32 values, is written and read back.
(2) For stride 1, backward-data is itself a convolution: of dy, padded by dilation*(kernel-1) - pad,
with the weights flipped in space and transposed (in, out) per group: a GEMM with K = (M/group)*kh*kw
straight into dx, whose cost is lowering dy, M*kh*kw*H*W 16-bit values. (2) runs where it can and
moves fewer bytes, i.e. M*H*W < 2*C*OH*OW: it made CIFAR-10 quick's conv2 and AlexNet's conv3-5
backward-data 15-30% faster, and was 30% slower on AlexNet's conv2 (M = 256 from C = 96).

BF16 bit patterns are lowered as int16: im2col only copies 16-bit words, and padding writes 0, which
is +0.0 in BF16 as in DFP16.
"""
from cython.parallel cimport prange, threadid
from libc.stdint cimport int16_t, uint16_t, uint32_t, uint8_t
from libc.string cimport memset

from minicaffe.kernels.im2col cimport Geometry, make_geometry, im2col_channels, col2im_channels
from minicaffe.kernels.lowp_gemm cimport (lowp_plan, gemm_bf16_raw, gemm_packed_a, gemm_s16_raw,
                                          pack_a, packed_a_bound, plan_gemm)
from minicaffe.kernels.parallel import num_threads

ctypedef fused lowp_t:
    int16_t
    uint16_t

# Buffers inside the workspace start on cache-line boundaries.
cdef long ALIGN = 64


cdef struct Plan:
    Geometry geom
    int batch, out_channels, group
    int out_per_group       # rows of W_g
    int k_per_group         # (C / group) * kh * kw: rows of col_g, columns of W_g
    int spatial             # OH * OW
    bint pointwise          # 1x1, stride 1, no padding: the image is its own column matrix
    bint flip_data          # backward-data runs as the convolution of dy with the flipped weights
    Geometry dy_geom        # when flip_data: dy's image [M, OH, OW] lowered to H x W outputs
    int workers             # threads that take images
    long col_bytes          # one worker's 16-bit column buffer (0 when pointwise)
    long dcol_bytes         # one worker's backward-data columns: 16-bit dy columns when flip_data,
                            # else FP32 columns for col2im (0 when pointwise)
    long dw_bytes           # one worker's FP32 weight-gradient partial sums
    long apack_bytes        # one group's packed weights, for any pass
    long flipped_bytes      # the flipped weights when flip_data
    long weight_size


cdef inline long aligned(long n) noexcept nogil:
    return (n + ALIGN - 1) // ALIGN * ALIGN


cdef int make_plan(Plan* p, tuple x_shape, tuple w_shape, tuple pad, tuple stride, tuple dilation,
                   int group, int threads) except -1:
    cdef int n, c, h, w_, m, cg, kh, kw
    n, c, h, w_ = x_shape
    m, cg, kh, kw = w_shape
    if group < 1 or c % group or m % group or cg * group != c:
        raise ValueError(f"weights {w_shape} with group {group} do not fit input {x_shape}")
    p.geom = make_geometry(c, h, w_, kh, kw, pad[0], pad[1], stride[0], stride[1], dilation[0], dilation[1])
    p.batch, p.out_channels, p.group = n, m, group
    p.out_per_group = m // group
    p.k_per_group = cg * kh * kw
    p.spatial = p.geom.out_h * p.geom.out_w
    p.pointwise = kh == 1 and kw == 1 and tuple(pad) == (0, 0) and tuple(stride) == (1, 1)
    p.workers = max(1, min(threads, n))
    cdef int flip_pad_h = dilation[0] * (kh - 1) - pad[0], flip_pad_w = dilation[1] * (kw - 1) - pad[1]
    p.flip_data = (not p.pointwise and tuple(stride) == (1, 1) and flip_pad_h >= 0 and flip_pad_w >= 0
                   and p.spatial > 0 and <long>m * h * w_ < 2L * c * p.spatial)
    if p.flip_data:
        p.dy_geom = make_geometry(m, p.geom.out_h, p.geom.out_w, kh, kw, flip_pad_h, flip_pad_w, 1, 1,
                                  dilation[0], dilation[1])
    p.col_bytes = 0 if p.pointwise else aligned(<long>c * kh * kw * p.spatial * 2)
    if p.flip_data:
        p.dcol_bytes = aligned(<long>m * kh * kw * h * w_ * 2)
    else:
        p.dcol_bytes = 0 if p.pointwise else aligned(<long>c * kh * kw * p.spatial * 4)
    p.weight_size = <long>m * p.k_per_group
    p.dw_bytes = aligned(p.weight_size * 4)
    p.apack_bytes = aligned(max(packed_a_bound(p.out_per_group, p.k_per_group),
                                packed_a_bound(cg, p.out_per_group * kh * kw) if p.flip_data
                                else packed_a_bound(p.k_per_group, p.out_per_group)))
    p.flipped_bytes = aligned(p.weight_size * 2) if p.flip_data else 0
    return 0


cdef long workspace_bytes(const Plan* p) noexcept:
    return p.workers * (p.col_bytes + p.dcol_bytes + p.dw_bytes) + p.group * p.apack_bytes + p.flipped_bytes + ALIGN


cdef inline uint32_t* apack_area(const Plan* p, uint8_t* workspace) noexcept nogil:
    return <uint32_t*>(workspace + p.workers * (p.col_bytes + p.dcol_bytes + p.dw_bytes))


cdef inline uint8_t* flipped_area(const Plan* p, uint8_t* workspace) noexcept nogil:
    return <uint8_t*>apack_area(p, workspace) + p.group * p.apack_bytes


def conv_lowp_workspace_bytes(tuple x_shape, tuple w_shape, tuple pad, tuple stride, tuple dilation,
                              int group=1, threads=None):
    """Bytes of workspace conv_forward_lowp / conv_backward_lowp need for these shapes and threads."""
    cdef Plan p
    make_plan(&p, x_shape, w_shape, pad, stride, dilation, group, num_threads() if threads is None else threads)
    return workspace_bytes(&p)


def conv_lowp_backward_data_method(tuple x_shape, tuple w_shape, tuple pad, tuple stride, tuple dilation,
                                   int group=1):
    """How conv_backward_lowp computes dx for these shapes: "flipped" (the convolution of dy with the
    flipped weights), "columns" (W^T @ dy, then col2im) or "pointwise" (W^T @ dy is dx)."""
    cdef Plan p
    make_plan(&p, x_shape, w_shape, pad, stride, dilation, group, 1)
    return "flipped" if p.flip_data else "pointwise" if p.pointwise else "columns"


cdef tuple dims(const Py_ssize_t* shape):
    return (shape[0], shape[1], shape[2], shape[3])


cdef int prepare(Plan* p, tuple x_shape, tuple w_shape, tuple y_shape, tuple pad, tuple stride,
                 tuple dilation, int group, Py_ssize_t workspace_size) except -1:
    make_plan(p, x_shape, w_shape, pad, stride, dilation, group, num_threads())
    expected = (p.batch, p.out_channels, p.geom.out_h, p.geom.out_w)
    if y_shape != expected:
        raise ValueError(f"output has shape {y_shape}, input {x_shape} and weights {w_shape} give {expected}")
    if workspace_size < workspace_bytes(p):
        raise ValueError(f"workspace holds {workspace_size} bytes, {workspace_bytes(p)} needed")
    return 0


cdef inline uint8_t* workspace_start(uint8_t* workspace) noexcept nogil:
    return workspace + (ALIGN - (<size_t>workspace) % ALIGN) % ALIGN


cdef inline int gemm16(bint trans_a, bint trans_b, int m, int n, int k, const lowp_t* a, int lda,
                       const lowp_t* b, int ldb, float* c, int ldc, float scale, float beta, int k_chunk,
                       bint debug_overflow, long long* events) noexcept nogil:
    """One single-threaded 16-bit GEMM; adds its overflow events into *events."""
    cdef long long found = 0
    cdef int status
    if lowp_t is int16_t:
        status = gemm_s16_raw(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, scale, beta, k_chunk,
                              debug_overflow, &found, 1)
        events[0] += found
    else:
        status = gemm_bf16_raw(trans_a, trans_b, m, n, k, a, lda, b, ldb, c, ldc, scale, beta, 1)
    return status


cdef inline int gemm_packed16(const lowp_plan* plan, const uint32_t* apack, const lowp_t* b, int ldb,
                              float* c, int ldc, float scale, bint debug_overflow,
                              long long* events) noexcept nogil:
    """C = scale * A @ B with A packed by pack_weights; adds its overflow events into *events."""
    cdef long long found = 0
    cdef int status = gemm_packed_a(plan, apack, False, <const uint16_t*>b, ldb, c, ldc, scale, 0,
                                    debug_overflow, &found)
    events[0] += found
    return status


cdef inline void pack_weights(lowp_plan* plan, const Plan* p, int m, int n, int k, bint trans, const lowp_t* w,
                              long group_stride, int k_chunk, uint32_t* apack) noexcept nogil:
    """Plans the per-image m x n x k product and packs each group's op(W) (k x m stored when trans,
    else m x k; groups group_stride values apart) into its slot of apack."""
    cdef int g
    plan_gemm(plan, lowp_t is uint16_t, m, n, k, k_chunk)
    for g in range(p.group):
        pack_a(plan, trans, <const uint16_t*>(w + g * group_stride), m if trans else k,
               apack + g * (p.apack_bytes // 4))


cdef void flip_weights(const Plan* p, const lowp_t* w, lowp_t* flipped) noexcept nogil:
    """flipped[g*cg + c, m, i, j] = w[g*mg + m, c, kh-1-i, kw-1-j]: the weights of backward-data as a
    convolution of dy."""
    cdef int kh = p.geom.kernel_h, kw = p.geom.kernel_w, area = kh * kw
    cdef int mg = p.out_per_group, cg = p.geom.channels // p.group
    cdef int g, m, c, tap
    cdef const lowp_t* src
    cdef lowp_t* dst
    for g in range(p.group):
        for m in range(mg):
            for c in range(cg):
                src = w + (<long>(g * mg + m) * cg + c) * area
                dst = flipped + (<long>(g * cg + c) * mg + m) * area
                for tap in range(area):
                    dst[tap] = src[area - 1 - tap]


cdef inline const lowp_t* columns(const Plan* p, const lowp_t* image, lowp_t* col) noexcept nogil:
    """The image's column matrix: the image itself when pointwise, else its im2col lowering into col."""
    if p.pointwise:
        return image
    im2col_channels(<const int16_t*>image, &p.geom, 0, p.geom.channels, <int16_t*>col)
    return col


# -- forward -----------------------------------------------------------------------------------------

cdef int forward_impl(const Plan* p, const lowp_t* x, const lowp_t* w, const float* bias, float* y,
                      float scale, int k_chunk, bint debug_overflow, uint8_t* workspace,
                      long long* events) noexcept nogil:
    cdef long x_image = <long>p.geom.channels * p.geom.height * p.geom.width
    cdef long y_image = <long>p.out_channels * p.spatial
    cdef int mg = p.out_per_group, kg = p.k_per_group, s = p.spatial
    cdef int n, t, g, row, j, failures = 0
    cdef long long found, counted = 0
    cdef const lowp_t* col
    cdef float* y_n
    cdef float b
    cdef lowp_plan plan
    cdef uint32_t* apack = apack_area(p, workspace)
    pack_weights(&plan, p, mg, s, kg, False, w, <long>mg * kg, k_chunk, apack)
    for n in prange(p.batch, num_threads=p.workers, schedule='static'):
        t = threadid()
        found = 0
        col = columns(p, x + n * x_image, <lowp_t*>(workspace + t * p.col_bytes))
        y_n = y + n * y_image
        for g in range(p.group):
            failures += gemm_packed16(&plan, apack + g * (p.apack_bytes // 4), col + <long>g * kg * s, s,
                                      y_n + <long>g * mg * s, s, scale, debug_overflow, &found) != 0
        if bias != NULL:
            for row in range(p.out_channels):
                b = bias[row]
                for j in range(s):
                    y_n[<long>row * s + j] += b
        counted += found  # a prange reduction: the workers must not add into *events concurrently
    events[0] += counted
    return failures


def conv_forward_lowp(const lowp_t[:, :, :, ::1] x, const lowp_t[:, :, :, ::1] w, const float[::1] bias,
                      float[:, :, :, ::1] y, double scale, tuple pad, tuple stride, tuple dilation,
                      int group, int k_chunk, bint debug_overflow, uint8_t[::1] workspace):
    """y = scale * conv(x, w) + bias (bias may be None); returns the INT32 overflow events counted
    (DFP16 with debug_overflow, else 0). k_chunk: most products per INT32 sum (DFP16; 0: no limit)."""
    cdef Plan p
    cdef long long events = 0
    cdef int failures
    prepare(&p, dims(x.shape), dims(w.shape), dims(y.shape), pad, stride, dilation, group, workspace.shape[0])
    if bias is not None and bias.shape[0] != p.out_channels:
        raise ValueError(f"bias has {bias.shape[0]} elements, expected {p.out_channels}")
    if p.batch == 0:
        return 0
    with nogil:
        failures = forward_impl(&p, &x[0, 0, 0, 0], &w[0, 0, 0, 0], &bias[0] if bias is not None else NULL,
                                &y[0, 0, 0, 0], <float>scale, k_chunk, debug_overflow,
                                workspace_start(&workspace[0]), &events)
    if failures:
        raise MemoryError("the 16-bit GEMM could not allocate its packing buffers")
    return events


# -- backward ----------------------------------------------------------------------------------------

cdef int backward_impl(const Plan* p, const lowp_t* x, const lowp_t* w, const lowp_t* dy, float* dx,
                       float* dw, float scale_data, float scale_weights, int k_chunk, bint debug_overflow,
                       uint8_t* workspace, long long* events) noexcept nogil:
    cdef long x_image = <long>p.geom.channels * p.geom.height * p.geom.width
    cdef long y_image = <long>p.out_channels * p.spatial
    cdef int mg = p.out_per_group, kg = p.k_per_group, s = p.spatial
    cdef int cg = p.geom.channels // p.group, hw = p.geom.height * p.geom.width
    cdef int kd = mg * p.geom.kernel_h * p.geom.kernel_w  # K of the flipped backward-data product
    cdef int n, t, g, failures = 0
    cdef long i, first, last
    cdef long long found, counted = 0
    cdef uint8_t* dcol_area = workspace + p.workers * p.col_bytes
    cdef uint8_t* dw_area = dcol_area + p.workers * p.dcol_bytes
    cdef uint32_t* apack = apack_area(p, workspace)
    cdef lowp_t* flipped = <lowp_t*>flipped_area(p, workspace)
    cdef lowp_plan plan
    cdef const lowp_t* col
    cdef const lowp_t* dy_n
    cdef lowp_t* dy_col
    cdef float* dcol
    cdef float* dx_n
    cdef float* dw_part
    cdef float total
    if dw != NULL:
        for t in range(p.workers):
            memset(dw_area + t * p.dw_bytes, 0, p.weight_size * sizeof(float))
    if dx != NULL:
        if p.flip_data:
            flip_weights(p, w, flipped)
            pack_weights(&plan, p, cg, hw, kd, False, flipped, <long>cg * kd, k_chunk, apack)
        else:
            pack_weights(&plan, p, kg, s, mg, True, w, <long>mg * kg, k_chunk, apack)
    for n in prange(p.batch, num_threads=p.workers, schedule='static'):
        t = threadid()
        found = 0
        dy_n = dy + n * y_image
        if dw != NULL:
            col = columns(p, x + n * x_image, <lowp_t*>(workspace + t * p.col_bytes))
            dw_part = <float*>(dw_area + t * p.dw_bytes)
            for g in range(p.group):
                failures += gemm16(False, True, mg, kg, s, dy_n + <long>g * mg * s, s, col + <long>g * kg * s, s,
                                   dw_part + <long>g * mg * kg, kg, scale_weights, 1, k_chunk, debug_overflow,
                                   &found) != 0
        if dx != NULL and p.flip_data:
            dy_col = <lowp_t*>(dcol_area + t * p.dcol_bytes)
            im2col_channels(<const int16_t*>dy_n, &p.dy_geom, 0, p.out_channels, <int16_t*>dy_col)
            dx_n = dx + n * x_image
            for g in range(p.group):
                failures += gemm_packed16(&plan, apack + g * (p.apack_bytes // 4), dy_col + <long>g * kd * hw, hw,
                                          dx_n + <long>g * cg * hw, hw, scale_data, debug_overflow, &found) != 0
        elif dx != NULL:
            dcol = dx + n * x_image if p.pointwise else <float*>(dcol_area + t * p.dcol_bytes)
            for g in range(p.group):
                failures += gemm_packed16(&plan, apack + g * (p.apack_bytes // 4), dy_n + <long>g * mg * s, s,
                                          dcol + <long>g * kg * s, s, scale_data, debug_overflow, &found) != 0
            if not p.pointwise:
                col2im_channels(<const float*>dcol, &p.geom, 0, p.geom.channels, dx + n * x_image)
        counted += found  # a prange reduction, as in forward_impl
    events[0] += counted
    if dw != NULL:
        # dw += the workers' partial sums, in worker order (deterministic), rows split over threads.
        for t in prange(p.workers, num_threads=p.workers, schedule='static', chunksize=1):
            first = p.weight_size * t // p.workers
            last = p.weight_size * (t + 1) // p.workers
            for i in range(first, last):
                total = dw[i]
                for g in range(p.workers):
                    total = total + (<float*>(dw_area + g * p.dw_bytes))[i]
                dw[i] = total
    return failures


def conv_backward_lowp(const lowp_t[:, :, :, ::1] x, const lowp_t[:, :, :, ::1] w,
                       const lowp_t[:, :, :, ::1] dy, float[:, :, :, ::1] dx, float[:, :, :, ::1] dw,
                       double scale_data, double scale_weights, tuple pad, tuple stride, tuple dilation,
                       int group, int k_chunk, bint debug_overflow, uint8_t[::1] workspace):
    """dx = scale_data * conv^T(dy, w) (overwritten) and dw += scale_weights * dy ⋆ x; either may be
    None. Returns the INT32 overflow events counted (DFP16 with debug_overflow, else 0)."""
    cdef Plan p
    cdef long long events = 0
    cdef int failures
    prepare(&p, dims(x.shape), dims(w.shape), dims(dy.shape), pad, stride, dilation, group, workspace.shape[0])
    if dx is not None and dims(dx.shape) != dims(x.shape):
        raise ValueError(f"dx has shape {dims(dx.shape)}, x has {dims(x.shape)}")
    if dw is not None and dims(dw.shape) != dims(w.shape):
        raise ValueError(f"dw has shape {dims(dw.shape)}, w has {dims(w.shape)}")
    if p.batch == 0:
        return 0
    with nogil:
        failures = backward_impl(&p, &x[0, 0, 0, 0], &w[0, 0, 0, 0], &dy[0, 0, 0, 0],
                                 &dx[0, 0, 0, 0] if dx is not None else NULL,
                                 &dw[0, 0, 0, 0] if dw is not None else NULL, <float>scale_data,
                                 <float>scale_weights, k_chunk, debug_overflow,
                                 workspace_start(&workspace[0]), &events)
    if failures:
        raise MemoryError("the 16-bit GEMM could not allocate its packing buffers")
    return events

"""2-D convolution with 16-bit GEMM operands: DFP16 (int16, INT32 accumulation in chunks, scaled to
FP32) or BF16 (uint16 bit patterns, FP32 accumulation). Outputs, input gradients and weight gradients
are FP32; the caller quantizes x, w and dy (once per pass) and passes each tensor's scale.

Images are spread over the threads (static assignment: image n always goes to the same worker for a
given thread count). Each worker calls the 16-bit GEMM single-threaded on its image, one call per
group. Where stride and dilation along the width are 1, the GEMM packs the image operand straight from
a zero-padded copy of the image (lowp_columns in lowp_gemm.h): the im2col column matrix is neither
written nor read back, nor, for backward-weights, transposed. Elsewhere the worker lowers its image
with im2col on the 16-bit values into its own column buffer. A 1x1 kernel with stride 1 and no padding
needs no lowering. The weights, the same for every image, are packed for the GEMM once per call,
before the workers start. Weight gradients are summed per fixed block of images (DW_SLOTS at most),
the blocks then added into dw in order, so that every result is bit-identical whatever the thread
count.

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
from libc.string cimport memcpy, memset

from minicaffe.kernels.im2col cimport Geometry, make_geometry, im2col_channels, col2im_channels
from minicaffe.kernels.lowp_gemm cimport (lowp_columns, lowp_plan, gemm_bf16_raw, gemm_columns, gemm_packed_a,
                                          gemm_s16_raw, pack_a, packed_a_bound, plan_gemm)
from minicaffe.kernels.parallel import num_threads

ctypedef fused lowp_t:
    int16_t
    uint16_t

# Buffers inside the workspace start on cache-line boundaries.
cdef long ALIGN = 64

# Weight gradients are summed per block of images, at most this many blocks (see backward_impl): a
# fixed split, so that dw does not depend on the thread count; more blocks let more threads share the
# work, each at the cost of one more weight-sized buffer to fill and add into dw.
cdef int DW_SLOTS = 4

# Whether the GEMMs pack images straight from padded copies where they can (set_image_packing).
cdef bint _image_packing = True


cdef struct Lowering:
    # An image read by the GEMM straight from a zero-padded copy (see lowp_columns in lowp_gemm.h).
    int padded_h, padded_w
    long image_bytes        # one worker's padded image
    long taps, outs         # rows and columns of the column matrix


cdef struct Plan:
    Geometry geom
    int batch, out_channels, group
    int out_per_group       # rows of W_g
    int k_per_group         # (C / group) * kh * kw: rows of col_g, columns of W_g
    int spatial             # OH * OW
    bint pointwise          # 1x1, stride 1, no padding: the image is its own column matrix
    bint flip_data          # backward-data runs as the convolution of dy with the flipped weights
    Geometry dy_geom        # when flip_data: dy's image [M, OH, OW] lowered to H x W outputs
    bint lowered            # the GEMMs pack x (and dy when flip_data) from padded copies: no im2col
    Lowering x_low, dy_low
    int workers             # threads that take images
    long col_bytes          # one worker's 16-bit column buffer, or padded x when lowered (0 when pointwise)
    long dcol_bytes         # one worker's backward-data columns: 16-bit dy columns (padded dy when
                            # lowered) when flip_data, else FP32 columns for col2im (0 when pointwise)
    long offsets_bytes      # the taps' and outputs' offsets when lowered
    int dw_slots            # blocks of images whose weight gradients are summed apart (DW_SLOTS at most);
                            # all but the first have a slot of dw_bytes in the workspace
    long dw_bytes           # one slot's FP32 weight-gradient sums
    long apack_bytes        # one group's packed weights, for any pass
    long flipped_bytes      # the flipped weights when flip_data
    long weight_size


cdef inline long aligned(long n) noexcept nogil:
    return (n + ALIGN - 1) // ALIGN * ALIGN


cdef void plan_lowering(Lowering* low, const Geometry* g) noexcept:
    low.padded_h = g.height + 2 * g.pad_h
    low.padded_w = g.width + 2 * g.pad_w
    low.image_bytes = aligned(<long>g.channels * low.padded_h * low.padded_w * 2)
    low.taps = <long>g.channels * g.kernel_h * g.kernel_w
    low.outs = <long>g.out_h * g.out_w


cdef int make_plan(Plan* p, tuple x_shape, tuple w_shape, tuple pad, tuple stride, tuple dilation,
                   int group, int threads) except -1:
    cdef int n, c, h, w_, m, cg, kh, kw
    n, c, h, w_ = x_shape
    m, cg, kh, kw = w_shape
    memset(p, 0, sizeof(Plan))
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
    # Packing from the image reads runs of neighbouring outputs (forward) and of neighbouring taps
    # (backward-weights): it pays where both are contiguous along a row.
    p.lowered = _image_packing and not p.pointwise and stride[1] == 1 and dilation[1] == 1
    p.offsets_bytes = 0
    if p.lowered:
        plan_lowering(&p.x_low, &p.geom)
        p.col_bytes = p.x_low.image_bytes
        p.offsets_bytes = aligned((p.x_low.taps + p.x_low.outs) * sizeof(int))
    else:
        p.col_bytes = 0 if p.pointwise else aligned(<long>c * kh * kw * p.spatial * 2)
    if p.flip_data and p.lowered:
        plan_lowering(&p.dy_low, &p.dy_geom)
        p.dcol_bytes = p.dy_low.image_bytes
        p.offsets_bytes += aligned((p.dy_low.taps + p.dy_low.outs) * sizeof(int))
    elif p.flip_data:
        p.dcol_bytes = aligned(<long>m * kh * kw * h * w_ * 2)
    else:
        p.dcol_bytes = 0 if p.pointwise else aligned(<long>c * kh * kw * p.spatial * 4)
    p.weight_size = <long>m * p.k_per_group
    p.dw_slots = max(1, min(n, DW_SLOTS))
    p.dw_bytes = aligned(p.weight_size * 4)
    p.apack_bytes = aligned(max(packed_a_bound(p.out_per_group, p.k_per_group),
                                packed_a_bound(cg, p.out_per_group * kh * kw) if p.flip_data
                                else packed_a_bound(p.k_per_group, p.out_per_group)))
    p.flipped_bytes = aligned(p.weight_size * 2) if p.flip_data else 0
    return 0


cdef long workspace_bytes(const Plan* p) noexcept:
    return (p.workers * (p.col_bytes + p.dcol_bytes) + (p.dw_slots - 1) * p.dw_bytes + p.group * p.apack_bytes + p.flipped_bytes
            + p.offsets_bytes + ALIGN)


cdef inline uint32_t* apack_area(const Plan* p, uint8_t* workspace) noexcept nogil:
    return <uint32_t*>(workspace + p.workers * (p.col_bytes + p.dcol_bytes) + (p.dw_slots - 1) * p.dw_bytes)


cdef inline uint8_t* flipped_area(const Plan* p, uint8_t* workspace) noexcept nogil:
    return <uint8_t*>apack_area(p, workspace) + p.group * p.apack_bytes


cdef inline int* offsets_area(const Plan* p, uint8_t* workspace) noexcept nogil:
    """x's tap offsets, then its output offsets; dy's (when flip_data) from aligned(x's) bytes on."""
    return <int*>(flipped_area(p, workspace) + p.flipped_bytes)


cdef inline int* dy_offsets_area(const Plan* p, uint8_t* workspace) noexcept nogil:
    return <int*>(<uint8_t*>offsets_area(p, workspace) + aligned((p.x_low.taps + p.x_low.outs) * sizeof(int)))


cdef void fill_offsets(const Geometry* g, const Lowering* low, int* tap, int* out) noexcept nogil:
    """tap[(c, i, j)] and out[(oh, ow)]: offsets in the padded image of a tap from a window's corner
    and of each output's window corner, so that im2col's col[r][j] is padded[tap[r] + out[j]]."""
    cdef int c, i, j, area = g.kernel_h * g.kernel_w, plane = low.padded_h * low.padded_w
    for c in range(g.channels):
        for i in range(g.kernel_h):
            for j in range(g.kernel_w):
                tap[c * area + i * g.kernel_w + j] = c * plane + i * g.dilation_h * low.padded_w + j * g.dilation_w
    for i in range(g.out_h):
        for j in range(g.out_w):
            out[i * g.out_w + j] = i * g.stride_h * low.padded_w + j * g.stride_w


cdef void pad_image(const uint16_t* image, const Geometry* g, const Lowering* low, uint16_t* padded) noexcept nogil:
    """The image with pad_h / pad_w zeros around each channel (0 is +0.0 in BF16 too)."""
    cdef int c, row, wp = low.padded_w, right = wp - g.pad_w - g.width
    cdef long plane = <long>low.padded_h * wp
    cdef uint16_t* dst
    for c in range(g.channels):
        dst = padded + c * plane
        memset(dst, 0, <size_t>g.pad_h * wp * 2)
        dst += <long>g.pad_h * wp
        for row in range(g.height):
            memset(dst, 0, g.pad_w * 2)
            memcpy(dst + g.pad_w, image + (<long>c * g.height + row) * g.width, <size_t>g.width * 2)
            memset(dst + g.pad_w + g.width, 0, right * 2)
            dst += wp
        memset(dst, 0, <size_t>(low.padded_h - g.pad_h - g.height) * wp * 2)


def conv_lowp_workspace_bytes(tuple x_shape, tuple w_shape, tuple pad, tuple stride, tuple dilation,
                              int group=1, threads=None):
    """Bytes of workspace conv_forward_lowp / conv_backward_lowp need for these shapes and threads."""
    cdef Plan p
    make_plan(&p, x_shape, w_shape, pad, stride, dilation, group, num_threads() if threads is None else threads)
    return workspace_bytes(&p)


def set_image_packing(bint enabled):
    """Where stride and dilation along the width are 1, pack the GEMMs' image operand (x, and dy for
    the flipped backward-data) straight from a zero-padded copy (True, the default) or lower it with
    im2col first (False: the two must agree bit for bit; the tests and benchmarks compare them)."""
    global _image_packing
    _image_packing = enabled


def conv_lowp_packs_from_image(tuple x_shape, tuple w_shape, tuple pad, tuple stride, tuple dilation,
                               int group=1):
    """Whether conv_forward_lowp / conv_backward_lowp pack x (and dy for the flipped backward-data)
    from a padded copy for these shapes, instead of lowering it with im2col."""
    cdef Plan p
    make_plan(&p, x_shape, w_shape, pad, stride, dilation, group, 1)
    return bool(p.lowered)


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


cdef inline int gemm_lowered(const lowp_plan* plan, const uint32_t* apack, const lowp_t* a, long lda, bint trans_b,
                             const lowp_t* image, const int* tap, const int* out, float* c, long ldc, float scale,
                             float beta, bint debug_overflow, long long* events) noexcept nogil:
    """C = scale * A @ op(B) + beta * C with B the column matrix of the padded image (trans_b: its
    transpose) and A packed in apack, or taken from a / lda when apack is NULL; adds its overflow
    events into *events."""
    cdef lowp_columns columns
    cdef long long found = 0
    columns.image = <const uint16_t*>image
    columns.tap = tap
    columns.out = out
    cdef int status = gemm_columns(plan, apack, False, <const uint16_t*>a, lda, trans_b, &columns, c, ldc, scale,
                                   beta, debug_overflow, &found)
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
    cdef int* x_tap = offsets_area(p, workspace)
    cdef int* x_out = x_tap + p.x_low.taps
    cdef lowp_t* padded
    pack_weights(&plan, p, mg, s, kg, False, w, <long>mg * kg, k_chunk, apack)
    if p.lowered:
        fill_offsets(&p.geom, &p.x_low, x_tap, x_out)
    for n in prange(p.batch, num_threads=p.workers, schedule='static'):
        t = threadid()
        found = 0
        y_n = y + n * y_image
        if p.lowered:
            padded = <lowp_t*>(workspace + t * p.col_bytes)
            pad_image(<const uint16_t*>(x + n * x_image), &p.geom, &p.x_low, <uint16_t*>padded)
            for g in range(p.group):
                failures += gemm_lowered(&plan, apack + g * (p.apack_bytes // 4), x, 0, False, padded,
                                         x_tap + <long>g * kg, x_out, y_n + <long>g * mg * s, s, scale, 0,
                                         debug_overflow, &found) != 0
        else:
            col = columns(p, x + n * x_image, <lowp_t*>(workspace + t * p.col_bytes))
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
    cdef int n, t, g, slot, image_first, image_end, failures = 0
    cdef long i, first, last
    cdef long long found, counted = 0
    cdef float beta
    cdef uint8_t* dcol_area = workspace + p.workers * p.col_bytes
    cdef uint8_t* dw_area = dcol_area + p.workers * p.dcol_bytes
    cdef uint32_t* apack = apack_area(p, workspace)
    cdef lowp_t* flipped = <lowp_t*>flipped_area(p, workspace)
    cdef lowp_plan plan, plan_weights
    cdef int* x_tap = offsets_area(p, workspace)
    cdef int* x_out = x_tap + p.x_low.taps
    cdef int* dy_tap = dy_offsets_area(p, workspace)
    cdef int* dy_out = dy_tap + p.dy_low.taps
    cdef lowp_t* padded
    cdef const lowp_t* col
    cdef const lowp_t* dy_n
    cdef lowp_t* dy_col
    cdef float* dcol
    cdef float* dx_n
    cdef float* dw_part
    cdef float total
    if dx != NULL and p.flip_data and p.lowered:
        fill_offsets(&p.dy_geom, &p.dy_low, dy_tap, dy_out)
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
            dx_n = dx + n * x_image
            if p.flip_data and p.lowered:
                padded = <lowp_t*>(dcol_area + t * p.dcol_bytes)
                pad_image(<const uint16_t*>dy_n, &p.dy_geom, &p.dy_low, <uint16_t*>padded)
                for g in range(p.group):
                    failures += gemm_lowered(&plan, apack + g * (p.apack_bytes // 4), dy_n, 0, False, padded,
                                             dy_tap + <long>g * kd, dy_out, dx_n + <long>g * cg * hw, hw,
                                             scale_data, 0, debug_overflow, &found) != 0
            elif p.flip_data:
                dy_col = <lowp_t*>(dcol_area + t * p.dcol_bytes)
                im2col_channels(<const int16_t*>dy_n, &p.dy_geom, 0, p.out_channels, <int16_t*>dy_col)
                for g in range(p.group):
                    failures += gemm_packed16(&plan, apack + g * (p.apack_bytes // 4), dy_col + <long>g * kd * hw,
                                              hw, dx_n + <long>g * cg * hw, hw, scale_data, debug_overflow,
                                              &found) != 0
            else:
                dcol = dx_n if p.pointwise else <float*>(dcol_area + t * p.dcol_bytes)
                for g in range(p.group):
                    failures += gemm_packed16(&plan, apack + g * (p.apack_bytes // 4), dy_n + <long>g * mg * s, s,
                                              dcol + <long>g * kg * s, s, scale_data, debug_overflow, &found) != 0
                if not p.pointwise:
                    col2im_channels(<const float*>dcol, &p.geom, 0, p.geom.channels, dx_n)
            counted += found  # a prange reduction, as in forward_impl
    if dw != NULL:
        if p.lowered:
            plan_gemm(&plan_weights, lowp_t is uint16_t, mg, kg, s, k_chunk)
            fill_offsets(&p.geom, &p.x_low, x_tap, x_out)
        # The weight gradients of each block of images are summed in image order: the first block's
        # into dw, each other block's into its own slot (its first image overwrites it), added into dw
        # in block order at the end. The blocks do not depend on the thread count, so neither does dw.
        for slot in prange(p.dw_slots, num_threads=min(p.workers, p.dw_slots), schedule='static'):
            t = threadid()
            found = 0
            dw_part = dw if slot == 0 else <float*>(dw_area + (slot - 1) * p.dw_bytes)
            image_first = <int>(<long>p.batch * slot // p.dw_slots)
            image_end = <int>(<long>p.batch * (slot + 1) // p.dw_slots)
            for n in range(image_first, image_end):
                beta = 0 if n == image_first and slot > 0 else 1
                dy_n = dy + n * y_image
                if p.lowered:
                    padded = <lowp_t*>(workspace + t * p.col_bytes)
                    pad_image(<const uint16_t*>(x + n * x_image), &p.geom, &p.x_low, <uint16_t*>padded)
                    for g in range(p.group):
                        failures += gemm_lowered(&plan_weights, NULL, dy_n + <long>g * mg * s, s, True, padded,
                                                 x_tap + <long>g * kg, x_out, dw_part + <long>g * mg * kg, kg,
                                                 scale_weights, beta, debug_overflow, &found) != 0
                else:
                    col = columns(p, x + n * x_image, <lowp_t*>(workspace + t * p.col_bytes))
                    for g in range(p.group):
                        failures += gemm16(False, True, mg, kg, s, dy_n + <long>g * mg * s, s, col + <long>g * kg * s,
                                           s, dw_part + <long>g * mg * kg, kg, scale_weights, beta, k_chunk,
                                           debug_overflow, &found) != 0
            counted += found
        # dw += the slots' sums, in slot order, its elements split over the threads.
        for t in prange(p.workers if p.dw_slots > 1 else 0, num_threads=p.workers, schedule='static',
                        chunksize=1):
            first = p.weight_size * t // p.workers
            last = p.weight_size * (t + 1) // p.workers
            for i in range(first, last):
                total = dw[i]
                for g in range(p.dw_slots - 1):
                    total = total + (<float*>(dw_area + g * p.dw_bytes))[i]
                dw[i] = total
    events[0] += counted
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

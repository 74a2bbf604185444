"""INT16 (DFP16) and BF16 matrix products on packed 16-bit pairs; the C kernels are in include/lowp_gemm.h.

``gemm_s16`` computes C = scale * op(A) @ op(B) + beta * C for int16 A and B, accumulating the
products in INT32 for at most ``k_chunk`` values of K at a time; each chunk's sums are converted to
FP32, multiplied by ``scale`` (2^-(e_a + e_b) for DFP16 operands) and added into C. ``gemm_bf16``
computes C = alpha * op(A) @ op(B) + beta * C for BF16 bit patterns held in uint16 arrays, with FP32
accumulation. The instruction set is chosen once, at import, from the CPU's features; ``variant``
reports it and ``set_variant``/``forced_variant`` override it (the tests run every variant the CPU
supports against the others). Cython kernels call the same GEMMs on raw pointers through
lowp_gemm.pxd.
"""
import contextlib

import numpy as np

from libc.stdint cimport int16_t, uint16_t, uint32_t

from minicaffe.kernels.parallel cimport team_size
from minicaffe.kernels.parallel import num_threads

cdef extern from "lowp_gemm.h" nogil:
    ctypedef struct lowp_kernel:
        pass

    size_t lowp_packed_a_bound(int m, int k)
    void lowp_plan_pack_a(const lowp_plan* plan, int trans_a, const uint16_t* a, long lda, uint32_t* apack)
    int lowp_plan_run_packed_a(const lowp_plan* plan, const uint32_t* apack, int trans_b, const uint16_t* b,
                               long ldb, float* c, long ldc, float scale, float beta, int debug_overflow,
                               long long* overflow_events)
    int lowp_plan_run_columns(const lowp_plan* plan, const uint32_t* apack, int trans_a, const uint16_t* a,
                              long lda, int trans_b, const lowp_columns* columns, float* c, long ldc,
                              float scale, float beta, int debug_overflow, long long* overflow_events)

    int lowp_s16_supported(int variant)
    int lowp_bf16_supported(int variant)
    int lowp_s16_best()
    int lowp_bf16_best()
    lowp_kernel lowp_s16_kernel(int variant)
    lowp_kernel lowp_bf16_kernel(int variant)
    void lowp_plan_init(lowp_plan* plan, lowp_kernel kern, int m, int n, int k, int k_chunk, int threads)
    int lowp_plan_run(const lowp_plan* plan, int team, int trans_a, int trans_b,
                      const uint16_t* a, long lda, const uint16_t* b, long ldb, float* c, long ldc,
                      float scale, float beta, int debug_overflow, long long* overflow_events)

# Names of the variants, by the enum values of lowp_gemm.h.
S16_VARIANTS = {"scalar": 0, "avx2": 1, "avx512_vnni": 2, "avx_vnni": 3}
BF16_VARIANTS = {"scalar": 0, "avx512f": 1, "avx512_bf16": 2}
_TABLES = {"s16": S16_VARIANTS, "bf16": BF16_VARIANTS}

cdef int _s16_variant = lowp_s16_best()
cdef int _bf16_variant = lowp_bf16_best()


cdef int gemm_s16_raw(bint trans_a, bint trans_b, int m, int n, int k,
                      const int16_t* a, int lda, const int16_t* b, int ldb,
                      float* c, int ldc, float scale, float beta, int k_chunk,
                      bint debug_overflow, long long* overflow_events, int threads) noexcept nogil:
    cdef lowp_plan plan
    lowp_plan_init(&plan, lowp_s16_kernel(_s16_variant), m, n, k, k_chunk, threads)
    return lowp_plan_run(&plan, team_size(plan.items, plan.threads), trans_a, trans_b,
                         <const uint16_t*>a, lda, <const uint16_t*>b, ldb, c, ldc,
                         scale, beta, debug_overflow, overflow_events)


cdef int gemm_bf16_raw(bint trans_a, bint trans_b, int m, int n, int k,
                       const uint16_t* a, int lda, const uint16_t* b, int ldb,
                       float* c, int ldc, float alpha, float beta, int threads) noexcept nogil:
    cdef lowp_plan plan
    lowp_plan_init(&plan, lowp_bf16_kernel(_bf16_variant), m, n, k, 0, threads)
    return lowp_plan_run(&plan, team_size(plan.items, plan.threads), trans_a, trans_b,
                         a, lda, b, ldb, c, ldc, alpha, beta, 0, NULL)


cdef void plan_gemm(lowp_plan* plan, bint bf16, int m, int n, int k, int k_chunk) noexcept nogil:
    if bf16:
        lowp_plan_init(plan, lowp_bf16_kernel(_bf16_variant), m, n, k, 0, 1)
    else:
        lowp_plan_init(plan, lowp_s16_kernel(_s16_variant), m, n, k, k_chunk, 1)


cdef size_t packed_a_bound(int m, int k) noexcept nogil:
    return lowp_packed_a_bound(m, k)


cdef void pack_a(const lowp_plan* plan, bint trans_a, const uint16_t* a, long lda, uint32_t* apack) noexcept nogil:
    lowp_plan_pack_a(plan, trans_a, a, lda, apack)


cdef int gemm_packed_a(const lowp_plan* plan, const uint32_t* apack, bint trans_b, const uint16_t* b, long ldb,
                       float* c, long ldc, float scale, float beta, bint debug_overflow,
                       long long* events) noexcept nogil:
    return lowp_plan_run_packed_a(plan, apack, trans_b, b, ldb, c, ldc, scale, beta, debug_overflow, events)


cdef int gemm_columns(const lowp_plan* plan, const uint32_t* apack, bint trans_a, const uint16_t* a, long lda,
                      bint trans_b, const lowp_columns* columns, float* c, long ldc, float scale, float beta,
                      bint debug_overflow, long long* events) noexcept nogil:
    return lowp_plan_run_columns(plan, apack, trans_a, a, lda, trans_b, columns, c, ldc, scale, beta,
                                 debug_overflow, events)


def _explain_bad_operands(fn, a, b, c, operand_dtype):
    """Raises a ValueError naming what is wrong with operands a typed memoryview refused."""
    for name, x, dtype in (("a", a, operand_dtype), ("b", b, operand_dtype), ("c", c, np.float32)):
        if not isinstance(x, np.ndarray):
            raise ValueError(f"{fn}: {name} must be a numpy array, got {type(x).__name__}")
        if x.dtype != dtype:
            raise ValueError(f"{fn}: {name} must have dtype {np.dtype(dtype).name}, got {x.dtype}")
        if x.ndim != 2:
            raise ValueError(f"{fn}: {name} must be 2-D, got shape {x.shape}")
        if not x.flags.c_contiguous:
            raise ValueError(f"{fn}: {name} must be C-contiguous")
    if not c.flags.writeable:
        raise ValueError(f"{fn}: c must be writeable")


cdef int _product_shape(str fn, const Py_ssize_t* a_shape, const Py_ssize_t* b_shape, const Py_ssize_t* c_shape,
                        bint trans_a, bint trans_b, int* mnk) except -1:
    """mnk = (m, n, k) of c = op(a) @ op(b), after checking that the 2-D shapes agree."""
    cdef Py_ssize_t m = a_shape[1] if trans_a else a_shape[0]
    cdef Py_ssize_t k = a_shape[0] if trans_a else a_shape[1]
    cdef Py_ssize_t k_b = b_shape[1] if trans_b else b_shape[0]
    cdef Py_ssize_t n = b_shape[0] if trans_b else b_shape[1]
    if k_b != k or c_shape[0] != m or c_shape[1] != n:
        raise ValueError(f"{fn}: op(a) is {m}x{k}, op(b) is {k_b}x{n}, c is {c_shape[0]}x{c_shape[1]}")
    if max(m, n, k) >= 2 ** 31:
        raise ValueError(f"{fn}: the product {m}x{k} @ {k}x{n} is too large")
    mnk[0], mnk[1], mnk[2] = m, n, k
    return 0


def gemm_s16(a, b, c, double scale, double beta=0.0, bint trans_a=False, bint trans_b=False,
             int k_chunk=0, bint debug_overflow=False):
    """c = scale * op(a) @ op(b) + beta * c for int16 a, b and float32 c; INT32 sums over chunks of
    at most ``k_chunk`` values of K (0: all of K). Returns the number of (row, column, chunk) sums
    that overflowed INT32 when ``debug_overflow`` (they wrap either way), else 0."""
    cdef const int16_t[:, ::1] av
    cdef const int16_t[:, ::1] bv
    cdef float[:, ::1] cv
    try:
        av, bv, cv = a, b, c
    except (ValueError, TypeError, BufferError):
        _explain_bad_operands("gemm_s16", a, b, c, np.int16)
        raise
    cdef int mnk[3]
    _product_shape("gemm_s16", av.shape, bv.shape, cv.shape, trans_a, trans_b, mnk)
    if k_chunk < 0:
        raise ValueError(f"gemm_s16: k_chunk must be >= 0, got {k_chunk}")
    cdef const int16_t* pa = &av[0, 0] if av.shape[0] * av.shape[1] else NULL
    cdef const int16_t* pb = &bv[0, 0] if bv.shape[0] * bv.shape[1] else NULL
    cdef float* pc = &cv[0, 0] if cv.shape[0] * cv.shape[1] else NULL
    cdef int lda = max(av.shape[1], 1), ldb = max(bv.shape[1], 1), ldc = max(mnk[1], 1)
    cdef int threads = num_threads()
    cdef long long events = 0
    cdef int status
    with nogil:
        status = gemm_s16_raw(trans_a, trans_b, mnk[0], mnk[1], mnk[2], pa, lda, pb, ldb, pc, ldc,
                              <float>scale, <float>beta, k_chunk, debug_overflow, &events, threads)
    if status != 0:
        raise MemoryError("gemm_s16: could not allocate the packing buffers")
    return events if debug_overflow else 0


def gemm_bf16(a, b, c, double alpha=1.0, double beta=0.0, bint trans_a=False, bint trans_b=False):
    """c = alpha * op(a) @ op(b) + beta * c for a, b holding BF16 bit patterns (uint16), FP32 c."""
    cdef const uint16_t[:, ::1] av
    cdef const uint16_t[:, ::1] bv
    cdef float[:, ::1] cv
    try:
        av, bv, cv = a, b, c
    except (ValueError, TypeError, BufferError):
        _explain_bad_operands("gemm_bf16", a, b, c, np.uint16)
        raise
    cdef int mnk[3]
    _product_shape("gemm_bf16", av.shape, bv.shape, cv.shape, trans_a, trans_b, mnk)
    cdef const uint16_t* pa = &av[0, 0] if av.shape[0] * av.shape[1] else NULL
    cdef const uint16_t* pb = &bv[0, 0] if bv.shape[0] * bv.shape[1] else NULL
    cdef float* pc = &cv[0, 0] if cv.shape[0] * cv.shape[1] else NULL
    cdef int lda = max(av.shape[1], 1), ldb = max(bv.shape[1], 1), ldc = max(mnk[1], 1)
    cdef int threads = num_threads()
    cdef int status
    with nogil:
        status = gemm_bf16_raw(trans_a, trans_b, mnk[0], mnk[1], mnk[2], pa, lda, pb, ldb, pc, ldc,
                               <float>alpha, <float>beta, threads)
    if status != 0:
        raise MemoryError("gemm_bf16: could not allocate the packing buffers")


def _name(table, int value):
    return next(name for name, v in table.items() if v == value)


def variant():
    """The instruction-set variant each GEMM runs, e.g. {"s16": "avx512_vnni", "bf16": "avx512_bf16"}."""
    return {"s16": _name(S16_VARIANTS, _s16_variant), "bf16": _name(BF16_VARIANTS, _bf16_variant)}


def supported_variants():
    """Every variant this CPU can run, per GEMM, fastest first."""
    order = {"s16": ["avx512_vnni", "avx_vnni", "avx2", "scalar"], "bf16": ["avx512_bf16", "avx512f", "scalar"]}
    check = {"s16": lowp_s16_supported, "bf16": lowp_bf16_supported}
    return {kind: [name for name in names if check[kind](_TABLES[kind][name])] for kind, names in order.items()}


def set_variant(kind, name):
    """Makes GEMM ``kind`` ("s16" or "bf16") run variant ``name``; ValueError if the CPU can't run it."""
    global _s16_variant, _bf16_variant
    if kind not in _TABLES:
        raise ValueError(f"set_variant: kind must be one of {sorted(_TABLES)}, got {kind!r}")
    if name not in _TABLES[kind]:
        raise ValueError(f"set_variant: {kind} variant must be one of {sorted(_TABLES[kind])}, got {name!r}")
    if name not in supported_variants()[kind]:
        raise ValueError(f"set_variant: this CPU cannot run the {name} {kind} GEMM")
    if kind == "s16":
        _s16_variant = S16_VARIANTS[name]
    else:
        _bf16_variant = BF16_VARIANTS[name]


@contextlib.contextmanager
def forced_variant(kind, name):
    """Runs GEMM ``kind`` as variant ``name`` inside the ``with`` block."""
    previous = variant()[kind]
    set_variant(kind, name)
    try:
        yield
    finally:
        set_variant(kind, previous)

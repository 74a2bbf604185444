"""Element-wise activation kernels over flat buffers, for the layers in minicaffe/layers/activation.py
and dropout.py.

Transcendental functions (exp, expm1, tanh, log1p, log, pow) are left to NumPy's SIMD ufuncs, which
on a 64x64x56x56 float32 tensor run 8-40x faster than scalar libm calls from prange loops on two
threads (exp 4.9 ms vs 40 ms, tanh 2.6 ms vs 200 ms). These kernels do the arithmetic around them in
a single pass: the selects, products and quotients of the backward passes, clipping, thresholds,
PReLU and the dropout mask.

The work is cut into fixed-size chunks handed out statically, so each thread streams a contiguous
range and the compiler can vectorize the inner loop. Every element is computed on its own, so results
do not depend on the thread count. Outputs may be the same buffer as any input (in-place layers).
"""
from cython cimport floating
from cython.parallel cimport prange
from minicaffe.kernels.parallel cimport team_size

# Elements per work item: large enough to amortize the scheduling, small enough to balance threads.
cdef Py_ssize_t CHUNK = 16384
# Independent running sums in a reduction: one AVX-512 register of doubles.
cdef enum:
    LANES = 8


cdef inline void _relu_forward_chunk(const floating* x, floating* y, Py_ssize_t n,
                                     floating slope) noexcept nogil:
    cdef Py_ssize_t i
    cdef floating v
    if slope == 0:
        # ``v <= 0`` is false for NaN, so a NaN passes through and divergence stays visible.
        for i in range(n):
            v = x[i]
            y[i] = 0 if v <= 0 else v
    else:
        for i in range(n):
            v = x[i]
            y[i] = v * slope if v <= 0 else v


cdef inline void _relu_backward_chunk(const floating* x, const floating* dy, floating* dx,
                                      Py_ssize_t n, floating slope) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        dx[i] = dy[i] if x[i] > 0 else dy[i] * slope


def relu_forward(const floating[::1] x, floating[::1] y, double negative_slope, int num_threads):
    """y = x where x > 0, else negative_slope * x. ``y`` may be ``x`` (in-place layer)."""
    cdef Py_ssize_t n = x.shape[0], chunks = (n + CHUNK - 1) // CHUNK, c, start
    cdef floating slope = <floating>negative_slope
    if y.shape[0] != n:
        raise ValueError("relu_forward: x and y differ in size")
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            start = c * CHUNK
            _relu_forward_chunk(&x[start], &y[start], min(CHUNK, n - start), slope)


def relu_backward(const floating[::1] x, const floating[::1] dy, floating[::1] dx,
                  double negative_slope, int num_threads):
    """dx = dy where x > 0, else negative_slope * dy.

    ``x`` is the bottom data. For an in-place layer it is the top data, which has the same sign as
    the input whenever negative_slope >= 0, so the mask is unchanged (Caffe relies on this too).
    """
    cdef Py_ssize_t n = x.shape[0], chunks = (n + CHUNK - 1) // CHUNK, c, start
    cdef floating slope = <floating>negative_slope
    if dy.shape[0] != n or dx.shape[0] != n:
        raise ValueError("relu_backward: x, dy and dx differ in size")
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            start = c * CHUNK
            _relu_backward_chunk(&x[start], &dy[start], &dx[start], min(CHUNK, n - start), slope)


cdef inline Py_ssize_t _size(str kernel, Py_ssize_t n, Py_ssize_t other) except -1:
    if other != n:
        raise ValueError(f"{kernel}: buffers differ in size ({n} and {other})")
    return n


# -- arithmetic around NumPy's transcendentals ---------------------------------------------------------

def affine(const floating[::1] x, floating[::1] y, double scale, double shift, int num_threads):
    """y = scale * x + shift."""
    cdef Py_ssize_t n = _size("affine", x.shape[0], y.shape[0])
    cdef Py_ssize_t chunks = (n + CHUNK - 1) // CHUNK, c, i
    cdef floating a = <floating>scale, b = <floating>shift
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                y[i] = a * x[i] + b


def scaled_product(const floating[::1] t, const floating[::1] dy, floating[::1] dx, double scale,
                   double shift, int num_threads):
    """dx = dy * (scale * t + shift): Exp's backward (t = y) and BNLL's (t = tanh(x / 2))."""
    cdef Py_ssize_t n = _size("scaled_product", t.shape[0], dy.shape[0])
    _size("scaled_product", n, dx.shape[0])
    cdef Py_ssize_t chunks = (n + CHUNK - 1) // CHUNK, c, i
    cdef floating a = <floating>scale, b = <floating>shift
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                dx[i] = dy[i] * (a * t[i] + b)


def sigmoid_backward(const floating[::1] y, const floating[::1] dy, floating[::1] dx, int num_threads):
    """dx = dy * y * (1 - y), from the sigmoid's output y."""
    cdef Py_ssize_t n = _size("sigmoid_backward", y.shape[0], dy.shape[0])
    _size("sigmoid_backward", n, dx.shape[0])
    cdef Py_ssize_t chunks = (n + CHUNK - 1) // CHUNK, c, i
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                dx[i] = dy[i] * y[i] * (1 - y[i])


def tanh_backward(const floating[::1] y, const floating[::1] dy, floating[::1] dx, int num_threads):
    """dx = dy * (1 - y^2), from the tanh's output y."""
    cdef Py_ssize_t n = _size("tanh_backward", y.shape[0], dy.shape[0])
    _size("tanh_backward", n, dx.shape[0])
    cdef Py_ssize_t chunks = (n + CHUNK - 1) // CHUNK, c, i
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                dx[i] = dy[i] * (1 - y[i] * y[i])


def absval_backward(const floating[::1] x, const floating[::1] dy, floating[::1] dx, int num_threads):
    """dx = sign(x) * dy, with sign(0) = 0 as Caffe's caffe_cpu_sign."""
    cdef Py_ssize_t n = _size("absval_backward", x.shape[0], dy.shape[0])
    _size("absval_backward", n, dx.shape[0])
    cdef Py_ssize_t chunks = (n + CHUNK - 1) // CHUNK, c, i
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                dx[i] = ((x[i] > 0) - (x[i] < 0)) * dy[i]


def bnll_finish(const floating[::1] x, const floating[::1] t, floating[::1] y, int num_threads):
    """y = max(x, 0) + t, where t = log1p(exp(-|x|)): Caffe's two branches of log(1 + exp(x)) in one."""
    cdef Py_ssize_t n = _size("bnll_finish", x.shape[0], t.shape[0])
    _size("bnll_finish", n, y.shape[0])
    cdef Py_ssize_t chunks = (n + CHUNK - 1) // CHUNK, c, i
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                y[i] = (x[i] if x[i] > 0 else 0) + t[i]


def elu_finish(const floating[::1] x, const floating[::1] t, floating[::1] y, double alpha,
               int num_threads):
    """y = x where x > 0, else alpha * t, where t = expm1(min(x, 0))."""
    cdef Py_ssize_t n = _size("elu_finish", x.shape[0], t.shape[0])
    _size("elu_finish", n, y.shape[0])
    cdef Py_ssize_t chunks = (n + CHUNK - 1) // CHUNK, c, i
    cdef floating a = <floating>alpha
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                y[i] = x[i] if x[i] > 0 else a * t[i]


def elu_backward(const floating[::1] x, const floating[::1] y, const floating[::1] dy, floating[::1] dx,
                 double alpha, int num_threads):
    """dx = dy where x > 0, else dy * (alpha + y): the derivative alpha * exp(x) read off the output."""
    cdef Py_ssize_t n = _size("elu_backward", x.shape[0], y.shape[0])
    _size("elu_backward", n, dy.shape[0])
    _size("elu_backward", n, dx.shape[0])
    cdef Py_ssize_t chunks = (n + CHUNK - 1) // CHUNK, c, i
    cdef floating a = <floating>alpha
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                dx[i] = dy[i] if x[i] > 0 else dy[i] * (a + y[i])


def power_backward(const floating[::1] x, const floating[::1] y, const floating[::1] dy,
                   floating[::1] dx, double factor, double scale, double shift, int num_threads):
    """dx = dy * factor * y / (scale * x + shift).

    With factor = power * scale this is the derivative of y = (shift + scale * x)^power written
    with y, as Caffe's Power layer does (and with factor = power, scale = 1, shift = 0 its
    shift-free case power * y / x).
    """
    cdef Py_ssize_t n = _size("power_backward", x.shape[0], y.shape[0])
    _size("power_backward", n, dy.shape[0])
    _size("power_backward", n, dx.shape[0])
    cdef Py_ssize_t chunks = (n + CHUNK - 1) // CHUNK, c, i
    cdef floating f = <floating>factor, a = <floating>scale, b = <floating>shift
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                dx[i] = dy[i] * (f * y[i] / (a * x[i] + b))


def log_backward(const floating[::1] x, const floating[::1] dy, floating[::1] dx, double numerator,
                 double scale, double shift, int num_threads):
    """dx = dy * numerator / (scale * x + shift), numerator = scale / log(base)."""
    cdef Py_ssize_t n = _size("log_backward", x.shape[0], dy.shape[0])
    _size("log_backward", n, dx.shape[0])
    cdef Py_ssize_t chunks = (n + CHUNK - 1) // CHUNK, c, i
    cdef floating f = <floating>numerator, a = <floating>scale, b = <floating>shift
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                dx[i] = dy[i] * (f / (a * x[i] + b))


# -- piecewise functions -----------------------------------------------------------------------------

def threshold_forward(const floating[::1] x, floating[::1] y, double threshold, int num_threads):
    """y = 1 where x > threshold, else 0."""
    cdef Py_ssize_t n = _size("threshold_forward", x.shape[0], y.shape[0])
    cdef Py_ssize_t chunks = (n + CHUNK - 1) // CHUNK, c, i
    cdef floating t = <floating>threshold
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                y[i] = 1 if x[i] > t else 0


def clip_forward(const floating[::1] x, floating[::1] y, double low, double high, int num_threads):
    """y = max(low, min(x, high)), with std::min/std::max's argument order (a NaN becomes low)."""
    cdef Py_ssize_t n = _size("clip_forward", x.shape[0], y.shape[0])
    cdef Py_ssize_t chunks = (n + CHUNK - 1) // CHUNK, c, i
    cdef floating lo = <floating>low, hi = <floating>high, v
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                v = hi if hi < x[i] else x[i]
                y[i] = v if lo < v else lo


def clip_backward(const floating[::1] x, const floating[::1] dy, floating[::1] dx, double low,
                  double high, int num_threads):
    """dx = dy where low <= x <= high, else 0 (the bounds themselves pass the gradient, as Caffe)."""
    cdef Py_ssize_t n = _size("clip_backward", x.shape[0], dy.shape[0])
    _size("clip_backward", n, dx.shape[0])
    cdef Py_ssize_t chunks = (n + CHUNK - 1) // CHUNK, c, i
    cdef floating lo = <floating>low, hi = <floating>high
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                dx[i] = dy[i] if lo <= x[i] <= hi else 0


# -- PReLU -------------------------------------------------------------------------------------------
# The bottom is seen as planes of ``dim`` elements (N * C planes of H * W for NCHW); plane p belongs to
# channel p % channels. ``slopes`` holds one slope per channel, or a single one shared by all.

def prelu_forward(const floating[::1] x, floating[::1] y, const floating[::1] slopes,
                  Py_ssize_t channels, Py_ssize_t dim, int num_threads):
    """y = x where x > 0, else slope * x."""
    cdef Py_ssize_t n = _size("prelu_forward", x.shape[0], y.shape[0])
    cdef Py_ssize_t planes = n // dim if dim > 0 else 0, p, i
    cdef bint shared = slopes.shape[0] == 1
    cdef int threads = team_size((n + CHUNK - 1) // CHUNK, num_threads)
    cdef floating s
    _check_slopes("prelu_forward", slopes.shape[0], channels)
    with nogil:
        for p in prange(planes, schedule="static", num_threads=threads):
            s = slopes[0 if shared else p % channels]
            for i in range(p * dim, p * dim + dim):
                y[i] = x[i] if x[i] > 0 else s * x[i]


def prelu_backward(const floating[::1] x, const floating[::1] dy, floating[::1] dx,
                   const floating[::1] slopes, Py_ssize_t channels, Py_ssize_t dim, int num_threads):
    """dx = dy where x > 0, else slope * dy."""
    cdef Py_ssize_t n = _size("prelu_backward", x.shape[0], dy.shape[0])
    _size("prelu_backward", n, dx.shape[0])
    cdef Py_ssize_t planes = n // dim if dim > 0 else 0, p, i
    cdef bint shared = slopes.shape[0] == 1
    cdef int threads = team_size((n + CHUNK - 1) // CHUNK, num_threads)
    cdef floating s
    _check_slopes("prelu_backward", slopes.shape[0], channels)
    with nogil:
        for p in prange(planes, schedule="static", num_threads=threads):
            s = slopes[0 if shared else p % channels]
            for i in range(p * dim, p * dim + dim):
                dx[i] = dy[i] if x[i] > 0 else s * dy[i]


cdef inline double _negative_part_dot(const floating* x, const floating* dy, Py_ssize_t n) noexcept nogil:
    """Sum of dy * x where x <= 0: products in the input type (as Caffe), sums in double. LANES
    running sums, added in a fixed order at the end, let the compiler vectorize the loop without
    reassociating, and a multiply by the mask instead of a branch avoids mispredictions (16x faster)."""
    cdef double lanes[LANES]
    cdef double total = 0
    cdef Py_ssize_t i, k, block
    for k in range(LANES):
        lanes[k] = 0
    for block in range(n // LANES):
        i = block * LANES
        for k in range(LANES):
            lanes[k] += <double>(dy[i + k] * x[i + k]) * (x[i + k] <= 0)
    for i in range(n - n % LANES, n):
        total += <double>(dy[i] * x[i]) * (x[i] <= 0)
    for k in range(LANES):
        total += lanes[k]
    return total


def prelu_slope_gradient(const floating[::1] x, const floating[::1] dy, floating[::1] slope_diff,
                         double[::1] plane_sums, Py_ssize_t channels, Py_ssize_t dim, int num_threads):
    """slope_diff[c] += sum of dy * x over the elements of channel c where x <= 0.

    Each plane is summed in double into ``plane_sums`` (one entry per plane, caller-owned), in
    parallel; the planes are then added per channel in plane order, so the sums do not depend on the
    thread count.
    """
    cdef Py_ssize_t n = _size("prelu_slope_gradient", x.shape[0], dy.shape[0])
    cdef Py_ssize_t planes = n // dim if dim > 0 else 0, p, c
    cdef int threads = team_size((n + CHUNK - 1) // CHUNK, num_threads)
    cdef double total
    _check_slopes("prelu_slope_gradient", slope_diff.shape[0], channels)
    if plane_sums.shape[0] < planes:
        raise ValueError(f"prelu_slope_gradient: plane_sums holds {plane_sums.shape[0]} of {planes} planes")
    with nogil:
        for p in prange(planes, schedule="static", num_threads=threads):
            plane_sums[p] = _negative_part_dot(&x[p * dim], &dy[p * dim], dim)
        for c in range(slope_diff.shape[0]):
            total = 0
            p = c
            while p < planes:
                total += plane_sums[p]
                p += slope_diff.shape[0]
            slope_diff[c] += <floating>total


cdef inline int _check_slopes(str kernel, Py_ssize_t slopes, Py_ssize_t channels) except -1:
    if slopes != 1 and slopes != channels:
        raise ValueError(f"{kernel}: {slopes} slopes for {channels} channels")
    return 0


# -- Dropout ------------------------------------------------------------------------------------------
# The mask is a pure function of (key, element index): element i uses random word i of the key (the
# SplitMix64 output for state key + (i + 1) * golden ratio, shared with the random fills), so forward
# and backward, any thread count, and a resumed run all see the same mask for the same key.

from minicaffe.kernels.random cimport mix64, random_word


def dropout_key(unsigned long long seed, unsigned long long position):
    """The mask key of forward number ``position`` of a layer seeded with ``seed``."""
    return mix64(mix64(seed) + position)


def dropout_apply(const floating[::1] x, floating[::1] y, unsigned long long key,
                  unsigned long long drop_below, double scale, int num_threads):
    """y = x * scale where element i is kept, else x * 0.

    Element i is dropped when the top 32 bits of its random word are below ``drop_below`` (the drop
    probability times 2^32). Forward applies it to the data, backward to the diff, with the same key.
    """
    cdef Py_ssize_t n = _size("dropout_apply", x.shape[0], y.shape[0])
    cdef Py_ssize_t chunks = (n + CHUNK - 1) // CHUNK, c, i
    cdef floating s = <floating>scale
    cdef unsigned long long word
    with nogil:
        for c in prange(chunks, schedule="static", num_threads=team_size(chunks, num_threads)):
            for i in range(c * CHUNK, min(c * CHUNK + CHUNK, n)):
                word = random_word(key, i)
                y[i] = x[i] * (s if (word >> 32) >= drop_below else 0)

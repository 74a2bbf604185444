"""INT16 (DFP16) and BF16 GEMMs against NumPy references, for every variant this CPU can run."""
import numpy as np
import pytest

from minicaffe.kernels import lowp_gemm, parallel

S16_VARIANTS = lowp_gemm.supported_variants()["s16"]
BF16_VARIANTS = lowp_gemm.supported_variants()["bf16"]
TRANS = [(False, False), (True, False), (False, True), (True, True)]
INT32_MIN, INT32_MAX = -2 ** 31, 2 ** 31 - 1
# (m, n, k): single elements, K odd (a zero-padded pair), tails in both M and N, K = 0.
SHAPES = [(1, 1, 1), (13, 37, 21), (12, 32, 2), (25, 70, 17), (50, 64, 100), (3, 5, 0)]


def stored(x, trans):
    """The array the GEMM is given for op(x) = x: its transpose, contiguous, when ``trans``."""
    return np.ascontiguousarray(x.T) if trans else x


def chunk_sums(a, b, k_chunk):
    """The exact int64 sums of each chunk of K: shape (chunks, m, n)."""
    k = a.shape[1]
    step = k_chunk if 0 < k_chunk < k else max(k, 1)
    return np.stack([a[:, s:s + step].astype(np.int64) @ b[s:s + step].astype(np.int64)
                     for s in range(0, max(k, 1), step)])


def s16_reference(a, b, c, scale, beta, k_chunk):
    """float64 model of the INT16 GEMM, and a bound on its FP32 rounding: each chunk's (wrapped)
    INT32 sum is rounded once to FP32 and added once into C."""
    sums = chunk_sums(a, b, k_chunk)
    wrapped = (sums - INT32_MIN) % 2 ** 32 + INT32_MIN
    result = scale * wrapped.sum(axis=0) + beta * c.astype(np.float64)
    bound = 2.0 ** -23 * (len(sums) + 1) * (scale * np.abs(wrapped).sum(axis=0) + abs(beta * c))
    return result, bound


def random_s16(rng, shape, limit=2 ** 13):
    """DFP16 values with the 2 bits of headroom the quantizer leaves."""
    return rng.integers(-limit, limit + 1, size=shape, dtype=np.int16)


def run_s16(variant, a, b, c, scale, beta=0.0, trans_a=False, trans_b=False, **kwargs):
    out = c.copy()
    with lowp_gemm.forced_variant("s16", variant):
        events = lowp_gemm.gemm_s16(stored(a, trans_a), stored(b, trans_b), out, scale, beta=beta,
                                    trans_a=trans_a, trans_b=trans_b, **kwargs)
    return out, events


@pytest.mark.parametrize("variant", S16_VARIANTS)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_s16_matches_exact_integer_product(variant, trans_a, trans_b, m, n, k):
    rng = np.random.default_rng(m * 1000 + n * 10 + k)
    a, b = random_s16(rng, (m, k)), random_s16(rng, (k, n))
    c = np.full((m, n), np.nan, np.float32)  # beta = 0 must ignore C, even NaN
    scale = 2.0 ** -20
    out, events = run_s16(variant, a, b, c, scale, trans_a=trans_a, trans_b=trans_b)
    # One chunk, power-of-two scale: the only rounding is the INT32 -> FP32 conversion.
    exact = (a.astype(np.int64) @ b.astype(np.int64)).astype(np.float32) * np.float32(scale)
    np.testing.assert_array_equal(out, exact)
    assert events == 0


@pytest.mark.parametrize("k_chunk", [1, 7, 16, 25, 64])
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
def test_s16_chunked_accumulation_and_beta(k_chunk, trans_a, trans_b):
    rng = np.random.default_rng(k_chunk)
    m, n, k = 19, 45, 101
    a, b = random_s16(rng, (m, k)), random_s16(rng, (k, n))
    c = rng.standard_normal((m, n)).astype(np.float32)
    scale, beta = 3.0e-7, 0.75
    want, bound = s16_reference(a, b, c, scale, beta, k_chunk)
    results = {}
    for variant in S16_VARIANTS:
        results[variant], _ = run_s16(variant, a, b, c, scale, beta, trans_a, trans_b, k_chunk=k_chunk)
        assert np.all(np.abs(results[variant] - want) <= bound), variant
    # Every variant wraps and spills identically, so they agree bit for bit.
    for variant, out in results.items():
        np.testing.assert_array_equal(out, results["scalar"], err_msg=variant)


@pytest.mark.parametrize("variant", S16_VARIANTS)
def test_s16_overflow_wraps_without_chunking_and_is_exact_with_it(variant):
    # Every product is 2^28, so 16 of them sum to 2^32: far outside INT32.
    a = np.full((3, 16), 2 ** 14, np.int16)
    b = np.full((16, 5), 2 ** 14, np.int16)
    c = np.zeros((3, 5), np.float32)
    exact = np.full((3, 5), 2.0 ** 32, np.float32)

    wrapped, events = run_s16(variant, a, b, c, 1.0, debug_overflow=True)
    assert np.all(wrapped == 0.0)  # 2^32 wraps to 0
    assert events == 15  # one chunk per element, each overflowing
    # Chunks of 8 still overflow (2^31 > INT32_MAX), both chunks of every element.
    half, events = run_s16(variant, a, b, c, 1.0, k_chunk=8, debug_overflow=True)
    assert np.all(half == -(2.0 ** 32))
    assert events == 30
    # Chunks of 4 sum to 2^30 each and the FP32 accumulation is exact.
    chunked, events = run_s16(variant, a, b, c, 1.0, k_chunk=4, debug_overflow=True)
    np.testing.assert_array_equal(chunked, exact)
    assert events == 0
    # Without the debug flag nothing is counted, and the result is the same.
    plain, events = run_s16(variant, a, b, c, 1.0, k_chunk=4)
    np.testing.assert_array_equal(plain, exact)
    assert events == 0


@pytest.mark.parametrize("variant", S16_VARIANTS)
@pytest.mark.parametrize("k_chunk", [0, 8, 24])
def test_s16_debug_counts_exactly_the_chunks_that_leave_int32(variant, k_chunk):
    rng = np.random.default_rng(7 + k_chunk)
    m, n, k = 14, 40, 48
    # Full-range operands: some chunk sums overflow, most do not.
    a = random_s16(rng, (m, k), limit=2 ** 15 - 1)
    b = random_s16(rng, (k, n), limit=2 ** 15 - 1)
    sums = chunk_sums(a, b, k_chunk)
    expected = int(np.count_nonzero((sums > INT32_MAX) | (sums < INT32_MIN)))
    assert expected > 0
    c = np.zeros((m, n), np.float32)
    out, events = run_s16(variant, a, b, c, 1.0, k_chunk=k_chunk, debug_overflow=True)
    assert events == expected
    want, bound = s16_reference(a, b, c, 1.0, 0.0, k_chunk)
    assert np.all(np.abs(out - want) <= bound)


def test_s16_threads_give_identical_results():
    rng = np.random.default_rng(3)
    a, b = random_s16(rng, (70, 300)), random_s16(rng, (300, 200))
    outputs = []
    before = parallel.num_threads()
    try:
        for threads in (1, 2):
            parallel.set_num_threads(threads)
            out = np.zeros((70, 200), np.float32)
            lowp_gemm.gemm_s16(a, b, out, 1.0, k_chunk=64)
            outputs.append(out)
    finally:
        parallel.set_num_threads(before)
    np.testing.assert_array_equal(outputs[0], outputs[1])


def bf16_round(x):
    """FP32 -> BF16 bit patterns, round to nearest even (finite inputs)."""
    bits = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)


def bf16_decode(bits):
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


@pytest.mark.parametrize("variant", BF16_VARIANTS)
@pytest.mark.parametrize("trans_a,trans_b", TRANS)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_bf16_matches_float64_product_of_decoded_inputs(variant, trans_a, trans_b, m, n, k):
    rng = np.random.default_rng(m * 7 + n * 3 + k)
    a, b = bf16_round(rng.standard_normal((m, k))), bf16_round(rng.standard_normal((k, n)))
    c = rng.standard_normal((m, n)).astype(np.float32)
    alpha, beta = 1.5, -0.5
    da, db = bf16_decode(a), bf16_decode(b)
    want = alpha * (da @ db) + beta * c
    # FP32 accumulation of k exact products, then the alpha/beta update.
    bound = 2.0 ** -23 * (k + 3) * (abs(alpha) * (np.abs(da) @ np.abs(db)) + abs(beta * c)) + 1e-30
    out = c.copy()
    with lowp_gemm.forced_variant("bf16", variant):
        lowp_gemm.gemm_bf16(stored(a, trans_a), stored(b, trans_b), out, alpha=alpha, beta=beta,
                            trans_a=trans_a, trans_b=trans_b)
    assert np.all(np.abs(out - want) <= bound)


def test_bf16_beta_zero_ignores_c_and_variants_agree():
    rng = np.random.default_rng(11)
    a, b = bf16_round(rng.standard_normal((30, 257))), bf16_round(rng.standard_normal((257, 77)))
    want = bf16_decode(a) @ bf16_decode(b)
    bound = 2.0 ** -23 * 260 * (np.abs(bf16_decode(a)) @ np.abs(bf16_decode(b)))
    for variant in BF16_VARIANTS:
        out = np.full((30, 77), np.nan, np.float32)
        with lowp_gemm.forced_variant("bf16", variant):
            lowp_gemm.gemm_bf16(a, b, out)
        assert np.all(np.abs(out - want) <= bound), variant


def test_variant_reports_and_forcing():
    chosen = lowp_gemm.variant()
    assert chosen["s16"] == S16_VARIANTS[0] and chosen["bf16"] == BF16_VARIANTS[0]
    with lowp_gemm.forced_variant("s16", "scalar"):
        assert lowp_gemm.variant()["s16"] == "scalar"
    assert lowp_gemm.variant() == chosen
    with pytest.raises(ValueError, match="variant must be one of"):
        lowp_gemm.set_variant("s16", "avx1024")
    with pytest.raises(ValueError, match="kind must be one of"):
        lowp_gemm.set_variant("int8", "scalar")


def s16_operands():
    return np.zeros((4, 6), np.int16), np.zeros((6, 5), np.int16), np.zeros((4, 5), np.float32)


@pytest.mark.parametrize("change,message", [
    (lambda a, b, c: (a.astype(np.float32), b, c), "a must have dtype int16"),
    (lambda a, b, c: (a, b.astype(np.uint16), c), "b must have dtype int16"),
    (lambda a, b, c: (a, b, c.astype(np.float64)), "c must have dtype float32"),
    (lambda a, b, c: (a.ravel(), b, c), "a must be 2-D"),
    (lambda a, b, c: (np.zeros((4, 12), np.int16)[:, ::2], b, c), "a must be C-contiguous"),
    (lambda a, b, c: (a, np.zeros((7, 5), np.int16), c), r"op\(a\) is 4x6, op\(b\) is 7x5"),
    (lambda a, b, c: (a, b, np.zeros((5, 4), np.float32)), "c is 5x4"),
    (lambda a, b, c: (a.tolist(), b, c), "a must be a numpy array"),
])
def test_s16_bad_input_raises_value_error(change, message):
    a, b, c = change(*s16_operands())
    with pytest.raises(ValueError, match=message):
        lowp_gemm.gemm_s16(a, b, c, 1.0)


def test_bad_input_read_only_c_negative_chunk_and_bf16_dtype():
    a, b, c = s16_operands()
    with pytest.raises(ValueError, match="k_chunk must be >= 0"):
        lowp_gemm.gemm_s16(a, b, c, 1.0, k_chunk=-1)
    c.flags.writeable = False
    with pytest.raises(ValueError, match="c must be writeable"):
        lowp_gemm.gemm_s16(a, b, c, 1.0)
    with pytest.raises(ValueError, match="gemm_bf16: a must have dtype uint16"):
        lowp_gemm.gemm_bf16(a, b.view(np.uint16), np.zeros((4, 5), np.float32))

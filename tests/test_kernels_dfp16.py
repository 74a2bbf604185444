"""DFP16 quantize/dequantize against a float64 NumPy reference, and their error bounds; every
round-to-nearest variant this CPU runs."""
import contextlib
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minicaffe.kernels import dfp16

Q_MAX = 32767
TINY = np.float32(2.0 ** -149)  # the smallest FP32 denormal


# -- NumPy reference ---------------------------------------------------------------------------------

def exponent_ref(x, headroom):
    m = float(np.max(np.abs(x.astype(np.float64)), initial=0.0))
    return 0 if m == 0 else math.frexp(m)[1] - (15 - headroom)


def quantize_ref(x, exponent):
    """(q, flushed, clipped): x * 2^-exponent in float64 (exact), rounded half to even, saturated."""
    scaled = np.ldexp(x.astype(np.float64), -exponent)
    q = np.rint(scaled)
    clipped = int(np.count_nonzero(np.abs(q) > Q_MAX))
    q = np.clip(q, -Q_MAX, Q_MAX).astype(np.int16)
    flushed = int(np.count_nonzero((q == 0) & (x != 0)))
    return q, flushed, clipped


def quantized(x, headroom=2, **kw):
    q = np.empty(x.shape, np.int16)
    return q, dfp16.quantize(x, q, headroom=headroom, **kw)


def dequantized(q, exponent):
    return dfp16.dequantize(q, exponent, np.empty(q.shape, np.float32))


@contextlib.contextmanager
def variant(name):
    saved = dfp16.variant()
    dfp16.set_variant(name)
    try:
        yield
    finally:
        dfp16.set_variant(saved)


def check_against_reference(x, headroom):
    """Quantizes x with every round-to-nearest variant, checks each against the reference."""
    e = exponent_ref(x, headroom)
    q_ref, flushed, clipped = quantize_ref(x, e)
    assert dfp16.exponent_for(x, headroom) == e
    for name in dfp16.variants():
        with variant(name):
            q, stats = quantized(x, headroom)
            q_given = np.empty(x.shape, np.int16)
            stats_given = dfp16.quantize_with_exponent(x, q_given, e)
        np.testing.assert_array_equal(q, q_ref)
        np.testing.assert_array_equal(q_given, q_ref)
        assert stats == stats_given
        assert stats.exponent == e
        assert (stats.flushed, stats.clipped) == (flushed, clipped)
        assert stats.max_abs == float(np.max(np.abs(x), initial=0))
    return q, stats


# -- properties on random tensors --------------------------------------------------------------------

finite_float32 = st.floats(width=32, allow_nan=False, allow_infinity=False, allow_subnormal=True)
tensors = hnp.arrays(np.float32, hnp.array_shapes(min_dims=1, max_dims=3, max_side=24),
                     elements=finite_float32)


@settings(max_examples=150, deadline=None)
@given(tensors, st.integers(0, 3))
def test_quantize_matches_reference_and_round_trip_bound(x, headroom):
    q, stats = check_against_reference(x, headroom)
    e = stats.exponent
    assert np.max(np.abs(q.astype(np.int32)), initial=0) <= min(2 ** (15 - headroom), Q_MAX)
    back = np.ldexp(q.astype(np.float64), e)
    with np.errstate(over="ignore"):  # a maximum that rounds up to 2^128 dequantizes to inf
        np.testing.assert_array_equal(dequantized(q, e), back.astype(np.float32))
    error = np.abs(back - x.astype(np.float64))
    if headroom > 0:
        assert stats.clipped == 0
        assert np.all(error <= 2.0 ** (e - 1))
    else:  # only a maximum that rounds to 2^15 saturates, one step off
        assert np.all(error <= 2.0 ** e)
    if stats.max_abs > 0:  # the exponent is the smallest that fits: the maximum uses the top bit
        assert np.max(np.abs(q.astype(np.int32))) >= 2 ** (14 - headroom)


@settings(max_examples=60, deadline=None)
@given(hnp.arrays(np.float32, st.integers(1, 300), elements=st.floats(-1, 1, width=32)),
       st.integers(-150, 127), st.integers(0, 2))
def test_extreme_exponents(base, shift, headroom):
    # the same tensor scaled anywhere into FP32's range, denormals included
    check_against_reference(np.ldexp(base.astype(np.float64), shift).astype(np.float32), headroom)


def test_blocks_and_threads_agree(threads):
    # several blocks plus a tail, values spanning many binades, some denormals
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(100_003) * np.exp2(rng.integers(-40, 10, 100_003))).astype(np.float32)
    x[::997] = TINY * 3
    results = []
    for n in (1, 2):
        threads(n)
        q, stats = check_against_reference(x, 2)
        qs, stats_s = quantized(x, stochastic=True, seed=7)
        results.append((q, stats, qs, stats_s))
    (q1, s1, qs1, ss1), (q2, s2, qs2, ss2) = results
    np.testing.assert_array_equal(q1, q2)
    np.testing.assert_array_equal(qs1, qs2)
    assert s1 == s2 and ss1 == ss2
    assert s1.flushed > 0


# -- special tensors ---------------------------------------------------------------------------------

def test_all_zeros():
    x = np.zeros((4, 5), np.float32)
    x[1, 1] = -0.0
    q, stats = quantized(x)
    assert stats == dfp16.QuantStats(0, 0.0, 0, 0)
    assert not q.any()
    assert not dequantized(q, stats.exponent).any()


def test_empty_tensor():
    q, stats = quantized(np.zeros(0, np.float32))
    assert stats == dfp16.QuantStats(0, 0.0, 0, 0)


def test_single_nonzero_in_zeros():
    x = np.zeros(50_000, np.float32)
    x[31_234] = -0.75
    q, stats = check_against_reference(x, 2)
    assert stats.exponent == -13 and q[31_234] == -6144 and np.count_nonzero(q) == 1


@pytest.mark.parametrize("value, exponent", [
    (np.finfo(np.float32).max, 115),   # frexp: 128
    (1e-38, -139),                     # a normal near the bottom: frexp -126
    (TINY, -161),                      # the smallest denormal: frexp -148
    (TINY * 1000, -152),
])
def test_extreme_single_values(value, exponent):
    x = np.array([value, -value, value / 3, 0], np.float32)
    q, stats = check_against_reference(x, 2)
    assert stats.exponent == exponent
    error = np.abs(np.ldexp(q.astype(np.float64), exponent) - x.astype(np.float64))
    assert np.all(error <= 2.0 ** (exponent - 1))


def test_maximum_rounding_up_to_2_pow_128_dequantizes_to_inf():
    q, stats = quantized(np.array([np.finfo(np.float32).max], np.float32))
    assert q[0] == 2 ** 13 and stats.exponent == 115
    assert dequantized(q, stats.exponent)[0] == np.inf


def test_tiny_values_beside_large_ones_are_flushed():
    x = np.array([1.0, 1e-6, -1e-9, TINY, 0.0, 2.0 ** -15, 2.0 ** -16], np.float32)
    q, stats = check_against_reference(x, 2)
    assert stats.exponent == -12  # frexp(1) = (0.5, 1)
    # 1e-6, -1e-9 and the denormal become 0; 2^-15 is 1/8 of a step, 2^-16 less
    assert stats.flushed == 5 and q[0] == 4096


@pytest.mark.parametrize("name", dfp16.variants())
def test_headroom_zero_saturates_the_maximum(name):
    # (1 - 2^-24) * 2^15 rounds to 2^15, one past int16
    x = np.array([1 - 2.0 ** -24, 0.5, -(1 - 2.0 ** -24)], np.float32)
    with variant(name):
        q, stats = quantized(x, headroom=0)
    assert stats.exponent == -15 and stats.clipped == 2
    assert list(q) == [Q_MAX, 16384, -Q_MAX]
    q1, stats1 = quantized(x, headroom=1)
    assert stats1.clipped == 0 and q1[0] == 16384


@pytest.mark.parametrize("name", dfp16.variants())
def test_ties_round_to_even(name):
    x = np.array([4000.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 32767.5, -32766.5, 32766.5], np.float32)
    q = np.empty(x.shape, np.int16)
    with variant(name):
        stats = dfp16.quantize_with_exponent(x, q, 0)
    assert list(q) == [4000, 0, 2, 2, 0, -2, -2, Q_MAX, -32766, 32766]
    assert stats.flushed == 2 and stats.clipped == 1


@pytest.mark.parametrize("name", dfp16.variants())
def test_quantize_with_exponent_clips_and_counts(name):
    rng = np.random.default_rng(2)
    x = (rng.standard_normal(40_003) * 1000).astype(np.float32)
    x[:3] = [3e38, -3e38, 1e-30]  # past INT32's range after scaling: saturate with their sign
    q = np.empty(x.shape, np.int16)
    with variant(name):
        stats = dfp16.quantize_with_exponent(x, q, -5)  # range ±1024: most values saturate
    q_ref, flushed, clipped = quantize_ref(x, -5)
    np.testing.assert_array_equal(q, q_ref)
    assert (stats.flushed, stats.clipped) == (flushed, clipped) and clipped > 10_000
    assert stats.max_abs == float(np.max(np.abs(x)))


@pytest.mark.parametrize("exponent", [-200, -160, -149, -140, -20, 0, 110, 120])
def test_dequantize_matches_reference(exponent):
    q = np.array([0, 1, -1, 3, 8191, -8192, Q_MAX, -Q_MAX, 12345], np.int16)
    with np.errstate(over="ignore"):  # 2^120 * 8191 is past FP32's range: inf on both sides
        expected = np.ldexp(q.astype(np.float64), exponent).astype(np.float32)  # one rounding
    np.testing.assert_array_equal(dequantized(q, exponent), expected)


# -- stochastic rounding ----------------------------------------------------------------------------

@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.77])
@pytest.mark.parametrize("sign", [1, -1])
def test_stochastic_rounding_is_unbiased(fraction, sign):
    # the maximum 4096 fixes e = 0 (headroom 2); every other element is sign * (37 + fraction)
    n = 1 << 16
    x = np.full(n + 1, sign * (37 + fraction), np.float32)
    x[0] = 4096
    q, stats = quantized(x, stochastic=True, seed=12345)
    assert stats.exponent == 0
    rest = q[1:].astype(np.int64)
    exact = float(x[1])
    assert set(np.unique(rest)) <= {math.floor(exact), math.floor(exact) + 1}
    p = exact - math.floor(exact)
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(rest.mean() - exact) < 6 * sigma


def test_stochastic_rounding_bounds_and_seeds():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal(30_000) * 5).astype(np.float32)
    q_a, stats = quantized(x, stochastic=True, seed=1)
    q_b, _ = quantized(x, stochastic=True, seed=1)
    q_c, _ = quantized(x, stochastic=True, seed=2)
    np.testing.assert_array_equal(q_a, q_b)
    assert np.count_nonzero(q_a != q_c) > 1000  # another seed, other draws
    e = stats.exponent
    error = np.abs(dequantized(q_a, e).astype(np.float64) - x)
    assert np.all(error < 2.0 ** e)
    # exactly representable values never move
    integers = np.arange(-2000, 2000, dtype=np.float32)
    q_i, stats_i = quantized(integers, stochastic=True, seed=9)
    np.testing.assert_array_equal(dequantized(q_i, stats_i.exponent), integers)


def test_stochastic_with_given_exponent_clips():
    x = np.array([100.0, -100.0, 0.25], np.float32)
    q = np.empty(3, np.int16)
    stats = dfp16.quantize_with_exponent(x, q, -9, stochastic=True, seed=4)
    assert stats.clipped == 2 and list(q[:2]) == [Q_MAX, -Q_MAX] and q[2] == 128


# -- errors ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_raises(bad):
    x = np.ones((3, 40_000), np.float32)
    x[2, 17] = bad
    x[2, 30_000] = bad
    q = np.full(x.shape, 7, np.int16)
    for name in dfp16.variants():
        with variant(name), pytest.raises(dfp16.NonFiniteError) as info:
            dfp16.quantize_with_exponent(x, np.empty_like(q), -10)
        assert info.value.count == 2
    with pytest.raises(dfp16.NonFiniteError) as info:
        dfp16.quantize(x, q)
    assert info.value.count == 2 and info.value.first_index == (2, 17)
    assert "2 non-finite values" in str(info.value)
    assert np.all(q == 7)  # nothing written
    with pytest.raises(dfp16.NonFiniteError):
        dfp16.quantize(x, q, stochastic=True)
    with pytest.raises(dfp16.NonFiniteError):
        dfp16.exponent_for(x)
    assert issubclass(dfp16.NonFiniteError, ValueError)


def test_bad_arguments():
    x = np.ones(10, np.float32)
    q = np.empty(10, np.int16)
    with pytest.raises(ValueError, match="float32"):
        dfp16.quantize(x.astype(np.float64), q)
    with pytest.raises(ValueError, match="C-contiguous"):
        dfp16.quantize(np.ones((10, 2), np.float32)[:, 0], q)
    with pytest.raises(ValueError, match="elements"):
        dfp16.quantize(x, np.empty(9, np.int16))
    with pytest.raises(ValueError, match="int16"):
        dfp16.quantize(x, np.empty(10, np.uint16))
    with pytest.raises(ValueError, match="headroom"):
        dfp16.quantize(x, q, headroom=15)
    with pytest.raises(ValueError, match="exponent"):
        dfp16.quantize_with_exponent(x, q, 300)
    with pytest.raises(ValueError):
        dfp16.dequantize(q, 0, np.empty(10, np.float64))
    with pytest.raises(ValueError, match="not available"):
        dfp16.set_variant("int8")

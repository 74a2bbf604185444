"""FP32 <-> BF16 conversions, bit by bit, against NumPy references; every variant this CPU runs."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from minicaffe.kernels import bf16

LOW_HALVES = [0x0000, 0x0001, 0x7FFF, 0x8000, 0x8001, 0xC000, 0xFFFF]


@pytest.fixture(params=bf16.variants())
def variant(request):
    saved = bf16.variant()
    bf16.set_variant(request.param)
    yield request.param
    bf16.set_variant(saved)


# -- NumPy references --------------------------------------------------------------------------------

def is_nan_bits(bits):
    return (bits & 0x7FFFFFFF) > 0x7F800000


def quiet_nan(bits):
    """A NaN keeps its sign and the high half of its payload, with the quiet bit set."""
    return ((bits >> 16) | 0x40).astype(np.uint16)


def rne_reference(bits):
    """Round to nearest even from the definition: pick the nearer of the two BF16 neighbours of x,
    measured in float64; on a tie the one with an even last bit. Past the largest finite BF16 the
    upper neighbour is inf, which IEEE rounding treats as 2^128 when measuring."""
    bits = bits.astype(np.uint32)
    down = (bits >> 16).astype(np.uint32)              # toward zero
    up = down + 1                                      # away from zero (carries into the exponent)
    with np.errstate(invalid="ignore"):                # NaN lanes are computed, then replaced
        x = bits.view(np.float32).astype(np.float64)
        down_value = (down << 16).view(np.float32).astype(np.float64)
        up_value = (up << 16).view(np.float32).astype(np.float64)
        up_value = np.where(np.isinf(up_value), np.copysign(2.0 ** 128, x), up_value)
        d_down, d_up = np.abs(x - down_value), np.abs(up_value - x)
    take_up = (d_up < d_down) | ((d_up == d_down) & (down & 1 == 1))
    result = np.where(take_up, up, down).astype(np.uint16)
    finite_or_inf = ~is_nan_bits(bits)
    exact = (bits & 0xFFFF) == 0                       # inf, ±0 and BF16 values stay as they are
    result = np.where(exact, down.astype(np.uint16), result)
    return np.where(finite_or_inf, result, quiet_nan(bits)).astype(np.uint16)


def truncate_reference(bits):
    bits = bits.astype(np.uint32)
    return np.where(is_nan_bits(bits), quiet_nan(bits), bits >> 16).astype(np.uint16)


def all_high_halves():
    """Every BF16 bit pattern as the high half of an FP32, with each of LOW_HALVES below it."""
    high = np.arange(1 << 16, dtype=np.uint32) << 16
    return (high[:, None] | np.array(LOW_HALVES, np.uint32)[None, :]).reshape(-1)


def to_bf16(x, truncate=False):
    out = np.empty(x.shape, np.uint16)
    (bf16.fp32_to_bf16_truncate if truncate else bf16.fp32_to_bf16)(x, out)
    return out


# -- RNE, exhaustively over the high halves ---------------------------------------------------------

def test_rne_on_every_high_half(variant):
    bits = all_high_halves()
    np.testing.assert_array_equal(to_bf16(bits.view(np.float32)), rne_reference(bits))


def test_truncation_on_every_high_half(variant):
    bits = all_high_halves()
    np.testing.assert_array_equal(to_bf16(bits.view(np.float32), truncate=True), truncate_reference(bits))


@pytest.mark.parametrize("bits, expected", [
    (0x3F808000, 0x3F80),  # tie, even below: stays
    (0x3F818000, 0x3F82),  # tie, odd below: up to even
    (0xBF818000, 0xBF82),  # the same, negative
    (0x3F807FFF, 0x3F80),  # just below half
    (0x3F808001, 0x3F81),  # just above half
    (0x7F7F7FFF, 0x7F7F),  # largest BF16, just below its half step
    (0x7F7F8000, 0x7F80),  # tie at the largest finite (odd): rounds to inf
    (0x7F7FFFFF, 0x7F80),  # largest FP32 rounds to inf
    (0xFF7FFFFF, 0xFF80),  # and to -inf
    (0x7F800000, 0x7F80),  # inf
    (0xFF800000, 0xFF80),  # -inf
    (0x00000000, 0x0000),  # +0
    (0x80000000, 0x8000),  # -0
    (0x00000001, 0x0000),  # the smallest denormal rounds to +0
    (0x80008000, 0x8000),  # denormal tie, even below: -0
    (0x00018000, 0x0002),  # denormal tie, odd below: up
    (0x007FFFFF, 0x0080),  # the largest denormal rounds up to the smallest normal
    (0x7F800001, 0x7FC0),  # signalling NaN, payload only in the low half: still NaN
    (0xFF800001, 0xFFC0),  # with its sign
    (0x7FC00000, 0x7FC0),  # quiet NaN
    (0x7FFFFFFF, 0x7FFF),  # NaN with a full payload: not rounded into the sign
    (0xFFA5A5A5, 0xFFE5),  # payload kept, quiet bit set
])
def test_special_values(variant, bits, expected):
    x = np.array([bits] * 19, np.uint32).view(np.float32)  # one vector plus a scalar tail
    assert list(to_bf16(x)) == [expected] * 19


@settings(max_examples=100, deadline=None)
@given(hnp.arrays(np.uint32, st.integers(0, 100), elements=st.integers(0, 2 ** 32 - 1)))
def test_random_bit_patterns(bits):
    saved = bf16.variant()
    try:
        for name in bf16.variants():
            bf16.set_variant(name)
            np.testing.assert_array_equal(to_bf16(bits.view(np.float32)), rne_reference(bits))
    finally:
        bf16.set_variant(saved)


def test_variants_agree_across_blocks_and_threads(threads):
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2 ** 32, size=70_001, dtype=np.uint64).astype(np.uint32)
    bits[::5] &= 0x807FFFFF  # many denormals
    x = bits.view(np.float32)
    expected = rne_reference(bits)
    saved = bf16.variant()
    try:
        for name in bf16.variants():
            bf16.set_variant(name)
            for n in (1, 2):
                threads(n)
                np.testing.assert_array_equal(to_bf16(x), expected)
    finally:
        bf16.set_variant(saved)


# -- back to FP32 and the emulation mode -------------------------------------------------------------

def test_bf16_to_fp32_is_exact_for_every_pattern():
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    out = bf16.bf16_to_fp32(h, np.empty(h.shape, np.float32))
    np.testing.assert_array_equal(out.view(np.uint32), h.astype(np.uint32) << 16)


def test_round_to_bf16_equals_convert_and_back(variant):
    bits = all_high_halves()
    x = bits.view(np.float32)
    rounded = bf16.round_to_bf16(x, np.empty_like(x))
    expected = rne_reference(bits).astype(np.uint32) << 16
    np.testing.assert_array_equal(rounded.view(np.uint32), expected)
    converted = bf16.bf16_to_fp32(to_bf16(x), np.empty_like(x))
    np.testing.assert_array_equal(rounded.view(np.uint32), converted.view(np.uint32))
    # BF16-representable values are fixed points
    again = bf16.round_to_bf16(rounded.copy())
    np.testing.assert_array_equal(again.view(np.uint32), rounded.view(np.uint32))


def test_emulation_in_place_and_truncation(variant):
    rng = np.random.default_rng(1)
    x = rng.standard_normal(5000).astype(np.float32)
    original = x.copy()
    result = bf16.round_to_bf16(x)
    assert result is x
    assert np.all(x.view(np.uint32) & 0xFFFF == 0)
    # RNE is within half a BF16 step (2^-8 relative), truncation within a step, and never larger
    relative = np.abs(x.astype(np.float64) - original) / np.abs(original)
    assert np.all(relative <= 2.0 ** -8)
    chopped = bf16.truncate_to_bf16(original, np.empty_like(original))
    np.testing.assert_array_equal(chopped.view(np.uint32),
                                  truncate_reference(original.view(np.uint32)).astype(np.uint32) << 16)
    assert np.all(np.abs(chopped) <= np.abs(original))
    assert np.mean(np.abs(chopped - original)) > 1.5 * np.mean(np.abs(x - original))


def test_nan_and_inf_survive_emulation():
    x = np.array([np.nan, -np.nan, np.inf, -np.inf, 0.0, -0.0], np.float32)
    for fn in (bf16.round_to_bf16, bf16.truncate_to_bf16):
        out = fn(x.copy())
        assert np.isnan(out[0]) and np.isnan(out[1]) and np.signbit(out[1])
        np.testing.assert_array_equal(out[2:], x[2:])
        assert np.signbit(out[5])


def test_bad_arguments():
    x = np.ones(8, np.float32)
    with pytest.raises(ValueError, match="uint16"):
        bf16.fp32_to_bf16(x, np.empty(8, np.int16))
    with pytest.raises(ValueError, match="float32"):
        bf16.fp32_to_bf16(x.astype(np.float64), np.empty(8, np.uint16))
    with pytest.raises(ValueError, match="elements"):
        bf16.round_to_bf16(x, np.empty(7, np.float32))
    with pytest.raises(ValueError, match="C-contiguous"):
        bf16.round_to_bf16(np.ones((8, 2), np.float32)[:, 1])
    with pytest.raises(ValueError, match="not available"):
        bf16.set_variant("fp8")

"""The counter-based random fills (minicaffe/kernels/random.pyx) against a NumPy reference, their
statistics, and DummyData's refill through them."""
import numpy as np
import pytest
from google.protobuf import text_format
from scipy import stats

import minicaffe
from minicaffe import rng
from minicaffe.blob import Blob, blob_dtype
from minicaffe.errors import LayerError, MinicaffeError
from minicaffe.kernels import random as random_fill
from minicaffe.layer import create_layer
from minicaffe.proto import minicaffe_pb2 as pb

GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
KEY = 0x5EED_1234_ABCD_0042
CHUNK = 65536  # the kernel's work item: sizes below cross it, with odd ends
DRAWS = 1_000_000


# -- NumPy reference ---------------------------------------------------------------------------------
def words_reference(key, count):
    """Words 0..count-1 of SplitMix64 seeded with ``key`` (uint64 arithmetic wraps in NumPy)."""
    z = np.uint64(key) + np.arange(1, count + 1, dtype=np.uint64) * GOLDEN_GAMMA
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def halves(key, count):
    """The float32 fills' 32-bit halves: value 2j from the high half of word j, 2j + 1 from the low."""
    words = words_reference(key, (count + 1) // 2)
    pairs = np.stack([words >> np.uint64(32), words & np.uint64(0xFFFFFFFF)], axis=1)
    return pairs.reshape(-1)[:count].astype(np.uint32), words


def uniform_f32_reference(key, count):
    bits, _ = halves(key, count)
    return (bits >> np.uint32(8)).astype(np.float32) * np.float32(2.0**-24)


def normal_f32_reference(key, count):
    """Box-Muller in float64 on the kernel's float32 radius uniform and 24-bit angle."""
    _, words = halves(key, count)
    high = (words >> np.uint64(32)).astype(np.uint32)
    u = high.astype(np.float32) * np.float32(2.0**-32) + np.float32(2.0**-33)
    radius = np.sqrt(-2.0 * np.log(u.astype(np.float64)))
    angle = 2 * np.pi * ((words & np.uint64(0xFFFFFFFF)).astype(np.uint32) >> np.uint32(8)) / 2.0**24
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1).reshape(-1)[:count]


def uniform53(words):
    return (words >> np.uint64(11)).astype(np.float64) * 2.0**-53


def normal_f64_reference(key, count):
    pairs = (count + 1) // 2
    words = words_reference(key, 2 * pairs)
    radius = np.sqrt(-2.0 * np.log(uniform53(words[0::2]) + 2.0**-54))
    angle = 2 * np.pi * uniform53(words[1::2])
    return np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=1).reshape(-1)[:count]


def normal(count, key=KEY, mean=0.0, std=1.0, dtype=np.float32, threads=2):
    out = np.empty(count, dtype)
    random_fill.fill_normal(out, mean, std, key, threads)
    return out


def uniform(count, key=KEY, low=0.0, high=1.0, dtype=np.float32, threads=2):
    out = np.empty(count, dtype)
    random_fill.fill_uniform(out, low, high, key, threads)
    return out


# -- against the reference ----------------------------------------------------------------------------
def test_uniform_float32_is_the_reference_bit_for_bit():
    count = 2 * CHUNK + 7
    np.testing.assert_array_equal(uniform(count), uniform_f32_reference(KEY, count))


def test_normal_float32_matches_float64_box_muller():
    """The polynomial log and sin/cos against libm in float64: relative error near float32's epsilon."""
    count = 2 * CHUNK + 7
    got = normal(count).astype(np.float64)
    expected = normal_f32_reference(KEY, count)
    relative = np.abs(got - expected) / np.maximum(np.abs(expected), 1e-30)
    assert relative.max() < 5e-7, relative.max()


def test_float64_fills_match_the_reference():
    count = CHUNK + 5
    np.testing.assert_array_equal(uniform(count, dtype=np.float64), uniform53(words_reference(KEY, count)))
    np.testing.assert_allclose(normal(count, dtype=np.float64), normal_f64_reference(KEY, count),
                               rtol=1e-13, atol=1e-15)


# -- determinism ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fill", [normal, uniform])
def test_same_key_same_values_for_any_thread_count(fill, dtype):
    count = 3 * CHUNK + 3
    first = fill(count, dtype=dtype, threads=1)
    for threads in (1, 2, 3, 8):
        np.testing.assert_array_equal(fill(count, dtype=dtype, threads=threads), first)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("fill", [normal, uniform])
def test_value_i_does_not_depend_on_the_fill_length(fill, dtype):
    longest = fill(CHUNK + 40, dtype=dtype)
    for count in (0, 1, 2, 3, 17, CHUNK - 1, CHUNK, CHUNK + 1, CHUNK + 39):
        np.testing.assert_array_equal(fill(count, dtype=dtype), longest[:count])


@pytest.mark.parametrize("fill", [normal, uniform])
def test_different_keys_and_offsets_give_unrelated_values(fill):
    count = 100_000
    a, b = fill(count, key=1), fill(count, key=2)
    assert np.corrcoef(a, b)[0, 1] < 0.02
    assert np.corrcoef(a[:-1], a[1:])[0, 1] < 0.02  # neighbours, also within a word
    assert np.corrcoef(a[:-2], a[2:])[0, 1] < 0.02  # neighbouring words
    assert np.mean(a == b) < 1e-3


def test_dropout_shares_the_random_words():
    """Dropout keeps element i when the high half of word i of its key clears the threshold."""
    from minicaffe.kernels import activation
    count, drop_below = 5000, 1 << 31
    x = np.ones(count, np.float32)
    y = np.empty_like(x)
    activation.dropout_apply(x, y, KEY, drop_below, 2.0, 2)
    kept = (words_reference(KEY, count) >> np.uint64(32)) >= np.uint64(drop_below)
    np.testing.assert_array_equal(y, np.where(kept, 2.0, 0.0))


# -- statistics ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_normal_moments_tails_and_distribution(dtype):
    z = normal(DRAWS, dtype=dtype).astype(np.float64)
    assert np.all(np.isfinite(z))
    # Tolerances are about 5 standard errors of each estimate at 1e6 draws.
    assert abs(z.mean()) < 5e-3
    assert abs(z.std() - 1) < 4e-3
    assert abs(stats.skew(z)) < 0.012
    assert abs(stats.kurtosis(z)) < 0.025
    assert abs(np.mean(np.abs(z) > 3) - 2 * stats.norm.sf(3)) < 3e-4
    assert stats.kstest(z, "norm").pvalue > 1e-3
    # Box-Muller's two values of a pair are independent: uncorrelated, and so are their squares.
    assert abs(np.corrcoef(z[0::2], z[1::2])[0, 1]) < 0.01
    assert abs(np.corrcoef(z[0::2] ** 2, z[1::2] ** 2)[0, 1]) < 0.01


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_uniform_range_moments_and_distribution(dtype):
    u = uniform(DRAWS, dtype=dtype)
    assert u.min() >= 0 and u.max() < 1
    u = u.astype(np.float64)
    assert abs(u.mean() - 0.5) < 1.5e-3
    assert abs(u.var() - 1 / 12) < 1e-3
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    counts = np.bincount((u * 100).astype(int), minlength=100)
    assert stats.chisquare(counts).pvalue > 1e-3


def test_no_nan_or_inf_over_many_keys():
    for key in range(20):
        assert np.all(np.isfinite(normal(200_003, key=key)))
        assert np.abs(normal(200_003, key=key)).max() < 6.8  # the radius uniform is at least 2^-33


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_affine_parameters(dtype):
    count = 10_001
    tolerance = 1e-6 if dtype == np.float32 else 1e-14
    np.testing.assert_allclose(normal(count, mean=3, std=0.5, dtype=dtype),
                               3 + 0.5 * normal(count, dtype=np.float64 if dtype == np.float64 else dtype),
                               rtol=tolerance, atol=tolerance)
    spread = uniform(count, low=-2, high=5, dtype=dtype)
    np.testing.assert_allclose(spread, -2 + 7 * uniform(count, dtype=dtype), rtol=tolerance, atol=4 * tolerance)
    assert spread.min() >= -2 and spread.max() < 5
    np.testing.assert_array_equal(normal(count, mean=1.5, std=0, dtype=dtype), 1.5)


# -- DummyData -----------------------------------------------------------------------------------------
def dummy_layer(fillers, shapes=("dim: 3 dim: 5 dim: 7", "dim: 4"), seed=11):
    text = ('name: "d" type: "DummyData" dummy_data_param { '
            + " ".join(f"shape {{ {shape} }}" for shape in shapes)
            + " ".join(f" data_filler {{ {filler} }}" for filler in fillers) + " }")
    layer = create_layer(text_format.Parse(text, pb.LayerParameter()), pb.TRAIN)
    tops = [Blob(name=f"top{i}") for i in range(len(shapes))]
    rng.set_seed(seed)
    layer.layer_setup([], tops)
    return layer, tops


def forwards(layer, tops, count):
    results = []
    for _ in range(count):
        layer.forward([], tops)
        results.append([top.data.copy() for top in tops])
    return results


def test_dummy_data_refills_at_each_forward_and_keeps_constants():
    layer, tops = dummy_layer(['type: "gaussian" mean: 2 std: 3', 'type: "constant" value: 4'])
    first, second = forwards(layer, tops, 2)
    assert not np.array_equal(first[0], second[0])
    np.testing.assert_array_equal(first[1], 4)
    np.testing.assert_array_equal(second[1], 4)
    tops[1].data[...] = 9  # a constant top is filled once, at setup
    layer.forward([], tops)
    np.testing.assert_array_equal(tops[1].data, 9)


def test_dummy_data_refill_is_keyed_by_the_framework_rng():
    """Each refilled top takes one key from the framework RNG per forward, in top order."""
    layer, tops = dummy_layer(['type: "gaussian" mean: 2 std: 3', 'type: "uniform" min: -1 max: 4'],
                              seed=11)
    generator = np.random.default_rng(11)
    for values in forwards(layer, tops, 2):
        normal_key, uniform_key = (int(generator.integers(2**64, dtype=np.uint64)) for _ in range(2))
        np.testing.assert_array_equal(values[0].reshape(-1), normal(105, key=normal_key, mean=2, std=3))
        np.testing.assert_array_equal(values[1], uniform(4, key=uniform_key, low=-1, high=4))


def test_dummy_data_is_repeatable_under_set_seed():
    fillers = ['type: "gaussian" std: 1', 'type: "uniform" max: 2']
    runs = [forwards(*dummy_layer(fillers, seed=seed), 3) for seed in (5, 5, 6)]
    for a, b in zip(runs[0], runs[1]):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(runs[0][0][0], runs[2][0][0])


def test_dummy_data_rarer_fillers_still_refill():
    layer, tops = dummy_layer(['type: "xavier"', 'type: "gaussian" std: 1 sparse: 2'],
                              shapes=("dim: 6 dim: 20", "dim: 8 dim: 50"))
    first, second = forwards(layer, tops, 2)
    bound = np.sqrt(3 / 20)
    assert np.abs(first[0]).max() <= bound and not np.array_equal(first[0], second[0])
    assert 0 < np.mean(first[1] == 0) < 1  # sparse keeps about 2 of 8 entries


def test_dummy_data_float64_tops():
    with blob_dtype(np.float64):
        layer, tops = dummy_layer(['type: "gaussian" std: 1', 'type: "uniform"'])
    values = forwards(layer, tops, 1)[0]
    assert values[0].dtype == np.float64 and np.all(np.isfinite(values[0]))
    assert np.all((values[1] >= 0) & (values[1] < 1))


def test_dummy_data_sparse_uniform_is_still_refused():
    layer, tops = dummy_layer(['type: "uniform" sparse: 1'])
    with pytest.raises(MinicaffeError, match="sparse is only supported by the gaussian filler"):
        layer.forward([], tops)


def test_dummy_data_negative_std_is_a_setup_error():
    with pytest.raises(LayerError, match=r"layer 'd' \(DummyData\): dummy_data_param.data_filler: "
                                         r"gaussian std must not be negative, got -1"):
        dummy_layer(['type: "gaussian" std: -1'])


def test_dummy_data_setup_draws_nothing_so_weights_are_unchanged():
    """Weight initialization after a DummyData layer is what it would be after an Input layer."""
    layers = ('layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip" '
              'inner_product_param {{ num_output: 3 weight_filler {{ type: "gaussian" std: 1 }} }} }}')
    inputs = {
        "dummy": 'layer { name: "data" type: "DummyData" top: "data" dummy_data_param { '
                 'shape { dim: 2 dim: 5 } data_filler { type: "gaussian" std: 1 } } }',
        "input": 'layer { name: "data" type: "Input" top: "data" input_param { shape { dim: 2 dim: 5 } } }',
    }
    weights = {}
    for name, first in inputs.items():
        rng.set_seed(3)
        net = minicaffe.Net(text_format.Parse(first + layers.format(), pb.NetParameter()), phase=pb.TRAIN)
        weights[name] = net.params["ip"][0].data.copy()
    np.testing.assert_array_equal(weights["dummy"], weights["input"])

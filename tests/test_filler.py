"""Fillers: the statistics each one promises, Caffe's formulas, seed repeatability, and errors."""
import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe import rng
from minicaffe.blob import Blob
from minicaffe.errors import MinicaffeError
from minicaffe.filler import fill_blob
from minicaffe.proto import minicaffe_pb2 as pb


def filler(text):
    return text_format.Parse(text, pb.FillerParameter())


def filled(shape, text, seed=0):
    rng.set_seed(seed)
    blob = Blob(shape)
    fill_blob(blob, filler(text))
    return blob.data.copy()


def test_constant():
    np.testing.assert_array_equal(filled((3, 4), 'type: "constant" value: 2.5'), np.full((3, 4), 2.5))
    np.testing.assert_array_equal(filled((5,), ""), np.zeros(5))   # Caffe's default: constant 0


def test_uniform_bounds_and_moments():
    values = filled((200, 100), 'type: "uniform" min: -2 max: 3')
    assert values.min() >= -2 and values.max() <= 3
    assert abs(values.mean() - 0.5) < 0.05
    assert abs(values.std() - 5 / np.sqrt(12)) < 0.05


def test_gaussian_moments():
    values = filled((200, 100), 'type: "gaussian" mean: 1 std: 0.5')
    assert abs(values.mean() - 1) < 0.02
    assert abs(values.std() - 0.5) < 0.02


def test_sparse_gaussian_keeps_sparse_over_shape0_of_the_entries():
    values = filled((50, 400), 'type: "gaussian" std: 1 sparse: 10')
    nonzero = np.count_nonzero(values) / values.size
    assert abs(nonzero - 10 / 50) < 0.01
    assert abs(values[values != 0].std() - 1) < 0.05


def test_positive_unitball_rows_sum_to_one():
    values = filled((6, 3, 4, 5), 'type: "positive_unitball"')
    assert values.min() >= 0
    np.testing.assert_allclose(values.reshape(6, -1).sum(axis=1), 1, rtol=1e-5)


@pytest.mark.parametrize("norm, n", [("FAN_IN", 3 * 5 * 5), ("FAN_OUT", 40 * 5 * 5),
                                      ("AVERAGE", (3 * 5 * 5 + 40 * 5 * 5) / 2)])
def test_xavier_and_msra_scale_by_the_chosen_fan(norm, n):
    shape = (40, 3, 5, 5)
    xavier = filled(shape, f'type: "xavier" variance_norm: {norm}')
    bound = np.sqrt(3 / n)
    assert xavier.min() >= -bound and xavier.max() <= bound
    assert abs(xavier.std() - bound / np.sqrt(3)) < 0.05 * bound
    msra = filled(shape, f'type: "msra" variance_norm: {norm}')
    assert abs(msra.mean()) < 0.05 * np.sqrt(2 / n)
    assert abs(msra.std() - np.sqrt(2 / n)) < 0.05 * np.sqrt(2 / n)


def test_xavier_fan_out_of_a_vector_is_its_count():
    values = filled((3000,), 'type: "xavier" variance_norm: FAN_OUT')
    assert np.abs(values).max() <= np.sqrt(3 / 3000)
    assert np.abs(values).max() > 0.9 * np.sqrt(3 / 3000)


def test_bilinear_is_the_upsampling_kernel():
    # kernel 4 (factor 2): taps [0.25, 0.75, 0.75, 0.25] in each direction.
    values = filled((2, 1, 4, 4), 'type: "bilinear"')
    taps = np.array([0.25, 0.75, 0.75, 0.25])
    for plane in values.reshape(-1, 4, 4):
        np.testing.assert_allclose(plane, np.outer(taps, taps))
    # kernel 3 (factor 2, odd): taps [0.5, 1, 0.5].
    np.testing.assert_allclose(filled((1, 1, 3, 3), 'type: "bilinear"')[0, 0],
                               np.outer([0.5, 1, 0.5], [0.5, 1, 0.5]))


@pytest.mark.parametrize("text", ['type: "uniform"', 'type: "gaussian"', 'type: "gaussian" sparse: 3',
                                  'type: "xavier"', 'type: "msra"', 'type: "positive_unitball"'])
def test_same_seed_same_values_other_seed_other_values(text):
    a = filled((8, 5, 3, 3), text, seed=7)
    b = filled((8, 5, 3, 3), text, seed=7)
    c = filled((8, 5, 3, 3), text, seed=8)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_fills_float64_blobs():
    from minicaffe.blob import blob_dtype
    with blob_dtype(np.float64):
        blob = Blob((4, 4))
    fill_blob(blob, filler('type: "gaussian"'))
    assert blob.data.dtype == np.float64 and np.count_nonzero(blob.data) == 16


@pytest.mark.parametrize("text, shape, message", [
    ('type: "gaussain"', (2, 2), "unknown filler type 'gaussain'"),
    ('type: "xavier" sparse: 2', (2, 2), "sparse is only supported by the gaussian filler"),
    ('type: "bilinear"', (2, 3, 4), "bilinear needs a 4-D blob with square kernels"),
    ('type: "bilinear"', (1, 1, 3, 4), "bilinear needs a 4-D blob with square kernels"),
    ('type: "gaussian" std: -1', (2,), "std must not be negative"),
])
def test_errors_are_one_line_and_name_the_problem(text, shape, message):
    with pytest.raises(MinicaffeError, match=message) as info:
        fill_blob(Blob(shape), filler(text), where="layer 'ip1' weight_filler")
    assert str(info.value).startswith("layer 'ip1' weight_filler: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("text", ['type: "uniform" min: -1 max: 2', 'type: "gaussian" mean: 0.5 std: 2',
                                  'type: "xavier"', 'type: "msra"', 'type: "positive_unitball"'])
def test_float32_blobs_are_drawn_in_float32_with_the_same_statistics(text):
    """The random fillers draw float32 straight into a float32 blob (no float64 round trip); the
    values differ from a float64 draw but their distribution is the same."""
    rng.set_seed(3)
    single = Blob((300, 200))
    fill_blob(single, filler(text))
    from minicaffe.blob import blob_dtype
    with blob_dtype(np.float64):
        double = Blob((300, 200))
    rng.set_seed(3)
    fill_blob(double, filler(text))
    assert single.data.dtype == np.float32
    assert not np.array_equal(single.data, double.data.astype(np.float32))   # really a float32 draw
    scale = double.data.std()
    assert abs(single.data.mean() - double.data.mean()) <= 0.02 * scale
    assert abs(single.data.std() - scale) <= 0.02 * scale

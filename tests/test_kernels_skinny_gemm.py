"""The skinny GEMM kernels (small batch x large weights) against a float64 NumPy reference."""
import numpy as np
import pytest
from google.protobuf import text_format

from gradient_check import make_bottoms, setup_layer
from minicaffe import rng
from minicaffe.kernels import parallel
from minicaffe.kernels import skinny_gemm as sg
from minicaffe.layer import create_layer
from minicaffe.proto import minicaffe_pb2 as pb
from minicaffe.threads import blas_single_threaded

# Shapes whose K and N are not multiples of the 16-float vector, nor of the register tiles.
WEIGHT_SHAPES = [(1, 1), (37, 45), (129, 257), (300, 1000)]
BATCHES = [1, 2, 3, 5, 8, 15, 16, 17, 31, 33]


@pytest.fixture
def restore_threads():
    before = parallel.num_threads()
    yield
    parallel.set_num_threads(before)


def reference(a, b, c, trans_b, beta):
    """Plain float64 C = A @ op(B) + beta * C, with the bound its float32 rounding error stays within."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    op_b = b64.T if trans_b else b64
    expected = a64 @ op_b + beta * c.astype(np.float64)
    magnitude = np.abs(a64) @ np.abs(op_b) + np.abs(beta * c)
    eps = np.finfo(c.dtype).eps
    return expected, 4 * eps * np.sqrt(a.shape[1] + 1) * magnitude + eps


def operands(gen, m, n, k, trans_b, dtype):
    a = gen.standard_normal((m, k)).astype(dtype)
    b = gen.standard_normal((n, k) if trans_b else (k, n)).astype(dtype)
    c = gen.standard_normal((m, n)).astype(dtype)
    return a, b, c


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("n, k", WEIGHT_SHAPES)
def test_skinny_matches_numpy(dtype, trans_b, n, k):
    gen = np.random.default_rng(n * 1000 + k)
    for m in BATCHES:
        for beta in (0.0, 1.0, 0.5):
            a, b, c = operands(gen, m, n, k, trans_b, dtype)
            expected, bound = reference(a, b, c, trans_b, beta)
            sg.skinny_matmul(a, b, c, trans_b=trans_b, beta=beta)
            error = np.abs(c - expected)
            assert (error <= bound).all(), (m, beta, float(error.max()))


@pytest.mark.parametrize("trans_b", [True, False])
def test_beta_zero_never_reads_c(trans_b):
    a, b, c = operands(np.random.default_rng(1), 7, 53, 70, trans_b, np.float32)
    c[...] = np.nan
    sg.skinny_matmul(a, b, c, trans_b=trans_b)
    assert np.isfinite(c).all()


@pytest.mark.parametrize("trans_b", [True, False])
def test_empty_sum_scales_c(trans_b):
    a, b, c = operands(np.random.default_rng(2), 3, 20, 0, trans_b, np.float32)
    before = c.copy()
    sg.skinny_matmul(a, b, c, trans_b=trans_b, beta=0.5)
    np.testing.assert_array_equal(c, 0.5 * before)


@pytest.mark.parametrize("trans_b", [True, False])
def test_row_strided_views_leave_the_rest_untouched(trans_b):
    gen = np.random.default_rng(3)
    m, n, k = 6, 35, 49
    a_big = gen.standard_normal((m, k + 7)).astype(np.float32)
    b_big = gen.standard_normal((n, k + 3) if trans_b else (k, n + 3)).astype(np.float32)
    c_big = gen.standard_normal((m, n + 5)).astype(np.float32)
    a, c = a_big[:, :k], c_big[:, :n]
    b = b_big[:, :k] if trans_b else b_big[:, :n]
    margin = c_big[:, n:].copy()
    expected, bound = reference(a, b, c, trans_b, 1.0)
    sg.skinny_matmul(a, b, c, trans_b=trans_b, beta=1.0)
    assert (np.abs(c - expected) <= bound).all()
    np.testing.assert_array_equal(c_big[:, n:], margin)


@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("m", [3, 16, 17])
def test_results_do_not_depend_on_the_thread_count(trans_b, m, restore_threads):
    if not parallel.openmp_enabled():
        pytest.skip("built without OpenMP")
    a, b, c = operands(np.random.default_rng(4), m, 301 * 8, 517, trans_b, np.float32)
    results = []
    for threads in (1, 2, 3):
        parallel.set_num_threads(threads)
        out = c.copy()
        sg.skinny_matmul(a, b, out, trans_b=trans_b, beta=1.0)
        results.append(out)
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_bad_arguments_raise():
    a = np.zeros((4, 10), np.float32)
    with pytest.raises(ValueError, match="op\\(B\\) is 11x6"):
        sg.skinny_matmul(a, np.zeros((6, 11), np.float32), np.zeros((4, 6), np.float32), trans_b=True)
    rows = sg.MAX_ROWS + 1
    with pytest.raises(ValueError, match=f"A has {rows} rows"):
        sg.skinny_matmul(np.zeros((rows, 10), np.float32), np.zeros((10, 3), np.float32),
                         np.zeros((rows, 3), np.float32))
    with pytest.raises(ValueError, match="rows of B must be contiguous"):
        sg.skinny_matmul(a, np.zeros((10, 12), np.float32)[:, ::2], np.zeros((4, 6), np.float32))


def test_matmul_chooses_by_shape():
    if not sg.vectorized():
        assert not sg.prefers_skinny(16, 4096, 9216, False, True, np.dtype(np.float32))
        pytest.skip("no AVX-512: matmul keeps BLAS everywhere")
    f32 = np.dtype(np.float32)
    # AlexNet fc6 at batch 16: forward and bottom gradient go to the skinny kernel ...
    assert sg.prefers_skinny(16, 4096, 9216, False, True, f32)
    assert sg.prefers_skinny(16, 9216, 4096, False, False, f32)
    # ... the weight gradient, large batches, small products and float64 stay with BLAS.
    assert not sg.prefers_skinny(4096, 9216, 16, True, False, f32)
    assert not sg.prefers_skinny(64, 4096, 9216, False, True, f32)
    assert not sg.prefers_skinny(16, 10, 500, False, True, f32)
    assert not sg.prefers_skinny(16, 4096, 9216, False, True, np.dtype(np.float64))


@pytest.mark.parametrize("m, alpha", [(8, 1.0), (8, 2.0), (40, 1.0)])
def test_matmul_matches_numpy_on_either_path(m, alpha):
    a, b, c = operands(np.random.default_rng(5), m, 700, 3001, True, np.float32)
    expected, bound = reference(a, b, c, True, 1.0)
    expected = alpha * (expected - c) + c
    with blas_single_threaded():
        sg.matmul(a, b, c, trans_b=True, alpha=alpha, beta=1.0)
    assert (np.abs(c - expected) <= abs(alpha) * bound).all()


@pytest.mark.parametrize("transpose", [False, True])
def test_inner_product_at_a_small_batch_matches_numpy(transpose):
    """Forward, bottom gradient and weight/bias gradients of a layer that takes the skinny path."""
    rng.set_seed(0)
    batch, inputs, outputs = 6, 1031, 517
    param = text_format.Parse(
        f'name: "fc" type: "InnerProduct" inner_product_param {{ num_output: {outputs} '
        f'transpose: {str(transpose).lower()} weight_filler {{ type: "gaussian" std: 0.1 }} '
        f'bias_filler {{ type: "gaussian" std: 0.1 }} }}', pb.LayerParameter())
    layer = create_layer(param, pb.TRAIN)
    bottoms = make_bottoms([(batch, inputs)], dtype=np.float32)
    tops = setup_layer(layer, bottoms, 1, dtype=np.float32)
    if sg.vectorized():
        forward_form = (batch, outputs, inputs, False, not transpose)
        assert sg.prefers_skinny(*forward_form, np.dtype(np.float32))
    w = layer.blobs[0].data.astype(np.float64)
    w_nk = w.T if transpose else w
    x = bottoms[0].data.astype(np.float64)
    with blas_single_threaded():
        layer.forward(bottoms, tops)
        np.testing.assert_allclose(tops[0].data, x @ w_nk.T + layer.blobs[1].data, rtol=1e-4, atol=1e-4)
        dy = np.random.default_rng(6).standard_normal((batch, outputs)).astype(np.float32)
        tops[0].diff[...] = dy
        for blob in layer.blobs:
            blob.diff[...] = 0
        layer.backward(tops, [True], bottoms)
    np.testing.assert_allclose(bottoms[0].diff, dy @ w_nk, rtol=1e-4, atol=1e-4)
    weight_grad = dy.astype(np.float64).T @ x
    np.testing.assert_allclose(layer.blobs[0].diff, weight_grad.T if transpose else weight_grad,
                               rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(layer.blobs[1].diff, dy.sum(axis=0), rtol=1e-4, atol=1e-4)

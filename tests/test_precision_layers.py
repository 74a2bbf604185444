"""DFP16 and BF16 Convolution and InnerProduct against FP32: forward and every gradient.

Two checks per case. (1) The low-precision layer equals the FP32 computation on the *decoded*
operands (NumPy references of the DFP16 quantizer and of BF16 round-to-nearest-even, below), up to
FP32 summation error: this pins the exponents, scales, transposes, groups and chunking. (2) It agrees
with plain FP32 within the error bound the format implies for a sum of K products a·b:
    DFP16:  |Δ| ≤ K·(|a|max·2^e_b + |b|max·2^e_a)/2 + K·2^(e_a+e_b)/4   (round to nearest, no clipping)
    BF16:   |Δ| ≤ (2u + u²)·Σ|a||b|,  u = 2^-8                          (relative rounding of each operand)
"""
import numpy as np
import pytest
from google.protobuf import text_format
from threadpoolctl import threadpool_limits

from minicaffe import rng
from minicaffe.blob import Blob
from minicaffe.errors import NumericalError
from minicaffe.layer import create_layer
from minicaffe.proto import minicaffe_pb2 as pb

FILLERS = 'weight_filler { type: "gaussian" std: 0.3 } bias_filler { type: "gaussian" std: 0.3 }'
BF16_UNIT_ROUNDOFF = 2.0 ** -8


@pytest.fixture(autouse=True)
def single_threaded_blas():
    with threadpool_limits(1, "blas"):
        yield


# -- NumPy references of the formats -----------------------------------------------------------------

def dfp16_exponent(x, headroom=2):
    m = float(np.max(np.abs(x), initial=0.0))
    if m == 0:
        return 0
    return np.frexp(m)[1] - (15 - headroom)


def dfp16_decode(x, headroom=2):
    """x rounded to its DFP16 grid (nearest, ties to even), as FP64, and the exponent."""
    e = dfp16_exponent(x, headroom)
    q = np.clip(np.rint(x.astype(np.float64) * 2.0 ** -e), -32767, 32767)
    return q * 2.0 ** e, e


def bf16_round(x):
    u = np.ascontiguousarray(x, np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32).astype(np.float64)


# -- FP64 references of the layers -------------------------------------------------------------------

def conv_reference(x, w, pad, stride, group):
    """y[n, m, i, j] = sum over c, p, q of w[m, c, p, q] * xpad[n, g*cg + c, i*s + p, j*s + q]."""
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (wd + 2 * pad - kw) // stride + 1
    mg = m // group
    y = np.zeros((n, m, oh, ow))
    for g in range(group):
        for p in range(kh):
            for q in range(kw):
                window = xp[:, g * cg:(g + 1) * cg, p:p + stride * oh:stride, q:q + stride * ow:stride]
                y[:, g * mg:(g + 1) * mg] += np.einsum("nchw,mc->nmhw", window, w[g * mg:(g + 1) * mg, :, p, q])
    return y


def conv_grads(x, w, dy, pad, stride, group):
    """(dx, dw) of sum(y * dy), by the adjoint of conv_reference."""
    n, c, h, wd = x.shape
    m, cg, kh, kw = w.shape
    xp_shape = (n, c, h + 2 * pad, wd + 2 * pad)
    oh, ow = dy.shape[2:]
    mg = m // group
    dxp, dw = np.zeros(xp_shape), np.zeros(w.shape)
    xp = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    for g in range(group):
        dyg = dy[:, g * mg:(g + 1) * mg]
        for p in range(kh):
            for q in range(kw):
                sl = (slice(None), slice(g * cg, (g + 1) * cg), slice(p, p + stride * oh, stride),
                      slice(q, q + stride * ow, stride))
                dxp[sl] += np.einsum("nmhw,mc->nchw", dyg, w[g * mg:(g + 1) * mg, :, p, q])
                dw[g * mg:(g + 1) * mg, :, p, q] += np.einsum("nmhw,nchw->mc", dyg, xp[sl])
    return dxp[:, :, pad:pad + h, pad:pad + wd], dw


# -- building and running the layers -----------------------------------------------------------------

def make_layer(kind, text, precision, options=""):
    field = "convolution_param" if kind == "Convolution" else "inner_product_param"
    param = text_format.Parse(f'name: "lowp" type: "{kind}" precision: {precision} '
                              f'precision_param {{ {options} }} {field} {{ {text} {FILLERS} }}', pb.LayerParameter())
    return create_layer(param, pb.TRAIN)


def run_layer(layer, x, dy_seed=3):
    """Forward and backward once; returns x, y, dy, dx, dw, db (weights and bias from the layer)."""
    bottom = Blob(x.shape, name="data")
    bottom.data[...] = x
    top = Blob(name="out")
    layer.layer_setup([bottom], [top])
    layer.forward([bottom], [top])
    dy = np.random.default_rng(dy_seed).standard_normal(top.shape).astype(np.float32)
    top.diff[...] = dy
    for blob in layer.blobs:
        blob.diff[...] = 0
    layer.backward([top], [True], [bottom])
    return top.data.copy(), dy, bottom.diff.copy(), layer.blobs[0].diff.copy(), layer.blobs[1].diff.copy()


def assert_close(actual, expected, bound, what):
    excess = np.abs(actual - expected) - bound
    worst = np.unravel_index(np.argmax(excess), excess.shape)
    assert excess[worst] <= 0, (f"{what}: |Δ| = {abs(actual - expected)[worst]:.3g} exceeds the bound "
                                f"{np.broadcast_to(bound, excess.shape)[worst]:.3g} at {worst}")


def fp32_tolerance(*terms):
    """FP32 summation error allowance for sums whose absolute-value sums are ``terms``."""
    return sum(4e-6 * t + 1e-30 for t in terms)


CONV_CASES = [
    ((2, 4, 7, 6), "num_output: 6 kernel_size: 3 pad: 1", (1, 1, 1)),
    ((3, 4, 9, 9), "num_output: 4 kernel_size: 3 stride: 2", (0, 2, 1)),
    ((2, 6, 6, 6), "num_output: 4 kernel_size: 3 pad: 1 group: 2", (1, 1, 2)),
    ((2, 8, 5, 5), "num_output: 5 kernel_size: 1", (0, 1, 1)),
    ((1, 3, 8, 8), "num_output: 6 kernel_size: 5 pad: 2 stride: 2 group: 3", (2, 2, 3)),
]


@pytest.mark.parametrize("shape, text, geometry", CONV_CASES)
@pytest.mark.parametrize("options", ["", "k_chunk: 7"])
def test_dfp16_convolution_matches_fp32(shape, text, geometry, options):
    pad, stride, group = geometry
    rng.set_seed(0)
    layer = make_layer("Convolution", text, "DFP16", options)
    x = np.random.default_rng(1).uniform(-2, 2, shape).astype(np.float32)
    y, dy, dx, dw, db = run_layer(layer, x)
    w = layer.blobs[0].data.astype(np.float64)
    bias = layer.blobs[1].data.astype(np.float64)[None, :, None, None]
    xq, e_x = dfp16_decode(x)
    wq, e_w = dfp16_decode(w)
    dyq, e_dy = dfp16_decode(dy)
    abs_y = conv_reference(np.abs(xq), np.abs(wq), pad, stride, group)
    # (1) the FP32 computation on the decoded operands
    assert_close(y, conv_reference(xq, wq, pad, stride, group) + bias, fp32_tolerance(abs_y, np.abs(bias)),
                 "forward vs decoded")
    dx_ref, dw_ref = conv_grads(xq, wq, dyq, pad, stride, group)
    abs_dx, abs_dw = conv_grads(np.abs(xq), np.abs(wq), np.abs(dyq), pad, stride, group)
    assert_close(dx, dx_ref, fp32_tolerance(abs_dx), "backward-data vs decoded")
    assert_close(dw, dw_ref, fp32_tolerance(abs_dw), "backward-weights vs decoded")
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-4)
    # (2) plain FP32 within the DFP16 bound; K is the number of products in each sum
    m, cg, kh, kw = w.shape
    k_fwd, k_data, k_weights = cg * kh * kw, (m // group) * kh * kw, dy.shape[0] * dy.shape[2] * dy.shape[3]

    def bound(k, a, e_a, b, e_b):
        return k * (np.abs(a).max() * 2.0 ** e_b + np.abs(b).max() * 2.0 ** e_a) / 2 + k * 2.0 ** (e_a + e_b) / 4

    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    assert_close(y, conv_reference(x64, w, pad, stride, group) + bias,
                 bound(k_fwd, x64, e_x, w, e_w) + fp32_tolerance(abs_y), "forward vs FP32")
    dx_32, dw_32 = conv_grads(x64, w, dy64, pad, stride, group)
    assert_close(dx, dx_32, bound(k_data, dy64, e_dy, w, e_w) + fp32_tolerance(abs_dx), "backward-data vs FP32")
    assert_close(dw, dw_32, bound(k_weights, dy64, e_dy, x64, e_x) + fp32_tolerance(abs_dw),
                 "backward-weights vs FP32")


@pytest.mark.parametrize("shape, text, geometry", CONV_CASES)
@pytest.mark.parametrize("mode", ["NATIVE", "EMULATE"])
def test_bf16_convolution_matches_fp32(shape, text, geometry, mode):
    pad, stride, group = geometry
    rng.set_seed(0)
    layer = make_layer("Convolution", text, "BF16", f"bf16_mode: {mode}")
    x = np.random.default_rng(1).uniform(-2, 2, shape).astype(np.float32)
    y, dy, dx, dw, db = run_layer(layer, x)
    w = layer.blobs[0].data.astype(np.float64)
    bias = layer.blobs[1].data.astype(np.float64)[None, :, None, None]
    xb, wb, dyb = bf16_round(x), bf16_round(w), bf16_round(dy)
    abs_y = conv_reference(np.abs(xb), np.abs(wb), pad, stride, group)
    abs_dx, abs_dw = conv_grads(np.abs(xb), np.abs(wb), np.abs(dyb), pad, stride, group)
    assert_close(y, conv_reference(xb, wb, pad, stride, group) + bias, fp32_tolerance(abs_y, np.abs(bias)),
                 "forward vs decoded")
    dx_ref, dw_ref = conv_grads(xb, wb, dyb, pad, stride, group)
    assert_close(dx, dx_ref, fp32_tolerance(abs_dx), "backward-data vs decoded")
    assert_close(dw, dw_ref, fp32_tolerance(abs_dw), "backward-weights vs decoded")
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=(0, 2, 3)), rtol=1e-5, atol=1e-4)
    u = BF16_UNIT_ROUNDOFF
    x64, dy64 = x.astype(np.float64), dy.astype(np.float64)
    assert_close(y, conv_reference(x64, w, pad, stride, group) + bias, (2 * u + u * u) * abs_y * 1.01
                 + fp32_tolerance(abs_y), "forward vs FP32")
    dx_32, dw_32 = conv_grads(x64, w, dy64, pad, stride, group)
    assert_close(dx, dx_32, (2 * u + u * u) * abs_dx * 1.01 + fp32_tolerance(abs_dx), "backward-data vs FP32")
    assert_close(dw, dw_32, (2 * u + u * u) * abs_dw * 1.01 + fp32_tolerance(abs_dw), "backward-weights vs FP32")


@pytest.mark.parametrize("precision", ["DFP16", "BF16"])
@pytest.mark.parametrize("transpose", [False, True])
def test_inner_product_matches_decoded_fp32(precision, transpose):
    rng.set_seed(0)
    layer = make_layer("InnerProduct", f"num_output: 7 transpose: {str(transpose).lower()}", precision,
                       "k_chunk: 16" if precision == "DFP16" else "")
    x = np.random.default_rng(1).uniform(-3, 3, (5, 3, 4, 5)).astype(np.float32)
    y, dy, dx, dw, db = run_layer(layer, x)
    decode = (lambda a: dfp16_decode(a)[0]) if precision == "DFP16" else bf16_round
    x2 = decode(x).reshape(5, -1)
    w = decode(layer.blobs[0].data)
    w_nk = w.T if transpose else w
    dyq = decode(dy)
    bias = layer.blobs[1].data.astype(np.float64)
    tol = lambda a, b: fp32_tolerance(np.abs(a) @ np.abs(b))
    assert_close(y, x2 @ w_nk.T + bias, tol(x2, w_nk.T) + fp32_tolerance(np.abs(bias)), "forward")
    assert_close(dx.reshape(5, -1), dyq @ w_nk, tol(dyq, w_nk), "backward-data")
    dw_nk = dyq.T @ x2
    assert_close(dw, dw_nk.T if transpose else dw_nk, tol(dyq.T, x2).T if transpose else tol(dyq.T, x2),
                 "backward-weights")
    np.testing.assert_allclose(db, dy.astype(np.float64).sum(axis=0), rtol=1e-5, atol=1e-5)
    # and plain FP32 within the format's bound
    x64, w64, dy64 = x.astype(np.float64).reshape(5, -1), layer.blobs[0].data.astype(np.float64), dy.astype(np.float64)
    w64 = w64.T if transpose else w64
    k = x64.shape[1]
    if precision == "DFP16":
        e_x, e_w = dfp16_exponent(x), dfp16_exponent(w64)
        bound = k * (np.abs(x64).max() * 2.0 ** e_w + np.abs(w64).max() * 2.0 ** e_x) / 2 + k * 2.0 ** (e_x + e_w) / 4
    else:
        bound = (2 * BF16_UNIT_ROUNDOFF + BF16_UNIT_ROUNDOFF ** 2) * 1.01 * (np.abs(x64) @ np.abs(w64).T)
    assert_close(y, x64 @ w64.T + bias, bound + tol(x2, w_nk.T), "forward vs FP32")


def test_bf16_native_and_emulated_agree():
    """Both modes compute the same products of bf16 values in FP32: only summation order differs."""
    results = []
    for mode in ("NATIVE", "EMULATE"):
        rng.set_seed(0)
        layer = make_layer("Convolution", "num_output: 8 kernel_size: 3 pad: 1", "BF16", f"bf16_mode: {mode}")
        x = np.random.default_rng(1).standard_normal((2, 6, 8, 8)).astype(np.float32)
        results.append(run_layer(layer, x))
    for native, emulated, what in zip(*results, ("y", "dy", "dx", "dw", "db")):
        np.testing.assert_allclose(native, emulated, rtol=1e-4, atol=1e-4, err_msg=what)


@pytest.mark.parametrize("kind, text", [("Convolution", "num_output: 3 kernel_size: 3"),
                                        ("InnerProduct", "num_output: 3")])
def test_non_finite_input_names_layer_and_blob(kind, text):
    layer = make_layer(kind, text, "DFP16")
    bottom, top = Blob((2, 2, 5, 5), name="pool1"), Blob(name="conv2")
    layer.layer_setup([bottom], [top])
    bottom.data[...] = 1
    bottom.data[1, 0, 2, 2] = np.nan
    with pytest.raises(NumericalError, match=r"layer 'lowp' \(%s\): bottom blob 'pool1' holds inf or NaN" % kind):
        layer.forward([bottom], [top])
    bottom.data[1, 0, 2, 2] = 0.5
    layer.forward([bottom], [top])
    top.diff[...] = 1
    top.diff.flat[3] = np.inf
    with pytest.raises(NumericalError, match=r"top blob 'conv2' diff holds inf or NaN"):
        layer.backward([top], [True], [bottom])
    assert "\n" not in str(NumericalError)


def test_stochastic_rounding_is_unbiased_on_average():
    """Averaged over many draws, stochastically rounded DFP16 forwards approach FP32 closer than one draw."""
    rng.set_seed(0)
    layer = make_layer("InnerProduct", "num_output: 4", "DFP16", "stochastic_rounding: true")
    bottom, top = Blob((3, 50), name="x"), Blob(name="y")
    bottom.data[...] = np.random.default_rng(2).uniform(-1, 1, bottom.shape)
    layer.layer_setup([bottom], [top])
    exact = bottom.data.astype(np.float64) @ layer.blobs[0].data.astype(np.float64).T + layer.blobs[1].data
    draws = []
    for _ in range(64):
        layer.forward([bottom], [top])
        draws.append(top.data.astype(np.float64).copy())
    single = np.abs(draws[0] - exact).mean()
    assert not np.array_equal(draws[0], draws[1])
    assert np.abs(np.mean(draws, axis=0) - exact).mean() < single / 3


def test_statistics_and_overflow_events():
    """With debug_overflow and a chunk too long for INT32, the stats count overflow events; the line names
    the layer, the exponents and the flushed and clipped fractions."""
    rng.set_seed(0)
    layer = make_layer("InnerProduct", "num_output: 2 bias_term: false", "DFP16",
                       "precision_stats: true debug_overflow: true k_chunk: 100000 headroom: 0")
    bottom, top = Blob((2, 8192), name="x"), Blob(name="y")
    layer.layer_setup([bottom], [top])
    bottom.data[...] = 1.0
    bottom.data[0, 0] = 1e-9                       # flushed to zero at this exponent
    layer.blobs[0].data[...] = 1.0
    layer.forward([bottom], [top])
    top.diff[...] = 1.0
    layer.backward([top], [True], [bottom])
    line = layer.lowp.stats.line()
    assert line.startswith("[precision] lowp DFP16: input: e=")
    assert "flushed 0.0061%" in line                 # 1 of 16384 values
    events = layer.lowp.stats.overflow_events
    assert events.get("forward", 0) > 0, line

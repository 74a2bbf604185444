"""The fused SGD step against the solver's NumPy formulation, bit for bit; the gradient zeroing; and
solver steps through the fused kernel against the same steps through the base class's NumPy hooks."""
import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe.blob import blob_dtype
from minicaffe.errors import MinicaffeError
from minicaffe.kernels.solver_update import fill_zero, sgd_step
from minicaffe.proto import minicaffe_pb2 as pb
from minicaffe.solvers.base import Solver
from minicaffe.solvers.sgd import SGDSolver

# Over two of the kernel's 16384-element chunks, with a ragged end.
LARGE = 2 * 16384 + 1001


def reference_sgd_step(data, diff, history, diff_scale, regularization, decay, momentum, local_rate):
    """Caffe's update as the solver's NumPy hooks write it, one rounded operation at a time."""
    real = data.dtype.type
    data, diff, history = data.copy(), diff.copy(), history.copy()
    diff *= real(diff_scale)
    if decay:
        diff += real(decay) * (data if regularization == "L2" else np.sign(data))
    history *= real(momentum)
    history += real(local_rate) * diff
    diff[...] = history
    data -= diff
    return data, diff, history


def random_state(n, dtype, seed=0):
    rng = np.random.default_rng(seed)
    data = rng.standard_normal(n).astype(dtype)
    data[::7] = 0  # sign(0) = 0 under L1
    diff = (rng.standard_normal(n) * 1e-2).astype(dtype)
    history = (rng.standard_normal(n) * 1e-3).astype(dtype)
    return data, diff, history


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [1, 7, LARGE])
@pytest.mark.parametrize("regularization,decay,diff_scale,momentum", [
    ("L2", 5e-4, 1.0, 0.9),
    ("L1", 1e-3, 1.0, 0.9),
    ("L2", 0.0, 1.0, 0.9),
    ("L2", 5e-4, 1 / 3, 0.9),
    ("L1", 1e-3, 1 / 3, 0.0),
    ("L2", 0.01, 1.0, 0.0),
])
def test_sgd_step_equals_the_numpy_formulation(dtype, n, regularization, decay, diff_scale, momentum):
    data, diff, history = random_state(n, dtype)
    expected = reference_sgd_step(data, diff, history, diff_scale, regularization, decay, momentum, 0.037)
    sgd_step(data, diff, history, diff_scale, regularization, decay, momentum, 0.037, 2)
    for got, want in zip((data, diff, history), expected):
        np.testing.assert_array_equal(got, want)


def test_sgd_step_lets_a_nan_through_as_np_sign_does():
    data, diff, history = random_state(33, np.float32)
    data[5] = np.nan
    expected = reference_sgd_step(data, diff, history, 1.0, "L1", 1e-3, 0.9, 0.1)
    sgd_step(data, diff, history, 1.0, "L1", 1e-3, 0.9, 0.1, 1)
    assert np.isnan(diff[5]) and np.isnan(history[5])
    for got, want in zip((data, diff, history), expected):
        np.testing.assert_array_equal(got, want)


def test_sgd_step_does_not_depend_on_the_thread_count():
    results = []
    for threads in (1, 2):
        state = random_state(LARGE, np.float32, seed=4)
        sgd_step(*state, 0.5, "L2", 1e-3, 0.9, 0.01, threads)
        results.append(state)
    for one, two in zip(*results):
        np.testing.assert_array_equal(one, two)


def test_sgd_step_rejects_mismatched_sizes_and_unknown_regularization():
    data, diff, history = random_state(10, np.float32)
    with pytest.raises(ValueError, match="differ in size"):
        sgd_step(data, diff[:9], history, 1.0, "L2", 0.0, 0.9, 0.1, 1)
    with pytest.raises(ValueError, match="unknown regularization 'L3'"):
        sgd_step(data, diff, history, 1.0, "L3", 1e-3, 0.9, 0.1, 1)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [0, 1, 13, LARGE])
def test_fill_zero_clears_exactly_the_view(dtype, n):
    buffer = np.full(n + 5, 3.5, dtype=dtype)
    fill_zero(buffer[:n])
    assert not buffer[:n].any()
    np.testing.assert_array_equal(buffer[n:], 3.5)


# conv (4x3x3x3 weights) and ip (with more weights than one chunk), with unequal lr and decay multipliers.
SMALL_NET = """
name: "small"
layer { name: "data" type: "Input" top: "data" top: "target"
        input_param { shape { dim: 2 dim: 3 dim: 10 dim: 10 } shape { dim: 2 dim: 70 } } }
layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        param { lr_mult: 1 decay_mult: 1 } param { lr_mult: 2 decay_mult: 0 }
        convolution_param { num_output: 4 kernel_size: 3 weight_filler { type: "gaussian" std: 0.3 }
                            bias_filler { type: "gaussian" std: 0.1 } } }
layer { name: "relu" type: "ReLU" bottom: "conv" top: "conv" }
layer { name: "ip" type: "InnerProduct" bottom: "conv" top: "ip"
        param { lr_mult: 0.5 decay_mult: 3 } param { lr_mult: 1 decay_mult: 0 }
        inner_product_param { num_output: 70 weight_filler { type: "gaussian" std: 0.05 }
                              bias_filler { type: "constant" value: 0.1 } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss" }
"""


class NumpyHooksSGD(SGDSolver):
    """SGD through the base class's separate NumPy steps, as before the fused kernel."""

    def _update_param(self, i, rate):
        Solver._update_param(self, i, rate)


def small_solver(cls, **fields):
    param = text_format.Parse(f"net_param {{ {SMALL_NET} }} base_lr: 0.05 lr_policy: 'fixed' max_iter: 100 "
                              "display: 0 random_seed: 5", pb.SolverParameter())
    for key, value in fields.items():
        setattr(param, key, value)
    solver = cls(param)
    rng = np.random.default_rng(1)
    solver.net.blobs["data"].data[...] = rng.standard_normal(solver.net.blobs["data"].shape)
    solver.net.blobs["target"].data[...] = rng.standard_normal(solver.net.blobs["target"].shape)
    return solver


@pytest.mark.parametrize("fields", [
    dict(momentum=0.9, weight_decay=5e-3, regularization_type="L2"),
    dict(momentum=0.9, weight_decay=1e-2, regularization_type="L1", iter_size=2),
    dict(momentum=0.0, weight_decay=0.0),
])
@pytest.mark.parametrize("num_threads", [1, 2])
def test_fused_solver_steps_equal_the_numpy_hooks(fields, num_threads, threads):
    threads(num_threads)
    fused, hooks = small_solver(SGDSolver, **fields), small_solver(NumpyHooksSGD, **fields)
    fused.step(4)
    hooks.step(4)
    for a, b, ha, hb in zip(fused.net.learnable_params, hooks.net.learnable_params, fused.history, hooks.history):
        np.testing.assert_array_equal(a.data, b.data)
        np.testing.assert_array_equal(a.diff, b.diff)  # the update value, as Caffe leaves it
        np.testing.assert_array_equal(ha, hb)
    start = small_solver(SGDSolver, **fields)
    assert not np.array_equal(start.net.params["ip"][0].data, fused.net.params["ip"][0].data)


def test_a_float64_net_keeps_float32_history_and_trains():
    with blob_dtype(np.float64):
        fused = small_solver(SGDSolver, momentum=0.9, weight_decay=5e-3)
        hooks = small_solver(NumpyHooksSGD, momentum=0.9, weight_decay=5e-3)
    assert fused.net.params["ip"][0].data.dtype == np.float64
    fused.step(2)
    hooks.step(2)
    for a, b in zip(fused.net.learnable_params, hooks.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)


def test_clear_param_diffs_zeroes_every_gradient():
    solver = small_solver(SGDSolver)
    solver.net.forward_backward()
    assert all(blob.diff.any() for blob in solver.net.learnable_params)
    solver.net.clear_param_diffs()
    assert not any(blob.diff.any() for blob in solver.net.learnable_params)


def test_an_unknown_regularization_type_is_a_clear_error():
    solver = small_solver(SGDSolver, weight_decay=1e-3, regularization_type="L3")
    with pytest.raises(MinicaffeError, match="unknown regularization_type 'L3'"):
        solver.step(1)

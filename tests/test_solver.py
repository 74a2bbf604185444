"""The solver: lr policies against their formulas, SGD checked analytically, snapshot/resume, clipping."""
import math

import numpy as np
import pytest
from google.protobuf import text_format

from minicaffe.errors import MinicaffeError
from minicaffe.proto import minicaffe_pb2 as pb
from minicaffe.solvers import get_solver

N, D = 8, 5

LEAST_SQUARES = f"""
name: "least_squares"
layer {{ name: "data" type: "Input" top: "data" top: "target"
        input_param {{ shape {{ dim: {N} dim: {D} }} shape {{ dim: {N} dim: 1 }} }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip"
        param {{ lr_mult: 1 decay_mult: 1 }} param {{ lr_mult: 2 decay_mult: 0 }}
        inner_product_param {{ num_output: 1 weight_filler {{ type: "gaussian" std: 1 }}
                               bias_filler {{ type: "gaussian" std: 1 }} }} }}
layer {{ name: "loss" type: "EuclideanLoss" bottom: "ip" bottom: "target" top: "loss" }}
"""


def solver_param(text, **fields):
    param = text_format.Parse(text, pb.SolverParameter())
    for key, value in fields.items():
        setattr(param, key, value)
    return param


def least_squares_solver(**fields):
    param = solver_param(f"net_param {{ {LEAST_SQUARES} }} base_lr: 0.1 lr_policy: 'fixed' max_iter: 100 "
                         "display: 0 random_seed: 3", **fields)
    solver = get_solver(param)
    rng = np.random.default_rng(0)
    solver.net.blobs["data"].data[...] = rng.standard_normal((N, D))
    solver.net.blobs["target"].data[...] = rng.standard_normal((N, 1))
    return solver


def reference_sgd(solver, iterations, base_lr, momentum, weight_decay, regularization="L2", iter_size=1,
                  clip=-1.0):
    """Caffe's update in float64: clip, normalize, regularize, momentum, apply."""
    X = solver.net.blobs["data"].data.astype(np.float64)
    t = solver.net.blobs["target"].data.astype(np.float64)
    W = solver.net.params["ip"][0].data.astype(np.float64).copy()
    b = solver.net.params["ip"][1].data.astype(np.float64).copy()
    hW, hb = np.zeros_like(W), np.zeros_like(b)
    for _ in range(iterations):
        residual = X @ W.T + b - t
        gW = iter_size * residual.T @ X / N
        gb = iter_size * residual.sum(axis=0) / N
        if clip >= 0:
            norm = math.sqrt((gW ** 2).sum() + (gb ** 2).sum())
            if norm > clip:
                gW, gb = gW * clip / norm, gb * clip / norm
        gW, gb = gW / iter_size, gb / iter_size
        gW = gW + weight_decay * (W if regularization == "L2" else np.sign(W))
        hW = base_lr * gW + momentum * hW
        hb = 2 * base_lr * gb + momentum * hb
        W, b = W - hW, b - hb
    return W, b


@pytest.mark.parametrize("momentum,weight_decay,regularization,iter_size,clip", [
    (0.0, 0.0, "L2", 1, -1.0),
    (0.9, 0.0, "L2", 1, -1.0),
    (0.9, 0.1, "L2", 1, -1.0),
    (0.5, 0.1, "L1", 1, -1.0),
    (0.9, 0.01, "L2", 3, -1.0),
    (0.9, 0.0, "L2", 1, 0.05),
])
def test_sgd_matches_the_analytic_update(momentum, weight_decay, regularization, iter_size, clip):
    solver = least_squares_solver(momentum=momentum, weight_decay=weight_decay,
                                  regularization_type=regularization, iter_size=iter_size,
                                  clip_gradients=clip)
    W, b = reference_sgd(solver, 5, 0.1, momentum, weight_decay, regularization, iter_size, clip)
    solver.step(5)
    np.testing.assert_allclose(solver.net.params["ip"][0].data, W, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(solver.net.params["ip"][1].data, b, rtol=1e-4, atol=1e-5)
    assert solver.iter == 5


def lr_at(policy, iteration, **fields):
    solver = least_squares_solver(lr_policy=policy, **fields)
    solver.iter = iteration
    return solver.learning_rate()


@pytest.mark.parametrize("iteration", [0, 1, 7, 100, 1234])
def test_lr_policies_follow_their_formulas(iteration):
    base, gamma, power, stepsize, max_iter = 0.01, 0.9, 0.75, 10, 2000
    approx = lambda x: pytest.approx(x, rel=1e-6)
    assert lr_at("fixed", iteration, base_lr=base) == approx(base)
    assert lr_at("step", iteration, base_lr=base, gamma=gamma, stepsize=stepsize) == \
        approx(base * gamma ** (iteration // stepsize))
    assert lr_at("exp", iteration, base_lr=base, gamma=gamma) == approx(base * gamma ** iteration)
    assert lr_at("inv", iteration, base_lr=base, gamma=1e-4, power=power) == \
        approx(base * (1 + 1e-4 * iteration) ** -power)
    assert lr_at("poly", iteration, base_lr=base, power=power, max_iter=max_iter) == \
        approx(base * (1 - iteration / max_iter) ** power)
    assert lr_at("sigmoid", iteration, base_lr=base, gamma=-0.01, stepsize=50) == \
        approx(base / (1 + math.exp(0.01 * (iteration - 50))))


def test_multistep_advances_one_step_at_a_time():
    solver = least_squares_solver(lr_policy="multistep", base_lr=1.0, gamma=0.5)
    solver.param.stepvalue.extend([3, 5])
    rates = []
    for it in range(8):
        solver.iter = it
        rates.append(solver.learning_rate())
    assert rates == [1, 1, 1, 0.5, 0.5, 0.25, 0.25, 0.25]


def test_unknown_lr_policy_and_solver_type_are_clear_errors():
    with pytest.raises(MinicaffeError, match="unknown lr_policy 'cosine'"):
        least_squares_solver(lr_policy="cosine")
    with pytest.raises(MinicaffeError, match="solver type 'Adam' is not available"):
        least_squares_solver(type="Adam")


def test_average_loss_smooths_the_displayed_loss():
    solver = least_squares_solver(average_loss=3, momentum=0.9)
    losses = []
    forward_backward = solver.net.forward_backward

    def recording(**kwargs):
        losses.append(forward_backward(**kwargs))
        return losses[-1]

    solver.net.forward_backward = recording
    solver.step(2)
    assert solver.smoothed_loss == pytest.approx(np.mean(losses), rel=1e-6)
    losses.clear()
    solver.step(7)
    assert solver.smoothed_loss == pytest.approx(np.mean(losses[-3:]), rel=1e-6)


# The trainable body of the tiny nets here and in test_comm_mpi.py: conv -> pool -> ReLU -> "ip" (4 classes).
TINY_BODY = """layer { name: "conv" type: "Convolution" bottom: "data" top: "conv"
        convolution_param { num_output: 3 kernel_size: 3 weight_filler { type: "xavier" } } }
layer { name: "pool" type: "Pooling" bottom: "conv" top: "pool" pooling_param { pool: MAX kernel_size: 2 stride: 2 } }
layer { name: "relu" type: "ReLU" bottom: "pool" top: "pool" }
layer { name: "ip" type: "InnerProduct" bottom: "pool" top: "ip"
        inner_product_param { num_output: 4 weight_filler { type: "xavier" } } }"""


def tiny_net(source):
    return f"""
name: "tiny"
layer {{ name: "d" type: "Data" top: "data" top: "label" transform_param {{ scale: 0.0039 }}
        data_param {{ source: "{source}" batch_size: 8 backend: IDX shuffle: true }} }}
{TINY_BODY}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}
"""


def tiny_solver(source, prefix, **fields):
    param = solver_param(f"net_param {{ {tiny_net(source)} }} base_lr: 0.05 momentum: 0.9 weight_decay: 0.001 "
                         f"lr_policy: 'step' gamma: 0.5 stepsize: 4 max_iter: 14 display: 0 random_seed: 11 "
                         f"snapshot_prefix: '{prefix}' snapshot_after_train: false", **fields)
    return get_solver(param)


def test_snapshot_then_resume_equals_an_uninterrupted_run(tiny_idx, tmp_path):
    prefix = str(tmp_path / "snap" / "tiny")
    uninterrupted = tiny_solver(tiny_idx, prefix)
    uninterrupted.solve()
    first = tiny_solver(tiny_idx, prefix, snapshot=6)
    first.step(6)  # 6 batches of 8 from 50 shuffled records: the resume crosses an epoch boundary
    first.close()
    resumed = tiny_solver(tiny_idx, prefix)
    resumed.solve(f"{prefix}_iter_6.solverstate")
    assert resumed.iter == uninterrupted.iter == 14
    for a, b in zip(uninterrupted.net.learnable_params, resumed.net.learnable_params):
        np.testing.assert_array_equal(a.data, b.data)
    for h_a, h_b in zip(uninterrupted.history, resumed.history):
        np.testing.assert_array_equal(h_a, h_b)
    for s in (uninterrupted, resumed):
        s.close()


def test_snapshot_files_are_caffe_binary_protos(tiny_idx, tmp_path):
    prefix = str(tmp_path / "tiny")
    solver = tiny_solver(tiny_idx, prefix, max_iter=3, snapshot=3)
    solver.solve()
    solver.close()
    state = pb.SolverState()
    state.ParseFromString(open(f"{prefix}_iter_3.solverstate", "rb").read())
    assert state.iter == 3 and state.learned_net == f"{prefix}_iter_3.caffemodel"
    assert len(state.history) == len(solver.net.learnable_params)
    model = pb.NetParameter()
    model.ParseFromString(open(f"{prefix}_iter_3.caffemodel", "rb").read())
    conv = next(lp for lp in model.layer if lp.name == "conv")
    assert list(conv.blobs[0].shape.dim) == [3, 1, 3, 3]
    assert not list(tmp_path.glob("*.tmp*"))


def test_test_nets_share_weights_and_report_outputs(tiny_idx, tmp_path):
    text = tiny_net(tiny_idx) + """layer { name: "acc" type: "Accuracy" bottom: "ip" bottom: "label" top: "acc"
                                           include { phase: TEST } }"""
    param = solver_param(f"net_param {{ {text} }} test_iter: 3 test_interval: 5 base_lr: 0.05 lr_policy: 'fixed' "
                         f"max_iter: 5 display: 0 random_seed: 1 snapshot_after_train: false")
    solver = get_solver(param)
    assert solver.test_nets[0].params["ip"][0].data is not solver.net.params["ip"][0].data
    solver.net.params["ip"][0].data[0, 0] = 42.0
    assert solver.test_nets[0].params["ip"][0].data[0, 0] == 42.0
    scores = solver.test(0)
    assert 0.0 <= scores["acc"] <= 1.0 and scores["loss"] > 0
    solver.close()

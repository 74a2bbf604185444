"""The communicator in a single process: the no-op default, launcher detection, the gradient codecs
against plain NumPy references, and the statistics. (tests/test_comm_mpi.py runs it under mpiexec.)"""
import math
import subprocess
import sys

import numpy as np
import pytest

from minicaffe.comm import CommConfig, Distribution, LocalSession, Statistics, create_session, launched_rank, \
    launched_ranks
from minicaffe.comm.compression import BF16Codec, Int8BlockCodec, bf16_to_fp32, fp32_to_bf16
from minicaffe.errors import MinicaffeError

from conftest import REPO


def test_single_process_training_never_imports_mpi4py(tiny_idx):
    script = f"""
import sys
from minicaffe.solvers.base import get_solver
from minicaffe.proto import minicaffe_pb2 as pb
from google.protobuf import text_format
net = '''layer {{ name: "d" type: "Data" top: "data" top: "label"
  data_param {{ source: "{tiny_idx}" batch_size: 4 backend: IDX }} }}
layer {{ name: "ip" type: "InnerProduct" bottom: "data" top: "ip" inner_product_param {{ num_output: 4 }} }}
layer {{ name: "loss" type: "SoftmaxWithLoss" bottom: "ip" bottom: "label" top: "loss" }}'''
solver = get_solver(text_format.Parse("net_param {{" + net + "}} base_lr: 0.01 max_iter: 2 lr_policy: 'fixed' snapshot_after_train: false",
                                      pb.SolverParameter()))
solver.solve()
assert type(solver.comm).__name__ == "LocalSession", solver.comm
assert "mpi4py" not in sys.modules
print("ok")
"""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "ok"


def test_local_session_does_nothing():
    session = create_session(net=None, distribution=Distribution(), config=CommConfig())
    assert isinstance(session, LocalSession)
    assert session.on_layer_done is None and not session.defers_updates and session.statistics is None
    session.gradients_ready()
    session.wait_param(0)
    session.wait_all()
    values = Distribution().sum_across_ranks([1.5, 2.0])
    np.testing.assert_array_equal(values, [1.5, 2.0])


def test_the_launcher_is_recognised_from_its_variables(monkeypatch):
    for name in ("PMI_SIZE", "PMI_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert (launched_ranks(), launched_rank()) == (1, 0)
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    assert (launched_ranks(), launched_rank()) == (4, 3)
    monkeypatch.setenv("PMI_SIZE", "2")
    monkeypatch.setenv("PMI_RANK", "1")
    assert (launched_ranks(), launched_rank()) == (2, 1)


@pytest.mark.parametrize("field, value", [("overlap", "sideways"), ("progress", "poll"), ("compress", "fp8"),
                                          ("bucket_mb", -1.0), ("timeout_s", 0.0)])
def test_bad_comm_settings_are_one_line_errors(field, value):
    with pytest.raises(MinicaffeError, match="comm"):
        CommConfig(**{field: value}).check()


# -- BF16 ------------------------------------------------------------------------------------------
def bf16_reference(x):
    """Round to nearest, ties to even, by comparing the two neighbouring bf16 values in float64."""
    out = np.empty(x.shape, np.uint16)
    for k, value in enumerate(x.astype(np.float32)):
        bits = int(np.array(value).view(np.uint32))
        if math.isnan(value):
            out[k] = (bits >> 16) | 0x40
            continue
        low = bits >> 16
        high = low + 1
        # bf16's "next value" past its largest finite one is 2**128 for rounding purposes (IEEE overflow).
        as_float = lambda h: (math.copysign(2.0 ** 128, value) if h & 0x7FFF == 0x7F80
                              else float(np.array(h << 16, np.uint32).view(np.float32)))
        if math.isinf(value):
            out[k] = low
            continue
        d_low, d_high = abs(float(value) - as_float(low)), abs(as_float(high) - float(value))
        if d_low < d_high or (d_low == d_high and low % 2 == 0):
            out[k] = low
        else:
            out[k] = high
    return out


def test_bf16_rounds_to_nearest_even_like_the_reference():
    rng = np.random.default_rng(0)
    halfway = np.array([0x3F808000, 0x3F818000, 0x3F80C000, 0x7F7FFFFF, 0x00008000, 0x80018000],
                       np.uint32).view(np.float32)
    specials = np.array([0.0, -0.0, np.inf, -np.inf, 1e-45, -3.4e38], np.float32)
    x = np.concatenate([rng.standard_normal(2000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 2000),
                        halfway, specials]).astype(np.float32)
    h = fp32_to_bf16(x, np.empty(x.shape, np.uint16))
    np.testing.assert_array_equal(h, bf16_reference(x))
    back = bf16_to_fp32(h, np.empty(x.shape, np.float32))
    normal = np.isfinite(back) & (np.abs(x) >= np.finfo(np.float32).tiny)
    assert np.all(np.abs(back[normal] - x[normal]) <= np.abs(x[normal]) * 2.0 ** -8)
    nan = np.array([np.nan], np.float32)
    assert np.isnan(bf16_to_fp32(fp32_to_bf16(nan, np.empty(1, np.uint16)), np.empty(1, np.float32)))[0]


def test_bf16_codec_sends_two_bytes_a_value_and_sums():
    codec = BF16Codec()
    x = np.linspace(-3, 3, 1001, dtype=np.float32)
    payload = np.empty(codec.payload_bytes(x.size), np.uint8)
    assert payload.size == 2 * x.size
    codec.encode(x, payload)
    out = np.ones_like(x)
    codec.add_decoded(payload, out, np.empty_like(x))
    np.testing.assert_allclose(out, 1 + x, atol=3 * 2.0 ** -8)


# -- INT8 blocks (DLCP) ----------------------------------------------------------------------------
def int8_reference(x):
    """Per block of 256: scale = 7 - ceil(log2 max|x|), q = saturate(round-half-even(x * 2**scale))."""
    n = x.size
    blocks = -(-n // 256)
    q = np.zeros(blocks * 256, np.int8)
    scales = np.zeros(blocks, np.int8)
    for b in range(blocks):
        part = x[b * 256: (b + 1) * 256].astype(np.float64)
        peak = float(np.max(np.abs(part)))
        scale = 0 if peak == 0 else 7 - math.ceil(math.log2(peak))
        scales[b] = scale
        for k, value in enumerate(part):
            q[b * 256 + k] = max(-128, min(127, round(value * 2.0 ** scale)))
    return q, scales


def test_int8_blocks_match_the_reference_and_feed_back_the_error():
    rng = np.random.default_rng(1)
    x = (rng.standard_normal(700) * np.repeat([1e-3, 5.0, 0.25], [256, 256, 188])).astype(np.float32)
    x[300] = 4.0     # a power of two at the block maximum saturates to 127
    x[600:] = 0      # the last block is partly zero; an all-zero block gets scale 0
    codec = Int8BlockCodec(x.size)
    payload = np.empty(codec.payload_bytes(x.size), np.uint8)
    assert payload.size == 3 * 257
    codec.encode(x, payload)
    q_ref, scales_ref = int8_reference(x)
    np.testing.assert_array_equal(payload[: 3 * 256].view(np.int8), q_ref)
    np.testing.assert_array_equal(payload[3 * 256:].view(np.int8), scales_ref)
    decoded = np.zeros_like(x)
    codec.add_decoded(payload, decoded, np.empty_like(x))
    np.testing.assert_array_equal(codec.residual, x - decoded)
    # Error feedback: what is sent over k iterations differs from k * x by one residual only.
    sent = decoded.astype(np.float64)
    for _ in range(9):
        codec.encode(x, payload)
        step = np.zeros_like(x)
        codec.add_decoded(payload, step, np.empty_like(x))
        sent += step
    np.testing.assert_allclose(sent + codec.residual, 10 * x.astype(np.float64), rtol=1e-5, atol=1e-6)


def test_int8_all_zero_gradient_round_trips():
    codec = Int8BlockCodec(300)
    payload = np.empty(codec.payload_bytes(300), np.uint8)
    codec.encode(np.zeros(300, np.float32), payload)
    out = np.zeros(300, np.float32)
    codec.add_decoded(payload, out, None)
    assert not out.any() and not codec.residual.any()


# -- statistics ------------------------------------------------------------------------------------
def test_overlap_fraction_is_one_minus_exposed_over_in_flight(caplog):
    stats = Statistics()
    a, b = stats.layer("conv1"), stats.layer("fc")
    a.bytes_per_iter = a.float32_bytes_per_iter = 400
    a.in_flight_s, a.exposed_s, a.iterations = 0.004, 0.003, 2
    b.bytes_per_iter, b.float32_bytes_per_iter = 1000, 4000
    b.in_flight_s, b.exposed_s, b.iterations = 0.016, 0.0, 2
    stats.collectives_in_flight_s = 0.020
    summary = stats.summary()
    assert summary["overlap"] == pytest.approx(1 - 0.003 / 0.020)
    assert summary["bytes_per_iter"] == 1400 and summary["float32_bytes_per_iter"] == 4400
    a.exposed_s = 0.5  # more time spent than in flight (packing and waiting on a blocking run)
    assert stats.summary()["overlap"] == 0.0
    stats.reset()
    assert stats.summary()["in_flight_s"] == 0 and stats.summary()["overlap"] == 0.0

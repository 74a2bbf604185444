"""The data-parallel scaling model: allreduce costs, the overlapped timeline, zoo nets, and the CLI."""
import json
import math

import pytest
from google.protobuf import text_format

from conftest import REPO, run_tool
from minicaffe.errors import MinicaffeError
from minicaffe.flops import layer_costs
from minicaffe.net import Net
from minicaffe.proto import minicaffe_pb2 as pb
from minicaffe.scaling import (Hardware, LayerWork, allreduce_time, gradient_messages, hiding_limit, model_net,
                               net_work, predict)

ZOO = REPO / "prototxt"
EXAMPLE = Hardware(flops=1e12, bandwidth=1e10, latency=5e-6, algorithm="ring")
TWO_LAYER_NET = """name: "two"
layer { name: "in" type: "Input" top: "data" top: "target"
        input_param { shape { dim: 2 dim: 3 } shape { dim: 2 dim: 2 } } }
layer { name: "ip1" type: "InnerProduct" bottom: "data" top: "ip1" inner_product_param { num_output: 4 } }
layer { name: "ip2" type: "InnerProduct" bottom: "ip1" top: "ip2" %s inner_product_param { num_output: 2 } }
layer { name: "loss" type: "EuclideanLoss" bottom: "ip2" bottom: "target" top: "loss" }
"""


def test_allreduce_formulas_match_hand_values():
    # 8 nodes, 1 MB, 1 GB/s, 10 us.
    n, p, bw, lat = 1e6, 8, 1e9, 1e-5
    assert allreduce_time(n, p, bw, lat, "ring") == pytest.approx(2 * 7 / 8 * 1e-3 + 14 * 1e-5)
    assert allreduce_time(n, p, bw, lat, "tree") == pytest.approx(2 * 3 * (1e-5 + 1e-3))
    assert allreduce_time(n, p, bw, lat, "recursive_doubling") == pytest.approx(3 * (1e-5 + 1e-3))
    # A non-power of two takes the next whole round.
    assert allreduce_time(n, 5, bw, lat, "recursive_doubling") == pytest.approx(3 * (1e-5 + 1e-3))
    # Ring bandwidth term tends to 2 n/B; its latency term grows linearly.
    assert allreduce_time(n, 1024, bw, 0, "ring") == pytest.approx(2 * 1023 / 1024 * 1e-3)
    for algorithm in ("ring", "tree", "recursive_doubling"):
        assert allreduce_time(n, 1, bw, lat, algorithm) == 0.0
        assert allreduce_time(0, 8, bw, lat, algorithm) == 0.0
    with pytest.raises(MinicaffeError, match="unknown allreduce algorithm"):
        allreduce_time(n, p, bw, lat, "butterfly")


def hand_work(second_bytes=200):
    # net order: "a" then "b"; backward runs b (2 s) then a (3 s).
    return [LayerWork("a", 1.0, 3.0, 100), LayerWork("b", 1.0, 2.0, second_bytes)]


# Recursive doubling on 2 nodes, no latency: one round of n / 100 B/s, so 100 B take 1 s.
HAND_LINK = Hardware(flops=1.0, bandwidth=100.0, latency=0.0, algorithm="recursive_doubling")


def test_two_layer_timeline_hides_the_first_ready_allreduce_behind_the_next_backward():
    # b's gradients are ready at 2 s and allreduce 2..4, hidden behind a's backward (2..5); a's are
    # ready at 5 and allreduce 5..6, exposed: 1 s. Iteration = forward 2 + 6.
    [one, two] = predict(hand_work(), batch=4, nodes=[1, 2], hardware=HAND_LINK, bucket_bytes=0)
    assert one.iteration_s == 7.0 and one.exposed_s == 0.0 and one.communication_s == 0.0
    assert two.iteration_s == pytest.approx(8.0)
    assert two.exposed_s == pytest.approx(1.0)
    assert two.communication_s == pytest.approx(3.0)
    assert two.no_overlap_s == pytest.approx(10.0)
    assert two.images_per_s == pytest.approx(8 / 8.0)
    assert two.speedup == pytest.approx(2 * 7 / 8)
    assert two.efficiency == pytest.approx(7 / 8)


def test_link_is_serialized_in_ready_order():
    # b's 400 B take 2..6, so a (ready at 5) waits for the link: 6..7.
    [two] = predict(hand_work(400), batch=4, nodes=[2], hardware=HAND_LINK, bucket_bytes=0)
    assert two.iteration_s == pytest.approx(2 + 7)
    assert two.exposed_s == pytest.approx(2.0)


def test_buckets_gather_gradients_until_full():
    assert gradient_messages(hand_work(), 0) == [(2.0, 200), (5.0, 100)]
    assert gradient_messages(hand_work(), 150) == [(2.0, 200), (5.0, 100)]
    # One bucket for both: sent only when a's backward ends, so nothing overlaps.
    assert gradient_messages(hand_work(), 1000) == [(5.0, 300)]
    [two] = predict(hand_work(), batch=4, nodes=[2], hardware=HAND_LINK, bucket_bytes=1000)
    assert two.iteration_s == pytest.approx(two.no_overlap_s) == pytest.approx(2 + 5 + 3)


def build_two_layer(ip2_params=""):
    return Net(text_format.Parse(TWO_LAYER_NET % ip2_params, pb.NetParameter()), phase=pb.TRAIN)


def test_net_work_takes_flops_from_layer_costs_and_only_trained_gradients():
    net = build_two_layer()
    try:
        work = {w.name: w for w in net_work(net, 2.0)}
        costs = {c.name: c for c in layer_costs(net)}
    finally:
        net.close()
    assert work["ip1"].forward_s == costs["ip1"].forward_flops / 2.0 > 0
    assert work["ip2"].backward_s == costs["ip2"].backward_flops / 2.0 > 0
    assert work["ip1"].gradient_bytes == (4 * 3 + 4) * 4
    assert work["ip2"].gradient_bytes == (2 * 4 + 2) * 4
    assert work["in"].gradient_bytes == work["loss"].gradient_bytes == 0
    frozen = build_two_layer('param { lr_mult: 0 } param { lr_mult: 1 }')
    try:
        assert {w.name: w for w in net_work(frozen, 1.0)}["ip2"].gradient_bytes == 2 * 4
    finally:
        frozen.close()


def test_more_bandwidth_never_slows_and_one_node_has_no_communication():
    net = build_two_layer()
    try:
        work, batch = net_work(net, 1e6), net.batch_size()
    finally:
        net.close()
    nodes = [1, 2, 3, 8, 64]
    for algorithm in ("ring", "tree", "recursive_doubling"):
        previous = None
        for bandwidth in (1e2, 1e3, 1e4, 1e6):
            predictions = predict(work, batch, nodes, Hardware(1e6, bandwidth, 1e-6, algorithm), bucket_bytes=0)
            assert predictions[0].communication_s == predictions[0].exposed_s == 0.0
            assert predictions[0].speedup == 1.0
            for p in predictions:
                assert p.iteration_s <= p.no_overlap_s + 1e-15
                assert p.efficiency <= 1.0 + 1e-12
            times = [p.iteration_s for p in predictions]
            if previous is not None:
                assert all(t <= prev + 1e-15 for t, prev in zip(times, previous))
            previous = times


@pytest.fixture(scope="module")
def zoo_predictions():
    nodes = [2 ** k for k in range(11)]
    return {name: model_net(ZOO / name / f"{name}_train_val.prototxt", EXAMPLE, nodes)
            for name in ("alexnet", "resnet50")}


def test_alexnet_communication_stops_hiding_long_before_resnet50(zoo_predictions):
    _, alex_work, alex = zoo_predictions["alexnet"]
    _, resnet_work, resnet = zoo_predictions["resnet50"]
    # AlexNet's fc layers sit at the output: their gradients are the first ready and the bulk of the bytes.
    ready_order = [w for w in reversed(alex_work) if w.gradient_bytes]
    assert [w.name for w in ready_order[:3]] == ["fc8", "fc7", "fc6"]
    assert sum(w.gradient_bytes for w in ready_order[:3]) > 0.9 * sum(w.gradient_bytes for w in alex_work)
    # 61 M parameters for ~1.45 GFLOP per image against ResNet-50's 25.6 M for ~4 GFLOP:
    # AlexNet exposes communication at far fewer nodes, and loses efficiency first.
    alex_limit, resnet_limit = hiding_limit(alex), hiding_limit(resnet)
    assert alex_limit is not None and alex_limit < (resnet_limit or math.inf)
    assert alex_limit <= 64
    by_nodes = lambda ps: {p.nodes: p for p in ps}
    assert by_nodes(alex)[64].efficiency < by_nodes(resnet)[64].efficiency
    for predictions in (alex, resnet):
        # Overlap helps wherever there is communication; efficiency never rises with nodes here.
        assert all(p.iteration_s < p.no_overlap_s for p in predictions[1:])
        assert all(a.efficiency >= b.efficiency - 1e-12 for a, b in zip(predictions, predictions[1:]))


def test_cli_json_end_to_end(tmp_path):
    hardware = tmp_path / "hw.json"
    hardware.write_text(json.dumps({"flops": 1e12, "bandwidth": 1e10, "latency": 5e-6, "algorithm": "tree"}))
    result = run_tool("scaling_model", f"--model={ZOO / 'alexnet' / 'alexnet_train_val.prototxt'}",
                      f"--hardware={hardware}", "--nodes=2,16", "--bandwidth=2e10", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["net"] == "AlexNet" and report["batch_per_node"] == 16
    assert report["hardware"] == {"flops": 1e12, "bandwidth": 2e10, "latency": 5e-6, "algorithm": "tree"}
    assert [p["nodes"] for p in report["predictions"]] == [1, 2, 16]
    assert report["predictions"][0]["speedup"] == 1.0
    text = run_tool("scaling_model", f"--model={ZOO / 'alexnet' / 'alexnet_train_val.prototxt'}",
                    "--flops=1e12", "--bandwidth=1e10", "--latency=5e-6", "--nodes=1,16")
    assert text.returncode == 0, text.stderr
    assert "no longer hides (exposed > 5% of compute) from 16 nodes" in text.stdout


@pytest.mark.parametrize("args, message", [
    (["--model=/nonexistent/net.prototxt", "--flops=1", "--bandwidth=1", "--latency=0"], "no such file"),
    (["--hardware=BAD"], "not valid JSON"),
    (["--hardware=NEGATIVE"], "bandwidth must be a positive number"),
    (["--flops=1e12"], "missing bandwidth, latency"),
    (["--flops=1", "--bandwidth=1", "--latency=0", "--nodes=0,2"], "--nodes"),
])
def test_cli_bad_input_prints_one_line(tmp_path, args, message):
    (tmp_path / "bad.json").write_text('{"flops": 1e12, "bandwidth": ')
    (tmp_path / "negative.json").write_text('{"flops": 1e12, "bandwidth": -1, "latency": 0}')
    args = [a.replace("BAD", str(tmp_path / "bad.json")).replace("NEGATIVE", str(tmp_path / "negative.json"))
            for a in args]
    if not any(a.startswith("--model") for a in args):
        args.append(f"--model={ZOO / 'alexnet' / 'alexnet_train_val.prototxt'}")
    result = run_tool("scaling_model", *args)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("scale-model: error:") and message in lines[0], result.stderr

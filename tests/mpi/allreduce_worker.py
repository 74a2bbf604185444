"""Checks bucketed gradient reduction on every rank of ``mpiexec -n N``; exits non-zero on a mismatch.

The net has parameters of odd sizes, a parameter shared by two layers, a layer with lr_mult 0 and an
Embed layer. Each rank writes rank-dependent gradients into the diffs, the session reduces them as a
backward pass would (layers in reverse, then the solver's waits), and every diff must then hold the mean
over the ranks; the lr_mult 0 parameter must be left alone and never sent. Run for several bucket sizes.
"""
import os
import sys

import numpy as np
from google.protobuf import text_format

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))

from minicaffe.comm import CommConfig, create_distribution, create_session, environment  # noqa: E402
from minicaffe.net import Net  # noqa: E402
from minicaffe.proto import minicaffe_pb2 as pb  # noqa: E402

NET = """
name: "odd"
layer { name: "in" type: "Input" top: "x" top: "words" top: "y"
        input_param { shape { dim: 3 dim: 13 } shape { dim: 3 dim: 5 } shape { dim: 3 dim: 7 } } }
layer { name: "embed" type: "Embed" bottom: "words" top: "e"
        embed_param { input_dim: 101 num_output: 3 weight_filler { type: "gaussian" } } }
layer { name: "fc1" type: "InnerProduct" bottom: "x" top: "h1" param { name: "shared_w" } param { name: "shared_b" }
        inner_product_param { num_output: 13 weight_filler { type: "gaussian" } } }
layer { name: "fc2" type: "InnerProduct" bottom: "h1" top: "h2" param { name: "shared_w" } param { name: "shared_b" }
        inner_product_param { num_output: 13 weight_filler { type: "gaussian" } } }
layer { name: "frozen" type: "InnerProduct" bottom: "h2" top: "h3" param { lr_mult: 0 } param { lr_mult: 0 }
        inner_product_param { num_output: 7 weight_filler { type: "gaussian" } } }
layer { name: "fc3" type: "InnerProduct" bottom: "h3" top: "h4"
        inner_product_param { num_output: 7 weight_filler { type: "gaussian" } } }
layer { name: "flat" type: "Flatten" bottom: "e" top: "ef" }
layer { name: "cat" type: "Concat" bottom: "h4" bottom: "ef" top: "c" concat_param { axis: 1 } }
layer { name: "fc4" type: "InnerProduct" bottom: "c" top: "out"
        inner_product_param { num_output: 7 weight_filler { type: "gaussian" } } }
layer { name: "loss" type: "EuclideanLoss" bottom: "out" bottom: "y" top: "loss" }
"""


def rank_gradient(blob_index, rank, shape):
    values = np.random.default_rng([blob_index, rank]).standard_normal(shape).astype(np.float32)
    return values


def check(bucket_mb, compress, dist, env):
    net = Net(text_format.Parse(NET, pb.NetParameter()), phase=pb.TRAIN)
    session = create_session(net, dist, CommConfig(bucket_mb=bucket_mb, compress=compress), env)
    names = [ps.layer_name for ps in session.param_sets]
    assert "frozen" not in names and "fc2" not in names, names   # lr_mult 0; shared params belong to fc1
    assert "embed" in names
    embed = net.layer_dict["embed"].blobs[0]
    # Dense: the whole |V| x d weight (and the bias) travel, whatever rows the batch touched.
    embed_bytes = 4 * sum(b.count for b in net.layer_dict["embed"].blobs)
    assert session.statistics.layer("embed").float32_bytes_per_iter == embed_bytes
    frozen = net.layer_dict["frozen"].blobs[0]
    frozen.diff[...] = 7.0
    for i, blob in enumerate(net.learnable_params):
        if blob is not frozen and net.params_lr[i]:
            blob.diff[...] = rank_gradient(i, dist.rank, blob.shape)
    # An Embed gradient touches only the rows of the indices seen; each rank sees other rows.
    embed.diff[...] = 0
    embed.diff[dist.rank::7] = 1.0 + dist.rank
    for layer_index in reversed(range(len(net.layers))):
        if session.on_layer_done is not None and net.layers[layer_index].blobs:
            session.on_layer_done(layer_index, net.layers[layer_index])
    session.gradients_ready()
    for i in range(len(net.learnable_params)):
        session.wait_param(i)
    tolerance = {"none": 1e-6, "bf16": 1e-2, "int8": 5e-2}[compress]
    for i, blob in enumerate(net.learnable_params):
        if blob is frozen:
            np.testing.assert_array_equal(blob.diff, 7.0)
            continue
        if blob is embed:
            expected = np.zeros(blob.shape, np.float32)
            for r in range(dist.size):
                expected[r::7] += (1.0 + r) / dist.size
        elif not net.params_lr[i]:
            continue
        else:
            expected = np.mean([rank_gradient(i, r, blob.shape) for r in range(dist.size)], axis=0)
        np.testing.assert_allclose(blob.diff, expected, rtol=tolerance, atol=tolerance,
                                   err_msg=f"bucket_mb={bucket_mb} compress={compress} param {blob.name}")
    session.close()
    return len(session.buckets)


def main():
    env = environment()
    dist = create_distribution(env, timeout_s=60)
    counts = [check(mb, "none", dist, env) for mb in (0.0, 0.0004, 4.0)]
    assert counts[0] > counts[1] >= counts[2], counts
    for compress in ("bf16", "int8"):
        check(0.0004, compress, dist, env)
    print(f"rank {dist.rank}: ok, buckets {counts}")


if __name__ == "__main__":
    main()

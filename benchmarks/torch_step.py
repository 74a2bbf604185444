"""PyTorch's training step on a zoo net's graph, timed in a process of its own: prints its median in ms.

benchmarks/throughput.py runs this as a child process with the environment its user gave it, so that
PyTorch's OpenMP runtime starts with its own defaults, not the wait policy minicaffe picks for its
own kernels when it is imported. For the same reason torch is imported here before minicaffe.

    PYTHONPATH=. python benchmarks/torch_step.py NET --threads T --iterations N [--warmup N]
"""
import argparse
import json

import torch

from throughput import median_seconds, train_val_path
from torch_reference import build_torch_model, copy_weights

from minicaffe import Net, TRAIN


def time_torch_step(name, threads, iterations, warmup):
    """Median seconds of forward, loss, backward and SGD with momentum on the net's first batch."""
    net = Net(str(train_val_path(name)), phase=TRAIN)
    try:
        net.forward()   # fills the input blobs
        module, input_names = build_torch_model(net)
        copy_weights(net, module)
        inputs = {name: torch.from_numpy(net.blobs[name].data.copy()) for name in input_names}
    finally:
        net.close()
    module.train()
    optimizer = torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=1e-6, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=False)
        module.loss(module(**inputs)).backward()
        optimizer.step()

    torch.set_num_threads(threads)
    return median_seconds(step, iterations, warmup)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("net")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--iterations", type=int, required=True)
    parser.add_argument("--warmup", type=int, default=1)
    args = parser.parse_args(argv)
    seconds = time_torch_step(args.net, args.threads, args.iterations, args.warmup)
    print(json.dumps({"median_ms": seconds * 1e3, "torch_threads": torch.get_num_threads()}))


if __name__ == "__main__":
    main()

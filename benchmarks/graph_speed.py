"""Speed of the graph encoding and the metanetwork against the reference implementation.

    python benchmarks/graph_speed.py [--repeats 20] [--device cpu]

Prints one line per measurement: our median time, the reference's time on this 2-core CPU
(issue 3: ResNet-56 encode 42 ms / decode 7 ms, ResNet-50 encode 1.4 s, GNN 8x64 on ResNet-56
forward 3.0 s / forward+backward 11.5 s) and the speed-up ratio reference / ours.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

import networks
from graph import Metanetwork, NetworkGraph

REFERENCE = {"resnet56 encode": 42e-3, "resnet56 decode": 7e-3, "resnet50 encode": 1.4,
             "gnn8x64 forward (no grad)": 3.0, "gnn8x64 forward+backward": 11.5}


def _median_time(fn, repeats: int, device: torch.device) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _report(name: str, seconds: float) -> None:
    ref = REFERENCE.get(name)
    ratio = f"  reference {ref * 1e3:9.2f} ms  ratio {ref / seconds:7.1f}x" if ref else ""
    print(f"{name:28s} {seconds * 1e3:10.2f} ms{ratio}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {device}")
    for name, example in (("resnet56", torch.randn(1, 3, 32, 32)),
                          ("resnet50", torch.randn(1, 3, 224, 224))):
        model = networks.build(name + ("_cifar" if name == "resnet56" else ""), 10)
        start = time.perf_counter()
        graph = NetworkGraph(model, example)  # uncached: the one-time tracing cost
        _report(f"{name} trace (one-time)", time.perf_counter() - start)
        state = {k: v.to(device) for k, v in model.state_dict().items()}
        data = graph.encode(state)
        _report(f"{name} encode", _median_time(lambda: graph.encode(state), args.repeats, device))
        _report(f"{name} decode", _median_time(lambda: graph.decode(data), args.repeats, device))
        if name == "resnet56":
            print(f"resnet56 graph: {graph}")
            meta = Metanetwork.for_graph(graph, num_layers=8, hidden=64).to(device)

            def forward():
                with torch.no_grad():
                    meta(data)

            def forward_backward():
                out = graph.decode(meta(data))
                sum(v.square().sum() for v in out.values() if v.requires_grad).backward()

            reps = max(3, args.repeats // 5)
            _report("gnn8x64 forward (no grad)", _median_time(forward, reps, device))
            _report("gnn8x64 forward+backward", _median_time(forward_backward, reps, device))


if __name__ == "__main__":
    main()

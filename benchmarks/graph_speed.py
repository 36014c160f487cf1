"""Speed of the graph encoding and the metanetwork against the reference implementation.

    python benchmarks/graph_speed.py [--repeats 20] [--device cpu] [--baseline REV]

Prints one line per measurement: our median time, the reference's time on this 2-core CPU
(issue 3: ResNet-56 encode 42 ms / decode 7 ms, ResNet-50 encode 1.4 s, GNN 8x64 on ResNet-56
forward 3.0 s / forward+backward 11.5 s) and the speed-up ratio reference / ours. The GNN is
timed twice: the paper's function (its message passing on dense identity edges, what the
reference computes) and ours (joint message passing, one identity edge per channel), each with
its peak memory above the level before it, each in a fresh process (CPU: resident set size
sampled every 5 ms; CUDA: the allocator's peak). With ``--baseline REV`` the GNN lines instead
time graph/metanetwork.py as of git revision REV and this checkout's in one process, run after
run, and print the median of the per-run ratios (wall clock, and CPU time of this process on
CPU): on a loaded machine absolute times say little, a ratio measured in one run does. The
tracing, encoding and decoding lines are then compared the same way: REV's code (exported to a
temporary folder) and this checkout's each time them in a fresh process, alternating, and the
median of the per-round ratios is printed.
"""
from __future__ import annotations

import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Literal

import psutil
import torch
from jsonargparse.typing import PositiveInt

import networks
from graph import Metanetwork, NetworkGraph
from pipeline.command_line import cli

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


class _PeakMemory:
    """Peak memory above the level at entry, in MiB."""

    def __init__(self, device: torch.device) -> None:
        self.device, self.peak = device, 0.0

    def __enter__(self) -> "_PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        process, self.base, self.running = psutil.Process(), psutil.Process().memory_info().rss, True

        def sample():
            while self.running:
                self.peak = max(self.peak, (process.memory_info().rss - self.base) / 2 ** 20)
                time.sleep(0.005)

        self.thread = threading.Thread(target=sample, daemon=True)
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak = (torch.cuda.max_memory_allocated(self.device) - self.base) / 2 ** 20
        else:
            self.running = False
            self.thread.join()


def _report(name: str, seconds: float, memory: float | None = None) -> None:
    ref = REFERENCE.get(name.split(" [")[0])
    ratio = f"  reference {ref * 1e3:9.2f} ms  ratio {ref / seconds:7.1f}x" if ref else ""
    peak = f"  peak +{memory:,.0f} MiB" if memory is not None else ""
    print(f"{name:50s} {seconds * 1e3:10.2f} ms{ratio}{peak}", flush=True)


def _time_metanetwork(model, example, message_passing: str, identity_edges: str, reps: int,
                      device: torch.device) -> None:
    graph = NetworkGraph(model, example, identity_edges)
    data = graph.encode({k: v.to(device) for k, v in model.state_dict().items()})
    print(f"resnet56 graph ({identity_edges} identities): {graph}")
    meta = Metanetwork.for_graph(graph, num_layers=8, hidden=64,
                                 message_passing=message_passing).to(device)

    def forward():
        with torch.no_grad():
            meta(data)

    def forward_backward():
        out = graph.decode(meta(data))
        sum(v.square().sum() for v in out.values() if v.requires_grad).backward()

    tag = f" [{message_passing}, {identity_edges}]"
    for name, fn in (("gnn8x64 forward (no grad)", forward),
                     ("gnn8x64 forward+backward", forward_backward)):
        with _PeakMemory(device) as memory:
            seconds = _median_time(fn, reps, device)
        _report(name + tag, seconds, memory.peak)


def _baseline_metanetwork(rev: str):
    """graph/metanetwork.py as of git revision ``rev``, imported beside this checkout's (its
    relative imports resolve to this checkout's graph package)."""
    root = Path(__file__).resolve().parents[1]
    source = subprocess.run(["git", "show", f"{rev}:graph/metanetwork.py"], cwd=root,
                            capture_output=True, text=True, check=True).stdout
    path = Path(tempfile.mkdtemp()) / "metanetwork.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("graph._baseline_metanetwork", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _compare_metanetwork(model, example, message_passing: str, identity_edges: str, reps: int,
                         device: torch.device, rev: str) -> None:
    graph = NetworkGraph(model, example, identity_edges)
    data = graph.encode({k: v.to(device) for k, v in model.state_dict().items()})
    metas = {}
    for name, cls in ((rev, _baseline_metanetwork(rev).Metanetwork), ("this", Metanetwork)):
        torch.manual_seed(0)  # the same parameters
        metas[name] = cls.for_graph(graph, num_layers=8, hidden=64,
                                    message_passing=message_passing).to(device)

    def forward(meta):
        with torch.no_grad():
            meta(data)

    def forward_backward(meta):
        out = graph.decode(meta(data))
        sum(v.square().sum() for v in out.values() if v.requires_grad).backward()

    for name, fn in (("gnn8x64 forward (no grad)", forward),
                     ("gnn8x64 forward+backward", forward_backward)):
        wall: dict[str, list[float]] = {k: [] for k in metas}
        cpu: dict[str, list[float]] = {k: [] for k in metas}
        for meta in metas.values():
            fn(meta)  # warm-up
        for _ in range(reps):
            for key, meta in metas.items():
                if device.type == "cuda":
                    torch.cuda.synchronize()
                start, start_cpu = time.perf_counter(), time.process_time()
                fn(meta)
                if device.type == "cuda":
                    torch.cuda.synchronize()
                wall[key].append(time.perf_counter() - start)
                cpu[key].append(time.process_time() - start_cpu)

        def ratio(times: dict[str, list[float]]) -> str:
            pairs = [a / b for a, b in zip(times[rev], times["this"])]
            return f"{statistics.median(pairs):.2f} ({min(pairs):.2f}-{max(pairs):.2f})"

        cpu_ratio = f", CPU time {ratio(cpu)}" if device.type == "cpu" else ""
        print(f"{name} [{message_passing}, {identity_edges}]: {rev} "
              f"{statistics.median(wall[rev]) * 1e3:.0f} ms, this "
              f"{statistics.median(wall['this']) * 1e3:.0f} ms; {rev} / this, median of "
              f"{reps} runs (range): wall {ratio(wall)}{cpu_ratio}", flush=True)


# Timed in a fresh process by either checkout (the API both share): name -> median seconds.
_ENCODING_TIMES = """
import json, statistics, sys, time
import torch
import graph, networks
from graph import NetworkGraph

def median(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)

out = {"graph package": graph.__file__}
for name, arch, size in (("resnet56", "resnet56_cifar", 32), ("resnet50", "resnet50", 224)):
    model, example = networks.build(arch, 10), torch.randn(1, 3, size, size)
    start = time.perf_counter()
    g = NetworkGraph(model, example)
    out[name + " trace (one-time)"] = time.perf_counter() - start
    state = model.state_dict()
    data = g.encode(state)
    out[name + " encode"] = median(lambda: g.encode(state), int(sys.argv[1]))
    out[name + " decode"] = median(lambda: g.decode(data), int(sys.argv[1]))
print(json.dumps(out))
"""


def _compare_encoding(rev: str, repeats: int, rounds: int) -> None:
    """Tracing, encoding and decoding of REV against this checkout, each round a fresh process
    per side, alternating; the median of the per-round ratios REV / this."""
    root = Path(__file__).resolve().parents[1]
    with tempfile.TemporaryDirectory() as tmp:  # REV's tree, removed afterwards
        sides = {rev: Path(tmp), "this": root}
        archive = subprocess.run(["git", "archive", rev], cwd=root, capture_output=True, check=True)
        subprocess.run(["tar", "-x", "-C", tmp], input=archive.stdout, check=True)
        times = _time_sides(sides, repeats, rounds)
    _print_ratios(times, rev, rounds)


def _time_sides(sides: dict[str, Path], repeats: int, rounds: int) -> dict[str, list[dict]]:
    """Each side's times, one fresh process per side and round, alternating."""
    times: dict[str, list[dict]] = {k: [] for k in sides}
    for _ in range(rounds):
        for key, folder in sides.items():
            run = subprocess.run([sys.executable, "-c", _ENCODING_TIMES, str(repeats)],
                                 cwd=folder, env={**os.environ, "PYTHONPATH": str(folder)},
                                 capture_output=True, text=True, check=True)
            record = json.loads(run.stdout.strip().splitlines()[-1])
            assert Path(record.pop("graph package")).is_relative_to(folder), record
            times[key].append(record)
    return times


def _print_ratios(times: dict[str, list[dict]], rev: str, rounds: int) -> None:
    for name in times["this"][0]:
        pairs = [a[name] / b[name] for a, b in zip(times[rev], times["this"])]
        print(f"{name:32s} {rev} {statistics.median(t[name] for t in times[rev]) * 1e3:9.2f} ms, "
              f"this {statistics.median(t[name] for t in times['this']) * 1e3:9.2f} ms; {rev} / "
              f"this, median of {rounds} rounds (range): {statistics.median(pairs):.2f} "
              f"({min(pairs):.2f}-{max(pairs):.2f})", flush=True)


def graph_speed(*, repeats: PositiveInt = 20, device: str = "cpu",
                gnn: tuple[Literal["joint", "paper"], Literal["diagonal", "dense"]] | None = None,
                baseline: str | None = None, rounds: PositiveInt = 5) -> None:
    """Time the encoding, the decoding and both metanetworks.

    Args:
        repeats: timed repetitions per measurement (the median counts)
        device: cpu, cuda, cuda:1, ...
        gnn: [MESSAGE_PASSING,IDENTITY_EDGES]: time only this metanetwork variant (the main run
            starts one process per variant, so that each peak memory starts clean)
        baseline: git revision REV: time the metanetworks against graph/metanetwork.py of REV
            in the same process (repeats / 2 runs each, alternating) instead of alone, and
            the tracing, encoding and decoding against REV's code
        rounds: with ``baseline``: fresh processes per side for the encoding comparison
    """
    dev = torch.device(device)
    resnet56 = networks.build("resnet56_cifar", 10)
    if gnn and baseline:
        _compare_metanetwork(resnet56, torch.randn(1, 3, 32, 32), *gnn, max(3, repeats // 2),
                             dev, baseline)
        return
    if gnn:
        _time_metanetwork(resnet56, torch.randn(1, 3, 32, 32), *gnn, max(3, repeats // 5), dev)
        return
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, device {dev}")
    if baseline and dev.type == "cpu":
        _compare_encoding(baseline, repeats, rounds)
    for name, model, example in (("resnet56", resnet56, torch.randn(1, 3, 32, 32)),
                                 ("resnet50", networks.build("resnet50", 10),
                                  torch.randn(1, 3, 224, 224))):
        start = time.perf_counter()
        graph = NetworkGraph(model, example)  # uncached: the one-time tracing cost
        _report(f"{name} trace (one-time)", time.perf_counter() - start)
        state = {k: v.to(dev) for k, v in model.state_dict().items()}
        data = graph.encode(state)
        _report(f"{name} encode", _median_time(lambda g=graph, s=state: g.encode(s), repeats, dev))
        _report(f"{name} decode", _median_time(lambda g=graph, d=data: g.decode(d), repeats, dev))
        if name == "resnet56":
            for variant in ("[paper,dense]", "[joint,diagonal]"):
                compare = ["--baseline", baseline] if baseline else []
                subprocess.run([sys.executable, __file__, "--gnn", variant, "--repeats",
                                str(repeats), "--device", device, *compare], check=True)


def main(argv: list[str] | None = None) -> int:
    return cli(graph_speed, argv, prog="graph_speed.py", description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())

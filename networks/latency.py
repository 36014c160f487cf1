"""Measured forward latency of a network: fewer MACs is not the same as faster.

``torch.utils.benchmark`` does the timing (warm-up, CUDA synchronisation, adaptive repeat
counts); this module only fixes what is measured and how it is reported: eval mode, no
gradient, one input shape per batch size, the median and the interquartile range over blocks
of runs, and the thread count the numbers were taken with.

Two runtimes: ``torch`` (PyTorch eager, CPU or CUDA) and ``onnxruntime`` (the network exported
to ONNX, as :mod:`networks.export` writes it for deployment, run by ONNX Runtime's CPU provider
with as many intra-op threads as torch uses). A network is fast or slow on the runtime that
serves it: ONNX Runtime fuses batch norm into the convolutions and plans memory once, so the
per-layer overhead that dominates PyTorch eager at batch 1 shrinks there.

Timings are taken in the allocator's steady state (:func:`settle_allocator`): without it, the
same network timed in a process that has only handled small tensors reads up to twice as slow
as in one that has trained (docs/decisions.md, "Latency in the allocator's steady state").
"""
from __future__ import annotations

import contextlib
import copy
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, Sequence

import torch
from torch import nn
from torch.utils import benchmark

Runtime = Literal["torch", "onnxruntime"]
RUNTIMES: tuple[Runtime, ...] = ("torch", "onnxruntime")


@dataclass(frozen=True)
class Latency:
    """One measurement: ``median_ms`` per forward of a batch of ``batch_size``."""
    batch_size: int
    device: str
    threads: int
    median_ms: float
    iqr_ms: float
    runs: int
    runtime: Runtime = "torch"

    def as_dict(self) -> dict:
        return asdict(self)


def check_runtime(runtime: str, device: str | torch.device) -> None:
    """Refuse a runtime this module does not know, or ONNX Runtime on another device than the
    CPU (its CPU provider is the one that ships with the ``onnxruntime`` package)."""
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
    if runtime == "onnxruntime" and torch.device(device).type != "cpu":
        raise ValueError(f"runtime 'onnxruntime' times on the CPU only, not on {device!r}; use "
                         "device cpu, or runtime torch for CUDA")


# glibc's ceiling for its dynamic mmap threshold on 64-bit systems (DEFAULT_MMAP_THRESHOLD_MAX)
_MMAP_THRESHOLD_MAX = 32 * 2**20


def settle_allocator() -> None:
    """Put glibc's allocator in the state a long-running process reaches, so a latency does not
    depend on what the process did before it.

    glibc serves a block above its mmap threshold (128 KiB at start) with a fresh mapping and
    returns it to the system when freed, so until the process frees a larger block, every
    forward page-faults its activations in again (the demo network at batch 64: about 7,000
    faults and 40 ms per forward, against none and 22 ms after a training step). Freeing a
    mapped block raises the threshold to its size (up to 32 MiB): one block just under the
    ceiling, allocated and freed untouched, does what a training step or a large batch would.
    Activations above 32 MiB are mapped afresh in every process alike. Costs microseconds;
    under another allocator it only allocates and frees one block."""
    block = torch.empty(_MMAP_THRESHOLD_MAX - 2**16, dtype=torch.uint8)
    del block


@contextlib.contextmanager
def _forward(model: nn.Module, runtime: Runtime, input_size: Sequence[int]
             ) -> Iterator[Callable[[torch.Tensor], Callable[[], object]]]:
    """``bind(x) -> run``: ``run()`` is one forward of ``model`` on ``x`` in ``runtime``. For
    ONNX Runtime the model is exported once (dynamic batch) into a temporary folder, removed
    when the context ends."""
    if runtime == "torch":
        yield lambda x: (lambda: model(x))
        return
    import onnxruntime as ort

    from .export import export_onnx

    with tempfile.TemporaryDirectory() as tmp:
        path = export_onnx(model, torch.zeros(1, *input_size), Path(tmp) / "timed.onnx")
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        options.log_severity_level = 3  # warnings about unused initializers are not ours
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name

        def bind(x: torch.Tensor) -> Callable[[], object]:
            feed = {name: x.numpy()}
            return lambda: session.run(None, feed)
        yield bind


def measure_latency(model: nn.Module, input_size: Sequence[int], batch_sizes: Sequence[int] = (1, 64),
                    device: str | torch.device = "cpu", min_run_time: float = 1.0,
                    runtime: Runtime = "torch") -> list[Latency]:
    """Forward latency of ``model`` (eval mode, no gradient) on random inputs of
    ``[batch, *input_size]`` for each batch size, in ``runtime``; ``min_run_time`` seconds of
    timing each (after a warm-up run). The model is moved to ``device`` and left in eval mode
    there."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    check_runtime(runtime, device)
    for batch in batch_sizes:
        if batch < 1:
            raise ValueError(f"batch size {batch} must be at least 1")
    model = model.to(device).eval()
    settle_allocator()
    results = []
    with torch.no_grad(), _forward(model, runtime, input_size) as bind:
        for batch in batch_sizes:
            run = bind(torch.randn(batch, *input_size, device=device))
            run()  # warm-up: allocator, kernels, lazy initialisation
            timer = benchmark.Timer(stmt="run()", globals={"run": run},
                                    num_threads=torch.get_num_threads())
            m = timer.blocked_autorange(min_run_time=min_run_time)
            results.append(Latency(batch, str(device), torch.get_num_threads(), m.median * 1e3,
                                   m.iqr * 1e3, len(m.times) * m.number_per_run, runtime))
    return results


def compare_latency(network: nn.Module, unpruned: nn.Module, input_size: Sequence[int],
                    batch_sizes: Sequence[int], device: str | torch.device = "cpu",
                    min_run_time: float = 1.0, runtime: Runtime = "torch") -> list[dict]:
    """Per batch size: the latency of ``network`` and of ``unpruned`` (median and IQR, ms) in
    ``runtime`` and the measured speed-up of the first over the second."""
    ours = measure_latency(network, input_size, batch_sizes, device, min_run_time, runtime)
    ref = measure_latency(unpruned, input_size, batch_sizes, device, min_run_time, runtime)
    return [{"batch_size": a.batch_size, "device": a.device, "runtime": a.runtime,
             "threads": a.threads,
             "latency_ms": a.median_ms, "iqr_ms": a.iqr_ms,
             "unpruned_latency_ms": b.median_ms, "unpruned_iqr_ms": b.iqr_ms,
             "speed_up_measured": b.median_ms / a.median_ms} for a, b in zip(ours, ref)]


def latency_probe(input_size: Sequence[int], batch_size: int = 1, device: str | torch.device = "cpu",
                  min_run_time: float = 0.2, runtime: Runtime = "torch") -> Callable[[nn.Module], float]:
    """``probe(model) -> ms``: the median forward latency of ``model`` at one batch size in
    ``runtime``, as :func:`measure_latency` takes it, for a pruning loop that stops on measured
    time (``networks.prune_to_latency``). ``min_run_time`` seconds of timing per call: short,
    since the loop times the network many times; the report measures the result again, longer.
    With ONNX Runtime every call exports the network again (about a second for a CIFAR
    ResNet: the network changes between calls), on the CPU whatever ``device`` is: a model
    that lives elsewhere (a fit on a GPU) is timed as a CPU copy and stays where it is."""
    if runtime == "onnxruntime":
        device = "cpu"
    check_runtime(runtime, device)

    def probe(model: nn.Module) -> float:
        was_training = model.training
        if runtime == "onnxruntime" and any(p.device.type != "cpu" for p in model.parameters()):
            model = copy.deepcopy(model).cpu()
        try:
            return measure_latency(model, input_size, [batch_size], device, min_run_time,
                                   runtime)[0].median_ms
        finally:
            model.train(was_training)
    return probe

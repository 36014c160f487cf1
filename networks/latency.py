"""Measured forward latency of a network: fewer MACs is not the same as faster.

``torch.utils.benchmark`` does the timing (warm-up, CUDA synchronisation, adaptive repeat
counts); this module only fixes what is measured and how it is reported: eval mode, no
gradient, one input shape per batch size, the median and the interquartile range over blocks
of runs, and the thread count the numbers were taken with.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable, Sequence

import torch
from torch import nn
from torch.utils import benchmark


@dataclass(frozen=True)
class Latency:
    """One measurement: ``median_ms`` per forward of a batch of ``batch_size``."""
    batch_size: int
    device: str
    threads: int
    median_ms: float
    iqr_ms: float
    runs: int

    def as_dict(self) -> dict:
        return asdict(self)


def measure_latency(model: nn.Module, input_size: Sequence[int], batch_sizes: Sequence[int] = (1, 64),
                    device: str | torch.device = "cpu", min_run_time: float = 1.0) -> list[Latency]:
    """Forward latency of ``model`` (eval mode, no gradient) on random inputs of
    ``[batch, *input_size]`` for each batch size; ``min_run_time`` seconds of timing each (after
    a warm-up run). The model is moved to ``device`` and left in eval mode there."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for but torch sees no CUDA device; use --device cpu")
    model = model.to(device).eval()
    results = []
    for batch in batch_sizes:
        if batch < 1:
            raise ValueError(f"batch size {batch} must be at least 1")
        x = torch.randn(batch, *input_size, device=device)
        with torch.no_grad():
            model(x)  # warm-up: allocator, kernels, lazy initialisation
            timer = benchmark.Timer(stmt="model(x)", globals={"model": model, "x": x},
                                    num_threads=torch.get_num_threads())
            m = timer.blocked_autorange(min_run_time=min_run_time)
        results.append(Latency(batch, str(device), torch.get_num_threads(), m.median * 1e3,
                               m.iqr * 1e3, len(m.times) * m.number_per_run))
    return results


def compare_latency(network: nn.Module, unpruned: nn.Module, input_size: Sequence[int],
                    batch_sizes: Sequence[int], device: str | torch.device = "cpu",
                    min_run_time: float = 1.0) -> list[dict]:
    """Per batch size: the latency of ``network`` and of ``unpruned`` (median and IQR, ms) and
    the measured speed-up of the first over the second."""
    ours = measure_latency(network, input_size, batch_sizes, device, min_run_time)
    ref = measure_latency(unpruned, input_size, batch_sizes, device, min_run_time)
    return [{"batch_size": a.batch_size, "device": a.device, "threads": a.threads,
             "latency_ms": a.median_ms, "iqr_ms": a.iqr_ms,
             "unpruned_latency_ms": b.median_ms, "unpruned_iqr_ms": b.iqr_ms,
             "speed_up_measured": b.median_ms / a.median_ms} for a, b in zip(ours, ref)]


def latency_probe(input_size: Sequence[int], batch_size: int = 1, device: str | torch.device = "cpu",
                  min_run_time: float = 0.2) -> Callable[[nn.Module], float]:
    """``probe(model) -> ms``: the median forward latency of ``model`` at one batch size, as
    :func:`measure_latency` takes it, for a pruning loop that stops on measured time
    (``networks.prune_to_latency``). ``min_run_time`` seconds of timing per call: short, since
    the loop times the network many times; the report measures the result again, longer."""
    def probe(model: nn.Module) -> float:
        was_training = model.training
        try:
            return measure_latency(model, input_size, [batch_size], device, min_run_time)[0].median_ms
        finally:
            model.train(was_training)
    return probe

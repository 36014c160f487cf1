"""MACs speed-up against measured speed-up (issue 16), and pruning to a measured latency target
(issue 33).

    python benchmarks/latency.py [--device cpu|cuda] [--min_run_time 1.0] [--speed_ups [2,3]] \
        [--target macs|latency] [--runtime torch|onnxruntime] [--out FILE.md]

``--target macs`` (default): ResNet-56 (CIFAR) and ResNet-50 (ImageNet) pruned to each MACs
speed-up by our pruner, timed against their unpruned architecture at batch 1 and a throughput
batch. ``--target latency``: ResNet-18 (ImageNet, 224) and the demo's half-width ResNet-20
(CIFAR) pruned until their *measured* latency speed-up at one batch size (1, then 64) reaches
each target (``networks.prune_to_latency``, timed on ``--device``), then timed again, longer,
at that batch size; beside it the same network pruned to the same target in MACs.
``--target round_to``: the same two networks pruned to each MACs target under every channel
multiple of ``networks.ROUND_TO_CANDIDATES``, each copy timed at batch 1 and 64: the trials of
``networks.choose_round_to`` (which multiple the runtime favours, and by how much).

Weights are random (time does not depend on their values; the pruner's group-norm criterion
then picks an arbitrary but valid structure, as it would on trained weights of another seed).
Each network is timed with ``networks.latency.compare_latency`` (eval mode, no gradient,
median and IQR over ``torch.utils.benchmark`` blocks).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from jsonargparse.typing import PositiveFloat

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch

import networks
from metaprune.errors import UserError
from networks.latency import compare_latency
from pipeline.command_line import cli, summary
from pipeline.common import one_line
from pipeline.options import Runtime, SpeedUp

# name, build arguments, input size, throughput batch
MACS_CASES = (("resnet56_cifar", {"num_classes": 10}, (3, 32, 32), 64),
              ("resnet50", {"num_classes": 1000}, (3, 224, 224), 16))
LATENCY_CASES = (("resnet18", {"num_classes": 1000}, (3, 224, 224), 64),
                 ("resnet20_cifar", {"num_classes": 10, "width": 0.5}, (3, 32, 32), 64))


def latency(*, device: Literal["cpu", "cuda"] = "cpu", min_run_time: PositiveFloat = 1.0,
            speed_ups: tuple[SpeedUp, ...] = (2.0, 3.0),
            target: Literal["macs", "latency", "round_to"] = "macs",
            runtime: Runtime = "torch", networks_only: tuple[str, ...] = (),
            out: str | None = None) -> int:
    """Prune each network to each target and time it against its unpruned architecture.

    Args:
        device: where to time
        min_run_time: seconds of timing per network and batch size (torch.utils.benchmark)
        speed_ups: pruning targets, e.g. [2,3]
        target: what the targets are: MACs speed-ups, measured latency speed-ups, or MACs
            speed-ups under each round_to candidate
        runtime: what times the networks: torch (eager) or onnxruntime (exported to ONNX; CPU)
        networks_only: only these of the target's networks (e.g. [resnet20_cifar]); empty: all
        out: also write the table to this markdown file
    """
    cases = [c for c in (MACS_CASES if target == "macs" else LATENCY_CASES)
             if not networks_only or c[0] in networks_only]
    if not cases:
        raise UserError(f"--networks_only {list(networks_only)} names none of the {target} "
                        "target's networks: " + ", ".join(c[0] for c in LATENCY_CASES + MACS_CASES))
    if target == "round_to":
        return _round_to_trials(cases, device, min_run_time, speed_ups, runtime, out)
    lines = [f"torch {torch.__version__}, {runtime} on {device}, {torch.get_num_threads()} threads, "
             f"targets in {target}\n",
             "| network | target | pruned to | MACs | speed-up by MACs | batch | unpruned ms | "
             "pruned ms | speed-up measured |", "|---|---|---|---|---|---|---|---|---|"]
    for name, build, size, batch in cases:
        example = torch.zeros(1, *size)
        unpruned = _build(name, build)
        base = networks.count_macs(unpruned, example)
        for goal in speed_ups:
            runs = [("macs", None, (1, batch))] if target == "macs" else [
                (kind, b, (b,)) for b in (1, batch) for kind in ("latency", "macs")]
            for kind, timed_at, batches in runs:
                pruned = _build(name, build)
                if kind == "macs":
                    networks.prune_to_speed_up(pruned, example, goal, base, 100)
                else:
                    probe = networks.latency_probe(size, timed_at, device, runtime=runtime)
                    try:
                        networks.prune_to_latency(pruned, example, goal, probe(unpruned), probe, 100,
                                                  reference=unpruned)
                    except ValueError as e:  # unreachable: the row says so, the table goes on
                        lines.append(f"| {name} | {goal:g}x | latency at batch {timed_at} | "
                                     f"{one_line(str(e))} | | {timed_at} | | | |")
                        print(lines[-1], flush=True)
                        continue
                macs = networks.count_macs(pruned, example)
                how = "MACs" if kind == "macs" else f"latency at batch {timed_at}"
                for r in compare_latency(pruned, unpruned, size, batches, device, min_run_time,
                                         runtime):
                    lines.append(f"| {name} | {goal:g}x | {how} | {macs / 1e6:.1f}M of "
                                 f"{base / 1e6:.1f}M | {base / macs:.2f}x | {r['batch_size']} "
                                 f"| {r['unpruned_latency_ms']:.2f} (IQR {r['unpruned_iqr_ms']:.2f}) "
                                 f"| {r['latency_ms']:.2f} (IQR {r['iqr_ms']:.2f}) "
                                 f"| {r['speed_up_measured']:.2f}x |")
                    print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if out:
        networks.atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    print(text)
    return 0


def _round_to_trials(cases: list, device: str, min_run_time: float,
                     speed_ups: tuple[float, ...], runtime: Runtime, out: str | None) -> int:
    """``--target round_to``: choose_round_to's trials per network, target and batch size."""
    lines = [f"torch {torch.__version__}, {runtime} on {device}, {torch.get_num_threads()} threads\n",
             "| network | target | batch | round_to | MACs | ms | MACs per ms | chosen |",
             "|---|---|---|---|---|---|---|---|"]
    for name, build, size, batch in cases:
        example = torch.zeros(1, *size)
        base = networks.count_macs(_build(name, build), example)
        for goal in speed_ups:
            for timed_at in (1, batch):
                probe = networks.latency_probe(size, timed_at, device, min_run_time, runtime)
                chosen, trials = networks.choose_round_to(
                    _build(name, build), example, _pruning_to(example, goal, base), probe)
                for t in trials:
                    cells = ("not reached", "", "") if t.macs is None or t.ms is None else \
                        (f"{t.macs / 1e6:.1f}M", f"{t.ms:.3f}", f"{t.macs / t.ms / 1e6:.3f}M")
                    lines.append(f"| {name} | {goal:g}x | {timed_at} | {t.round_to} | "
                                 + " | ".join(cells) + f" | {'yes' if t.round_to == chosen else ''} |")
                    print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if out:
        networks.atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    print(text)
    return 0


def _pruning_to(example: torch.Tensor, goal: float, base: int):
    """``prune(model, round_to)``: to ``goal`` x fewer MACs than ``base``, in 100 steps."""
    def prune(model: torch.nn.Module, r: int | None) -> None:
        pruner = networks.criterion_pruner(model, example, 100, round_to=r)
        networks.prune_to_speed_up(model, example, goal, base, 100, pruner=pruner)
    return prune


def _build(name: str, build: dict) -> torch.nn.Module:
    """The network with seed-0 weights (the same structure is pruned whatever ran before)."""
    torch.manual_seed(0)
    return networks.build(name, **build).eval()


def main(argv: list[str] | None = None) -> int:
    return cli(latency, argv, prog="latency.py", description=summary(__doc__))


if __name__ == "__main__":
    sys.exit(main())

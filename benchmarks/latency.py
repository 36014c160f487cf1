"""MACs speed-up against measured speed-up (issue 16): ResNet-56 (CIFAR) and ResNet-50 (ImageNet)
pruned to 2x and 3x by our pruner, timed against their unpruned architecture.

    python benchmarks/latency.py [--device cpu|cuda] [--min_run_time 1.0] [--speed_ups [2,3]] \
        [--out FILE.md]

Weights are random (time does not depend on their values; the pruner's group-norm criterion
then picks an arbitrary but valid structure, as it would on trained weights of another seed).
Each network is timed with ``networks.latency.compare_latency`` (eval mode, no gradient,
median and IQR over ``torch.utils.benchmark`` blocks) at batch 1 and a throughput batch.
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
from networks.latency import compare_latency
from pipeline.command_line import cli, summary
from pipeline.options import SpeedUp

CASES = (  # name, classes, input size, throughput batch
    ("resnet56_cifar", 10, (3, 32, 32), 64),
    ("resnet50", 1000, (3, 224, 224), 16),
)


def latency(*, device: Literal["cpu", "cuda"] = "cpu", min_run_time: PositiveFloat = 1.0,
            speed_ups: tuple[SpeedUp, ...] = (2.0, 3.0), out: str | None = None) -> int:
    """Prune each network to each target and time it against its unpruned architecture.

    Args:
        device: where to time
        min_run_time: seconds of timing per network and batch size (torch.utils.benchmark)
        speed_ups: pruning targets (MACs), e.g. [2,3]
        out: also write the table to this markdown file
    """
    lines = [f"torch {torch.__version__}, {device}, {torch.get_num_threads()} threads\n",
             "| network | target | MACs | speed-up by MACs | batch | unpruned ms | pruned ms "
             "| speed-up measured |", "|---|---|---|---|---|---|---|---|"]
    for name, classes, size, batch in CASES:
        torch.manual_seed(0)
        example = torch.zeros(1, *size)
        unpruned = networks.build(name, classes)
        base = networks.count_macs(unpruned, example)
        for target in speed_ups:
            torch.manual_seed(0)  # the same weights, hence structure, whatever was timed before
            pruned = networks.build(name, classes).eval()
            networks.prune_to_speed_up(pruned, example, target, base, 100)
            macs = networks.count_macs(pruned, example)
            for r in compare_latency(pruned, unpruned, size, (1, batch), device, min_run_time):
                lines.append(f"| {name} | {target:g}x | {macs / 1e6:.1f}M of {base / 1e6:.1f}M "
                             f"| {base / macs:.2f}x | {r['batch_size']} "
                             f"| {r['unpruned_latency_ms']:.2f} (IQR {r['unpruned_iqr_ms']:.2f}) "
                             f"| {r['latency_ms']:.2f} (IQR {r['iqr_ms']:.2f}) "
                             f"| {r['speed_up_measured']:.2f}x |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if out:
        networks.atomic_write(out, lambda tmp: Path(tmp).write_text(text))
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(latency, argv, prog="latency.py", description=summary(__doc__))


if __name__ == "__main__":
    sys.exit(main())

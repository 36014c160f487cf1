"""MACs speed-up against measured speed-up (issue 16): ResNet-56 (CIFAR) and ResNet-50 (ImageNet)
pruned to 2x and 3x by our pruner, timed against their unpruned architecture.

    python benchmarks/latency.py [--device cpu|cuda] [--min_run_time 1.0] [--out FILE.md]

Weights are random (time does not depend on their values; the pruner's group-norm criterion
then picks an arbitrary but valid structure, as it would on trained weights of another seed).
Each network is timed with ``networks.latency.compare_latency`` (eval mode, no gradient,
median and IQR over ``torch.utils.benchmark`` blocks) at batch 1 and a throughput batch.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

import networks  # noqa: E402
from networks.latency import compare_latency  # noqa: E402

CASES = (  # name, classes, input size, throughput batch
    ("resnet56_cifar", 10, (3, 32, 32), 64),
    ("resnet50", 1000, (3, 224, 224), 16),
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--min_run_time", type=float, default=1.0)
    parser.add_argument("--speed_ups", type=float, nargs="+", default=[2.0, 3.0])
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    args = parser.parse_args(argv)
    lines = [f"torch {torch.__version__}, {args.device}, {torch.get_num_threads()} threads\n",
             "| network | target | MACs | speed-up by MACs | batch | unpruned ms | pruned ms "
             "| speed-up measured |", "|---|---|---|---|---|---|---|---|"]
    for name, classes, size, batch in CASES:
        torch.manual_seed(0)
        example = torch.zeros(1, *size)
        unpruned = networks.build(name, classes)
        base = networks.count_macs(unpruned, example)
        for target in args.speed_ups:
            torch.manual_seed(0)  # the same weights, hence structure, whatever was timed before
            pruned = networks.build(name, classes).eval()
            networks.prune_to_speed_up(pruned, example, target, base, 100)
            macs = networks.count_macs(pruned, example)
            for r in compare_latency(pruned, unpruned, size, (1, batch), args.device,
                                     args.min_run_time):
                lines.append(f"| {name} | {target:g}x | {macs / 1e6:.1f}M of {base / 1e6:.1f}M "
                             f"| {base / macs:.2f}x | {r['batch_size']} "
                             f"| {r['unpruned_latency_ms']:.2f} (IQR {r['unpruned_iqr_ms']:.2f}) "
                             f"| {r['latency_ms']:.2f} (IQR {r['iqr_ms']:.2f}) "
                             f"| {r['speed_up_measured']:.2f}x |")
                print(lines[-1], flush=True)
    text = "\n".join(lines) + "\n"
    if args.out:
        networks.atomic_write(args.out, lambda tmp: Path(tmp).write_text(text))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

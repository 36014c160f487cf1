"""How far stage 2 narrowed each layer, against final accuracy, over quality-benchmark runs.

    python benchmarks/quality_widths.py --runs runs/quality_cifar10/prune runs/quality_confirm/prune

For every finished run ``seed<N>/<S>x/<method>/`` under ``--runs``: the narrowest layer's kept
fraction (output channels of the final network over those of the stage-1 network it was pruned
from, over every Conv2d and Linear) and the final test accuracy; per target, the quantiles of
that fraction, the share of runs with a layer under a third of its width, and the correlation
of the fraction with final accuracy. Global ranking can empty single layers (docs/pruning.md,
"The per-layer cap"); this measures how often it does and what it costs.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

import networks  # noqa: E402
from pipeline import results  # noqa: E402


def widths(path: str | Path) -> list[int]:
    """Output widths of the network file's Conv2d and Linear layers, in module order."""
    net = networks.load_network(path)[0]
    return [m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
            for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def narrowest(run: Path) -> tuple[float, float]:
    """(the narrowest layer's kept fraction, final test accuracy) of one finished run."""
    report = json.loads((run / "report.json").read_text())
    stages = report["files"]["stages"]
    kept = min(a / b for a, b in zip(widths(stages["final"]), widths(stages["finetuned"])))
    return kept, report["accuracy"]["final"]["test"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="prune/ folders of benchmarks")
    args = parser.parse_args(argv)
    rows: dict[str, list[tuple[str, float, float]]] = {}
    for folder in args.runs:
        for run in results.run_folders(folder):
            kept, acc = narrowest(run)
            rows.setdefault(run.parent.name, []).append((f"{run.parts[-3]}/{run.name}", kept, acc))
    print("| target | runs | narrowest layer kept: min / q10 / median / q90 | runs with a layer "
          "under 1/3 | correlation with final test acc |\n|---|---|---|---|---|")
    for target, cells in sorted(rows.items()):
        kept = np.array([c[1] for c in cells])
        acc = np.array([c[2] for c in cells])
        q = np.quantile(kept, [0, 0.1, 0.5, 0.9])
        print(f"| {target} | {len(cells)} | {' / '.join(f'{v:.2f}' for v in q)} | "
              f"{(kept < 1 / 3).mean():.0%} | {np.corrcoef(kept, acc)[0, 1]:+.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

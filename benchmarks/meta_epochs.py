"""Per-epoch meta-val metrics of meta-training runs, side by side, from their TensorBoard logs.

    python benchmarks/meta_epochs.py RUN_DIR [RUN_DIR ...] [--labels a b ...]

RUN_DIR is a meta-training log folder (the one holding ``events.out.tfevents.*``, e.g.
``runs/quality_cifar10/meta``). Prints one markdown table: for every epoch, each run's val
cross-entropy of the meta-val members with the metanetwork's weights (``val/ce``), the 10%
quantile of their normalized group norms (``val/group_norm_q10``: the spread that pruning
exploits, 1 = all groups alike) and the fraction of near-zero groups; the unmodified members'
values head the table.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

METRICS = (("val/ce", "val CE"), ("val/group_norm_q10", "norm q10"),
           ("val/near_zero_groups", "near-zero"))


def epoch_values(run: Path) -> dict[str, list[float]]:
    """``{tag: [value per validation, in order]}`` for the METRICS and their ``_original``."""
    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    wanted = [t for m, _ in METRICS for t in (m, f"{m}_original")]
    missing = [t for t in wanted if t not in tags]
    if missing:
        raise SystemExit(f"{run}: no scalars {missing} (is it a meta-training log folder?)")
    return {t: [e.value for e in acc.Scalars(t)] for t in wanted}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--labels", nargs="+", default=None)
    args = parser.parse_args()
    labels = args.labels or [r.name for r in args.runs]
    if len(labels) != len(args.runs):
        raise SystemExit("give one --labels entry per run")
    values = [epoch_values(r) for r in args.runs]
    head = [f"{label} {name}" for label in labels for _, name in METRICS]
    print("| epoch | " + " | ".join(head) + " |")
    print("|---|" + "---|" * len(head))
    print("| original | " + " | ".join(f"{v[f'{m}_original'][0]:.3f}" for v in values
                                       for m, _ in METRICS) + " |")
    for epoch in range(max(len(v["val/ce"]) for v in values)):
        cells = [f"{v[m][epoch]:.3f}" if epoch < len(v[m]) else "-" for v in values
                 for m, _ in METRICS]
        print(f"| {epoch} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

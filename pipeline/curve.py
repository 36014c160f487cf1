"""Accuracy-vs-speed-up curves: ``python prune.py curve`` and the plots and files of every curve.

The curve (``networks.accuracy_curve``) prunes a copy of the network progressively without
finetuning and records val accuracy at each speed-up, each point after re-estimating the BN
running statistics on ``bn_batches`` training batches (0: the raw curve). Outputs:
``curve.csv``, ``curve.png`` (written atomically). The files and plots also hold curves in
weight sparsity (``networks.sparsity_curve``, the weight runs of ``prune.py run``): ``axis``
names what the first column of a point is (``AXES``).
"""
from __future__ import annotations

import csv
import io
import os
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Sized, cast

import matplotlib

matplotlib.use("Agg")  # files only, never a display
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm import tqdm  # noqa: E402

import networks  # noqa: E402
from datamodules.sources import DataSplit  # noqa: E402
from metaprune.errors import UserError

from .common import save_png, write_bytes  # noqa: E402
from .options import BN_BATCH_SIZE, BN_BATCHES, CurveOptions  # noqa: E402

Curves = dict[str, list[tuple[float, int, float]]]
# A curve's x axis -> (the CSV columns of a point's first two items, the plot's x label, the
# unit a range of it is written with): speed-up against MACs, or weight sparsity against the
# weights left.
AXES = {"speed_up": (("speed_up", "macs"), "speed-up (MACs unpruned / MACs)", "x"),
        "weight_sparsity": (("weight_sparsity", "nonzero_weights"),
                            "weight sparsity (fraction of zero conv/linear weights)", ""),
        "latency_speed_up": (("latency_speed_up", "macs"),
                             "measured latency speed-up (unpruned time / time)", "x")}


class CurveError(UserError):
    """Bad input to ``prune.py curve``."""


def curves_csv(curves: Curves, axis: str = "speed_up") -> bytes:
    """The curves as CSV (``curve, speed_up, macs, accuracy``, or for ``axis="weight_sparsity"``
    ``curve, weight_sparsity, nonzero_weights, accuracy``; one row per point)."""
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["curve", *AXES[axis][0], "accuracy"])
    for name, points in curves.items():
        writer.writerows([name, f"{s:.6f}", m, f"{a:.6f}"] for s, m, a in points)
    return out.getvalue().encode()


def read_curves(path: str | os.PathLike) -> Curves:
    """The curves of a ``curve.csv`` written by ``curves_csv`` (either axis)."""
    curves: Curves = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            x, count = next(columns for columns, _, _ in AXES.values() if columns[0] in row)
            curves.setdefault(row["curve"], []).append(
                (float(row[x]), int(row[count]), float(row["accuracy"])))
    return curves


LINE_STYLES = (("-", "."), ("--", "x"), (":", "^"), ("-.", "s"))


def curves_figure(curves: Curves, title: str = "accuracy vs speed-up (no finetuning)",
                  chance: float | None = None, span: tuple[float, float] | None = None,
                  highlight: str | None = None, split: str = "val", axis: str = "speed_up"):
    """Accuracy (on ``split``) against speed-up, one line per curve, on a 0-1 axis (a zoomed
    axis makes noise look like swings); optionally the chance level, a shaded speed-up range
    (what a score averages over) and one curve drawn bold (e.g. the selected checkpoint). Each
    curve gets its own line style and marker, so that curves lying on each other stay visible.
    ``axis``: what the points' first items are (``AXES``)."""
    _, xlabel, unit = AXES[axis]
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, (name, points) in enumerate(curves.items()):
        line, marker = LINE_STYLES[i % len(LINE_STYLES)]
        ax.plot([p[0] for p in points], [p[-1] for p in points], marker=marker, linestyle=line,
                markersize=4, label=name, linewidth=2.5 if name == highlight else 1.2)
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle="--", linewidth=1, label=f"chance ({chance:.0%})")
    if span is not None:
        ax.axvspan(*span, color="tab:blue", alpha=0.08, label=f"{span[0]:g}-{span[1]:g}{unit}")
    ax.set_ylim(0.0, 1.0)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(f"{split} accuracy")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    if len(curves) > 1 or chance is not None or span is not None:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def save_figure(curves: Curves, path: str | os.PathLike, title: str | None = None,
                **style) -> Path:
    """The curves plotted into a PNG at ``path``, atomically (``style``: see curves_figure)."""
    fig = curves_figure(curves, title, **style) if title else curves_figure(curves, **style)
    return save_png(fig, path)


def save_curves(curves: Curves, out_dir: str | os.PathLike, title: str | None = None,
                axis: str = "speed_up", stem: str = "curve", **style) -> tuple[Path, Path]:
    """``<stem>.csv`` and ``<stem>.png`` in ``out_dir``, atomically (``axis``: see ``AXES``)."""
    out_dir = Path(out_dir)
    return (write_bytes(out_dir / f"{stem}.csv", curves_csv(curves, axis)),
            save_figure(curves, out_dir / f"{stem}.png", title, axis=axis, **style))


def evaluator(loader, device: torch.device | str):
    """A function model -> accuracy on ``loader``."""
    return lambda model: networks.accuracy(model, loader, device)


CURVE_PAIRS = 3  # readings of a point and of the unpruned architecture, alternating


def timed(evaluate: Callable[[nn.Module], float], probe: Callable[[nn.Module], float],
          unpruned: nn.Module, speed_ups: list[float]) -> Callable[[nn.Module], float]:
    """``evaluate`` that also appends the model's measured latency speed-up over ``unpruned``
    to ``speed_ups`` (``networks.paired_latency``: the two timed alternately,
    ``CURVE_PAIRS`` readings each, so the machine's drift along a curve cancels point by
    point): a curve evaluates each of its points once, in order, so ``speed_ups`` lines up
    with the points."""
    def evaluate_and_time(model: nn.Module) -> float:
        accuracy = evaluate(model)
        speed_ups.append(networks.paired_latency(probe, unpruned, model, CURVE_PAIRS).speed_up)
        return accuracy
    return evaluate_and_time


def latency_points(points: list[tuple[float, int, float]],
                   speed_ups: list[float]) -> list[tuple[float, int, float]]:
    """A curve's points against the measured latency speed-up instead of the MACs one."""
    if len(speed_ups) != len(points):
        raise RuntimeError(f"{len(speed_ups)} timings for {len(points)} curve points")
    return [(s, macs, acc) for (_, macs, acc), s in zip(points, speed_ups)]


def calibration(datamodule, count: int = BN_BATCHES,
                batch_size: int = BN_BATCH_SIZE) -> list[torch.Tensor]:
    """``count`` fixed batches of the datamodule's training images for BN recalibration."""
    if getattr(datamodule, "train_set", None) is None:
        datamodule.setup("validate")  # builds the train and val splits, never the test split
    return networks.calibration_batches(datamodule.train_set, count, batch_size)




def evaluation_split(args: CurveOptions, lineages: list[list[dict]]) -> tuple[DataSplit, bool]:
    """The split to evaluate on: the command-line's where given, else the last split the first
    recorded network trained on (its own val images); and whether any network records one."""
    own = next((DataSplit.from_dict(lineage[-1]) for lineage in lineages if lineage), None)
    base = own or DataSplit(args.dataset or "cifar10", None, 0.1, 0)
    given: dict[str, Any] = {"dataset": args.dataset, "subset": args.subset,
                             "val_fraction": args.val_fraction, "seed": args.seed}
    return replace(base, **{k: v for k, v in given.items() if v is not None}), own is not None


def curve_command(args: CurveOptions) -> int:
    """``prune.py curve``: one accuracy-vs-speed-up curve per network file, one overlay plot."""
    from datamodules import ImageDataModule

    labels = args.labels or [str(Path(f)) for f in args.network]  # CurveOptions checks the count
    loaded = [networks.load_network(f) for f in args.network]  # all files checked before work
    classes = {record["arch"]["num_classes"] for _, record in loaded}
    if len(classes) > 1:
        raise CurveError(f"the --network files have different class counts {sorted(classes)}; "
                         "curves on one dataset need networks of one task")
    lineages = [list(record["metadata"].get("trained_on") or []) for _, record in loaded]
    split, recorded = evaluation_split(args, lineages)
    assert args.data_root is not None  # CurveOptions requires it
    dm = ImageDataModule(args.data_root, dataset=split.dataset, num_classes=classes.pop(),
                         batch_size=args.batch_size, num_workers=0,
                         val_fraction=split.val_fraction, subset=split.subset, seed=split.seed)
    dm.check_held_out({f"network file {file!r}": lineage
                       for file, lineage in zip(args.network, lineages)})
    if not all(lineages):
        unknown = [f for f, lineage in zip(args.network, lineages) if not lineage]
        print(f"prune.py curve: WARNING: {', '.join(unknown)} record no training data split (files "
              "written before it was recorded, or by other code): the val images may include "
              "images they trained on; pass --subset/--val_fraction/--seed as they were trained"
              + ("" if recorded else " (using all training images, val_fraction 0.1, seed 0)"),
              file=sys.stderr)
    dm.setup("validate")
    val_set = dm.split_set("val")
    example = val_set[0][0].unsqueeze(0)
    batches = calibration(dm, args.bn_batches, args.bn_batch_size)
    curves: Curves = {}
    latency: Curves = {}
    for label, (network, record) in tqdm(list(zip(labels, loaded)), desc="curves", unit="network",
                                          disable=len(loaded) < 2):
        evaluate = evaluator(dm.val_dataloader(), "cpu")
        speed_ups: list[float] = []
        if args.latency_batch:
            probe = networks.latency_probe(example.shape[1:], args.latency_batch,
                                           runtime=args.latency_runtime)
            evaluate = timed(evaluate, probe, networks.build_arch(record["arch"]).eval(),
                             speed_ups)
        curves[label] = networks.accuracy_curve(
            network.eval(), example, networks.base_macs(record["arch"], example), evaluate,
            args.max_speed_up, args.iterative_steps, args.every, batches, args.max_pruning_ratio,
            args.importance)
        if args.latency_batch:
            latency[label] = latency_points(curves[label], speed_ups)
    out = Path(args.out) if args.out else Path(args.network[0]).parent
    title = args.title or (f"{', '.join(labels)}: val accuracy, pruned without finetuning "
                           f"({len(cast(Sized, val_set))} val images)")
    written = list(save_curves(curves, out, title, chance=1 / dm.num_classes))
    if latency:
        written += save_curves(latency, out, f"{title}, timed in {args.latency_runtime} at batch "
                               f"{args.latency_batch} ({torch.get_num_threads()} CPU threads)",
                               axis="latency_speed_up", stem="curve_latency",
                               chance=1 / dm.num_classes)
    for label, points in curves.items():
        print(f"{label}\n| speed-up | MACs | val acc |" + (" latency speed-up |" if latency else "")
              + "\n|---|---|---|" + ("---|" if latency else ""))
        for i, (s, m, a) in enumerate(points):
            print(f"| {s:.3f} | {m:,} | {a:.4f} |"
                  + (f" {latency[label][i][0]:.3f} |" if latency else ""))
    print(f"wrote {', '.join(str(p) for p in written)}")
    return 0

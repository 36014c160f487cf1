"""Automatic metanetwork checkpoint selection: ``python prune.py select``.

Replaces the reference's manual search over epochs. For every candidate checkpoint of a
meta-training run, each meta-val zoo member (held out from meta-training) goes through the
metanetwork, gets a short finetune on the image train split, and its acc-vs-speed-up curve is
computed on the val split (never the test split), every point after re-estimating the BN
statistics on ``--bn_batches`` training batches. Score = mean over members of the curve's
mean accuracy over ``--speed_up_range`` (``networks.curve_area``). Checkpoints meta-trained
for weight sparsity are scored alike on accuracy-vs-weight-sparsity curves
(``networks.sparsity_curve``) over ``--sparsity_range``. The identity (no
metanetwork, same finetune) is scored too, as a reference row; it is never selected, but when
no checkpoint scores above it the command says so (a warning, and ``selection.json``), since
then the metanetwork makes the members no easier to prune than finetuning alone.

Outputs in ``--out`` (default ``<run>/selection``): ``selection.csv`` (one row per
candidate), ``selection_curves.csv`` (every curve), ``selection.png`` (mean curves overlaid),
``selection.json`` (the best score against the identity's) and ``best.ckpt`` (a copy of the
best checkpoint), all written atomically.
"""
from __future__ import annotations

import argparse
import copy
import csv
import io
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

import networks
from graph import Metanetwork, feedforward
from lightning_modules import load_metanetwork, trained_criterion, trained_sparsity
from metaprune.errors import UserError
from networks import CheckpointError

from .common import one_line, write_bytes, write_json
from .config_files import load_config_file
from .curve import (
    calibration,
    curves_csv,
    evaluator,
    save_figure,
)
from .options import SelectRequest

IDENTITY = "none (identity)"
SELECTION_FILE = "selection.json"  # the chosen checkpoint's score against the identity


class SelectionError(UserError):
    """Bad input to ``prune.py select``; the message names the file or option."""


def zoo_datamodule(config: str | Path, zoo_dir: str | None = None,
                   data_root: str | None = None):
    """The ``ModelZooDataModule`` of a meta.yaml's ``data`` section, set up (train/val only)."""
    where = f"meta config {str(config)!r}"
    cfg = load_config_file(config, SelectionError, "meta")
    data = copy.deepcopy(cfg.get("data")) if isinstance(cfg, dict) else None
    if not isinstance(data, dict) or "init_args" not in data:
        raise SelectionError(f"{where} has no data section with class_path and init_args")
    if zoo_dir is not None:
        data["init_args"]["zoo"] = zoo_dir
    if data_root is not None:
        data["init_args"]["images"]["init_args"]["root"] = data_root
    from jsonargparse import ArgumentParser

    from datamodules import ModelZooDataModule

    parser = ArgumentParser(exit_on_error=False)  # builds class_path/init_args as LightningCLI
    parser.add_argument("--data", type=ModelZooDataModule)
    try:
        dm = parser.instantiate_classes(parser.parse_object({"data": data})).data
    except argparse.ArgumentError as e:
        raise SelectionError(f"{where}: its data section is not a ModelZooDataModule "
                             f"({one_line(str(e))})") from None
    dm.setup("fit")  # reads the image train split and carves the val split out of it
    if not dm.val_ids:
        raise SelectionError(f"{where}: the zoo has no meta-val members (meta_val_members=0)")
    return dm


def find_checkpoints(run: Path, which: str, exclude: Path) -> list[Path]:
    """Candidate files: every ``*.ckpt`` under ``run`` except ``last.ckpt`` (a duplicate) and
    anything in ``exclude`` (earlier selection outputs); ``which`` = all | N | a,b,c."""
    if not run.is_dir():
        raise SelectionError(f"--run {str(run)!r} is not a folder; pass the meta-training run dir")
    if which not in ("all",) and not which.isdigit():
        files = [Path(p) if Path(p).is_absolute() else run / p for p in which.split(",")]
        for f in files:
            if not f.is_file():
                raise CheckpointError(f"metanetwork checkpoint {str(f)!r} does not exist; check "
                                      "--checkpoints (paths relative to --run)")
        return files
    found = sorted(p for p in run.rglob("*.ckpt")
                   if p.name != "last.ckpt" and not p.name.startswith(".")
                   and exclude not in p.parents)
    if not found:
        raise SelectionError(f"no metanetwork checkpoints (*.ckpt other than last.ckpt) under "
                             f"{str(run)!r}; meta-train first (python train.py fit --config "
                             "configs/<task>/meta.yaml) with checkpoint.save_top_k: -1")
    if which.isdigit():
        count = int(which)
        if count < 1:
            raise SelectionError("--checkpoints N needs N >= 1")
        keep = np.unique(np.linspace(0, len(found) - 1, min(count, len(found))).round().astype(int))
        found = [found[i] for i in keep]
    return found


def apply_metanetwork(metanetwork: Metanetwork | None, network: nn.Module,
                      example: torch.Tensor) -> nn.Module:
    """A copy of ``network`` with the weights the metanetwork writes (identity when None)."""
    out = copy.deepcopy(network)
    if metanetwork is not None:
        feedforward(metanetwork, out, example)
    return out


def finetune(model: nn.Module, loader, steps: int, lr: float, device) -> nn.Module:
    """``steps`` plain SGD steps (momentum 0.9, wd 5e-4) over the cycled ``loader``."""
    if steps <= 0:
        return model
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            opt.zero_grad()
            F.cross_entropy(model(x.to(device)), y.to(device)).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return model.eval()


def mean_curve(curves: list[list], lo: float, hi: float, n: int = 60) -> list[tuple]:
    """Member curves averaged on a common speed-up grid (for the overlay plot)."""
    start = min(c[0][0] for c in curves)
    grid = np.linspace(min(start, lo), hi, n)
    acc = np.mean([np.interp(grid, [p[0] for p in c], [p[-1] for p in c]) for c in curves], 0)
    return [(float(s), 0, float(a)) for s, a in zip(grid, acc)]




def select_checkpoint(args: SelectRequest) -> int:
    """Score every candidate checkpoint of a meta-training run on the meta-val members and
    copy the best to ``<out>/best.ckpt`` (``prune.py select``); returns 0."""
    run = Path(args.run)
    out = Path(args.out) if args.out else run / "selection"
    files = find_checkpoints(run, args.checkpoints, out)
    metas = {str(f): load_metanetwork(f) for f in files}  # every file checked before any work
    scoring = Scoring.of(args, files)
    lo, hi = scoring.span
    dm = zoo_datamodule(args.config, args.zoo_dir, args.data_root)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    example = dm.example_input()
    members = []
    for i in dm.val_ids:
        member = dm.members[i]
        members.append((i, member.network, networks.base_macs(member.record["arch"], example)))
    evaluate = evaluator(dm.images.val_dataloader(), device)
    batches = calibration(dm.images, args.bn_batches, args.bn_batch_size)
    rows: list[dict[str, Any]] = []
    curves, mean_curves = {}, {}
    for name, meta in [(IDENTITY, None), *metas.items()]:
        label = (str(Path(name).relative_to(run)) if meta is not None and run in Path(name).parents
                 else name)
        start, areas, mine = time.perf_counter(), [], []
        for i, network, base in members:
            model = apply_metanetwork(meta, network, example).to(device)
            torch.manual_seed(args.seed)  # same batches for every candidate
            finetune(model, dm.images.train_dataloader(), args.finetune_steps, args.finetune_lr,
                     device)
            points = scoring.curve(model, example.to(device), base, evaluate, batches)
            curves[f"{label} member{i}"] = points
            mine.append(points)
            areas.append(networks.curve_area(points, lo, hi))
        mean_curves[label] = mean_curve(mine, lo, hi)
        rows.append({"checkpoint": label, "path": "" if meta is None else name,
                     "score": float(np.mean(areas)),
                     "member_scores": " ".join(f"{a:.4f}" for a in areas),
                     "seconds": round(time.perf_counter() - start, 1)})
        print(f"{label}: score {rows[-1]['score']:.4f}", flush=True)
    best = max((r for r in rows if r["path"]), key=lambda r: r["score"])
    for r in rows:
        r["best"] = r is best
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=list(rows[0]))
    writer.writeheader()
    writer.writerows(rows)
    write_bytes(out / "selection.csv", table.getvalue().encode())
    write_bytes(out / "selection_curves.csv", curves_csv(curves, scoring.axis))
    save_figure(mean_curves, out / "selection.png",
                title=f"meta-val members, {args.finetune_steps} finetune steps, no finetune after "
                      f"(bold: selected)", chance=1 / dm.images.num_classes, span=(lo, hi),
                highlight=best["checkpoint"], axis=scoring.axis)
    identity = next(r for r in rows if not r["path"])
    verdict = selection_verdict(best, identity)
    write_json(out / SELECTION_FILE, verdict)
    write_bytes(out / "best.ckpt", Path(best["path"]).read_bytes())  # last: it marks selection done
    print(f"\nscore = mean val accuracy over {scoring.axis.replace('_', ' ')} [{lo}, {hi}] "
          "(no finetune after pruning)\n")
    print("| checkpoint | score | per member | best |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['checkpoint']} | {r['score']:.4f} | {r['member_scores']} | "
              f"{'**best**' if r['best'] else ''} |")
    print(f"\nbest: {best['checkpoint']} -> {out / 'best.ckpt'}")
    if not verdict["beats_identity"]:
        print(f"WARNING: no checkpoint scores above the identity on the meta-val members (best "
              f"{best['score']:.4f} <= identity {identity['score']:.4f}): this metanetwork makes "
              "them no easier to prune than finetuning alone. best.ckpt is the best of them "
              f"anyway; {out / SELECTION_FILE} records this.", file=sys.stderr)
    return 0


@dataclass(frozen=True)
class Scoring:
    """How a candidate is scored: the curve each meta-val member gets, on the axis of what its
    checkpoints were meta-trained to make prunable (channels: accuracy against speed-up;
    weights: against weight sparsity), and the span its area averages over."""

    axis: str                      # pipeline.curve.AXES
    span: tuple[float, float]
    curve: Callable[..., list]     # (model, example, base MACs, evaluate, batches) -> points

    @classmethod
    def of(cls, args: SelectRequest, files: list[Path]) -> Scoring:
        if _agreed(files, trained_sparsity, "pruning targets", "") == "weights":
            levels = networks.sparsity_levels(args.sparsity_step, args.sparsity_range,
                                              args.sparsity_range[1])
            return cls("weight_sparsity", args.sparsity_range,
                       lambda model, example, base, evaluate, batches: networks.sparsity_curve(
                           model, evaluate, levels, batches, args.sparsity_scope,
                           args.sparsity_exclude))
        criterion = args.importance or _agreed(files, trained_criterion, "pruning criteria",
                                               ", or pass --importance")
        return cls("speed_up", args.speed_up_range,
                   lambda model, example, base, evaluate, batches: networks.accuracy_curve(
                       model, example, base, evaluate, args.speed_up_range[1],
                       args.iterative_steps, args.every, batches, args.max_pruning_ratio,
                       criterion))


def _agreed(files: list[Path], read: Callable[[Path], str], what: str, hint: str) -> str:
    """What every checkpoint in ``files`` was meta-trained for (``read``); refused when they
    differ."""
    found = {str(f): read(f) for f in files}
    if len(set(found.values())) > 1:
        raise SelectionError(f"the checkpoints were meta-trained for different {what} ({found}); "
                             f"select among one run's checkpoints{hint}")
    return next(iter(found.values()))


def selection_verdict(best: dict, identity: dict) -> dict:
    """What ``selection.json`` records: the chosen checkpoint, its score, the identity's, and
    whether it beats the identity (so that a caller can refuse, or record, a draw that does not)."""
    return {"checkpoint": best["checkpoint"], "score": best["score"],
            "identity_score": identity["score"], "beats_identity": best["score"] > identity["score"]}

"""A pruning run's results in TensorBoard, beside its stages' training logs.

``prune.py run`` writes one event file under ``<run dir>/summary`` when the run completes, so
``tensorboard --logdir <run dir>`` (or the demo's folder) shows the outcome next to the
training curves. Tags (one scheme with the pruning callbacks' ``pruning/*``):

* ``accuracy/<network>/<split>``: val and test accuracy of the networks the run evaluated
  (``original``, ``feedforward``, ``finetuned``, ``pruned``, ``final``);
* ``pruning/speed_up``, ``pruning/speed_up_target``, ``pruning/macs``, ``pruning/params``,
  ``pruning/base_macs``: the result against the unpruned architecture;
* ``pruning/speed_up_measured/batch<B>`` and ``latency_ms/<pruned|unpruned>/batch<B>``: measured
  forward latency per batch size;
* ``curve/stage1`` and ``curve/final``: accuracy against speed-up without finetuning (BN
  recalibrated), the step being ``round(100 * speed-up)`` (TensorBoard steps are integers), and
  ``curve/stage1_area``, the stage-1 curve's mean over ``prune.curve_range``.

A latency run (a ``latency_speed_up`` target) has ``pruning/latency_speed_up`` (measured at
its batch size on the CPU, the report's) and ``pruning/latency_speed_up_target`` beside
``pruning/speed_up`` (in MACs, no target).

A weight run (a weight-sparsity or N:M target) has ``pruning/weight_sparsity`` (counted on the
exported network), ``pruning/weight_sparsity_target`` (magnitude targets), ``pruning/macs``,
``pruning/base_macs`` and ``pruning/params`` (unchanged by zeros) in place of the speed-ups, and
its curves are in weight sparsity: the step is ``round(1000 * sparsity)`` (per mille of zero
weights), ``curve/stage1_area`` the mean over ``prune.sparsity_range``.
"""
from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

SUMMARY = "summary"


def scalars(report: dict, curves: dict[str, Sequence[tuple]]) -> list[tuple[str, float, int]]:
    """``(tag, value, step)`` of everything ``write_summary`` logs."""
    out: list[tuple[str, float, int]] = []
    for network, splits in report["accuracy"].items():
        for split, value in (splits or {}).items():
            out.append((f"accuracy/{network}/{split}", float(value), 0))
    macs, sparsity = report["macs"], report.get("weight_sparsity")
    if sparsity is None:
        speed_up = report["speed_up"]
        out.append(("pruning/speed_up", float(speed_up["reached"]), 0))
        if "target" in speed_up:  # a latency target has none in MACs
            out.append(("pruning/speed_up_target", float(speed_up["target"]), 0))
        if "latency_speed_up" in report:
            latency = report["latency_speed_up"]
            out += [("pruning/latency_speed_up", float(latency["reached"]), 0),
                    ("pruning/latency_speed_up_target", float(latency["target"]), 0)]
    else:
        out.append(("pruning/weight_sparsity", float(sparsity["reached"]), 0))
        if sparsity["target"] is not None:
            out.append(("pruning/weight_sparsity_target", float(sparsity["target"]), 0))
    out += [("pruning/macs", float(macs["after"]), 0), ("pruning/base_macs", float(macs["unpruned"]), 0),
            ("pruning/params", float(report["params"]["after"]), 0)]
    for row in report["latency"]:
        batch = row["batch_size"]
        out += [(f"pruning/speed_up_measured/batch{batch}", float(row["speed_up_measured"]), 0),
                (f"latency_ms/pruned/batch{batch}", float(row["latency_ms"]), 0),
                (f"latency_ms/unpruned/batch{batch}", float(row["unpruned_latency_ms"]), 0)]
    scale = 100 if sparsity is None else 1000  # speed-up in hundredths, sparsity per mille
    for name, points in curves.items():
        out += [(f"curve/{name}", float(p[-1]), round(scale * p[0])) for p in points]
    out.append(("curve/stage1_area", float(report["stage1_curve"]["area"]), 0))
    return out


def write_summary(run_dir: Path, report: dict, curves: dict[str, Sequence[tuple]]) -> Path:
    """``<run_dir>/summary``: one event file of :func:`scalars`, written under a temporary
    name and then renamed, so an interrupted write never leaves a half summary (or two)."""
    from torch.utils.tensorboard import SummaryWriter

    final, tmp = run_dir / SUMMARY, run_dir / f".{SUMMARY}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    writer = SummaryWriter(str(tmp))
    try:
        for tag, value, step in scalars(report, curves):
            writer.add_scalar(tag, value, step)
    finally:
        writer.close()
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final

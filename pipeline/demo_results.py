"""The demo's results (``prune.py demo``, docs/pruning.md, "The demo pipeline"): the table and
the paired differences of every held-out network's runs, the plot of the stage-1 curves,
``results.json`` and ``results.md`` (rewritten only when their content changes, so a finished
demo's rerun writes nothing) and the summary printed at the end."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .common import atomic_write, write_json
from .paired import paired_table
from .results import demo_table, measures, paired_differences, run_key
from .run_config import FIRST_STAGE, REPORT

if TYPE_CHECKING:
    from .demo import DemoSettings

RESULTS = "results.json"
SMOKE_BANNER = ("SMOKE RUN (--fast): every stage ran a few batches; these numbers test the "
                "pipeline, not the method")


@dataclass(frozen=True)
class DemoResults:
    """What the demo computed from its runs' reports."""

    table: str           # one row per run (pipeline.results.demo_table)
    differences: str     # the paired differences between methods, as a table
    overlay: Path        # the stage-1 curves of the first network, one per method
    record: dict         # results.json's content


def stage1_overlay(out: Path, demo: DemoSettings, reports: dict[str, dict]) -> Path:
    """``<out>/stage1_curves.png``: the stage-1 curves (each run's ``<stage 1>/curve.csv``,
    BN recalibrated) of the first held-out network, one per method, on one plot."""
    from .curve import read_curves, save_figure

    path, seed, curves = out / "stage1_curves.png", demo.target_seeds[0], {}
    if path.is_file():  # stage 1 of a network is computed once: so is its plot
        return path
    for method in demo.methods:
        key = run_key(seed, demo.targets[0], method)
        stage1 = read_curves(out / "prune" / key / reports[key]["stage1_curve"]["csv"])
        curves[f"{method} (after {FIRST_STAGE[method]})"] = next(iter(stage1.values()))
    lo, hi = reports[key]["stage1_curve"]["range"]
    split = reports[key]["stage1_curve"].get("split", "val")
    axis, label = (("weight_sparsity", "weight sparsity") if demo.weight_sparsities else
                   ("speed_up", "speed-up"))
    return save_figure(curves, path, f"seed {seed} after stage 1: {split} accuracy vs {label}, "
                       "no finetuning, BN recalibrated",
                       chance=1 / reports[key]["architecture"]["num_classes"], span=(lo, hi),
                       split=split, axis=axis)


def write_results(out: Path, demo: DemoSettings, reports: dict[str, dict], targets: dict[int, Path],
                  best: Path | None, times: dict[str, float]) -> DemoResults:
    """The table, the paired differences and the overlay, and ``results.json``/``results.md``
    in ``out``. ``times``: seconds per step of this run; each step keeps the seconds it took
    when first computed (a rerun's skips do not overwrite them)."""
    table = demo_table(reports)
    differences = paired_table(paired_differences(measures(reports)))
    overlay = stage1_overlay(out, demo, reports)
    old = json.loads((out / RESULTS).read_text()) if (out / RESULTS).is_file() else {}
    seconds = dict(old.get("seconds") or {})
    seconds.update({k: v for k, v in times.items() if k not in seconds})
    record = {"smoke": demo.smoke, "table": table,
              "targets": {str(k): str(v) for k, v in targets.items()},
              "metanetwork": str(best) if best else None,
              "reports": {k: str(out / "prune" / k / REPORT) for k in reports},
              "seconds": seconds, "total_s": round(sum(seconds.values()), 1)}
    if old != json.loads(json.dumps(record)):
        write_json(out / RESULTS, record)
    banner = f"**{SMOKE_BANNER}**\n\n" if demo.smoke else ""
    text = (f"{banner}{table}\n\nPaired differences (first - second, percentage points):\n\n"
            f"{differences}\n")
    if not (out / "results.md").is_file() or (out / "results.md").read_text() != text:
        atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(text))
    return DemoResults(table, differences, overlay, record)


def print_summary(out: Path, demo: DemoSettings, reports: dict[str, dict], best: Path | None,
                  results: DemoResults, total: float) -> None:
    """The demo's last words: what was pruned, the table, the differences, and where every
    output is; ``total``: this run's seconds."""
    arch = next(iter(reports.values()))["architecture"]
    print(f"\nmeta pruning demo: {arch['name']} {arch['kwargs']} seeds {demo.target_seeds} (held "
          f"out of the zoo of seeds {demo.zoo_seeds}), methods {demo.methods} at "
          f"{', '.join(t.text for t in demo.targets)}, same finetune budgets\n")
    if demo.smoke:
        print(f"{SMOKE_BANNER}\n")
    print(results.table)
    print(f"\npaired differences (first - second, percentage points; the stage-1 curve area is "
          f"the mean val accuracy over the range, pruned without finetuning):\n"
          f"{results.differences}")
    where = f"{out / 'prune'}/seed<N>/{'w<S>' if demo.weight_sparsities else '<S>x'}/<method>"
    print(f"\nreports:     {where}/report.json   (table: {out / 'results.md'})")
    selection_plot = f", {best.parent / 'selection.png'}" if best else ""
    print(f"plots:       {results.overlay}, {where}/curve.png{selection_plot}")
    print(f"tensorboard: tensorboard --logdir {out}")
    exported = [ext for ext, key in ((".pt2", "exported"), (".onnx", "onnx"))
                if any(r["files"].get(key) for r in reports.values())]
    also = f" (+ {', '.join(exported)})" if exported else ""
    print(f"networks:    {where}/network.pt{also}" + (f", metanetwork {best}" if best else ""))
    seconds = results.record["seconds"]
    print(f"[this run {total:.0f} s; when first computed: {results.record['total_s']:.0f} s in all, "
          f"{', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}]")

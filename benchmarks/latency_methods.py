"""Accuracy against measured latency: the three methods compared on the same networks (issue 33).

    python prune.py demo --config benchmarks/latency_demo.yaml --out runs/latency_demo \
        --data_root ../shared/data/cifar10-jpeg
    python benchmarks/latency_methods.py --demo runs/latency_demo \
        --data_root ../shared/data/cifar10-jpeg [--latency_batch 64] [--latency_speed_up 1.5] \
        [--area [1.2,1.6]] [--part curves|runs|table]

For every held-out network of a finished demo, and every method's stage-1 network of it
(``<demo>/prune/seed<N>/<target>/<method>/<stage 1>/network.pt``):

* ``curves``: ``prune.py curve --latency_batch B`` on the three stage-1 networks together (one
  overlay per network, val images): every point timed alternately with the unpruned
  architecture (``networks.paired_latency``), and the area under accuracy against the measured
  latency speed-up over ``--area`` (mean val accuracy, ``networks.curve_area``).
* ``runs``: ``prune.py run --latency_speed_up L --latency_batch B``, stage 1 reused from the
  demo's run: the final test accuracy at the latency target, the latency speed-up the report
  re-times, and the MACs speed-up it took.

``table`` (also the default after a part) writes ``<demo>/latency/latency_methods.md`` and
``.json``: every value per network and method, and the paired differences (metanetwork - none,
metanetwork - sparse, sparse - none) with 95% intervals. Every cell is skipped when its output
exists, so a killed run resumes. Exploratory, not a registered run: the demo's networks are
small and few, and the area's range and the target were fixed when this script was written,
before its first result.
"""
from __future__ import annotations

import csv
import json
import os
import sys
from pathlib import Path
from typing import Literal, cast

from jsonargparse.typing import PositiveFloat, PositiveInt

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import networks
import prune
from pipeline.command_line import cli, summary
from pipeline.common import atomic_write, write_json
from pipeline.options import Method
from pipeline.paired import paired_table
from pipeline.results import paired_differences
from pipeline.run import FIRST_STAGE, REPORT, RunRequest, prune_run

METHODS = ("metanetwork", "none", "sparse")
RETIMED, MACS_TAKEN = "latency speed-up re-timed", "MACs speed-up taken"  # shown, not compared


def stage1_runs(demo: Path) -> dict[str, dict[str, Path]]:
    """``{seed<N>: {method: run folder}}``: the first target's run of each network and method
    (stage 1 does not depend on the target)."""
    runs: dict[str, dict[str, Path]] = {}
    for report in sorted((demo / "prune").glob(f"seed*/*/*/{REPORT}")):
        run = report.parent
        runs.setdefault(run.parts[-3], {}).setdefault(run.name, run)
    if not runs:
        raise SystemExit(f"{demo}/prune holds no finished run; run the demo first (see --help)")
    return runs


def curves(demo: Path, network: str, runs: dict[str, Path], data_root: str, batch: int) -> Path:
    """The three stage-1 networks' curves, timed; ``curve_latency.csv``."""
    out = demo / "latency" / network
    if not (out / "curve_latency.csv").is_file():
        methods = [m for m in METHODS if m in runs]
        files = ",".join(str(runs[m] / FIRST_STAGE[m] / "network.pt") for m in methods)
        code = prune.main(["curve", "--network", f"[{files}]", "--labels", f"[{','.join(methods)}]",
                           "--data_root", data_root, "--latency_batch", str(batch),
                           "--out", str(out), "--title",
                           f"{network}: stage-1 networks, val accuracy against latency at batch {batch}"])
        if code:
            raise SystemExit(f"prune.py curve failed for {network} ({code})")
    return out / "curve_latency.csv"


def latency_run(demo: Path, network: str, method: str, run: Path, data_root: str, batch: int,
                target: float) -> dict:
    """The stage-1 network of ``run`` pruned to the latency target and finetuned: its report."""
    out = demo / "latency" / network / f"lat{target:g}b{batch}" / method
    if not (out / REPORT).is_file():
        recorded = json.loads((run / "run.json").read_text())
        prune_run(RunRequest(str(demo / "configs" / "prune.yaml"), network=recorded["network"],
                             method=cast(Method, method), metanetwork=recorded["metanetwork"],
                             latency_speed_up=target, latency_batch=batch, out=str(out),
                             data_root=data_root, seed=recorded["seed"],
                             reuse_first_stage=str(run)))
    return json.loads((out / REPORT).read_text())


def values(demo: Path, runs: dict[str, dict[str, Path]], area: tuple[float, float], batch: int,
           target: float) -> dict[str, dict[str, dict[str, float]]]:
    """``{measure: {method: {network: value}}}`` of what has run."""
    out: dict[str, dict[str, dict[str, float]]] = {}

    def put(measure: str, method: str, network: str, value: float) -> None:
        out.setdefault(measure, {}).setdefault(method, {})[network] = value

    for network in runs:
        table = demo / "latency" / network / "curve_latency.csv"
        if table.is_file():
            rows = list(csv.DictReader(table.open()))
            for method in {r["curve"] for r in rows}:
                points = [(float(r["latency_speed_up"]), float(r["accuracy"]))
                          for r in rows if r["curve"] == method]
                put(f"stage-1 val area, latency {area[0]:g}-{area[1]:g}x at batch {batch}", method,
                    network, networks.curve_area(points, *area))
        for method in runs[network]:
            report = demo / "latency" / network / f"lat{target:g}b{batch}" / method / REPORT
            if report.is_file():
                r = json.loads(report.read_text())
                put(f"test acc at latency {target:g}x, batch {batch}", method, network,
                    r["accuracy"]["final"]["test"])
                put(RETIMED, method, network, r["latency_speed_up"]["reached"])
                put(MACS_TAKEN, method, network, r["speed_up"]["reached"])
    return out


def write_table(demo: Path, measured: dict[str, dict[str, dict[str, float]]], batch: int) -> Path:
    """``latency_methods.md`` / ``.json`` under ``<demo>/latency``."""
    held_out = sorted({n for per in measured.values() for m in per.values() for n in m})
    lines = [f"# Accuracy against measured latency at batch {batch} (exploratory)", "",
             "| measure | method | " + " | ".join(held_out) + " |", "|---|---|" + "---|" * len(held_out)]
    for measure, per in measured.items():
        for method, by_network in sorted(per.items()):
            lines.append(f"| {measure} | {method} | " + " | ".join(
                f"{by_network[n]:.4f}" if n in by_network else "" for n in held_out) + " |")
    diffs = paired_differences({k: v for k, v in measured.items() if k not in (RETIMED, MACS_TAKEN)})
    lines += ["", "Paired differences (accuracy points):", "", paired_table(diffs)]
    out = demo / "latency" / "latency_methods.md"
    atomic_write(out, lambda tmp: Path(tmp).write_text("\n".join(lines) + "\n"))
    write_json(out.with_suffix(".json"), {"values": measured, "paired": [
        {"measure": d.measure, "first": d.first, "second": d.second, "differences": d.differences,
         "mean": d.mean, "ci95": d.ci95} for d in diffs]})
    return out


def latency_methods(*, demo: str, data_root: str, latency_batch: PositiveInt = 64,
                    latency_speed_up: PositiveFloat = 1.5, area: tuple[float, float] = (1.2, 1.6),
                    part: Literal["all", "curves", "runs", "table"] = "all") -> int:
    """Time and prune a demo's stage-1 networks to compare the methods in measured latency.

    Args:
        demo: a finished ``prune.py demo`` output folder
        data_root: the demo's image data
        latency_batch: the batch size every latency is timed at
        latency_speed_up: the latency target of the runs
        area: the latency speed-up range of the curves' area
        part: curves, runs, table, or all of them
    """
    root, data_root = Path(demo), str(Path(data_root).resolve())  # as the demo records it
    runs = stage1_runs(root)
    for network, by_method in runs.items():
        if part in ("all", "curves"):
            curves(root, network, by_method, data_root, latency_batch)
        if part in ("all", "runs"):
            for method, run in by_method.items():
                latency_run(root, network, method, run, data_root, latency_batch, latency_speed_up)
    table = write_table(root, values(root, runs, area, latency_batch, latency_speed_up), latency_batch)
    print(table.read_text())
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(latency_methods, argv, prog="latency_methods.py", description=summary(__doc__))


if __name__ == "__main__":
    sys.exit(main())

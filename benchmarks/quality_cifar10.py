"""The paper's claim at CPU scale (issue 6): meta pruning against its baselines on CIFAR-10.

    python benchmarks/quality_cifar10.py --data_root ../shared/data/cifar10-jpeg \
        [--config benchmarks/quality_cifar10.yaml] [--out runs/quality_cifar10]

Runs ``prune.py demo`` with benchmarks/quality_cifar10.yaml (a zoo, meta-training, checkpoint
selection on meta-val members, then every held-out network pruned by every method to every
speed-up; the choices are written in that file). Every cell is a ``prune.py run`` folder with its
``report.json``, so an interrupted benchmark continues where it stopped and a finished cell is
never recomputed. Then it writes, under ``--out``:

* ``quality.md``: test accuracy mean +- std over the held-out networks per method and speed-up,
  with val accuracy, MACs and parameters (and the per-network table);
* ``curves/curve.png`` + ``curve.csv``: the acc-vs-speed-up curves (pruning without finetuning,
  val split) of the first held-out network after each method's stage 1, on one plot.

Nothing here is selected on test data: the metanetwork checkpoint comes from ``select`` (val
curve area of meta-val members), all budgets are fixed in the config.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import prune  # noqa: E402
from pipeline import demo as pipeline_demo  # noqa: E402
from pipeline import run as pipeline_run  # noqa: E402
from pipeline.common import atomic_write  # noqa: E402

HERE = Path(__file__).resolve().parent


def mean_std(values: list[float]) -> str:
    """``mean +- std`` in percent (sample std; ``n=1`` has none)."""
    pct = [100 * v for v in values]
    if len(pct) == 1:
        return f"{pct[0]:.2f}"
    return f"{statistics.mean(pct):.2f} +- {statistics.stdev(pct):.2f}"


def summary_table(reports: dict[str, dict]) -> str:
    """One row per (speed-up, method): accuracies over the held-out networks."""
    cells: dict[tuple[float, str], list[dict]] = {}
    for r in reports.values():
        cells.setdefault((r["speed_up"]["target"], r["method"]), []).append(r)
    lines = ["| speed-up | method | networks | test acc (%) | val acc (%) | test acc before pruning "
             "(%) | reached | MACs | params |", "|---|---|---|---|---|---|---|---|---|"]
    for (target, method), rows in sorted(cells.items()):
        acc = lambda stage, split: [r["accuracy"][stage][split] for r in rows]  # noqa: E731
        reached = [r["speed_up"]["reached"] for r in rows]
        macs = statistics.mean(r["macs"]["after"] for r in rows)
        params = statistics.mean(r["params"]["after"] for r in rows)
        lines.append(f"| {target:g}x | {method} | {len(rows)} | {mean_std(acc('final', 'test'))} "
                     f"| {mean_std(acc('final', 'val'))} | {mean_std(acc('finetuned', 'test'))} "
                     f"| {min(reached):.2f}-{max(reached):.2f}x | {macs / 1e6:.2f}M "
                     f"| {params / 1e3:.1f}k |")
    return "\n".join(lines)


def stage_one_curves(out: Path, cfg: dict, data_root: str) -> Path:
    """Acc-vs-speed-up curves of the first held-out network after each method's stage 1."""
    seed = cfg["demo"]["target_seeds"][0]
    speed_up = cfg["demo"]["speed_ups"][0]
    files, labels = [], []
    for method in cfg["demo"]["methods"]:
        run = out / "prune" / pipeline_demo.run_key(seed, speed_up, method)
        files.append(str(run / pipeline_run.FIRST_STAGE[method] / "network.pt"))
        labels.append(f"{method} (after {pipeline_run.FIRST_STAGE[method]})")
    curves = out / "curves"
    if (curves / "curve.png").is_file():
        return curves
    data = cfg["data"]
    prune.main(["curve", "--network", *files, "--labels", *labels, "--data_root", data_root,
                "--subset", str(data["subset"]), "--max_speed_up", str(1.5 * max(cfg["demo"]["speed_ups"])),
                "--every", "5", "--out", str(curves),
                "--title", f"seed {seed}: val accuracy vs speed-up, no finetuning"])
    return curves


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", required=True, help="CIFAR-10 (e.g. ../shared/data/cifar10-jpeg)")
    parser.add_argument("--config", default=str(HERE / "quality_cifar10.yaml"))
    parser.add_argument("--out", default="runs/quality_cifar10")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out).resolve()
    status = prune.main(["demo", "--config", args.config, "--data_root", args.data_root,
                         "--out", str(out)])
    if status:
        return status
    cfg = pipeline_demo.load_demo_config(args.config)
    results = json.loads((out / pipeline_demo.RESULTS).read_text())
    reports = {k: json.loads(Path(p).read_text()) for k, p in results["reports"].items()}
    curves = stage_one_curves(out, cfg, str(Path(args.data_root).resolve()))
    text = (f"# quality_cifar10: {len(cfg['demo']['target_seeds'])} held-out networks x "
            f"{len(cfg['demo']['methods'])} methods x {len(cfg['demo']['speed_ups'])} speed-ups\n\n"
            f"Test accuracy after pruning and finetuning, mean +- std over the held-out networks "
            f"(seeds {cfg['demo']['target_seeds']}); metanetwork checkpoint "
            f"{Path(results['metanetwork']).name} chosen by `select` on meta-val data.\n\n"
            f"{summary_table(reports)}\n\nPer network:\n\n{results['table']}\n\n"
            f"Curves: {curves / 'curve.png'}\n\nCompute when first run: {results['total_s']:.0f} s "
            f"({', '.join(f'{k} {v:.0f} s' for k, v in results['seconds'].items())})\n")
    atomic_write(out / "quality.md", lambda tmp: Path(tmp).write_text(text))
    print(text)
    print(f"[this call {time.perf_counter() - start:.0f} s] wrote {out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

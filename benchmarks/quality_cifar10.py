"""The paper's claim at CPU scale (issues 6, 13): meta pruning against its baselines, paired.

    python benchmarks/quality_cifar10.py --data_root ../shared/data/cifar10-jpeg \
        [--config benchmarks/quality_cifar10.yaml [benchmarks/quality_view.yaml]] \
        [--out runs/quality_cifar10] \
        [--zoo_seeds 0 1 2 3 4 5] [--target_seeds 100 101 102 103 104] [--speed_ups 2 3] \
        [--methods metanetwork none sparse] [--max_pruning_ratio 0.67] \
        [--meta_epochs 8] [--stage1_epochs 4] [--final_epochs 4]

Runs ``prune.py demo`` with the config (a zoo, meta-training, checkpoint selection on meta-val
members, then every held-out network pruned by every method to every speed-up; the choices
are written in the config, the command-line options override them and the composed config is
kept as ``<out>/benchmark.yaml``). Every cell is a ``prune.py run`` folder with its
``report.json``, so an interrupted benchmark continues where it stopped and a finished cell is
never recomputed. Then it writes, under ``--out``, ``quality.md`` with

* per network and method: the area under the stage-1 network's val accuracy-vs-speed-up curve
  over ``prune.curve_range`` (pruning without finetuning, BN statistics re-estimated at every
  point: the direct measure of "easier to prune") and the final test accuracy at each speed-up;
* paired differences (metanetwork - none, metanetwork - sparse, sparse - none) on both, with
  the mean and a 95% confidence interval over the networks (``pipeline.paired``);
* the time each method costs per pruned network, and the one-time cost of the zoo and
  meta-training;
* ``stage1_curves.png``: the stage-1 curves of the first held-out network, one per method;
* ``paired.png``: the paired differences as a forest plot (each network a dot, the mean on its
  95% interval).

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

import yaml

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import prune  # noqa: E402
from pipeline import demo as pipeline_demo  # noqa: E402
from pipeline import results  # noqa: E402
from pipeline.common import atomic_write, merged  # noqa: E402
from pipeline.paired import paired_table, save_paired_plot  # noqa: E402

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
             "(%) | reached | measured, batch 1 | MACs | params |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for (target, method), rows in sorted(cells.items()):
        acc = lambda stage, split, rows=rows: [r["accuracy"][stage][split] for r in rows]  # noqa: E731
        reached = [r["speed_up"]["reached"] for r in rows]
        measured = [r["speed_up"].get("measured", {}).get("1") for r in rows]
        measured_text = (f"{statistics.mean(measured):.2f}x" if None not in measured else "-")
        macs = statistics.mean(r["macs"]["after"] for r in rows)
        params = statistics.mean(r["params"]["after"] for r in rows)
        lines.append(f"| {target:g}x | {method} | {len(rows)} | {mean_std(acc('final', 'test'))} "
                     f"| {mean_std(acc('final', 'val'))} | {mean_std(acc('finetuned', 'test'))} "
                     f"| {min(reached):.2f}-{max(reached):.2f}x | {measured_text} | {macs / 1e6:.2f}M "
                     f"| {params / 1e3:.1f}k |")
    return "\n".join(lines)


def per_network_table(values: dict[str, dict[str, dict[str, float]]]) -> str:
    """Markdown: one row per (measure, network), one column per method (percent)."""
    methods = sorted({m for per in values.values() for m in per})
    lines = ["| measure | network | " + " | ".join(methods) + " |",
             "|---|---|" + "---|" * len(methods)]
    for measure, per in values.items():
        for net in sorted({n for v in per.values() for n in v}):
            cells = [f"{100 * per[m][net]:.2f}" if net in per.get(m, {}) else "-" for m in methods]
            lines.append(f"| {measure} | {net} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cost_table(reports: dict[str, dict], seconds: dict[str, float]) -> str:
    """Wall time per pruned network and method (stage 1 counted once per network), and the
    one-time costs the metanetwork amortises."""
    per: dict[str, dict[str, float]] = {}
    for key, r in reports.items():
        network = results.network_of(key)
        per.setdefault(r["method"], {}).setdefault(network, 0.0)
        per[r["method"]][network] += r["time_s"]
    lines = ["| method | seconds per network (all targets, mean) |", "|---|---|"]
    lines += [f"| {m} | {statistics.fmean(v.values()):.0f} |" for m, v in sorted(per.items())]
    once = {k: v for k, v in seconds.items() if k.startswith(("zoo ", "meta", "select"))}
    zoo_time = sum(v for k, v in once.items() if k.startswith('zoo'))
    if once:  # a benchmark of the baselines alone trains no metanetwork
        lines.append(f"\nOne-time (metanetwork only): zoo {zoo_time:.0f} s, "
                     f"meta-training {once.get('meta-train', 0):.0f} s, "
                     f"selection {once.get('select', 0):.0f} s")
    return "\n".join(lines)


def chosen(metanetwork: str | None) -> str:
    """Where the metanetwork came from (a benchmark of the baselines alone has none)."""
    if metanetwork is None:
        return "No metanetwork (baselines only)."
    return f"Metanetwork checkpoint {Path(metanetwork).name} chosen by `select` on meta-val data."


def merge_configs(names: list[str]) -> dict:
    """Benchmark configs merged in order (an experiment file holds only its differences from
    the one before it), stage-config paths made absolute (each is relative to the file that
    names it)."""
    cfg: dict = {}
    for name in names:
        path = Path(name).resolve()
        if not path.is_file():
            raise SystemExit(f"error: benchmark config {name}: no such file")
        layer = yaml.safe_load(path.read_text()) or {}
        configs = (layer.get("demo") or {}).get("configs")
        if configs:
            layer["demo"]["configs"] = {k: str((path.parent / v).resolve()) for k, v in configs.items()}
        cfg = merged(cfg, layer)
    return cfg


def write_config(cfg: dict, out: Path) -> Path:
    """``<out>/benchmark.yaml`` (rewritten only when its content changes)."""
    composed = out / "benchmark.yaml"
    text = yaml.safe_dump(cfg, sort_keys=False)
    if not composed.is_file() or composed.read_text() != text:
        atomic_write(composed, lambda tmp: Path(tmp).write_text(text))
    return composed


def compose_config(args: argparse.Namespace, out: Path) -> Path:
    """The benchmark configs merged in order with the command-line overrides, written to
    ``<out>/benchmark.yaml``."""
    cfg = merge_configs(args.config)
    demo = cfg["demo"]
    for key in ("zoo_seeds", "target_seeds", "speed_ups", "methods"):
        if getattr(args, key) is not None:
            demo[key] = getattr(args, key)
    epochs = {("meta", "trainer"): args.meta_epochs,
              ("prune", "finetune", "trainer"): args.stage1_epochs,
              ("prune", "final", "trainer"): args.final_epochs}
    for keys, value in epochs.items():
        if value is not None:
            node = cfg
            for key in keys:
                if not isinstance(node.get(key), dict):
                    node[key] = {}
                node = node[key]
            node["max_epochs"] = value
    if args.max_pruning_ratio is not None:
        cfg.setdefault("prune", {}).setdefault("prune", {})["max_pruning_ratio"] = args.max_pruning_ratio
    return write_config(cfg, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", required=True, help="CIFAR-10 (e.g. ../shared/data/cifar10-jpeg)")
    parser.add_argument("--config", nargs="+", default=[str(HERE / "quality_cifar10.yaml")],
                        help="benchmark configs, merged in order (e.g. quality_cifar10.yaml "
                             "quality_view.yaml)")
    parser.add_argument("--out", default="runs/quality_cifar10")
    parser.add_argument("--zoo_seeds", type=int, nargs="+", help="meta-training zoo seeds")
    parser.add_argument("--target_seeds", type=int, nargs="+", help="held-out networks' seeds")
    parser.add_argument("--speed_ups", type=float, nargs="+", help="targets, e.g. 2 3")
    parser.add_argument("--methods", nargs="+", choices=list(pipeline_demo.METHODS),
                        help="methods to run (without metanetwork: no zoo, no meta-training)")
    parser.add_argument("--max_pruning_ratio", type=float,
                        help="per-layer cap of stage 2 and the curves (prune.max_pruning_ratio)")
    parser.add_argument("--meta_epochs", type=int, help="meta-training epochs")
    parser.add_argument("--stage1_epochs", type=int, help="epochs of each method's stage 1")
    parser.add_argument("--final_epochs", type=int, help="finetune epochs after pruning")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    out = Path(args.out).resolve()
    config = compose_config(args, out)
    status = prune.main(["demo", "--config", str(config), "--data_root", args.data_root,
                         "--out", str(out)])
    if status:
        return status
    cfg = pipeline_demo.load_demo_config(config)
    results = json.loads((out / pipeline_demo.RESULTS).read_text())
    reports = {k: json.loads(Path(p).read_text()) for k, p in results["reports"].items()}
    values = results.measures(reports)
    demo = cfg.demo
    curves = pipeline_demo.stage1_overlay(out, demo, reports)
    diffs = results.paired_differences(values)
    forest = ""  # a benchmark of one method pairs nothing
    if diffs:
        save_paired_plot(diffs, out / "paired.png", f"{len(demo.target_seeds)} held-out networks: "
                         "paired differences per network")
        forest = "![paired differences](paired.png)\n\n"
    text = (f"# quality_cifar10: {len(demo.target_seeds)} held-out networks x "
            f"{len(demo.methods)} methods x {len(demo.speed_ups)} speed-ups\n\n"
            f"Held-out networks (seeds {demo.target_seeds}), never meta-trained on. "
            f"{chosen(results['metanetwork'])} Config: {config}\n\n"
            f"## Paired differences (first - second, percentage points)\n\n"
            f"{paired_table(diffs)}\n\n{forest}"
            f"## Per network (%)\n\n{per_network_table(values)}\n\n"
            f"## Mean +- std per method\n\n{summary_table(reports)}\n\n"
            f"## Cost\n\n{cost_table(reports, results['seconds'])}\n\n"
            f"Curves: {curves}\n\nCompute when first run: {results['total_s']:.0f} s "
            f"({', '.join(f'{k} {v:.0f} s' for k, v in results['seconds'].items())})\n")
    atomic_write(out / "quality.md", lambda tmp: Path(tmp).write_text(text))
    print(text)
    print(f"[this call {time.perf_counter() - start:.0f} s] wrote {out / 'quality.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Quality studies on CIFAR-10 (issues 6, 13, 30): the paired benchmark of meta pruning against
its baselines, and what is done with its runs afterwards, one subcommand each.

    python benchmarks/quality.py run --data_root ../shared/data/cifar10-jpeg \
        [--config [benchmarks/quality_cifar10.yaml,benchmarks/quality_view.yaml]] \
        [--out runs/quality_cifar10] [--zoo_seeds [0,1,2,3,4,5]] \
        [--target_seeds [100,101,102,103,104]] [--speed_ups [2,3]] \
        [--methods [metanetwork,none,sparse]] [--max_pruning_ratio 0.67] \
        [--meta_epochs 8] [--stage1_epochs 4] [--final_epochs 4]
    python benchmarks/quality.py variant --benchmark runs/quality_cifar10 \
        --metanetwork runs/variants/paper_dense/selection/best.ckpt --out runs/variants/paper_dense
    python benchmarks/quality.py rerun --runs runs/quality_fresh/prune --max_pruning_ratio 0.67 \
        --methods [none,sparse] --out runs/capped/quality_fresh
    python benchmarks/quality.py pool --runs [runs/quality_cifar10/prune,runs/quality_confirm/prune] \
        --variant [metanetwork=runs/variants/paper_distill/prune] [--out pooled.md] [--plot pooled.png]
    python benchmarks/quality.py widths --runs [runs/quality_cifar10/prune,runs/quality_confirm/prune]

``run`` is the benchmark (``quality.md`` and its plots); ``variant`` prunes the same held-out
networks with another metanetwork; ``rerun`` runs a benchmark's runs again under a per-layer
cap; ``pool`` pairs the runs of several benchmark folders at once; ``widths`` tabulates how far
stage 2 narrowed each layer. Every pruning is a ``prune.py run`` folder
``<out>/prune/seed<N>/<S>x/<method>/`` (``pipeline.results``), so each subcommand is resumable
cell by cell and reads the others' folders. Nothing here is selected on test data; each
subcommand's docstring says what it writes.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from jsonargparse.typing import PositiveInt

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import prune
from metaprune.errors import UserError
from pipeline import demo as pipeline_demo
from pipeline import demo_results, results
from pipeline.command_line import cli, summary
from pipeline.common import atomic_write, merged
from pipeline.config_files import load_config_file
from pipeline.options import Method, PruningCap, SpeedUp
from pipeline.paired import paired, paired_table, save_paired_plot
from pipeline.run import RUN_FILE, RunRequest, prune_run

HERE = Path(__file__).resolve().parent
VARIANT = "variant"  # the method name of a variant's runs


@dataclass(kw_only=True)
class Recipe:
    """Benchmark configs and the data they run on.

    Args:
        data_root: CIFAR-10 (e.g. ../shared/data/cifar10-jpeg)
        config: benchmark configs, merged in order (e.g. [quality_cifar10.yaml,quality_view.yaml])
    """

    data_root: str
    config: list[str] = field(default_factory=lambda: [str(HERE / "quality_cifar10.yaml")])


@dataclass(kw_only=True)
class Benchmark(Recipe):
    """The quality benchmark: the configs' choices, overridden by the options given.

    Args:
        out: output folder
        zoo_seeds: meta-training zoo seeds
        target_seeds: held-out networks' seeds
        speed_ups: targets, e.g. [2,3]
        methods: methods to run (without metanetwork: no zoo, no meta-training)
        max_pruning_ratio: per-layer cap of stage 2 and the curves (prune.max_pruning_ratio)
        meta_epochs: meta-training epochs
        stage1_epochs: epochs of each method's stage 1
        final_epochs: finetune epochs after pruning
    """

    out: str = "runs/quality_cifar10"
    zoo_seeds: list[int] | None = None
    target_seeds: list[int] | None = None
    speed_ups: list[SpeedUp] | None = None
    methods: list[Method] | None = None
    max_pruning_ratio: PruningCap | None = None
    meta_epochs: PositiveInt | None = None
    stage1_epochs: PositiveInt | None = None
    final_epochs: PositiveInt | None = None


# ---------------------------------------------------------------------------------------------
# configs (shared with registered.py and tune_baselines.py)


def merge_configs(names: list[str]) -> dict:
    """Benchmark configs merged in order (an experiment file holds only its differences from
    the one before it), stage-config paths made absolute (each is relative to the file that
    names it)."""
    cfg: dict = {}
    for name in names:
        path = Path(name).resolve()
        if not path.is_file():
            raise SystemExit(f"error: benchmark config {name}: no such file")
        layer = load_config_file(path) or {}
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


def compose_config(bench: Benchmark, out: Path) -> Path:
    """The benchmark configs merged in order with the command-line overrides, written to
    ``<out>/benchmark.yaml``."""
    cfg = merge_configs(bench.config)
    demo = cfg["demo"]
    for key in ("zoo_seeds", "target_seeds", "speed_ups", "methods"):
        if getattr(bench, key) is not None:
            demo[key] = getattr(bench, key)
    epochs = {("meta", "trainer"): bench.meta_epochs,
              ("prune", "finetune", "trainer"): bench.stage1_epochs,
              ("prune", "final", "trainer"): bench.final_epochs}
    for keys, value in epochs.items():
        if value is not None:
            node = cfg
            for key in keys:
                if not isinstance(node.get(key), dict):
                    node[key] = {}
                node = node[key]
            node["max_epochs"] = value
    if bench.max_pruning_ratio is not None:
        cfg.setdefault("prune", {}).setdefault("prune", {})["max_pruning_ratio"] = bench.max_pruning_ratio
    return write_config(cfg, out)


# ---------------------------------------------------------------------------------------------
# run: the benchmark's tables


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


def run(bench: Benchmark) -> int:
    """The paper's claim at CPU scale: meta pruning against its baselines, paired.

    Runs ``prune.py demo`` with the config (a zoo, meta-training, checkpoint selection on
    meta-val members, then every held-out network pruned by every method to every speed-up;
    the choices are written in the config, the options override them and the composed config is
    kept as ``<out>/benchmark.yaml``). An interrupted benchmark continues where it stopped and a
    finished cell is never recomputed. Then it writes, under ``--out``, ``quality.md`` with

    * per network and method: the area under the stage-1 network's accuracy-vs-speed-up curve
      over ``prune.curve_range`` (pruning without finetuning, BN statistics re-estimated at
      every point: the direct measure of "easier to prune") and the final test accuracy at
      each speed-up;
    * paired differences (metanetwork - none, metanetwork - sparse, sparse - none) on both,
      with the mean and a 95% confidence interval over the networks (``pipeline.paired``);
    * the time each method costs per pruned network, and the one-time cost of the zoo and
      meta-training;
    * ``stage1_curves.png``: the stage-1 curves of the first held-out network, one per method;
    * ``paired.png``: the paired differences as a forest plot (each network a dot, the mean on
      its 95% interval).

    The metanetwork checkpoint comes from ``select`` (val curve area of meta-val members), all
    budgets are fixed in the config.
    """
    start = time.perf_counter()
    out = Path(bench.out).resolve()
    config = compose_config(bench, out)
    status = prune.main(["demo", "--config", str(config), "--data_root", bench.data_root,
                         "--out", str(out)])
    if status:
        return status
    cfg = pipeline_demo.load_demo_config(config)
    written = json.loads((out / demo_results.RESULTS).read_text())
    reports = {k: json.loads(Path(p).read_text()) for k, p in written["reports"].items()}
    values = results.measures(reports)
    demo = cfg.demo
    curves = demo_results.stage1_overlay(out, demo, reports)
    diffs = results.paired_differences(values)
    forest = ""  # a benchmark of one method pairs nothing
    if diffs:
        save_paired_plot(diffs, out / "paired.png", f"{len(demo.target_seeds)} held-out networks: "
                         "paired differences per network")
        forest = "![paired differences](paired.png)\n\n"
    text = (f"# quality_cifar10: {len(demo.target_seeds)} held-out networks x "
            f"{len(demo.methods)} methods x {len(demo.speed_ups)} speed-ups\n\n"
            f"Held-out networks (seeds {demo.target_seeds}), never meta-trained on. "
            f"{chosen(written['metanetwork'])} Config: {config}\n\n"
            f"## Paired differences (first - second, percentage points)\n\n"
            f"{paired_table(diffs)}\n\n{forest}"
            f"## Per network (%)\n\n{per_network_table(values)}\n\n"
            f"## Mean +- std per method\n\n{summary_table(reports)}\n\n"
            f"## Cost\n\n{cost_table(reports, written['seconds'])}\n\n"
            f"Curves: {curves}\n\nCompute when first run: {written['total_s']:.0f} s "
            f"({', '.join(f'{k} {v:.0f} s' for k, v in written['seconds'].items())})\n")
    atomic_write(out / "quality.md", lambda tmp: Path(tmp).write_text(text))
    print(text)
    print(f"[this call {time.perf_counter() - start:.0f} s] wrote {out / 'quality.md'}")
    return 0


# ---------------------------------------------------------------------------------------------
# variant and rerun: more prune runs on a benchmark's networks


def variant(*, benchmark: str, metanetwork: str, out: str, target_seeds: list[int] | None = None) -> int:
    """A metanetwork variant on the benchmark's held-out networks, paired with its baselines.

    Prunes every held-out network of a finished (or running) ``run`` folder with ``--method
    metanetwork`` and this metanetwork, to every speed-up, with the benchmark's own prune config
    (same budgets, same seeds), each cell a ``prune.py run`` folder under ``<out>/prune``. Then
    writes ``<out>/variant.md``: the paired differences of this variant against the benchmark's
    ``none``, ``sparse`` and ``metanetwork`` runs on the same networks (stage-1 curve area and
    final test accuracy, 95% CI; ``pipeline.paired``), and ``<out>/variant.png``, their forest
    plot. The variant's metanetwork should be selected as the benchmark's is (``prune.py
    select`` on the meta-val members), never on these networks.

    Args:
        benchmark: a ``quality.py run`` --out folder
        metanetwork: the variant's selected checkpoint
        out: output folder of this variant
        target_seeds: prune only these of the benchmark's held-out networks (e.g. two processes
            on disjoint halves use two cores); the table pairs whatever has finished
    """
    bench, folder = Path(benchmark).resolve(), Path(out).resolve()
    demo = json.loads((bench / pipeline_demo.DEMO_FILE).read_text())["demo"]
    unknown = sorted(set(target_seeds or []) - set(demo["target_seeds"]))
    if unknown:
        raise UserError(f"--target_seeds {unknown} are not held-out networks of {bench} "
                        f"(it has {demo['target_seeds']})")
    config = bench / "configs" / "prune.yaml"
    for seed in target_seeds or demo["target_seeds"]:
        network = bench / "target" / "members" / f"seed{seed}.pt"
        first = None
        for speed_up in demo["speed_ups"]:
            key = results.run_key(seed, speed_up, VARIANT)
            run_dir = folder / "prune" / key
            prune_run(RunRequest(str(config), network=str(network), method="metanetwork",
                                 metanetwork=str(Path(metanetwork).resolve()),
                                 speed_up=speed_up, out=str(run_dir),
                                 reuse_first_stage=str(first) if first else None))
            first = first or run_dir
    reports = results.read_reports(folder / "prune", VARIANT)  # this call's runs and others'
    reports.update(results.read_reports(bench / "prune"))
    values = results.measures(reports)
    diffs = [paired(per, VARIANT, other, measure) for measure, per in values.items()
             for other in ("none", "sparse", "metanetwork") if other in per and VARIANT in per]
    text = (f"# variant {metanetwork} on {bench}\n\nPaired differences (variant - "
            f"baseline, percentage points) over the held-out networks {demo['target_seeds']}:"
            f"\n\n{paired_table(diffs)}\n")
    atomic_write(folder / "variant.md", lambda tmp: Path(tmp).write_text(text))
    save_paired_plot(diffs, folder / "variant.png", f"{Path(metanetwork).name} on {bench.name}: "
                     "variant - baseline per network")
    print(text)
    return 0


def capped_config(settings: dict, cap: float, folder: Path) -> Path:
    """The run's stored config (run.json) with ``prune.max_pruning_ratio``, as a prune.yaml in
    ``folder`` named by its content (runs that share a config share the file)."""
    config = json.loads(json.dumps(settings["config"]))
    config["prune"]["max_pruning_ratio"] = cap
    text = yaml.safe_dump(config, sort_keys=True)
    path = folder / f"prune-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    if not path.is_file():
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def rerun(*, runs: str, max_pruning_ratio: PruningCap, out: str,
          methods: list[str] | None = None) -> int:
    """A benchmark's runs again with a per-layer pruning cap, stage 1 reused.

    Every finished run under ``--runs`` (``seed<N>/<S>x/<method>/``, as ``run`` and
    ``variant`` write them) runs again with its own stored settings plus
    ``prune.max_pruning_ratio``, taking stage 1 from the original run (``--reuse_first_stage``):
    the same network, stage 1, budgets and seeds; only stage 2's pruning and the curves change.
    The runs mirror ``--runs`` under ``<out>/prune``; pool them with ``pool`` as any
    benchmark folder.

    Args:
        runs: a benchmark's prune/ folder
        max_pruning_ratio: the per-layer cap of stage 2 and the curves, in (0, 1]
        out: output folder
        methods: run folders to redo (e.g. [none,sparse,variant]); default all
    """
    source_root, folder = Path(runs).resolve(), Path(out).resolve()
    done = [d for d in results.run_folders(source_root) if methods is None or d.name in methods]
    if not done:
        raise UserError(f"--runs {runs!r} holds no finished run" + (f" of {methods}" if methods else ""))
    for i, source in enumerate(done, 1):
        settings = json.loads((source / RUN_FILE).read_text())
        rel = source.relative_to(source_root)
        print(f"[{i}/{len(done)}] {rel}", file=sys.stderr)
        prune_run(RunRequest(str(capped_config(settings, max_pruning_ratio, folder / "configs")),
                             network=settings["network"], method=settings["method"],
                             metanetwork=settings["metanetwork"], speed_up=settings["speed_up"],
                             seed=settings["seed"], out=str(folder / "prune" / rel),
                             reuse_first_stage=str(source)))
    return 0


# ---------------------------------------------------------------------------------------------
# pool and widths: tables over finished runs


def pool(*, runs: list[str], variant: list[str] | None = None, out: str | None = None,
         plot: str | None = None) -> int:
    """Paired differences over the held-out networks of several benchmark folders at once.

    Every ``<folder>/seed<N>/<S>x/<method>/report.json`` under ``--runs`` counts, keyed by
    network and method; ``--variant [METHOD=FOLDER]`` makes the runs in FOLDER (``variant``'s
    ``<out>/prune``, whose method is ``variant``) stand for METHOD, replacing that method's
    runs of the same networks. Networks must be held out of meta-training in every folder;
    nothing here is selected, it only pools what was run. Prints and optionally writes the
    paired table and its forest plot (each network a dot, the mean on its 95% interval).

    Args:
        runs: prune/ folders of benchmarks
        variant: METHOD=FOLDER: runs that stand for METHOD (replacing its runs of the same
            networks)
        out: also write the table to this markdown file
        plot: also draw the differences into this PNG
    """
    reports: dict[str, dict] = {}
    for folder in runs:
        reports.update(results.read_reports(Path(folder)))
    for spec in variant or []:
        method, _, folder = spec.partition("=")
        if not folder:
            raise UserError(f"--variant {spec!r}: write METHOD=FOLDER")
        reports = {k: r for k, r in reports.items() if r["method"] != method
                   or not (Path(folder) / k.rsplit("/", 1)[0]).is_dir()}
        reports.update(results.read_reports(Path(folder), method))
    networks = sorted({results.network_of(k) for k in reports})
    diffs = results.paired_differences(results.measures(reports))
    text = f"Held-out networks: {', '.join(networks)} ({len(reports)} runs)\n\n{paired_table(diffs)}\n"
    if out:
        atomic_write(Path(out), lambda tmp: Path(tmp).write_text(text))
    if plot:
        save_paired_plot(diffs, plot, f"held-out networks {networks[0]}-{networks[-1]} "
                         f"({len(networks)}), paired differences")
    print(text)
    return 0


def layer_widths(path: str | Path) -> list[int]:
    """Output widths of the network file's Conv2d and Linear layers, in module order."""
    import torch

    import networks

    net = networks.load_network(path)[0]
    return [m.out_channels if isinstance(m, torch.nn.Conv2d) else m.out_features
            for m in net.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]


def narrowest(run_dir: Path) -> tuple[float, float]:
    """(the narrowest layer's kept fraction, final test accuracy) of one finished run."""
    report = json.loads((run_dir / "report.json").read_text())
    stages = report["files"]["stages"]
    kept = min(a / b for a, b in zip(layer_widths(stages["final"]), layer_widths(stages["finetuned"])))
    return kept, report["accuracy"]["final"]["test"]


def widths(*, runs: list[str]) -> int:
    """How far stage 2 narrowed each layer, against final accuracy, over benchmark runs.

    For every finished run ``seed<N>/<S>x/<method>/`` under ``--runs``: the narrowest layer's
    kept fraction (output channels of the final network over those of the stage-1 network it
    was pruned from, over every Conv2d and Linear) and the final test accuracy; per target, the
    quantiles of that fraction, the share of runs with a layer under a third of its width, and
    the correlation of the fraction with final accuracy. Global ranking can empty single layers
    (docs/pruning.md, "The per-layer cap"); this measures how often it does and what it costs.

    Args:
        runs: prune/ folders of benchmarks
    """
    import numpy as np

    rows: dict[str, list[tuple[str, float, float]]] = {}
    for folder in runs:
        for run_dir in results.run_folders(folder):
            kept, acc = narrowest(run_dir)
            cell = f"{run_dir.parts[-3]}/{run_dir.name}"
            rows.setdefault(run_dir.parent.name, []).append((cell, kept, acc))
    print("| target | runs | narrowest layer kept: min / q10 / median / q90 | runs with a layer "
          "under 1/3 | correlation with final test acc |\n|---|---|---|---|---|")
    for target, cells in sorted(rows.items()):
        kept = np.array([c[1] for c in cells])
        accs = np.array([c[2] for c in cells])
        q = np.quantile(kept, [0, 0.1, 0.5, 0.9])
        print(f"| {target} | {len(cells)} | {' / '.join(f'{v:.2f}' for v in q)} | "
              f"{(kept < 1 / 3).mean():.0%} | {np.corrcoef(kept, accs)[0, 1]:+.2f} |")
    return 0


COMMANDS = {"run": run, "variant": variant, "rerun": rerun, "pool": pool, "widths": widths}


def main(argv: list[str] | None = None) -> int:
    return cli(COMMANDS, argv, prog="quality.py", description=summary(__doc__))


if __name__ == "__main__":
    sys.exit(main())

"""The baselines' tuning budget: the finetune learning rate every method shares, and ``sparse``'s
regularizer, chosen on tuning networks by validation data only.

    python benchmarks/tune_baselines.py --data_root ../shared/data/cifar10-jpeg \
        --config benchmarks/quality_cifar10.yaml benchmarks/quality_view.yaml \
        --seeds 100 101 102 --out runs/tune_baselines [--part targets|lr|sparse|table]

Two searches on the same tuning networks (seeds that earlier metanetwork variants were chosen
on, never a confirmatory network), each cell a ``prune.py run`` folder (resumable):

* ``lr``: the learning rate of stage 1 and stage 2 (shared by every method: the finetunes are
  the same code), run with ``none`` at every speed-up of the config; score = the final val
  accuracy, averaged over networks and speed-ups.
* ``sparse``: DepGraph sparse training's ``reg`` and ``alpha`` on a grid an order of magnitude
  around the shipped values (``alpha`` below 1 would invert the adaptive weighting, so the grid
  starts at 1), at the config's learning rate and the first speed-up; score = the val area of
  the stage-1 curve, the rule by which ``prune.py select`` picks a metanetwork checkpoint (the
  final val accuracy is shown beside it).

``--part`` runs one search (two processes use two cores; ``targets`` trains the tuning
networks first, so that the two searches do not train them twice) and ``table`` (also the
default after a search) writes ``<out>/tuning.md`` and ``tuning.json``: every value tried with
its val scores, and the chosen ones. No test image is read by any choice here.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
from pathlib import Path

import yaml

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import quality_cifar10  # noqa: E402

from pipeline import demo as pipeline_demo  # noqa: E402
from pipeline.common import atomic_write, merged, write_json  # noqa: E402
from pipeline.run import REPORT, RunRequest, prune_run  # noqa: E402
from pipeline.zoo import zoo_member  # noqa: E402

LRS = (0.003, 0.01, 0.03)
REGS = (5e-5, 5e-4, 5e-3)
ALPHAS = (1.0, 4.0, 16.0)
# Tuning runs measure val only: no latency timing, no ONNX check, the stage-1 curve on val.
TUNING = {"stage1_curve_split": "val", "latency_batch_sizes": [], "onnx": False}


@dataclasses.dataclass(frozen=True)
class Cell:
    """One tuning setting: ``method`` with the stage learning rate and sparse's regularizer."""

    method: str
    lr: float
    reg: float | None = None
    alpha: float | None = None

    @property
    def name(self) -> str:
        extra = f"_reg{self.reg:g}_alpha{self.alpha:g}" if self.method == "sparse" else ""
        return f"{self.method}_lr{self.lr:g}{extra}"

    def overrides(self) -> dict:
        """The prune config's differences for this cell."""
        lr = {"model": {"init_args": {"lr": self.lr}}}
        prune = dict(TUNING)
        if self.method == "sparse":
            prune.update(reg=self.reg, alpha=self.alpha)
        return {"prune": prune, "finetune": lr, "final": lr}


def stage_lr(prune_cfg: dict) -> float:
    """The learning rate the benchmark's prune config gives stage 1."""
    return float(prune_cfg["finetune"]["model"]["init_args"]["lr"])


def grid(part: str, shipped_lr: float) -> list[Cell]:
    """The cells of one search."""
    if part == "lr":
        return [Cell("none", lr) for lr in LRS]
    return [Cell("sparse", shipped_lr, reg, alpha) for reg in REGS for alpha in ALPHAS]


def setup(args: argparse.Namespace, out: Path) -> tuple[pipeline_demo.DemoConfig, dict[str, Path], dict]:
    """The benchmark's stage configs under ``<out>/configs`` (as the demo writes them)."""
    composed = quality_cifar10.write_config(quality_cifar10.merge_configs(args.config), out)
    cfg = pipeline_demo.load_demo_config(composed)  # its target seeds are not used here
    stages, configs = pipeline_demo.demo_folder(cfg, out, pipeline_demo.demo_data(args.data_root)[0])
    return cfg, configs, stages


def run_cell(cell: Cell, seed: int, speed_ups: list[float], configs: dict[str, Path],
             stages: dict, out: Path) -> list[dict]:
    """Every speed-up of one cell on one tuning network (stage 1 shared); their reports."""
    config = out / "configs" / f"prune_{cell.name}.yaml"
    text = yaml.safe_dump(merged(stages["prune"], cell.overrides()), sort_keys=False)
    if not config.is_file() or config.read_text() != text:
        atomic_write(config, lambda tmp: Path(tmp).write_text(text))
    network = out / "target" / "members" / f"seed{seed}.pt"
    reports, first = [], None
    for speed_up in speed_ups:
        run = out / "prune" / cell.name / f"seed{seed}" / f"{speed_up:g}x"
        prune_run(RunRequest(str(config), network=str(network), method=cell.method,
                             speed_up=speed_up, out=str(run),
                             reuse_first_stage=str(first) if first else None))
        reports.append(json.loads((run / REPORT).read_text()))
        first = first or run
    return reports


def scores(cell: Cell, reports: dict[int, list[dict]]) -> dict:
    """A cell's val scores over the tuning networks (means), per network too."""
    area = {s: r[0]["stage1_curve"]["area"] for s, r in reports.items()}
    final = {s: statistics.fmean(x["accuracy"]["final"]["val"] for x in r) for s, r in reports.items()}
    return {"cell": dataclasses.asdict(cell), "name": cell.name,
            "stage1_val_area": statistics.fmean(area.values()),
            "final_val_acc": statistics.fmean(final.values()),
            "per_network": {str(s): {"stage1_val_area": area[s], "final_val_acc": final[s]} for s in reports}}


def table(rows: list[dict], key: str, title: str) -> str:
    """Markdown: every cell tried, its val scores, the chosen one (highest ``key``) in bold."""
    best = max(rows, key=lambda r: r[key])
    lines = [f"### {title} (chosen by {key})", "",
             "| cell | stage-1 val curve area (%) | final val acc (%) | per network (area / acc) |",
             "|---|---|---|---|"]
    for r in rows:
        name = f"**{r['name']}**" if r is best else r["name"]
        per = "; ".join(f"{s}: {100 * v['stage1_val_area']:.2f} / {100 * v['final_val_acc']:.2f}"
                        for s, v in r["per_network"].items())
        lines.append(f"| {name} | {100 * r['stage1_val_area']:.2f} "
                     f"| {100 * r['final_val_acc']:.2f} | {per} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data_root", required=True, help="CIFAR-10 (e.g. ../shared/data/cifar10-jpeg)")
    parser.add_argument("--config", nargs="+", default=[str(quality_cifar10.HERE / "quality_cifar10.yaml")],
                        help="benchmark configs, merged in order")
    parser.add_argument("--seeds", type=int, nargs="+", default=[100, 101, 102],
                        help="tuning networks (never a confirmatory network)")
    parser.add_argument("--out", default="runs/tune_baselines")
    parser.add_argument("--part", choices=("targets", "lr", "sparse", "table"), default=None,
                        help="one step only (default: all of them in one process)")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    cfg, configs, stages = setup(args, out)
    for seed in args.seeds:
        if args.part in (None, "targets"):
            zoo_member(configs["zoo"], seed=seed, zoo_dir=str(out / "target"))
    shipped_lr = stage_lr(stages["prune"])
    results: dict[str, list[dict]] = {}
    for part, speed_ups in (("lr", cfg.demo.speed_ups), ("sparse", cfg.demo.speed_ups[:1])):
        run_it = args.part in (None, part)
        rows = []
        for cell in grid(part, shipped_lr):
            done = {s: run_cell(cell, s, speed_ups, configs, stages, out) for s in args.seeds
                    if run_it or all((out / "prune" / cell.name / f"seed{s}" / f"{x:g}x" / REPORT).is_file()
                                     for x in speed_ups)}
            if len(done) == len(args.seeds):
                rows.append(scores(cell, done))
        results[part] = rows
    if args.part not in (None, "table"):
        return 0
    parts = [("lr", "final_val_acc", "Finetune learning rate, shared by every method (none)"),
             ("sparse", "stage1_val_area", "Sparse training's reg and alpha")]
    text = "\n\n".join(table(results[p], key, title) for p, key, title in parts if results[p])
    chosen = {p: max(results[p], key=lambda r: r[key])["cell"] for p, key, _ in parts if results[p]}
    write_json(out / "tuning.json", {"seeds": args.seeds, "rows": results, "chosen": chosen})
    atomic_write(out / "tuning.md", lambda tmp: Path(tmp).write_text(
        f"# Baseline tuning on networks {args.seeds} (val only)\n\n{text}\n"))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The baselines' tuning budget: the finetune learning rate every method shares, and ``sparse``'s
regularizer, chosen on tuning networks by validation data only.

    python benchmarks/tune_baselines.py --data_root ../shared/data/cifar10-jpeg \
        --config [benchmarks/quality_cifar10.yaml,benchmarks/quality_view.yaml] \
        --seeds [100,101,102] --out runs/tune_baselines [--part targets|lr|sparse|table]

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

When a choice lies on the edge of its grid, the grid is extended beyond it, one grid step at a
time and at most twice (``--lrs``, ``--regs``, ``--alphas``); sparse is searched again at the
learning rate the first search chose (``--sparse_lr``), around its best cell. The table holds
every cell that has run on every tuning network.

``--part`` runs one search (two processes use two cores; ``targets`` trains the tuning
networks first, so that the two searches do not train them twice) and ``table`` (also the
default after a search) writes ``<out>/tuning.md`` and ``tuning.json``: every value tried with
its val scores, and the chosen ones. No test image is read by any choice here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Literal

import yaml
from jsonargparse.typing import NonNegativeFloat, PositiveFloat

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import quality

from pipeline import demo as pipeline_demo
from pipeline.command_line import cli, summary
from pipeline.common import atomic_write, merged, write_json
from pipeline.options import ZooOptions
from pipeline.run import REPORT, RunRequest, prune_run
from pipeline.zoo import zoo_member

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

    @classmethod
    def parse(cls, name: str) -> "Cell":
        """The cell of a folder name (``name``'s inverse)."""
        m = re.fullmatch(r"(none|sparse)_lr([^_]+)(?:_reg([^_]+)_alpha([^_]+))?", name)
        if m is None:
            raise ValueError(f"{name!r} is not a tuning cell's folder")
        method, lr, reg, alpha = m.groups()
        return cls(method, float(lr), *(None if v is None else float(v) for v in (reg, alpha)))

    def overrides(self) -> dict:
        """The prune config's differences for this cell."""
        lr = {"model": {"init_args": {"lr": self.lr}}}
        prune = dict(TUNING)
        if self.method == "sparse":
            prune.update(reg=self.reg, alpha=self.alpha)
        return {"prune": prune, "finetune": lr, "final": lr}


@dataclasses.dataclass(kw_only=True)
class Tuning(quality.Recipe):
    """The two searches and where they run.

    Args:
        seeds: tuning networks (never a confirmatory network)
        out: output folder
        part: one step only (default: all of them in one process)
        lrs: learning rates tried with none
        regs: sparse's reg values
        alphas: sparse's alpha values
        sparse_lr: the learning rate of the sparse search (default the config's)
    """

    seeds: list[int] = dataclasses.field(default_factory=lambda: [100, 101, 102])
    out: str = "runs/tune_baselines"
    part: Literal["targets", "lr", "sparse", "table"] | None = None
    lrs: list[PositiveFloat] = dataclasses.field(default_factory=lambda: list(LRS))
    regs: list[NonNegativeFloat] = dataclasses.field(default_factory=lambda: list(REGS))
    alphas: list[PositiveFloat] = dataclasses.field(default_factory=lambda: list(ALPHAS))
    sparse_lr: PositiveFloat | None = None


def stage_lr(prune_cfg: dict) -> float:
    """The learning rate the benchmark's prune config gives stage 1."""
    return float(prune_cfg["finetune"]["model"]["init_args"]["lr"])


def grid(part: str, tuning: Tuning, shipped_lr: float) -> list[Cell]:
    """The cells of one search (``sparse`` at ``--sparse_lr``, default the config's rate)."""
    if part == "lr":
        return [Cell("none", lr) for lr in tuning.lrs]
    lr = tuning.sparse_lr or shipped_lr
    return [Cell("sparse", lr, reg, alpha) for reg in tuning.regs for alpha in tuning.alphas]


def setup(tuning: Tuning, out: Path) -> tuple[pipeline_demo.DemoConfig, dict[str, Path], dict]:
    """The benchmark's stage configs under ``<out>/configs`` (as the demo writes them)."""
    composed = quality.write_config(quality.merge_configs(tuning.config), out)
    cfg = pipeline_demo.load_demo_config(composed)  # its target seeds are not used here
    stages, configs = pipeline_demo.demo_folder(cfg, out, pipeline_demo.demo_data(tuning.data_root)[0])
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


def table(rows: list[dict], best: dict, key: str, title: str) -> str:
    """Markdown: every cell tried, its val scores, the chosen one in bold."""
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


def choices(results: dict[str, list[dict]]) -> dict[str, dict]:
    """The chosen rows: the learning rate with the best final val accuracy of ``none``; then
    sparse's cell with the best stage-1 val area among those run at that learning rate (all
    cells when none was)."""
    best: dict[str, dict] = {}
    if results["lr"]:
        best["lr"] = max(results["lr"], key=lambda r: r["final_val_acc"])
    if results["sparse"]:
        lr = best["lr"]["cell"]["lr"] if "lr" in best else None
        pool = [r for r in results["sparse"] if r["cell"]["lr"] == lr] or results["sparse"]
        best["sparse"] = max(pool, key=lambda r: r["stage1_val_area"])
    return best


def tune_baselines(tuning: Tuning) -> int:
    """The searches (or the one ``--part``), then the table."""
    out = Path(tuning.out).resolve()
    cfg, configs, stages = setup(tuning, out)
    for seed in tuning.seeds:
        if tuning.part in (None, "targets"):
            zoo_member(ZooOptions(str(configs["zoo"]), seed=seed, zoo_dir=str(out / "target")))
    shipped_lr = stage_lr(stages["prune"])
    speed_ups = {"lr": cfg.demo.speed_ups, "sparse": cfg.demo.speed_ups[:1]}
    for part in ("lr", "sparse"):
        if tuning.part in (None, part):
            for cell in grid(part, tuning, shipped_lr):
                for seed in tuning.seeds:
                    run_cell(cell, seed, speed_ups[part], configs, stages, out)
    if tuning.part not in (None, "table"):
        return 0
    # every cell that has run on every tuning network, this call's grid or an earlier one's
    results: dict[str, list[dict]] = {"lr": [], "sparse": []}
    cells = sorted((Cell.parse(d.name) for d in (out / "prune").iterdir() if d.is_dir()),
                   key=lambda c: (c.method, c.lr, c.reg or 0.0, c.alpha or 0.0))
    for cell in cells:
        part = "lr" if cell.method == "none" else "sparse"
        done = {s: run_cell(cell, s, speed_ups[part], configs, stages, out) for s in tuning.seeds
                if all((out / "prune" / cell.name / f"seed{s}" / f"{x:g}x" / REPORT).is_file()
                       for x in speed_ups[part])}
        if len(done) == len(tuning.seeds):
            results[part].append(scores(cell, done))
    best = choices(results)
    parts = [("lr", "final_val_acc", "Finetune learning rate, shared by every method (none)"),
             ("sparse", "stage1_val_area", "Sparse training's reg and alpha, at the chosen "
                                           "learning rate when it was searched there")]
    text = "\n\n".join(table(results[p], best[p], key, title) for p, key, title in parts if p in best)
    chosen = {p: row["cell"] for p, row in best.items()}
    write_json(out / "tuning.json", {"seeds": tuning.seeds, "rows": results, "chosen": chosen})
    atomic_write(out / "tuning.md", lambda tmp: Path(tmp).write_text(
        f"# Baseline tuning on networks {tuning.seeds} (val only)\n\n{text}\n"))
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(tune_baselines, argv, prog="tune_baselines.py", description=summary(__doc__))


if __name__ == "__main__":
    sys.exit(main())

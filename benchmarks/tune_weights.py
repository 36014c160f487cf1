"""The equal tuning behind a weight-sparsity comparison: the L1 strength of the metanetwork's
meta-training (``sparsity: weights``) and of ``sparse``, on tuning networks, by validation data
only.

    python benchmarks/tune_weights.py --data_root ../shared/data/cifar10-jpeg \
        --config [benchmarks/registrations/view-confirm/recipe/benchmark.yaml] \
        --seeds [100,101,102] --out runs/tune_weights \
        [--zoo_from runs/registrations/<name>/A] [--part targets|none|sparse|metanetwork|table]

Every cell is a ``prune.py demo`` of the recipe in ``<out>/<cell>`` with a weight-sparsity
target (``--weight_sparsity``, default 0.9), the tuning networks as its held-out networks and
one method: ``none`` (the reference, nothing to tune), ``sparse_reg<R>`` (sparse training's L1
``prune.reg``) or ``metanetwork_reg<R>`` (meta-training's ``model.init_args.reg`` with
``sparsity: weights``, then ``prune.py select`` on the meta-val members as the demo does). The
cells share the tuning networks (``<out>/target``) and the zoo (``<out>/zoo``, or the zoo of a
draw of the same recipe with ``--zoo_from``), so a metanetwork cell costs its meta-training,
its selection and its pruning runs. Every stage-1 curve is on val images; no test image is read
by any choice here.

Both searches get the same budget: the same number of values (three by default, a factor of
ten apart), the same networks, the same score, the mean stage-1 val curve area over weight
sparsity 0.5-0.9 (the rule by which ``prune.py select`` picks a checkpoint; the final val
accuracy at the target is shown beside it). The grids are centred by a rule fixed before any
cell ran: ``sparse`` around the shipped ``prune.reg`` (5e-4, the grid its channel search used);
the metanetwork where its L1 penalty at a zoo member (``reg * sum |w|``; ``sum |w|`` is
3,200-4,800 on the recipe's half-width ResNet-20 members) is about the cross-entropy's margin to
chance over a step's batches (4 x (2.30 - 1.58) = 2.9), the rule docs/meta_training.md gives
for ``reg``. When a choice lies on the edge of its grid, both grids are extended one step beyond
their edge alike (``--sparse_regs``, ``--meta_regs``), at most twice.

``--part`` runs one kind of cell (``targets`` trains the tuning networks first, so that two
processes do not train them twice) and ``table`` (also the default after a part) writes
``<out>/tuning.md`` and ``tuning.json``: every cell that has run on every tuning network, its
val scores, and the chosen ``reg`` of each method. The search outlasts a session, and a fresh
machine keeps no cell folders: ``--rows_from`` takes the rows of earlier sessions' committed
``tuning.json`` files (same recipe, networks and target) for the cells not run here.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Literal

from jsonargparse.typing import PositiveFloat

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import quality
import tune_baselines
from registered import Shared

from pipeline import demo as pipeline_demo
from pipeline.command_line import cli, summary
from pipeline.common import merged, write_json, write_text
from pipeline.options import DemoOptions, WeightFraction, ZooOptions
from pipeline.results import Target, run_key
from pipeline.run import REPORT
from pipeline.zoo import zoo_member

SPARSE_REGS = (5e-5, 5e-4, 5e-3)
META_REGS = (1e-4, 1e-3, 1e-2)
KINDS = ("none", "sparse", "metanetwork")


@dataclasses.dataclass(frozen=True)
class Cell:
    """One tuning setting: ``method`` with its L1 strength (none has none)."""

    method: Literal["none", "sparse", "metanetwork"]
    reg: float | None = None

    @property
    def name(self) -> str:
        return self.method if self.reg is None else f"{self.method}_reg{self.reg:g}"

    @classmethod
    def parse(cls, name: str) -> "Cell":
        """The cell of a folder name (``name``'s inverse)."""
        m = re.fullmatch(r"none|(sparse|metanetwork)_reg([^_]+)", name)
        if m is None:
            raise ValueError(f"{name!r} is not a tuning cell's folder")
        return cls("none") if m.group(1) is None else cls(m.group(1), float(m.group(2)))  # type: ignore[arg-type]

    def overrides(self, seeds: list[int], weight_sparsity: float) -> dict:
        """The demo config's differences from the recipe for this cell."""
        prune = dict(tune_baselines.TUNING)
        if self.method == "sparse":
            prune["reg"] = self.reg
        diff: dict = {"demo": {"methods": [self.method], "target_seeds": list(seeds),
                               "speed_ups": [], "weight_sparsities": [weight_sparsity]},
                      "prune": {"prune": prune}}
        if self.method == "metanetwork":  # the pruned view ranks channels: not for weights
            diff["meta"] = {"model": {"init_args": {"sparsity": "weights", "reg": self.reg,
                                                    "pruned_view": 0.0}}}
        return diff


@dataclasses.dataclass(kw_only=True)
class WeightTuning(quality.Recipe):
    """The searches and where they run.

    Args:
        seeds: tuning networks (never a confirmatory network)
        out: output folder
        part: the tuning networks, one kind of cell, or the table only (default: all in turn)
        weight_sparsity: the cells' target (the stage-1 score does not depend on it)
        sparse_regs: sparse's L1 reg values
        meta_regs: the metanetwork's meta-training L1 reg values
        zoo_from: a draw folder of the same recipe whose zoo the metanetwork cells link
        rows_from: ``tuning.json`` files of earlier sessions (the same recipe, networks and
            target): their rows complete the table for cells that have no folder here (a fresh
            machine keeps no cells; the rows are deterministic on one kind of machine)
    """

    seeds: list[int] = dataclasses.field(default_factory=lambda: [100, 101, 102])
    out: str = "runs/tune_weights"
    part: Literal["targets", "none", "sparse", "metanetwork", "table"] | None = None
    weight_sparsity: WeightFraction = 0.9
    sparse_regs: list[PositiveFloat] = dataclasses.field(default_factory=lambda: list(SPARSE_REGS))
    meta_regs: list[PositiveFloat] = dataclasses.field(default_factory=lambda: list(META_REGS))
    zoo_from: str | None = None
    rows_from: list[str] = dataclasses.field(default_factory=list)


def cells(tuning: WeightTuning, kind: str) -> list[Cell]:
    if kind == "none":
        return [Cell("none")]
    regs = tuning.sparse_regs if kind == "sparse" else tuning.meta_regs
    return [Cell(kind, float(reg)) for reg in regs]  # type: ignore[arg-type]


def cell_config(tuning: WeightTuning, cell: Cell, out: Path) -> Path:
    """``<out>/<cell>/benchmark.yaml``: the recipe with the cell's differences."""
    recipe = quality.merge_configs(tuning.config)
    folder = out / cell.name
    folder.mkdir(parents=True, exist_ok=True)
    return quality.write_config(merged(recipe, cell.overrides(tuning.seeds, tuning.weight_sparsity)),
                                folder)


def link_shared(tuning: WeightTuning, config: Path, out: Path, data: dict) -> None:
    """The cell's ``target`` and ``zoo`` folders as links to the shared ones (a ``--zoo_from``
    zoo is refused when its stage config differs from the recipe's)."""
    folder = config.parent
    stages = pipeline_demo.demo_stage_configs(pipeline_demo.load_demo_config(config), folder, data)
    Shared(out, ("target",)).link(folder, stages)
    Shared(Path(tuning.zoo_from).resolve() if tuning.zoo_from else out, ("zoo",)).link(folder, stages)


def run_cell(tuning: WeightTuning, cell: Cell, out: Path, data: dict) -> None:
    config = cell_config(tuning, cell, out)
    link_shared(tuning, config, out, data)
    pipeline_demo.demo_command(DemoOptions(data_root=tuning.data_root, out=str(config.parent),
                                           config=str(config)))


def train_targets(tuning: WeightTuning, out: Path, data: dict) -> None:
    """The tuning networks, by the recipe's target (or zoo) stage, into ``<out>/target`` (the
    stage configs written as the ``none`` cell's demo writes them)."""
    config = cell_config(tuning, Cell("none"), out)
    link_shared(tuning, config, out, data)
    _, configs = pipeline_demo.demo_folder(pipeline_demo.load_demo_config(config), config.parent, data)
    for seed in tuning.seeds:
        zoo_member(ZooOptions(str(pipeline_demo.target_config(configs)), seed=seed,
                              zoo_dir=str(out / "target")))


def cell_reports(tuning: WeightTuning, cell: Cell, out: Path) -> dict[int, list[dict]] | None:
    """The cell's report on every tuning network, or None while one is missing."""
    target = Target(tuning.weight_sparsity, weights=True)
    files = {s: out / cell.name / "prune" / run_key(s, target, cell.method) / REPORT for s in tuning.seeds}
    if not all(f.is_file() for f in files.values()):
        return None
    return {s: [json.loads(f.read_text())] for s, f in files.items()}


def choices(rows: dict[str, list[dict]]) -> dict[str, dict]:
    """Per method, the row with the best stage-1 val area (none's only row as the reference)."""
    return {kind: max(found, key=lambda r: r["stage1_val_area"]) for kind, found in rows.items() if found}


def earlier_rows(tuning: WeightTuning) -> dict[str, dict]:
    """The rows of ``--rows_from`` by cell name; a file of other settings is refused by name."""
    found: dict[str, dict] = {}
    for file in tuning.rows_from:
        record = json.loads(Path(file).read_text())
        mine = {"config": tuning.config, "seeds": tuning.seeds, "weight_sparsity": tuning.weight_sparsity}
        differs = [k for k, v in mine.items() if record.get(k) != v]
        if differs:
            raise ValueError(f"--rows_from {file}: its {', '.join(differs)} differ from this "
                             f"tuning's; take rows only from the same recipe, networks and target")
        for kind_rows in record["rows"].values():
            found.update({r["name"]: {**r, "from": str(file)} for r in kind_rows})
    return found


def table(tuning: WeightTuning, out: Path) -> str:
    """``tuning.md`` and ``tuning.json`` from every cell folder that has run on every network,
    and the rows of ``--rows_from`` for cells not run here."""
    rows: dict[str, list[dict]] = {kind: [] for kind in KINDS}
    found = []
    for d in sorted(p for p in out.iterdir() if p.is_dir()):
        try:
            found.append(Cell.parse(d.name))
        except ValueError:
            continue  # the shared folders (target, zoo)
    earlier = earlier_rows(tuning)
    here = {c.name for c in found}
    found += [Cell.parse(name) for name in earlier if name not in here]
    for cell in sorted(found, key=lambda c: (KINDS.index(c.method), c.reg or 0.0)):
        reports = cell_reports(tuning, cell, out) if cell.name in here else None
        if reports is not None:
            rows[cell.method].append(tune_baselines.scores(cell, reports))  # type: ignore[arg-type]
        elif cell.name in earlier:
            rows[cell.method].append(earlier[cell.name])
    best = choices(rows)
    titles = {"none": "No sparsity training (the reference)",
              "sparse": "Sparse training's L1 reg",
              "metanetwork": "The metanetwork's meta-training L1 reg (sparsity: weights)"}
    text = "\n\n".join(tune_baselines.table(rows[k], best[k], "stage1_val_area", titles[k])
                       for k in KINDS if k in best)
    write_json(out / "tuning.json", {"config": tuning.config, "seeds": tuning.seeds,
                                     "weight_sparsity": tuning.weight_sparsity, "rows": rows,
                                     "chosen": {k: r["cell"] for k, r in best.items() if k != "none"}})
    write_text(out / "tuning.md", f"# Weight-sparsity tuning on networks {tuning.seeds} (val only; "
               f"final val acc at weight sparsity {tuning.weight_sparsity:g})\n\n{text}\n")
    return text


def tune_weights(tuning: WeightTuning) -> int:
    """The cells (or one ``--part``), then the table."""
    out = Path(tuning.out).resolve()
    data = pipeline_demo.demo_data(tuning.data_root)[0]
    if tuning.part in (None, "targets"):
        train_targets(tuning, out, data)
    for kind in KINDS:
        if tuning.part in (None, kind):
            for cell in cells(tuning, kind):
                run_cell(tuning, cell, out, data)
    if tuning.part != "targets":
        print(table(tuning, out))
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli(tune_weights, argv, prog="tune_weights.py", description=summary(__doc__))


if __name__ == "__main__":
    sys.exit(main())

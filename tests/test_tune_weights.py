"""benchmarks/tune_weights.py: every cell a demo of the recipe with one method and its L1
strength, the tuning networks and the zoo shared, the table choosing per method by the stage-1
val area of the reports on disk."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml
from benchmark_helpers import BENCHMARKS, benchmark_module

from pipeline import demo as pipeline_demo
from pipeline.registration import RegistrationError
from pipeline.results import Target, run_key

RECIPE = Path(__file__).parents[1] / "configs" / "demo" / "demo.yaml"


@pytest.fixture
def tune(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    for name in ("registered", "tune_baselines", "quality", "tune_weights"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return benchmark_module("tune_weights")


def tuning(tune, tmp_path: Path, **kw):
    return tune.WeightTuning(data_root=str(tmp_path / "data"), config=[str(RECIPE)],
                             out=str(tmp_path / "out"), **kw)


def test_cells_are_named_by_their_settings_and_parsed_back(tune) -> None:
    for cell in (tune.Cell("none"), tune.Cell("sparse", 5e-05), tune.Cell("metanetwork", 0.01)):
        assert tune.Cell.parse(cell.name) == cell
    assert tune.Cell("metanetwork", 1e-3).name == "metanetwork_reg0.001"
    for name in ("target", "zoo", "sparse", "none_reg1"):
        with pytest.raises(ValueError, match="not a tuning cell"):
            tune.Cell.parse(name)


def test_each_cell_is_a_demo_of_the_recipe_with_its_method_and_reg(
        tune, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The cells' demo configs differ from the recipe in the method, the weight target, the
    tuning networks, the val-only report and the cell's reg (sparse's in prune, the
    metanetwork's in meta with sparsity: weights); every cell links the same networks and zoo."""
    ran: list[Path] = []
    trained: list[tuple[int, str]] = []
    monkeypatch.setattr(pipeline_demo, "demo_command", lambda options: ran.append(Path(options.config)))
    monkeypatch.setattr(tune, "zoo_member", lambda options: trained.append((options.seed, options.zoo_dir)))
    settings = tuning(tune, tmp_path, seeds=[7, 8], sparse_regs=[0.1], meta_regs=[0.2, 0.3])
    for part in ("targets", "none", "sparse", "metanetwork"):
        assert tune.tune_weights(tune.WeightTuning(**{**vars(settings), "part": part})) == 0
    out = tmp_path / "out"
    assert trained == [(7, str(out / "target")), (8, str(out / "target"))]
    assert [p.parent.name for p in ran] == ["none", "sparse_reg0.1", "metanetwork_reg0.2",
                                            "metanetwork_reg0.3"]
    recipe = yaml.safe_load(RECIPE.read_text())
    for config in ran:
        cfg = pipeline_demo.load_demo_config(config)
        cell = tune.Cell.parse(config.parent.name)
        assert cfg.demo.methods == [cell.method] and cfg.demo.target_seeds == [7, 8]
        assert cfg.demo.speed_ups == [] and cfg.demo.weight_sparsities == [0.9]
        assert cfg.demo.zoo_seeds == recipe["demo"]["zoo_seeds"]
        assert cfg.prune["prune"]["stage1_curve_split"] == "val"
        assert cfg.prune["prune"].get("reg") == (cell.reg if cell.method == "sparse" else None)
        meta = (cfg.meta.get("model") or {}).get("init_args") or {}
        if cell.method == "metanetwork":
            assert (meta["sparsity"], meta["reg"], meta["pruned_view"]) == ("weights", cell.reg, 0.0)
        else:
            assert "sparsity" not in meta and "reg" not in meta
        for part in ("target", "zoo"):
            assert (config.parent / part).resolve() == out / part
    # the stage configs of a cell parse as the demo checks them
    stages = pipeline_demo.demo_stage_configs(pipeline_demo.load_demo_config(ran[-1]),
                                              ran[-1].parent, {"root": str(tmp_path)})
    assert stages["meta"]["model"]["init_args"]["sparsity"] == "weights"


def test_a_zoo_of_another_recipe_is_refused(tune, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pipeline_demo, "demo_command", lambda options: 0)
    draw = tmp_path / "draw"
    (draw / "configs").mkdir(parents=True)
    (draw / "configs" / "zoo.yaml").write_text(yaml.safe_dump({"zoo": {"dir": str(draw / "zoo")}}))
    with pytest.raises(RegistrationError, match="its zoo stage .* differs from this recipe's"):
        tune.tune_weights(tuning(tune, tmp_path, part="none", zoo_from=str(draw)))


def write_report(out: Path, cell, seed: int, area: float, acc: float) -> None:
    run = out / cell.name / "prune" / run_key(seed, Target(0.9, weights=True), cell.method)
    run.mkdir(parents=True)
    (run / "report.json").write_text(json.dumps(
        {"stage1_curve": {"area": area}, "accuracy": {"final": {"val": acc, "test": 0.0}}}))


def test_the_table_chooses_each_methods_reg_by_the_stage1_val_area(tune, tmp_path: Path) -> None:
    """Means over the networks; a cell missing a network is left out; the final val accuracy
    is shown but does not choose."""
    out = tmp_path / "out"
    Cell = tune.Cell
    scores = {Cell("none"): [(0.30, 0.5), (0.40, 0.5)],
              Cell("sparse", 1e-3): [(0.40, 0.6), (0.50, 0.6)],
              Cell("sparse", 1e-2): [(0.44, 0.4), (0.50, 0.4)],  # best area, worse accuracy
              Cell("metanetwork", 1e-4): [(0.60, 0.5), (0.20, 0.5)],
              Cell("metanetwork", 1e-3): [(0.90, 0.9)]}  # one network only: not tabulated
    for cell, per_network in scores.items():
        for seed, (area, acc) in zip((7, 8), per_network):
            write_report(out, cell, seed, area, acc)
    (out / "target").mkdir()
    text = tune.table(tuning(tune, tmp_path, seeds=[7, 8]), out)
    chosen = json.loads((out / "tuning.json").read_text())["chosen"]
    assert chosen == {"sparse": {"method": "sparse", "reg": 1e-2},
                      "metanetwork": {"method": "metanetwork", "reg": 1e-4}}
    assert "| **sparse_reg0.01** | 47.00 | 40.00 |" in text
    assert "| sparse_reg0.001 | 45.00 | 60.00 |" in text
    assert "| **metanetwork_reg0.0001** | 40.00 | 50.00 |" in text
    assert "metanetwork_reg0.001 " not in text
    assert (out / "tuning.md").read_text().count("chosen by stage1_val_area") == 3


def test_rows_of_an_earlier_session_complete_the_table_and_other_settings_are_refused(
        tune, tmp_path: Path) -> None:
    """A cell run here wins over the earlier file's row of the same name; the earlier file's
    other rows enter the table and the choice, marked with the file."""
    out, Cell = tmp_path / "out", tune.Cell
    for seed, area in ((7, 0.30), (8, 0.40)):
        write_report(out, Cell("sparse", 1e-3), seed, area, 0.5)
    earlier = tmp_path / "earlier.json"
    row = {"cell": {"method": "sparse", "reg": 1e-2}, "name": "sparse_reg0.01",
           "stage1_val_area": 0.45, "final_val_acc": 0.5, "per_network": {}}
    shadowed = {**row, "cell": {"method": "sparse", "reg": 1e-3}, "name": "sparse_reg0.001",
                "stage1_val_area": 0.99}
    settings = tuning(tune, tmp_path, seeds=[7, 8], rows_from=[str(earlier)])
    earlier.write_text(json.dumps({"config": settings.config, "seeds": [7, 8], "weight_sparsity": 0.9,
                                   "rows": {"sparse": [row, shadowed]}}))
    tune.table(settings, out)
    written = json.loads((out / "tuning.json").read_text())
    assert [(r["name"], r["stage1_val_area"], r.get("from")) for r in written["rows"]["sparse"]] == [
        ("sparse_reg0.001", 0.35, None), ("sparse_reg0.01", 0.45, str(earlier))]
    assert written["chosen"] == {"sparse": {"method": "sparse", "reg": 1e-2}}
    earlier.write_text(json.dumps({"config": settings.config, "seeds": [7, 9], "weight_sparsity": 0.9,
                                   "rows": {}}))
    with pytest.raises(ValueError, match=rf"--rows_from {earlier}: its seeds differ"):
        tune.table(settings, out)

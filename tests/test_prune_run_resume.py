"""`prune.py run` resumed and reused: a finished run reruns as a no-op, a killed one redoes only
what is missing, a stage-2 typo fails before stage 1 and the fix keeps stage 1, a capped run
reuses an uncapped run's stage 1 (the runs they start from: conftest.py)."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import yaml
from benchmark_helpers import benchmark_module
from pruning_helpers import ARCH, QUICK, STEPS, TARGET, X32, run

import networks
import networks.export
from pipeline import run as pipeline_run
from pipeline import run_report, run_stages

pytestmark = pytest.mark.usefixtures("cli_argv")


def test_rerunning_a_finished_run_recomputes_nothing(runs: dict[str, Path], setup: dict,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    out = runs["none"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}

    def fail(*args, **kwargs):
        raise AssertionError("recomputed")

    monkeypatch.setattr(run_stages, "fit_stage", fail)
    monkeypatch.setattr(pipeline_run, "check_inputs", fail)
    for name in ("evaluate_networks", "measured_latency", "export_checked_onnx"):
        monkeypatch.setattr(run_report, name, fail)
    for name in ("export_program", "export_onnx"):
        monkeypatch.setattr(networks.export, name, fail)
    assert run(setup["config"], setup["network"], "none", out) == 0
    assert before == {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}


def test_killed_run_resumes_without_redoing_finished_stages(runs: dict[str, Path], setup: dict,
                                                            tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Stage 1 done, export missing (killed after stage 2): only evaluation/export/report run."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(runs["none"], out)
    for name in ("report.json", "network.pt2", "curve.png"):
        (out / name).unlink()
    (out / "run.json").write_text((runs["none"] / "run.json").read_text())
    monkeypatch.setattr(run_stages, "fit_stage", lambda *a, **k: pytest.fail("a stage was refit"))
    assert run(setup["config"], setup["network"], "none", out) == 0
    assert json.loads((out / "report.json").read_text())["accuracy"] == \
        json.loads((runs["none"] / "report.json").read_text())["accuracy"]
    assert (out / "network.pt2").is_file() and (out / "curve.png").is_file()


def test_stage2_typo_fails_before_stage1_and_the_fix_reuses_stage1(
        runs: dict[str, Path], setup: dict, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A misspelled key in `final:` is refused before anything trains or is written, naming the
    file, the section and the key; after stage 1 finished, a changed `final:` keeps stage 1."""
    import shutil

    cfg = yaml.safe_load(setup["config"].read_text())
    bad = copy.deepcopy(cfg)
    bad["final"]["trainer"]["max_epoch"] = 1  # typo of max_epochs
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump(bad))
    trained = []
    monkeypatch.setattr(run_stages, "fit_stage", lambda *a, **k: trained.append(a))
    with pytest.raises(pipeline_run.PruneRunError,
                       match=rf"prune config '{config}', section 'final'.*'max_epoch'"):
        run(config, setup["network"], "none", tmp_path / "typo")
    assert not trained and not (tmp_path / "typo").exists()
    bad = copy.deepcopy(cfg)
    bad["final"]["model"]["init_args"]["lrr"] = 0.1
    config.write_text(yaml.safe_dump(bad))
    with pytest.raises(pipeline_run.PruneRunError, match=r"section 'final'.*model.*'lrr'"):
        run(config, setup["network"], "none", tmp_path / "typo")
    assert not trained

    # stage 1 finished (copied from a finished run minus its stage 2), then 'final' changes
    out = tmp_path / "changed"
    shutil.copytree(runs["none"], out)
    shutil.rmtree(out / pipeline_run.SECOND_STAGE / "checkpoints")
    (out / pipeline_run.SECOND_STAGE / "network.pt").unlink()
    for name in ("report.json", "network.pt", "network.pt2", "eval.json"):
        (out / name).unlink()
    changed = copy.deepcopy(cfg)
    changed["final"]["model"]["init_args"]["lr"] = 0.02
    config.write_text(yaml.safe_dump(changed))
    stages = []

    def run_stage(config: dict, output: Path, name: str) -> Path:
        stages.append((name, output.is_file()))
        if name == pipeline_run.SECOND_STAGE:
            pytest.fail("stop after the stages were chosen")
        return output

    monkeypatch.setattr(pipeline_run, "run_stage", run_stage)
    with pytest.raises(pytest.fail.Exception, match="stop after"):
        run(config, setup["network"], "none", out)
    assert stages == [("finetune", True), (pipeline_run.SECOND_STAGE, False)]  # stage 1 kept
    assert (out / f"{pipeline_run.SECOND_STAGE}.superseded-1").is_dir()  # moved aside, not deleted
    stored = json.loads((out / "run.json").read_text())
    assert stored["config"]["final"]["model"]["init_args"]["lr"] == 0.02


def test_a_capped_run_reuses_stage_1_and_prunes_within_the_cap(
        runs: dict[str, Path], setup: dict, tmp_path: Path) -> None:
    """prune.max_pruning_ratio changes stage 2 only: stage 1 comes from an uncapped run, and
    stage 2 prunes it as the capped criterion does (networks.prune_to_speed_up)."""
    cfg = yaml.safe_load(setup["config"].read_text())
    cfg["prune"]["max_pruning_ratio"] = 0.1
    config = tmp_path / "capped.yaml"
    config.write_text(yaml.safe_dump(cfg))
    out = tmp_path / "capped"
    assert run(config, setup["network"], "none", out, None,
               "--reuse_first_stage", str(runs["none"]), *QUICK) == 0
    first = pipeline_run.FIRST_STAGE["none"]
    assert (out / first / "network.pt").read_bytes() == (runs["none"] / first / "network.pt").read_bytes()
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["prune"]["max_pruning_ratio"] == 0.1

    def widths(net: torch.nn.Module) -> list[int]:
        return [m.out_channels for m in net.modules() if isinstance(m, torch.nn.Conv2d)]

    expected = networks.load_network(out / first / "network.pt")[0].eval()
    base = networks.base_macs(ARCH, X32)
    networks.prune_to_speed_up(expected, X32, TARGET, base, STEPS, max_pruning_ratio=0.1)
    capped = widths(networks.load_network(out / "network.pt")[0])
    assert capped == widths(expected) != widths(networks.load_network(runs["none"] / "network.pt")[0])
    # the stage-1 curve prunes too: recomputed under the cap, not copied
    assert (out / first / "curve.csv").read_text() != (runs["none"] / first / "curve.csv").read_text()
    cfg["prune"]["max_pruning_ratio"] = 1.5
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(pipeline_run.PruneRunError, match=r"prune.max_pruning_ratio 1.5: Not of "
                                                         r"type PruningCap: does not conform"):
        run(config, setup["network"], "none", tmp_path / "bad", None)
    cfg["prune"].update(max_pruning_ratio=0.5, stage1_curve_split="train")
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(pipeline_run.PruneRunError, match=r"prune.stage1_curve_split train: Expected a "
                                                         r"typing.Literal\['test', 'val'\]"):
        run(config, setup["network"], "none", tmp_path / "bad", None)
    assert not (tmp_path / "bad").exists()


@pytest.mark.slow  # the benchmark tool (benchmarks/quality.py), not the library: run with -m slow
def test_quality_rerun_redoes_a_benchmark_run_under_a_cap_from_its_stored_settings(
        runs: dict[str, Path], tmp_path: Path) -> None:
    """benchmarks/quality.py rerun: the stored run.json becomes a prune.yaml that reproduces the
    run's settings but the cap, so stage 1 is reused (not retrained) and only the cap differs."""
    import shutil

    quality = benchmark_module("quality")
    source = tmp_path / "bench" / "seed0" / "2x" / "none"
    shutil.copytree(runs["none"], source)
    assert quality.main(["rerun", "--runs", str(tmp_path / "bench"), "--max_pruning_ratio", "0.1",
                         "--methods", "[none]", "--out", str(tmp_path / "capped")]) == 0
    out = tmp_path / "capped" / "prune" / "seed0" / "2x" / "none"
    before, after = (json.loads((d / "run.json").read_text()) for d in (source, out))
    assert after["config"]["prune"].pop("max_pruning_ratio") == 0.1
    assert after == before
    first = pipeline_run.FIRST_STAGE["none"]
    assert (out / first / "network.pt").read_bytes() == (source / first / "network.pt").read_bytes()
    assert not (out / first / "checkpoints").exists()  # reused, not trained again
    assert json.loads((out / "report.json").read_text())["config"]["prune"]["max_pruning_ratio"] == 0.1

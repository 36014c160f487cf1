"""`prune.py run` to a latency target: stage 2 prunes until a (deterministic) clock reaches
it."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from pruning_helpers import ARCH, STEPS, X32
from torch import nn

import networks
import prune
from datamodules.zoo_manifest import widths
from pipeline import run as pipeline_run
from pipeline import run_stages

pytestmark = pytest.mark.usefixtures("cli_argv")


def test_a_latency_target_prunes_stage_2_until_the_clock_reaches_it(
        setup: dict, runs: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    """--latency_speed_up 1.5 --latency_batch 2 --prune.round_to 2, stage 1 taken from the
    speed-up run: a deterministic clock (time proportional to MACs, as
    tests/test_structured_pruning.py uses) stands in for networks.latency_probe, so stage 2 must
    stop where networks.prune_to_latency stops on the stage-1 network against the *unpruned
    architecture*'s time, every layer it narrows a multiple of 2; the folder, run.json and
    report.json name the latency target, the report's measured speed-up reaches it, the curves
    are in MACs (the final one from the MACs speed-up reached), a rerun is answered from the
    files, and two targets are refused."""
    batch, target = 2, 1.5
    readings: list[tuple[int, float]] = []

    def probe(input_size, batch_size=1, device="cpu", min_run_time=0.2, runtime="torch"):
        assert list(input_size) == [3, 32, 32] and batch_size == batch and runtime == "torch"
        assert torch.device(device).type == "cpu"  # the stage's device, and the report's

        def clock(model: nn.Module) -> float:
            readings.append((batch_size, networks.count_macs(model, X32) * batch_size / 1e6))
            return readings[-1][1]
        return clock

    monkeypatch.setattr(networks, "latency_probe", probe)
    folder = Path(yaml.safe_load(setup["config"].read_text())["prune"]["dir"])
    out = folder / f"net_none_lat{target:g}b{batch}_seed0"
    argv = ["run", "--config", str(setup["config"]), "--network", str(setup["network"]),
            "--method", "none", "--latency_speed_up", str(target), "--latency_batch", str(batch),
            "--prune.round_to", "2", "--reuse_first_stage", str(runs["none"]), "--prune.onnx=false"]
    assert prune.main(argv) == 0
    assert out.is_dir() and len(readings) > 4

    stored = json.loads((out / "run.json").read_text())
    assert list(stored) == ["method", "latency_speed_up", "latency_batch", "seed", "network",
                            "network_sha256", "metanetwork", "metanetwork_sha256", "config"]
    assert stored["latency_speed_up"] == target and stored["latency_batch"] == batch
    prune_cfg = stored["config"]["prune"]
    assert "speed_up" not in prune_cfg and prune_cfg["latency_speed_up"] == target
    assert prune_cfg["latency_batch"] == batch and prune_cfg["round_to"] == 2

    report = json.loads((out / "report.json").read_text())
    assert list(report) == ["format", "method", "network", "metanetwork", "architecture", "target",
                            "latency_speed_up", "speed_up", "latency", "onnx", "macs", "params",
                            "accuracy", "stage1_curve", "seeds", "files", "config", "time_s"]
    assert report["target"] == {"latency_speed_up": target, "latency_batch": batch}
    macs = report["macs"]
    mac_speed_up = macs["unpruned"] / macs["after"]
    latency = report["latency_speed_up"]
    assert latency["target"] == target and latency["batch_size"] == batch
    assert latency["device"] == "cpu"
    assert latency["reached"] == pytest.approx(mac_speed_up) and latency["reached"] >= target
    assert latency["unpruned_latency_ms"] == pytest.approx(macs["unpruned"] * batch / 1e6)
    assert "target" not in report["speed_up"]
    assert report["speed_up"]["reached"] == pytest.approx(mac_speed_up)
    assert [r["batch_size"] for r in report["latency"]] == [1, 64]  # the table, as before

    # Oracle: the stage-1 network (reused, not trained) pruned by prune_to_latency with the
    # same clock against the unpruned architecture's time and round_to 2 stops at the same widths
    first = pipeline_run.FIRST_STAGE["none"]
    assert (out / first / "network.pt").read_bytes() == (runs["none"] / first / "network.pt").read_bytes()
    assert not (out / first / "checkpoints").exists()
    start = networks.load_network(out / first / "network.pt")[0].eval()
    before = widths(start)
    clock = probe([3, 32, 32], batch)
    base_ms = clock(networks.build(ARCH["name"], 3, **ARCH["kwargs"]))
    pruner = networks.criterion_pruner(start, X32, STEPS, round_to=2)
    assert networks.prune_to_latency(start, X32, target, base_ms, clock, STEPS, pruner=pruner) \
        == pytest.approx(latency["reached"])
    final = networks.load_network(out / "network.pt")[0]
    assert widths(final) == widths(start)
    pruned = networks.load_network(out / pipeline_run.SECOND_STAGE / "pruned.pt")[0]
    assert widths(pruned) == widths(final)
    narrowed = {k: (before[k], w) for k, w in widths(final).items() if w != before[k]}
    assert narrowed and all(w % 2 == 0 for _, w in narrowed.values()), narrowed  # round_to held
    callback = report["config"]["stages"][pipeline_run.SECOND_STAGE]["trainer"]["callbacks"][-2]
    assert callback["class_path"] == "callbacks.PruneToSpeedUp"
    assert {k: callback["init_args"][k] for k in ("latency_speed_up", "latency_batch", "round_to")} \
        == {"latency_speed_up": target, "latency_batch": batch, "round_to": 2}
    assert "speed_up" not in callback["init_args"]

    # curves in MACs: the stage-1 one copied (same kind), the final one from the speed-up reached
    from pipeline.curve import read_curves
    from pipeline.summary import scalars

    assert (out / first / "curve.csv").read_text() == (runs["none"] / first / "curve.csv").read_text()
    (points,) = read_curves(out / "curve.csv").values()
    assert points[0][0] == pytest.approx(mac_speed_up) and points[0][1] == macs["after"]
    tags = {tag: value for tag, value, _ in scalars(report, {})}
    assert tags["pruning/latency_speed_up"] == pytest.approx(latency["reached"])
    assert tags["pruning/latency_speed_up_target"] == target and "pruning/speed_up_target" not in tags

    # a rerun is answered from the files; a second target is refused before anything loads
    fit_stage = run_stages.fit_stage
    monkeypatch.setattr(run_stages, "fit_stage", lambda *a, **k: pytest.fail("a stage was refit"))
    count = len(readings)
    assert prune.main(argv) == 0 and len(readings) == count
    capsys.readouterr()
    bad = tmp_path / "two"
    for extra, message in (
            (["--prune.latency_speed_up", "1.5"],
             "prune.speed_up 1.6 and prune.latency_speed_up 1.5 are two targets; a run has one"),
            (["--speed_up", "2", "--latency_speed_up", "2"],
             "--speed_up and --latency_speed_up are two targets"),
            (["--latency_batch", "2"], "--latency_batch 2 goes with a latency target")):
        assert prune.cli(["run", "--config", str(setup["config"]), "--network",
                          str(setup["network"]), "--method", "none", "--out", str(bad), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, (message, err)
    assert not bad.exists()
    # a target the clock never reaches is known only in stage 2: named in one line, stage 1 kept
    far = tmp_path / "far"
    monkeypatch.setattr(run_stages, "fit_stage", fit_stage)
    assert prune.cli(["run", "--config", str(setup["config"]), "--network", str(setup["network"]),
                      "--method", "none", "--out", str(far), "--latency_speed_up", "1000",
                      "--latency_batch", str(batch), "--reuse_first_stage", str(runs["none"])]) == 2
    err = capsys.readouterr().err
    assert "prune.py: error: stage 2: latency speed-up target 1000.000x is unreachable: 40 " \
        "pruning steps reach" in err and f"Stage 1 is kept: pass another --latency_speed_up " \
        f"with --reuse_first_stage {far}" in err, err
    assert (far / first / "network.pt").is_file() and not (far / "report.json").exists()


def test_a_latency_target_timed_in_onnx_runtime_is_named_and_recorded_everywhere(
        setup: dict, runs: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    """--prune.latency_runtime onnxruntime --prune.round_to auto: every clock stage 2 and the
    report start is ONNX Runtime's (a deterministic stand-in again; tests/test_latency.py times
    the real one), the folder says so (-ort), and run.json, the report's target, its reached
    speed-up and the stage-2 callback record the runtime. The report carries round_to's
    trials: on a clock that reads MACs no multiple does more MACs per ms, so 1 (no rounding)."""
    runtimes: list[str] = []

    def probe(input_size, batch_size=1, device="cpu", min_run_time=0.2, runtime="torch"):
        runtimes.append(runtime)
        return lambda model: networks.count_macs(model, X32) / 1e6

    monkeypatch.setattr(networks, "latency_probe", probe)
    folder = Path(yaml.safe_load(setup["config"].read_text())["prune"]["dir"])
    out = folder / "net_none_lat1.5b1-ort_seed0"
    assert prune.main(["run", "--config", str(setup["config"]), "--network", str(setup["network"]),
                       "--method", "none", "--latency_speed_up", "1.5",
                       "--prune.latency_runtime", "onnxruntime", "--reuse_first_stage",
                       str(runs["none"]), "--prune.onnx=false", "--prune.round_to", "auto",
                       "--prune.latency_batch_sizes", "[]"]) == 0
    assert out.is_dir() and len(runtimes) >= 2 and set(runtimes) == {"onnxruntime"}
    stored = json.loads((out / "run.json").read_text())
    assert stored["latency_runtime"] == "onnxruntime"
    report = json.loads((out / "report.json").read_text())
    assert report["target"] == {"latency_speed_up": 1.5, "latency_batch": 1,
                                "latency_runtime": "onnxruntime"}
    assert report["latency_speed_up"]["runtime"] == "onnxruntime" and report["latency"] == []
    callback = report["config"]["stages"][pipeline_run.SECOND_STAGE]["trainer"]["callbacks"][-2]
    assert callback["init_args"]["latency_runtime"] == "onnxruntime"
    assert callback["init_args"]["round_to"] == "auto"
    assert report["round_to"]["chosen"] == 1 and report["round_to"]["runtime"] == "onnxruntime"
    assert [t["round_to"] for t in report["round_to"]["trials"]] == [1, 2, 4, 8, 16]

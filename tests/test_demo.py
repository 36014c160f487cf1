"""`prune.py demo` (issue 6): the whole pipeline of docs/method.md (zoo, meta-training,
checkpoint selection, pruning a held-out network three ways, the table) on generated tiny data,
through the shipped configs/demo/demo.yaml shrunk to seconds; a rerun recomputes nothing."""
from __future__ import annotations

import contextlib
import io
import json
import sys
import warnings
from pathlib import Path

import pytest
import yaml
from benchmark_helpers import BENCHMARKS, benchmark_module

import prune
from pipeline import demo as pipeline_demo
from pipeline import demo_results, results, run_stages
from pipeline import run as pipeline_run
from pipeline import zoo as pipeline_zoo
from pipeline.cli import cli
from pipeline.console import configure
from pipeline.options import ZooOptions

pytestmark = pytest.mark.usefixtures("cli_argv")
DEMO = Path(__file__).parents[1] / "configs" / "demo" / "demo.yaml"
TINY_FIT = {"limit_train_batches": 2, "enable_model_summary": False, "enable_progress_bar": False}


def tiny_demo_config(out: Path) -> Path:
    """The shipped demo.yaml with tiny stages: 3 classes, half-width ResNet-8, 1 epoch of 2
    batches per fit, a 1-layer x 8 metanetwork, a short selection."""
    cfg = yaml.safe_load(DEMO.read_text())
    configs = DEMO.parent
    cfg["demo"]["configs"] = {k: str(configs / v) for k, v in cfg["demo"]["configs"].items()}
    cfg["data"] = {"dataset": "cifar10", "num_classes": 3, "subset": None, "test_subset": None,
                   "batch_size": 8, "eval_batch_size": 8, "val_fraction": 0.25}
    cfg["zoo"] = {
        "zoo": {"iterative_steps": 40},
        "pretrain": {"trainer": {"max_epochs": 1, **TINY_FIT},
                     "model": {"init_args": {"network": "resnet8_cifar",
                                             "network_kwargs": {"width": 0.5}}}},
        "finetune": {"trainer": {"max_epochs": 1}}}
    cfg["meta"] = {"trainer": {"max_epochs": 1, "enable_model_summary": False,
                               "enable_progress_bar": False},
                   "data": {"init_args": {"batches_per_step": 1, "batch_size": 4,
                                          "steps_per_member": 1}},
                   "model": {"init_args": {"num_layers": 1, "hidden": 8, "node_res_ratio": 0.1,
                                           "edge_res_ratio": 0.1, "milestones": []}}}
    cfg["prune"] = {"prune": {"iterative_steps": 40, "onnx": False, "program": False,
                              "latency_batch_sizes": []},
                    "base": {"trainer": dict(TINY_FIT)},
                    "finetune": {"trainer": {"max_epochs": 1}},
                    "final": {"trainer": {"max_epochs": 1}}}
    cfg["select"].update(finetune_steps=2, iterative_steps=40, every=10)
    cfg["demo"]["speed_ups"] = [2.0, 2.5]  # the second reuses each method's stage 1
    path = out / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def demo(config: Path, root: Path, out: Path) -> int:
    return prune.main(["demo", "--config", str(config), "--data_root", str(root), "--out", str(out)])


@pytest.fixture(scope="module")
def finished(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tmp = tmp_path_factory.mktemp("demo")
    config, out = tiny_demo_config(tmp), tmp / "out"
    # the held-out network is narrower than the zoo's: the metanetwork is applied across widths
    cfg = yaml.safe_load(config.read_text())
    cfg["target"] = {"pretrain": {"model": {"init_args": {"network_kwargs": {"width": 0.25}}}}}
    config.write_text(yaml.safe_dump(cfg))
    argv, sys.argv = sys.argv, ["prune.py"]
    console = io.StringIO()  # the demo as a user runs it: through the entry point, quiet
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(console), \
                contextlib.redirect_stderr(console):
            assert cli(["demo", "--config", str(config), "--data_root", str(tiny_cifar), "--out",
                        str(out)]) == 0
    finally:
        sys.argv = argv
        configure(verbose=True)  # the library default, for the other tests
    return {"config": config, "out": out, "root": tiny_cifar, "console": console.getvalue()}


def test_demo_console_is_quiet_and_nothing_is_lost(finished: dict) -> None:
    """One line per stage (header + progress bar), the result tables, nothing else; each
    stage's own output (Lightning's messages included) is in its log file."""
    lines = finished["console"].split("\n")  # a progress bar redraws its line with "\r"
    assert len(lines) < 80, finished["console"]
    for k, stage in enumerate(pipeline_demo.STAGES, 1):
        assert sum(line.lstrip("\r").startswith(f"[{k}/5] {stage}") for line in lines) == 1
    for noise in ("Seed set to", "GPU available", "Tip:", "Total params", "LeafSpec"):
        assert noise not in finished["console"]
    logs = finished["out"] / "logs"
    assert "Seed set to 0" in (logs / "zoo.log").read_text()
    assert "| seed100 | metanetwork |" in finished["console"]


def test_demo_runs_the_whole_pipeline(finished: dict, capsys: pytest.CaptureFixture) -> None:
    out = finished["out"]
    from datamodules.zoo_manifest import read_manifest

    zoo = read_manifest(out / "zoo")
    assert [m["seed"] for m in zoo["members"]] == [0, 1, 2, 3]  # the meta-training zoo
    target = read_manifest(out / "target")  # the held-out network: not in the zoo
    assert [m["seed"] for m in target["members"]] == [100]
    assert (out / "meta" / "checkpoints" / "last.ckpt").is_file()
    assert list((out / "meta").glob("events.out.tfevents.*"))
    assert (out / "meta" / "selection" / "best.ckpt").is_file()
    assert (out / "meta" / "selection" / "selection.png").is_file()
    written = json.loads((out / "results.json").read_text())
    table = written["table"]
    # not a smoke run: demo.json as folders written before the option hold it (they stay valid)
    assert "smoke" not in json.loads((out / "demo.json").read_text())["demo"]
    for method in pipeline_run.METHODS:
        for speed_up in (2.0, 2.5):
            run = out / "prune" / results.run_key(100, speed_up, method)
            report = json.loads((run / "report.json").read_text())
            assert report["method"] == method
            assert report["speed_up"]["target"] == speed_up <= report["speed_up"]["reached"]
            assert report["network"] == str((out / "target" / "members" / "seed100.pt").resolve())
            assert (run / "curve.png").is_file()
            assert f"| seed100 | {method} | " in table and f"(target {speed_up:g}x)" in table
            # the MACs read consistently with the speed-up: unpruned architecture / given -> pruned
            macs = {k: f"{v / 1e6:.2f}M" if v >= 1e6 else f"{v / 1e3:.1f}k"
                    for k, v in report["macs"].items()}
            assert f"| {macs['unpruned']} / {macs['before']} -> {macs['after']} |" in table
        # stage 1 ran once: the 2.5x run took the 2x run's network and trained no stage 1
        first, stage = out / "prune" / "seed100", pipeline_run.FIRST_STAGE[method]
        assert (first / "2.5x" / method / stage / "network.pt").read_bytes() == \
            (first / "2x" / method / stage / "network.pt").read_bytes()
        assert not (first / "2.5x" / method / stage / "checkpoints").exists()
        assert (first / "2x" / method / stage / "checkpoints").exists()
    meta = json.loads((out / "prune" / results.run_key(100, 2.0, "metanetwork")
                       / "report.json").read_text())
    assert meta["metanetwork"] == str(out / "meta" / "selection" / "best.ckpt")
    # the target section: the zoo at width 0.5, the held-out network at 0.25, said and recorded
    assert {m["architecture"]["kwargs"]["width"] for m in zoo["members"]} == {0.5}
    assert target["members"][0]["architecture"]["kwargs"] == {"width": 0.25}
    assert meta["transfer"] == {"trained_on": [{**target["members"][0]["architecture"],
                                                "kwargs": {"width": 0.5}}],
                                "applied_to": target["members"][0]["architecture"]}
    text = (out / "results.md").read_text()
    assert text.startswith(table + "\n\nPaired differences")
    for measure in ("stage-1 curve area 2-3x", "test acc at 2x", "test acc at 2.5x"):
        for first, second in results.PAIRS:
            assert f"| {measure} | {first} - {second} | 1 |" in text
    assert (out / "stage1_curves.png").is_file()


def test_demo_rerun_recomputes_nothing(finished: dict, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    from pipeline import train

    def forbidden(*args, **kwargs):
        raise AssertionError("a finished demo stage ran again")

    out = finished["out"]
    files = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    patched = [(pipeline_demo, "fit_stage"), (run_stages, "fit_stage"), (pipeline_zoo, "fit_stage"),
               (train, "main"), (pipeline_demo, "select_checkpoint")]
    for target, name in patched:
        monkeypatch.setattr(target, name, forbidden)
    capsys.readouterr()
    assert demo(finished["config"], finished["root"], out) == 0
    printed = capsys.readouterr().out
    for method in pipeline_run.METHODS:
        assert f"| {method} |" in printed
    assert "tensorboard --logdir" in printed and "report.json" in printed
    assert {p: p.stat().st_mtime_ns for p in files} == files  # nothing rewritten


def test_demo_refuses_an_output_folder_of_other_settings(finished: dict, tmp_path: Path) -> None:
    import shutil

    other = shutil.copytree(finished["root"], tmp_path / "other")  # same data, another root
    with pytest.raises(pipeline_demo.DemoError, match="holds a demo with other settings"):
        demo(finished["config"], other, finished["out"])


def test_demo_checks_data_and_every_stage_config_before_touching_out(
        finished: dict, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(pipeline_demo.DemoError, match=r"data not found.*--data_root.*METAPRUNE_DATA"):
        demo(finished["config"], empty, tmp_path / "out")
    (empty / "train").mkdir()
    (empty / "test").mkdir()  # the layout without class folders: named as such, no count advice
    with pytest.raises(pipeline_demo.DemoError, match=r"no class folders in .*empty/train'"):
        demo(finished["config"], empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cfg = yaml.safe_load(finished["config"].read_text())
    cfg["prune"].setdefault("final", {}).setdefault("trainer", {})["max_epoch"] = 1  # a typo
    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(pipeline_demo.DemoError, match=r"prune config .*prune.yaml', section 'final'"
                                                      r".*'max_epoch'"):
        demo(config, finished["root"], tmp_path / "out")
    assert not (tmp_path / "out").exists()
    cfg = yaml.safe_load(finished["config"].read_text())
    cfg["select"]["finetune_step"] = 3  # a typo
    config.write_text(yaml.safe_dump(cfg))
    with pytest.raises(pipeline_demo.DemoError, match=r"section 'select'.*'finetune_step'"):
        demo(config, finished["root"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_demo_data_root_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv(pipeline_demo.DATA_ENV, raising=False)
    data, _ = pipeline_demo.demo_data(None)
    assert data == {"root": str(tmp_path / "data" / "cifar10"), "download": True}
    monkeypatch.setenv(pipeline_demo.DATA_ENV, str(tmp_path / "env"))
    assert pipeline_demo.demo_data(None)[0] == {"root": str(tmp_path / "env")}
    assert pipeline_demo.demo_data(str(tmp_path / "arg"))[0] == {"root": str(tmp_path / "arg")}


def test_demo_target_must_be_held_out(tmp_path: Path) -> None:
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["demo"]["target_seeds"] = [cfg["demo"]["zoo_seeds"][0]]
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(pipeline_demo.DemoError, match="held out"):
        pipeline_demo.load_demo_config(path)


@pytest.mark.parametrize("key,value,error", [
    ("speed_ups", 2.0, "demo.speed_ups: Expected a .*list.*Got value: 2.0"),
    ("target_seeds", [], "must be a non-empty list"),
    ("methods", None, "required: demo.methods"), ("zoo_seeds", [1.5], "demo.zoo_seeds.*1.5"),
    ("methods", ["none", "random"], r"demo.methods.*Expected a typing.Literal"),
    ("zoo_speed_ups", [1.5, 1.0], r"demo.zoo_speed_ups.*SpeedUp: 1.0 does not conform to restriction v>1.0"),
    ("configs", {"zoo": "zoo.yaml"}, r"demo.configs has no \['meta', 'prune'\]")])
def test_demo_section_is_checked_key_by_key(tmp_path: Path, key: str, value, error: str) -> None:
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["demo"][key] = value
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(pipeline_demo.DemoError, match=f"demo config '{path}'.*{error}"):
        pipeline_demo.load_demo_config(path)


@pytest.mark.parametrize("layers", [["quality_cifar10.yaml"], ["quality_cifar10.yaml", "quality_view.yaml"]])
def test_shipped_benchmark_configs_compose_and_every_stage_parses(tmp_path: Path, layers: list) -> None:
    """Each shipped benchmark config, merged over the ones before it, gives a demo whose every
    stage config of every method parses; the experiment file changes only what it names."""
    import dataclasses

    quality = benchmark_module("quality")
    bench = quality.Benchmark(data_root=str(tmp_path / "data"), target_seeds=[120],
                              config=[str(BENCHMARKS / name) for name in layers], max_pruning_ratio=0.67)
    cfg = pipeline_demo.load_demo_config(quality.compose_config(bench, tmp_path))
    data = {"root": str(tmp_path / "data"), "download": True}  # parse only: no data is read
    stages = pipeline_demo.demo_stage_configs(cfg, tmp_path / "out", data)
    settings = json.loads(json.dumps({"demo": dataclasses.asdict(cfg.demo), "select": cfg.select,
                                      "stages": stages}))
    configs = pipeline_demo.write_demo_configs(tmp_path / "out", settings, stages)
    pipeline_demo.check_demo(cfg, stages, configs, data)
    meta = stages["meta"]["model"]["init_args"]
    assert meta["distill"] == 1.0 and meta["message_passing"] == "paper"  # the base's
    assert stages["prune"]["prune"]["max_pruning_ratio"] == 0.67 and cfg.demo.target_seeds == [120]
    view = len(layers) == 2
    assert meta.get("pruned_view") == (1.0 if view else None)
    assert cfg.demo.zoo_speed_ups == ([1.2, 1.5, 1.7] if view else [])
    assert cfg.demo.zoo_seeds == list(range(12 if view else 6))
    assert stages["meta"]["data"]["init_args"]["steps_per_member"] == (1 if view else 4)


def test_quality_benchmark_table_is_mean_and_std_over_networks() -> None:
    """benchmarks/quality.py run's aggregation, against numbers worked out by hand."""
    quality = benchmark_module("quality")

    def report(method: str, target: float, test: float, measured: float | None = None) -> dict:
        acc = {"test": test, "val": test / 2}
        speed_up = {"target": target, "reached": target + 0.01}
        if measured is not None:  # runs from before latency was measured have none
            speed_up["measured"] = {"1": measured, "64": 9.0}
        return {"method": method, "speed_up": speed_up,
                "accuracy": {"final": acc, "finetuned": {"test": 0.5, "val": 0.5}},
                "macs": {"after": 2e6}, "params": {"after": 3000}}

    reports = {f"seed{i}/2x/none": report("none", 2.0, a, 1.5 + i / 10)
               for i, a in enumerate((0.50, 0.60, 0.70))}
    reports["seed0/3x/sparse"] = report("sparse", 3.0, 0.40)
    table = quality.summary_table(reports).splitlines()
    assert table[2].startswith("| 2x | none | 3 | 60.00 +- 10.00 | 30.00 +- 5.00 | 50.00 +- 0.00 "
                               "| 2.01-2.01x | 1.60x | 2.00M | 3.0k |")
    assert table[3].startswith("| 3x | sparse | 1 | 40.00 | 20.00 | 50.00 | 3.01-3.01x | - |")


def test_demo_stage_configs_use_stable_paths_under_out(tmp_path: Path) -> None:
    cfg = pipeline_demo.load_demo_config(DEMO)
    stages = pipeline_demo.demo_stage_configs(cfg, tmp_path, {"root": "/data"})
    assert stages["zoo"]["zoo"]["dir"] == str(tmp_path / "zoo")
    assert stages["zoo"]["pretrain"]["data"]["init_args"]["root"] == "/data"
    assert stages["meta"]["data"]["init_args"]["zoo"] == str(tmp_path / "zoo")
    assert stages["meta"]["data"]["init_args"]["images"]["init_args"]["root"] == "/data"
    assert stages["meta"]["trainer"]["logger"]["init_args"]["version"] == "meta"
    assert stages["prune"]["prune"]["dir"] == str(tmp_path / "prune")
    assert stages["prune"]["base"]["data"]["init_args"]["root"] == "/data"
    assert stages["prune"]["prune"]["speed_up"] == 2.0
    fast = pipeline_demo.demo_stage_configs(pipeline_demo.load_demo_config(DEMO, fast=True), tmp_path, {})
    assert fast["meta"]["trainer"]["max_epochs"] == 1
    assert fast["prune"]["prune"]["latency_batch_sizes"] == [] and fast["prune"]["prune"]["onnx"] is False
    assert fast["prune"]["prune"]["program"] is False
    assert pipeline_demo.load_demo_config(DEMO, fast=True).demo.smoke
    assert not cfg.demo.smoke


def test_zoo_speed_ups_add_members_per_seed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every zoo seed gets its config's member, then one variant per extra initial speed-up."""
    calls = []
    monkeypatch.setattr(pipeline_demo, "zoo_member",
                        lambda options: calls.append(options))
    monkeypatch.setattr(pipeline_demo, "fit_stage", lambda stage: None)
    monkeypatch.setattr(pipeline_demo, "select_checkpoint", lambda request: None)
    cfg = pipeline_demo.load_demo_config(DEMO)
    cfg.demo.zoo_seeds, cfg.demo.zoo_speed_ups = [3, 7], [1.2, 1.5]
    console = pipeline_demo.Stages(list(pipeline_demo.STAGES), tmp_path / "logs")
    best = pipeline_demo.metanetwork_stages(cfg, {"meta": {}}, {"zoo": "zoo.yaml", "meta": "m.yaml"},
                                            tmp_path, console, lambda name, fn: fn())
    assert best == tmp_path / "meta" / "selection" / "best.ckpt"
    assert calls == [ZooOptions("zoo.yaml", seed=s, speed_up=r, variant=v) for s in (3, 7)
                     for r, v in ((None, None), (1.2, "s1.2"), (1.5, "s1.5"))]


def weight_demo_config(tmp_path: Path, sparsity: str = "weights",
                       methods: tuple[str, ...] = ("metanetwork", "none")) -> Path:
    """The tiny demo with weight-sparsity targets (0.6, then 0.8 reusing stage 1) and, when a
    method needs one, a metanetwork meta-trained for ``sparsity``."""
    cfg = yaml.safe_load(tiny_demo_config(tmp_path).read_text())
    cfg["demo"].update(methods=list(methods), speed_ups=[], weight_sparsities=[0.6, 0.8])
    cfg["meta"]["model"]["init_args"].update(sparsity=sparsity, reg=1e-3)
    path = tmp_path / f"weights_{sparsity}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_a_smoke_demo_of_the_baselines_alone_zeroes_weights_to_each_target(
        tiny_cifar: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """The baselines alone with weight-sparsity targets, as a smoke run: no zoo and no
    metanetwork, every result marked smoke (a metanetwork meta-trained for weights prunes in
    weight_runs, and the demo's metanetwork stages do not depend on the kind of target but for
    the refusal below)."""
    import torch

    from networks import load_network

    cfg = yaml.safe_load(weight_demo_config(tmp_path, methods=("none", "sparse")).read_text())
    cfg["demo"]["smoke"] = True
    config, out = tmp_path / "smoke.yaml", tmp_path / "out"
    config.write_text(yaml.safe_dump(cfg))
    assert demo(config, tiny_cifar, out) == 0
    assert not (out / "zoo").exists() and not (out / "meta").exists()
    for method in ("none", "sparse"):
        for sparsity in (0.6, 0.8):
            run = out / "prune" / results.run_key(100, results.Target(sparsity, weights=True), method)
            assert run.parts[-2] == f"w{sparsity:g}"
            report = json.loads((run / "report.json").read_text())
            assert "speed_up" not in report and report["target"]["weight_sparsity"] == sparsity
            # counted here from the exported file: every convolution and dense layer's weights
            weights = [m.weight for m in load_network(run / "network.pt")[0].modules()
                       if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
            zeros, total = sum(int((w == 0).sum()) for w in weights), sum(w.numel() for w in weights)
            assert abs(zeros - sparsity * total) <= 1  # the target, rounded to a whole weight
        first, stage = out / "prune" / "seed100", pipeline_run.FIRST_STAGE[method]
        assert (first / "w0.8" / method / stage / "network.pt").read_bytes() == \
            (first / "w0.6" / method / stage / "network.pt").read_bytes()
    written = json.loads((out / "results.json").read_text())
    assert written["metanetwork"] is None and written["smoke"] is True
    assert json.loads((out / "demo.json").read_text())["demo"]["smoke"] is True
    text = (out / "results.md").read_text()
    assert text.startswith(f"**{demo_results.SMOKE_BANNER}**")
    assert "| weight sparsity reached |" in text
    for measure in ("stage-1 curve area, weight sparsity 0.5-0.9", "test acc at weight sparsity 0.6",
                    "test acc at weight sparsity 0.8"):
        assert f"| {measure} | sparse - none | 1 |" in text
    assert (out / "stage1_curves.png").is_file()
    printed = capsys.readouterr().out
    assert "| seed100 | none |" in printed and "metanetwork" not in printed
    assert demo_results.SMOKE_BANNER in printed
    assert "at weight sparsity 0.6, weight sparsity 0.8" in printed
    # the tiny config exports neither ONNX nor the torch.export program: none is named
    assert "seed<N>/w<S>/<method>/network.pt\n" in printed


def test_a_demo_whose_metanetwork_prunes_the_other_kind_is_refused_before_training(
        tiny_cifar: Path, tmp_path: Path) -> None:
    config, out = weight_demo_config(tmp_path, sparsity="channels"), tmp_path / "out"
    with pytest.raises(pipeline_demo.DemoError, match=r"model.init_args.sparsity is 'channels', "
                       r"but the demo's targets are demo.weight_sparsities; .* to 'weights'"):
        pipeline_demo.demo_command(pipeline_demo.DemoOptions(
            config=str(config), data_root=str(tiny_cifar), out=str(out)))
    assert not out.exists()


@pytest.mark.parametrize("targets, error", [
    ({"speed_ups": [2.0], "weight_sparsities": [0.5]}, "not both"),
    ({"speed_ups": [], "weight_sparsities": []}, "one of them a non-empty list")])
def test_a_demo_has_one_kind_of_target(tmp_path: Path, targets: dict, error: str) -> None:
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["demo"].update(targets)
    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with pytest.raises(pipeline_demo.DemoError,
                       match=f"demo.speed_ups .* or as demo.weight_sparsities .*{error}"):
        pipeline_demo.load_demo_config(path)


def test_weight_targets_name_their_folders_measures_and_prune_section(tmp_path: Path) -> None:
    target = results.Target(0.9, weights=True)
    assert (target.folder, target.text, target.option) == ("w0.9", "weight sparsity 0.9",
                                                           {"weight_sparsity": 0.9})
    assert results.run_key(7, 2, "none") == results.run_key(7, results.Target(2.0), "none") == \
        "seed7/2x/none"
    report = {"method": "none", "stage1_curve": {"range": [0.5, 0.9], "area": 0.61},
              "weight_sparsity": {"target": 0.9, "reached": 0.9001},
              "accuracy": {"final": {"test": 0.8}}}
    assert results.measures({"seed7/w0.9/none": report}) == {
        "stage-1 curve area, weight sparsity 0.5-0.9": {"none": {"seed7": 0.61}},
        "test acc at weight sparsity 0.9": {"none": {"seed7": 0.8}}}
    cfg = pipeline_demo.load_demo_config(weight_demo_config(tmp_path))
    prune_section = pipeline_demo.demo_stage_configs(cfg, tmp_path, {})["prune"]["prune"]
    assert prune_section["weight_sparsity"] == 0.6 and "speed_up" not in prune_section

"""Every shipped config parses and trains one batch (fast_dev_run) on tiny generated data."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.train import main

CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*/pretrain.yaml"))
pytestmark = pytest.mark.usefixtures("cli_argv")
NETWORKS = {"demo": "resnet20_cifar", "resnet56_cifar10": "resnet56_cifar",
            "vgg19_cifar100": "vgg19_bn_cifar", "resnet50_imagenet": "resnet50",
            "vit_b16_imagenet": "vit_b_16", "vit_cifar10": "vit_cifar"}


def test_every_task_has_a_pretrain_config() -> None:
    assert {p.parent.name for p in CONFIGS} == set(NETWORKS)


# ViT-B/16 at 224 takes ten times the others; its meta config still takes a step in the default
# suite (test_reliability.py) and its configs still parse (test_zoo.py)
@pytest.mark.parametrize("config", [pytest.param(c, marks=pytest.mark.slow)
                                    if c.parent.name == "vit_b16_imagenet" else c for c in CONFIGS],
                         ids=lambda p: p.parent.name)
def test_config_runs_fast_dev_run(config: Path, tiny_cifar: Path, tiny_imagenet: Path,
                                  tmp_path: Path) -> None:
    large = "imagenet" in config.parent.name
    root, classes = (tiny_imagenet, 2) if large else (tiny_cifar, 3)
    args = ["fit", "--config", str(config), f"--data.init_args.root={root}",
            f"--data.init_args.num_classes={classes}", f"--model.init_args.num_classes={classes}",
            "--data.init_args.batch_size=2", "--data.init_args.num_workers=0",
            "--data.init_args.subset=null", "--trainer.accelerator=cpu",
            "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false"]
    if large:
        args.append("--trainer.precision=32")  # the config's 16-mixed is for GPUs
    cli = main(args)
    assert cli.trainer.state.finished
    assert cli.model.hparams.network == NETWORKS[config.parent.name]  # the config's own model
    assert cli.model.network(cli.datamodule.val_set[0][0][None]).shape == (1, classes)


def test_stage_configs_merge_mappings_recursively_and_replace_everything_else():
    """pipeline.config_files.merged (OmegaConf): a later section overrides an earlier one key by key
    inside mappings; lists and scalars are replaced whole; interpolations stay for LightningCLI;
    the inputs are not modified; a list against a mapping is a one-line UserError."""
    from metaprune.errors import UserError
    from pipeline.config_files import merged

    base = {"trainer": {"max_epochs": 12, "callbacks": [{"class_path": "A"}]},
            "model": {"init_args": {"lr": 0.1, "num_classes": "${data.init_args.num_classes}"}}}
    stage = {"trainer": {"max_epochs": 3, "callbacks": []}, "model": {"init_args": {"lr": 0.01}},
             "extra": None}
    assert merged(base, stage) == {
        "trainer": {"max_epochs": 3, "callbacks": []},
        "model": {"init_args": {"lr": 0.01, "num_classes": "${data.init_args.num_classes}"}},
        "extra": None}
    assert base["trainer"]["max_epochs"] == 12 and stage["model"] == {"init_args": {"lr": 0.01}}
    with pytest.raises(UserError, match="cannot be merged"):
        merged({"trainer": {"callbacks": []}}, {"trainer": {"callbacks": {"x": 1}}})


# -- configs by component (pipeline.config_files) ----------------------------------------------

ROOT = Path(__file__).parents[1] / "configs"


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_base_merges_components_in_order_then_the_files_own_keys(tmp_path: Path) -> None:
    """``_base_`` paths are relative to the file naming them; a list merges left to right; the
    mapping's own keys win; components may have components; the result has no ``_base_``."""
    from pipeline.config_files import load_config_file

    _write(tmp_path / "parts/inner.yaml", "a: {x: 1, y: 2}\nlist: [1, 2]\n")
    _write(tmp_path / "parts/outer.yaml", "_base_: inner.yaml\na: {y: 3, z: 4}\n")
    _write(tmp_path / "parts/other.yaml", "a: {z: 5}\nb: other\n")
    task = _write(tmp_path / "task/t.yaml", "section:\n  _base_: [../parts/outer.yaml, "
                  "../parts/other.yaml]\n  a: {x: 9}\n  list: [7]\nkeep: ${section.b}\n")
    assert load_config_file(task) == {"section": {"a": {"x": 9, "y": 3, "z": 5}, "list": [7],
                                                  "b": "other"},
                                      "keep": "${section.b}"}


@pytest.mark.parametrize(("text", "message"), [
    ("d:\n  _base_: ../missing.yaml\n", r"missing.yaml' does not exist"),
    ("d:\n  _base_: 3\n", r"t.yaml', key d._base_: give a file path"),
    ("d:\n  _base_: list.yaml\n", r"key d._base_: 'list.yaml' must hold a mapping"),
    ("_base_: loop.yaml\n", r"includes itself \(.*t.yaml -> .*loop.yaml -> .*t.yaml\)"),
])
def test_a_bad_base_names_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    from metaprune.errors import UserError
    from pipeline.config_files import load_config_file

    _write(tmp_path / "list.yaml", "[1, 2]\n")
    _write(tmp_path / "loop.yaml", "_base_: t.yaml\n")
    with pytest.raises(UserError, match=message):
        load_config_file(_write(tmp_path / "t.yaml", text))


def test_each_dataset_and_the_logger_are_declared_once() -> None:
    """Task configs name the data and logger components instead of repeating them, and every
    shipped config composes (train.py and prune.py read the same composed document)."""
    from pipeline.config_files import BASE_KEY, load_config_file

    tasks = sorted(p for p in ROOT.glob("*/*.yaml") if p.parent.name not in {"data", "logger"})
    for path in tasks:
        text = path.read_text()
        assert "datamodules.ImageDataModule" not in text, path
        assert "TensorBoardLogger" not in text, path
        assert BASE_KEY not in str(load_config_file(path)), path
    assert sum(BASE_KEY in p.read_text() for p in tasks) >= 20


def test_train_cli_composes_a_config_and_takes_overrides_on_top(cli_argv) -> None:
    """``train.py --config`` of a composed file: the component's keys, the file's own, then the
    command line (jsonargparse alone cannot merge a file's keys over a file it includes)."""
    from pipeline.train import main

    cli = main(["--config", str(ROOT / "demo" / "pretrain.yaml"), "--data.init_args.subset=7",
                "--trainer.logger.init_args.name=elsewhere"], run=False)
    data = cli.config["data"]["init_args"]
    assert (data["dataset"], data["num_workers"], data["subset"]) == ("cifar10", 0, 7)
    assert cli.config["model"]["init_args"]["num_classes"] == 10  # ${...} resolved after composing
    assert cli.config["trainer"]["logger"]["init_args"]["name"] == "elsewhere"

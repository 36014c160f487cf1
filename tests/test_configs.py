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
    """pipeline.common.merged (OmegaConf): a later section overrides an earlier one key by key
    inside mappings; lists and scalars are replaced whole; interpolations stay for LightningCLI;
    the inputs are not modified; a list against a mapping is a one-line UserError."""
    from metaprune.errors import UserError
    from pipeline.common import merged

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

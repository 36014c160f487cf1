from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pruning_helpers import plain_accuracy

import networks
from callbacks import ExportNetwork
from datamodules import DatasetError
from lightning_modules import ImageClassifier
from pipeline.train import main

pytestmark = pytest.mark.usefixtures("cli_argv")
CONFIG = str(Path(__file__).parents[1] / "configs" / "demo" / "pretrain.yaml")


def tiny_args(root: Path, out: Path, *extra: str) -> list[str]:
    """The demo config shrunk to seconds: 3 classes, a quarter-width ResNet-8, 2 batches."""
    return ["--config", CONFIG, f"--data.init_args.root={root}", "--data.init_args.num_classes=3",
            "--data.init_args.batch_size=8", "--data.init_args.subset=null",
            "--model.init_args.num_classes=3", "--model.init_args.network=resnet8_cifar",
            "--model.init_args.network_kwargs={width: 0.25}",
            f"--trainer.logger.init_args.save_dir={out}", f"--trainer.default_root_dir={out}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false", *extra]


def _export(cli) -> Path:
    return next(cb for cb in cli.trainer.callbacks if isinstance(cb, ExportNetwork)).path


def test_fit_exports_best_network_and_test_evaluates(tiny_cifar: Path, tmp_path: Path) -> None:
    cli = main(["fit", *tiny_args(tiny_cifar, tmp_path, "--trainer.max_epochs=2",
                                  "--trainer.limit_train_batches=2")])
    best = cli.trainer.checkpoint_callback.best_model_path
    assert Path(best).name.startswith("epoch00") and "acc" in Path(best).name
    assert (Path(best).parent / "last.ckpt").is_file()

    path = _export(cli)
    assert path == Path(cli.trainer.log_dir) / "network.pt"
    net, record = networks.load_network(path)
    assert record["metadata"]["checkpoint"] == best
    best_score = float(cli.trainer.checkpoint_callback.best_model_score)
    assert record["metadata"]["val_acc"] == pytest.approx(best_score)
    reference = ImageClassifier.load_from_checkpoint(best, map_location="cpu").network.eval()
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), reference(x), rtol=0, atol=0)

    cli = main(["test", *tiny_args(tiny_cifar, tmp_path / "test"), f"--ckpt_path={best}"])
    assert cli.datamodule.test_set is not None and len(cli.datamodule.test_set) == 12
    expected = plain_accuracy(reference, cli.datamodule.test_dataloader())  # the best checkpoint's
    assert float(cli.trainer.callback_metrics["test/acc"]) == pytest.approx(expected)


def test_fast_dev_run_exports_final_weights(tiny_cifar: Path, tmp_path: Path) -> None:
    cli = main(["fit", *tiny_args(tiny_cifar, tmp_path, "--trainer.fast_dev_run=true")])
    net, _ = networks.load_network(_export(cli))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), cli.model.network.eval()(x), rtol=0, atol=0)


def test_missing_data_stops_with_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DatasetError,
                       match=r"missing.*does not exist.*--data_root.*data.init_args.download: true"):
        main(["fit", *tiny_args(tmp_path / "missing", tmp_path, "--trainer.fast_dev_run=true")])


@pytest.mark.slow  # ~20 s alone; DDP equivalence is in the default suite (test_ddp_equivalence.py)
def test_ddp_spawn_on_two_cpu_processes(tiny_cifar: Path, tmp_path: Path) -> None:
    cli = main(["fit", *tiny_args(tiny_cifar, tmp_path, "--trainer.max_epochs=1",
                                  "--trainer.strategy=ddp_spawn", "--trainer.devices=2",
                                  "--trainer.accelerator=cpu")])
    assert cli.trainer.world_size == 2
    assert Path(cli.trainer.checkpoint_callback.best_model_path).is_file()
    networks.load_network(next(tmp_path.rglob("network.pt")))

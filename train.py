"""Train or evaluate a target network with LightningCLI.

    python train.py fit  --config configs/resnet56_cifar10/pretrain.yaml
    python train.py test --config configs/resnet56_cifar10/pretrain.yaml --ckpt_path <ckpt>

After ``fit`` the best checkpoint's network (by val/acc) is also written as a network file,
``<log_dir>/network.pt``, the input format of the zoo and pruning stages.
"""
from __future__ import annotations

import os

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a shared CPU
# machine, spinning threads of two jobs starve each other: a ResNet-20 step measured 3.0 s
# with the default policy and 0.30 s with PASSIVE while another job ran (0.22 s alone).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import copy  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from lightning.pytorch.utilities import rank_zero_info  # noqa: E402

import datamodules  # noqa: F401,E402  (registers ImageDataModule for class_path lookup)
import lightning_modules  # noqa: F401,E402
import networks  # noqa: E402


class ExportNetwork(Callback):
    """At the end of fit, save the best checkpoint's network as a network file.

    Runs inside the training processes, so it works under ddp_spawn as well as ddp. Only rank
    0 reads the checkpoint (other nodes may not see its file system) and writes the export,
    into a copy of the network: the module itself keeps its final weights on every rank.
    Without a checkpoint (fast_dev_run) the final weights are exported.
    """

    def __init__(self, filename: str = "network.pt") -> None:
        self.filename = filename
        self.path: Path | None = None

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not hasattr(pl_module, "arch"):
            return  # meta-training: the module carries no target network to export
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / self.filename  # all ranks
        if not trainer.is_global_zero:
            return
        ckpt = trainer.checkpoint_callback
        best = getattr(ckpt, "best_model_path", "") if ckpt else ""
        network = pl_module.network
        if best:
            state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
            network = copy.deepcopy(network)
            network.load_state_dict({k.removeprefix("network."): v for k, v in state.items()
                                     if k.startswith("network.")})
        score = getattr(ckpt, "best_model_score", None)
        metadata = {"checkpoint": best or None, "val_acc": float(score) if score is not None else None,
                    **pl_module.lineage(trainer.datamodule)}
        networks.save_network(network, self.path, arch=pl_module.arch, metadata=metadata)
        rank_zero_info(f"exported network ({best or 'final weights'}) to {self.path}")


class TrainCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.add_lightning_class_args(ExportNetwork, "export")
        parser.set_defaults({
            # Metric names contain "/", so the filename spells them out itself.
            "checkpoint.monitor": "val/acc",
            "checkpoint.mode": "max",
            "checkpoint.save_last": True,
            "checkpoint.auto_insert_metric_name": False,
            "checkpoint.filename": "epoch{epoch:03d}-acc{val/acc:.4f}",
            "trainer.logger": {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                               "init_args": {"save_dir": "runs", "name": "default"}},
            "trainer.callbacks": [{"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
                                   "init_args": {"logging_interval": "epoch"}}],
        })

    def before_instantiate_classes(self) -> None:
        """``fit --ckpt_path last`` resumes in the killed run's own logger version.

        Lightning looks for ``last.ckpt`` only in the checkpoint directory of the run being
        started; with the logger's version left automatic that is a new, empty ``version_<n+1>``,
        so the run would silently start from scratch. Pin the logger to the newest existing
        version that holds a ``checkpoints/last.ckpt`` (an explicit version or
        ``checkpoint.dirpath`` is left as given)."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        if self.subcommand != "fit" or config is None or config.get("ckpt_path") != "last" \
                or config.get("checkpoint.dirpath"):
            return
        logger = config.get("trainer.logger")
        init = getattr(logger, "init_args", None)
        if init is None or getattr(init, "version", "unset") is not None:
            return
        save_dir = getattr(init, "save_dir", None) or config.get("trainer.default_root_dir") or "."
        base = Path(save_dir) / str(getattr(init, "name", None) or "lightning_logs")
        found = [((d / "checkpoints" / "last.ckpt").stat().st_mtime, int(d.name[8:]))
                 for d in base.glob("version_*") if d.name[8:].isdigit()
                 and (d / "checkpoints" / "last.ckpt").is_file()] if base.is_dir() else []
        if found:
            init.version = max(found)[1]
            rank_zero_info(f"--ckpt_path last: resuming {base / f'version_{init.version}'}")


def main(args: list[str] | None = None, run: bool = True) -> TrainCLI:
    """Entry point; ``args`` replaces ``sys.argv[1:]`` (used by the tests)."""
    return TrainCLI(
        args=args,
        run=run,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()

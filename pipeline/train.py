"""The training command: LightningCLI with checkpointing, network export and resume
(``python train.py``; the pipeline builds every Lightning stage with :func:`main` too)."""
from __future__ import annotations

import sys
import warnings
from pathlib import Path

import yaml
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.utilities import rank_zero_info

import datamodules  # noqa: F401  (registers ImageDataModule for class_path lookup)
import lightning_modules  # noqa: F401
from callbacks.export import ExportNetwork

from .common import tensorboard_logger
from .config_files import load_config_file, uses_components


class TrainCLI(LightningCLI):
    """LightningCLI with a checkpoint callback, network export and ``--ckpt_path last`` resume."""

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
            "trainer.logger": tensorboard_logger("runs", "default"),
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


def composed_config_args(args: list[str]) -> list[str]:
    """``args`` with each ``--config FILE`` whose file names component files (``_base_``,
    :mod:`pipeline.config_files`) replaced by the composed document: LightningCLI takes a
    config as text too, and jsonargparse alone cannot merge a file's own keys over a file it
    includes."""
    out = list(args)
    for i, token in enumerate(out):
        if token == "--config" and i + 1 < len(out):
            at, path = i + 1, out[i + 1]
        elif token.startswith("--config="):
            at, path = i, token.partition("=")[2]
        else:
            continue
        if uses_components(path):
            text = yaml.safe_dump(load_config_file(path), sort_keys=False)
            out[at] = text if at != i else f"--config={text}"
    return out


def main(args: list[str] | None = None, run: bool = True) -> TrainCLI:
    """Entry point; ``args`` replaces ``sys.argv[1:]`` (used by the tests)."""
    given = sys.argv[1:] if args is None else args
    composed = composed_config_args(given)
    if args is None and composed != given:  # the command line itself, with configs composed
        warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return TrainCLI(
        args=None if composed == given and args is None else composed,
        run=run,
        subclass_mode_model=True,
        subclass_mode_data=True,
        seed_everything_default=0,
        parser_kwargs={"parser_mode": "omegaconf"},
        save_config_kwargs={"overwrite": True},
    )

"""``prune.py zoo`` (docs/zoo.md): train a target network (stage 1, "pretrain"), prune it to the
task's initial speed-up and finetune it (stage 2, "finetune"), and add it to the zoo as member
``seed`` (or ``seed<N>-<variant>``: another member of the same trained network). Both stages
are ordinary Lightning fits built from the config by ``pipeline.train.main``. A stage whose
output exists is skipped, and a stage killed half way resumes from its ``last.ckpt``."""
from __future__ import annotations

import copy
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from jsonargparse.typing import PositiveInt

from datamodules.zoo_manifest import ZooError, find_member, member_name
from metaprune.errors import UserError

from .common import (
    check_stage_config,
    fit_stage,
    is_rank_zero,
    merged,
    read_config,
    refuse_stage_seeds,
    tensorboard_logger,
    wait_for,
)
from .options import SpeedUp, ZooOptions


class ZooConfigError(UserError):
    """A zoo.yaml is malformed; the message names the file and the key."""


@dataclass
class ZooSettings:
    """The ``zoo`` section of a zoo.yaml (docs/zoo.md).

    Args:
        speed_up: the initial pruning target, against the unpruned architecture.
        dir: the zoo folder; empty: ``zoo/<the config's folder name>``.
        iterative_steps: pruning steps to reach ``speed_up``.
        input_size: one input's shape (channels, height, width).
        pretrained: a network file to start from instead of stage 1.
        seed: the member's seed (seeds both stages; ``--seed`` overrides it).
        variant: "" for the member made as configured; a name (``--variant``) for another
            member of the same trained network, e.g. pruned to another ``--speed_up``. Stage 1
            is shared by every variant of a seed; stage 2 runs per variant.
    """

    speed_up: SpeedUp
    dir: str = ""
    iterative_steps: PositiveInt = 200
    input_size: list[PositiveInt] = field(default_factory=lambda: [3, 32, 32])
    pretrained: str | None = None
    seed: int = 0
    variant: str = ""


@dataclass
class ZooConfig:
    """A zoo.yaml: the member's settings and its two stages' LightningCLI configs (``finetune``
    is merged over ``pretrain``)."""

    zoo: ZooSettings
    pretrain: dict
    finetune: dict = field(default_factory=dict)


def load_zoo_config(path: str | os.PathLike, seed: int | None = None, zoo_dir: str | None = None,
                    data_root: str | None = None, pretrained: str | None = None,
                    speed_up: float | None = None, variant: str | None = None,
                    overrides: dict | None = None) -> ZooConfig:
    """Read a zoo.yaml and apply the command-line options and ``overrides`` (``--SECTION.KEY
    VALUE``, merged over the file; ``zoo.dir`` filled in)."""
    path = Path(path)
    cfg = read_config(path, ZooConfig, ZooConfigError, "zoo", overrides=overrides)
    refuse_stage_seeds((cfg.pretrain, cfg.finetune), f"zoo config {str(path)!r}", ZooConfigError,
                       "the member's seed comes from --seed (or zoo.seed) and seeds both stages")
    zoo = cfg.zoo
    zoo.dir = zoo_dir or zoo.dir or f"zoo/{path.parent.name}"
    zoo.seed = zoo.seed if seed is None else int(seed)
    zoo.pretrained = pretrained or zoo.pretrained
    zoo.speed_up = zoo.speed_up if speed_up is None else float(speed_up)
    zoo.variant = zoo.variant if variant is None else variant
    try:
        member_name(zoo.seed, zoo.variant)
    except ZooError as e:
        raise ZooConfigError(f"zoo config {str(path)!r}: {e}") from None
    if data_root is not None:
        for section in (cfg.pretrain, cfg.finetune):
            data = section.get("data")
            if section is cfg.pretrain or (isinstance(data, dict) and "init_args" in data):
                section.setdefault("data", {}).setdefault("init_args", {})["root"] = data_root
    return cfg


def _logger(zoo_dir: Path, name: str, stage: str) -> dict:
    return tensorboard_logger(zoo_dir / "runs", name, stage)


def stage_dir(zoo_dir: str | os.PathLike, seed: int, stage: str, variant: str = "") -> Path:
    """``<zoo_dir>/runs/seed<N>[-<variant>]/<stage>``: the stage's log dir (TensorBoard,
    checkpoints, config)."""
    return Path(zoo_dir) / "runs" / member_name(seed, variant) / stage


def pretrain_config(cfg: ZooConfig) -> dict:
    """The LightningCLI config (without subcommand) of stage 1."""
    zoo, out = cfg.zoo, copy.deepcopy(cfg.pretrain)
    out["seed_everything"] = zoo.seed
    trainer = out.setdefault("trainer", {})
    trainer["logger"] = _logger(Path(zoo.dir), member_name(zoo.seed), "pretrain")
    trainer["default_root_dir"] = str(stage_dir(zoo.dir, zoo.seed, "pretrain"))
    return out


def finetune_config(cfg: ZooConfig, weights: str | os.PathLike) -> dict:
    """The LightningCLI config of stage 2: ``finetune`` merged over ``pretrain``, starting
    from ``weights``, with the PruneToSpeedUp and ExportToZoo callbacks."""
    zoo = cfg.zoo
    out = merged(cfg.pretrain, cfg.finetune)
    out["seed_everything"] = zoo.seed
    out.setdefault("model", {}).setdefault("init_args", {})["weights"] = str(weights)
    trainer = out.setdefault("trainer", {})
    trainer["logger"] = _logger(Path(zoo.dir), member_name(zoo.seed, zoo.variant), "finetune")
    trainer["default_root_dir"] = str(stage_dir(zoo.dir, zoo.seed, "finetune", zoo.variant))
    callbacks = list(trainer.get("callbacks") or [
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
         "init_args": {"logging_interval": "epoch"}}])
    callbacks += [
        {"class_path": "callbacks.PruneToSpeedUp",
         "init_args": {"speed_up": zoo.speed_up, "iterative_steps": zoo.iterative_steps,
                       "input_size": list(zoo.input_size)}},
        {"class_path": "callbacks.ExportToZoo",
         "init_args": {"zoo_dir": zoo.dir, "seed": zoo.seed, "variant": zoo.variant,
                       "input_size": list(zoo.input_size)}},
    ]
    trainer["callbacks"] = callbacks
    return out


def run_pretrain(cfg: ZooConfig) -> Path:
    """Stage 1: train the target network; returns its network file (skipped when it exists)."""
    zoo = cfg.zoo
    if zoo.pretrained:
        path = Path(zoo.pretrained)
        if not path.is_file():
            raise ZooConfigError(f"zoo.pretrained={str(path)!r} does not exist; pass a network "
                                 "file (networks.save_network) or set it to null to train one")
        return path
    path = stage_dir(zoo.dir, zoo.seed, "pretrain") / "network.pt"
    if path.is_file():
        print(f"stage 1 (pretrain) done already: {path}", file=sys.stderr)
        return path
    fit_stage(pretrain_config(cfg))
    wait_for(path)
    return path


def run_finetune(cfg: ZooConfig, weights: Path) -> dict | None:
    """Stage 2: prune, finetune, test, register the member (skipped when its row exists)."""
    zoo = cfg.zoo
    row = find_member(zoo.dir, zoo.seed, zoo.variant)
    if row is not None:
        print(f"stage 2 (finetune) done already: {member_name(zoo.seed, zoo.variant)} is in "
              "the zoo", file=sys.stderr)
        return row
    wait_for(weights)
    fit_stage(finetune_config(cfg, weights), test=True)
    return find_member(zoo.dir, zoo.seed, zoo.variant)


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def check_zoo_stages(cfg: ZooConfig, path: str | os.PathLike) -> None:
    """Both stage configs parsed and type-checked before stage 1 trains (errors name the file,
    the section and the key)."""
    where = f"zoo config {str(path)!r}, section"
    check_stage_config(pretrain_config(cfg), f"{where} 'pretrain'", ZooConfigError)
    weights = stage_dir(cfg.zoo.dir, cfg.zoo.seed, "pretrain") / "network.pt"
    check_stage_config(finetune_config(cfg, weights), f"{where} 'finetune' (merged over 'pretrain')",
                       ZooConfigError)




def zoo_member(args: ZooOptions) -> tuple[ZooConfig, dict | None]:
    """Train, prune and finetune one zoo member (``prune.py zoo``; None in ``args`` means the
    config's value). Returns the config as applied and the member's manifest row (None on a DDP
    rank that does not register it)."""
    cfg = load_zoo_config(args.config, seed=args.seed, zoo_dir=args.zoo_dir,
                          data_root=args.data_root, pretrained=args.pretrained,
                          speed_up=args.speed_up, variant=args.variant, overrides=args.overrides)
    check_zoo_stages(cfg, args.config)
    weights = run_pretrain(cfg)
    return cfg, run_finetune(cfg, weights)


def zoo_command(args: ZooOptions) -> int:
    """``prune.py zoo``: train, prune and finetune one zoo member."""
    t0 = time.perf_counter()
    cfg, row = zoo_member(args)
    if row is not None and is_rank_zero():
        name = member_name(row["seed"], row["variant"])
        print(f"zoo {cfg.zoo.dir}: {name} -> {row['file']}, speed-up "
              f"{row['speed_up']:.3f}x ({row['macs']:,} MACs), val/acc {_acc(row['val_acc'])}, "
              f"test/acc {_acc(row['test_acc'])} [{time.perf_counter() - t0:.0f} s]")
    return 0


"""``prune.py zoo`` (docs/zoo.md): train a target network (stage 1, "pretrain"), prune it to the
task's initial speed-up and finetune it (stage 2, "finetune"), and add it to the zoo as member
``seed``. Both stages are ordinary Lightning fits built from the config by ``pipeline.train.main``. A stage
whose output exists is skipped, and a stage killed half way resumes from its ``last.ckpt``."""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

from metaprune.errors import UserError

from .common import (
    add_data_root_argument,
    check_stage_config,
    fit_stage,
    is_rank_zero,
    merged,
    read_yaml_config,
    wait_for,
)

ZOO_KEYS = {"dir", "speed_up", "iterative_steps", "input_size", "pretrained", "seed"}


class ZooConfigError(UserError):
    """A zoo.yaml is malformed; the message names the file and the key."""


def load_zoo_config(path: str | os.PathLike, seed: int | None = None, zoo_dir: str | None = None,
                    data_root: str | None = None, pretrained: str | None = None) -> dict:
    """Read a zoo.yaml and apply the command-line overrides. Returns ``{"zoo", "pretrain",
    "finetune"}`` with ``zoo`` complete (defaults filled in, ``seed`` set)."""
    path = Path(path)
    cfg = read_yaml_config(path, "zoo", ZooConfigError, ("zoo", "pretrain", "finetune"))
    where = f"zoo config {str(path)!r}"
    for key in ("zoo", "pretrain"):
        if not isinstance(cfg.get(key), dict):
            raise ZooConfigError(f"{where}: section {key!r} is missing or not a mapping")
    cfg.setdefault("finetune", {})
    if not isinstance(cfg["finetune"], dict):
        raise ZooConfigError(f"{where}: section 'finetune' must be a mapping")
    zoo = cfg["zoo"]
    unknown = sorted(set(zoo) - ZOO_KEYS)
    if unknown:
        raise ZooConfigError(f"{where}: unknown zoo keys {unknown}; allowed: {sorted(ZOO_KEYS)}")
    if "speed_up" not in zoo:
        raise ZooConfigError(f"{where}: zoo.speed_up (the initial pruning target) is required")
    if "seed_everything" in cfg["pretrain"] or "seed_everything" in cfg["finetune"]:
        raise ZooConfigError(f"{where}: do not set seed_everything; the member's seed comes from "
                             "--seed (or zoo.seed) and seeds both stages")
    zoo.setdefault("dir", f"zoo/{path.parent.name}")
    zoo.setdefault("iterative_steps", 200)
    zoo.setdefault("input_size", [3, 32, 32])
    zoo.setdefault("pretrained", None)
    zoo.setdefault("seed", 0)
    for key, value in (("seed", seed), ("dir", zoo_dir), ("pretrained", pretrained)):
        if value is not None:
            zoo[key] = value
    if data_root is not None:
        for section in ("pretrain", "finetune"):
            data = cfg[section].get("data")
            if section == "pretrain" or (isinstance(data, dict) and "init_args" in data):
                cfg[section].setdefault("data", {}).setdefault("init_args", {})["root"] = data_root
    zoo["seed"] = int(zoo["seed"])
    return cfg


def _logger(zoo_dir: Path, seed: int, stage: str) -> dict:
    return {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(zoo_dir / "runs"), "name": f"seed{seed}", "version": stage}}


def stage_dir(zoo_dir: str | os.PathLike, seed: int, stage: str) -> Path:
    """``<zoo_dir>/runs/seed<N>/<stage>``: the stage's log dir (TensorBoard, checkpoints, config)."""
    return Path(zoo_dir) / "runs" / f"seed{int(seed)}" / stage


def pretrain_config(cfg: dict) -> dict:
    """The LightningCLI config (without subcommand) of stage 1."""
    zoo, out = cfg["zoo"], copy.deepcopy(cfg["pretrain"])
    out["seed_everything"] = zoo["seed"]
    trainer = out.setdefault("trainer", {})
    trainer["logger"] = _logger(Path(zoo["dir"]), zoo["seed"], "pretrain")
    trainer["default_root_dir"] = str(stage_dir(zoo["dir"], zoo["seed"], "pretrain"))
    return out


def finetune_config(cfg: dict, weights: str | os.PathLike) -> dict:
    """The LightningCLI config of stage 2: ``finetune`` merged over ``pretrain``, starting
    from ``weights``, with the PruneToSpeedUp and ExportToZoo callbacks."""
    zoo = cfg["zoo"]
    out = merged(cfg["pretrain"], cfg["finetune"])
    out["seed_everything"] = zoo["seed"]
    out.setdefault("model", {}).setdefault("init_args", {})["weights"] = str(weights)
    trainer = out.setdefault("trainer", {})
    trainer["logger"] = _logger(Path(zoo["dir"]), zoo["seed"], "finetune")
    trainer["default_root_dir"] = str(stage_dir(zoo["dir"], zoo["seed"], "finetune"))
    callbacks = list(trainer.get("callbacks") or [
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
         "init_args": {"logging_interval": "epoch"}}])
    callbacks += [
        {"class_path": "callbacks.PruneToSpeedUp",
         "init_args": {"speed_up": float(zoo["speed_up"]), "iterative_steps": int(zoo["iterative_steps"]),
                       "input_size": list(zoo["input_size"])}},
        {"class_path": "callbacks.ExportToZoo",
         "init_args": {"zoo_dir": str(zoo["dir"]), "seed": zoo["seed"],
                       "input_size": list(zoo["input_size"])}},
    ]
    trainer["callbacks"] = callbacks
    return out


def run_pretrain(cfg: dict) -> Path:
    """Stage 1: train the target network; returns its network file (skipped when it exists)."""
    zoo = cfg["zoo"]
    if zoo["pretrained"]:
        path = Path(zoo["pretrained"])
        if not path.is_file():
            raise ZooConfigError(f"zoo.pretrained={str(path)!r} does not exist; pass a network "
                                 "file (networks.save_network) or set it to null to train one")
        return path
    path = stage_dir(zoo["dir"], zoo["seed"], "pretrain") / "network.pt"
    if path.is_file():
        print(f"stage 1 (pretrain) done already: {path}", file=sys.stderr)
        return path
    fit_stage(pretrain_config(cfg))
    wait_for(path)
    return path


def run_finetune(cfg: dict, weights: Path) -> dict | None:
    """Stage 2: prune, finetune, test, register the member (skipped when its row exists)."""
    from datamodules.zoo_manifest import find_member

    zoo = cfg["zoo"]
    row = find_member(zoo["dir"], zoo["seed"])
    if row is not None:
        print(f"stage 2 (finetune) done already: seed {zoo['seed']} is in the zoo", file=sys.stderr)
        return row
    wait_for(weights)
    fit_stage(finetune_config(cfg, weights), test=True)
    return find_member(zoo["dir"], zoo["seed"])


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def check_zoo_stages(cfg: dict, path: str | os.PathLike) -> None:
    """Both stage configs parsed and type-checked before stage 1 trains (errors name the file,
    the section and the key)."""
    where = f"zoo config {str(path)!r}, section"
    check_stage_config(pretrain_config(cfg), f"{where} 'pretrain'", ZooConfigError)
    weights = stage_dir(cfg["zoo"]["dir"], cfg["zoo"]["seed"], "pretrain") / "network.pt"
    check_stage_config(finetune_config(cfg, weights), f"{where} 'finetune' (merged over 'pretrain')",
                       ZooConfigError)


def add_zoo_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``prune.py zoo``."""
    parser.add_argument("--config", required=True, help="configs/<task>/zoo.yaml")
    parser.add_argument("--seed", type=int, default=None,
                        help="member seed (seeds both stages); default zoo.seed or 0")
    parser.add_argument("--zoo_dir", default=None, help="zoo directory; default zoo.dir")
    add_data_root_argument(parser, what="overrides data.init_args.root")
    parser.add_argument("--pretrained", default=None,
                        help="network file to start from; skips stage 1 (overrides zoo.pretrained)")


def zoo_command(args: argparse.Namespace) -> int:
    """``prune.py zoo``: train, prune and finetune one zoo member."""
    cfg = load_zoo_config(args.config, seed=args.seed, zoo_dir=args.zoo_dir,
                          data_root=args.data_root, pretrained=args.pretrained)
    check_zoo_stages(cfg, args.config)
    t0 = time.perf_counter()
    weights = run_pretrain(cfg)
    row = run_finetune(cfg, weights)
    if row is not None and is_rank_zero():
        zoo = cfg["zoo"]
        print(f"zoo {zoo['dir']}: seed {row['seed']} -> {row['file']}, speed-up "
              f"{row['speed_up']:.3f}x ({row['macs']:,} MACs), val/acc {_acc(row['val_acc'])}, "
              f"test/acc {_acc(row['test_acc'])} [{time.perf_counter() - t0:.0f} s]")
    return 0


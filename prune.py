"""The pruning pipeline of DESIGN section 2, one subcommand per step.

    python prune.py zoo --config configs/<task>/zoo.yaml [--seed N] [--zoo_dir DIR] [--data_root PATH]

Subcommands are registered in ``SUBCOMMANDS``: each is a pair of functions, one adding its
arguments to an argparse subparser and one running it with the parsed namespace. To add one,
write ``add_<name>_arguments(parser)`` and ``<name>_command(args) -> int`` and list them there.

``zoo`` (docs/zoo.md): train a target network (stage 1, "pretrain"), prune it to the task's
initial speed-up and finetune it (stage 2, "finetune"), and add it to the zoo as member
``seed``. Both stages are ordinary Lightning fits built from the config by ``train.main`` (so
TensorBoard logs, checkpoints and strategies work as in ``train.py``). A stage whose output
exists is skipped, and a stage killed half way resumes from its ``last.ckpt``.

    python prune.py run --config configs/<task>/prune.yaml --network PATH [--metanetwork PATH]
        [--method metanetwork|none|sparse] [--speed_up S] [--out DIR] [--data_root PATH] [--seed N]

``run`` (docs/pruning.md): prune one network to ``S`` x fewer MACs than its unpruned
architecture. Stage 1 (metanetwork feedforward, the identity, or sparse training) + finetune,
stage 2 prune + finetune, each a Lightning fit through ``train.main``; then evaluation, export
(network file, ``torch.export`` program, ``curve.png``) and ``report.json``. Inputs are checked
before any training; finished stages are skipped. ``curve`` and ``select`` live in
callbacks/curve.py and callbacks/selection.py.

    python prune.py demo [--data_root PATH] [--out DIR] [--fast]

``demo`` (docs/pruning.md): the whole pipeline on configs/demo/demo.yaml: ``zoo`` for seeds
0-3 and a held-out seed 100, meta-training, ``select``, ``run`` with every method, a table.
Data: ``--data_root``, else ``$METAPRUNE_DATA``, else CIFAR-10 downloaded to data/cifar10.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see train.py

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Callable, Sequence  # noqa: E402

import yaml  # noqa: E402

# ---------------------------------------------------------------------------------------------
# zoo
# ---------------------------------------------------------------------------------------------
ZOO_KEYS = {"dir", "speed_up", "iterative_steps", "input_size", "pretrained", "seed"}


class ZooConfigError(ValueError):
    """A zoo.yaml is malformed; the message names the file and the key."""


def deep_merge(base: dict, override: dict) -> dict:
    """``override`` merged into a copy of ``base``: dicts recursively, anything else replaced."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def read_yaml_config(path: str | os.PathLike, kind: str, error: type[ValueError],
                     sections: Sequence[str]) -> dict:
    """A YAML config file as a dict of known top-level ``sections``; ``error`` names the file."""
    where = f"{kind} config {str(path)!r}"
    try:
        cfg = yaml.safe_load(Path(path).read_text())
    except OSError as e:
        raise error(f"{where} cannot be read: {e}") from e
    except yaml.YAMLError as e:
        raise error(f"{where} is not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise error(f"{where} must be a mapping with keys {', '.join(sections)}")
    unknown = sorted(set(cfg) - set(sections))
    if unknown:
        raise error(f"{where}: unknown top-level keys {unknown}; allowed: {list(sections)}")
    return cfg


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
    out = deep_merge(cfg["pretrain"], cfg["finetune"])
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


def _is_rank_zero() -> bool:
    ranks = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")
    return all(os.environ.get(k, "0") == "0" for k in ranks)


def _wait_for(path: Path, timeout_s: float = 600.0) -> None:
    """Ranks > 0 under a relaunching DDP strategy may get here before rank 0 wrote ``path``."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file() and not _is_rank_zero() and time.monotonic() < deadline:
        time.sleep(1.0)


def fit_stage(config: dict, test: bool = False) -> Any:
    """Run one Lightning fit (optionally followed by a test of the best checkpoint) from a
    LightningCLI config dict; resumes from ``<log_dir>/checkpoints/last.ckpt`` when present."""
    import train

    # train.main warns when sys.argv (ours) and args both exist; sys.argv must stay as it is
    # (a relaunching DDP strategy starts the other ranks with it).
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    cli = train.main(["--config", yaml.safe_dump(config, sort_keys=False)], run=False)
    last = Path(cli.trainer.log_dir) / "checkpoints" / "last.ckpt"
    ckpt_path = str(last) if last.is_file() else None
    if ckpt_path:
        print(f"resuming from {ckpt_path}", file=sys.stderr)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    if test:
        has_best = bool(getattr(cli.trainer.checkpoint_callback, "best_model_path", ""))
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best" if has_best else None)
    return cli


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
    _wait_for(path)
    return path


def run_finetune(cfg: dict, weights: Path) -> dict | None:
    """Stage 2: prune, finetune, test, register the member (skipped when its row exists)."""
    from callbacks import find_member

    zoo = cfg["zoo"]
    row = find_member(zoo["dir"], zoo["seed"])
    if row is not None:
        print(f"stage 2 (finetune) done already: seed {zoo['seed']} is in the zoo", file=sys.stderr)
        return row
    _wait_for(weights)
    fit_stage(finetune_config(cfg, weights), test=True)
    return find_member(zoo["dir"], zoo["seed"])


def add_zoo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="configs/<task>/zoo.yaml")
    parser.add_argument("--seed", type=int, default=None,
                        help="member seed (seeds both stages); default zoo.seed or 0")
    parser.add_argument("--zoo_dir", default=None, help="zoo directory; default zoo.dir")
    parser.add_argument("--data_root", default=None, help="overrides data.init_args.root")
    parser.add_argument("--pretrained", default=None,
                        help="network file to start from; skips stage 1 (overrides zoo.pretrained)")


def zoo_command(args: argparse.Namespace) -> int:
    cfg = load_zoo_config(args.config, seed=args.seed, zoo_dir=args.zoo_dir,
                          data_root=args.data_root, pretrained=args.pretrained)
    t0 = time.perf_counter()
    weights = run_pretrain(cfg)
    row = run_finetune(cfg, weights)
    if row is not None and _is_rank_zero():
        zoo = cfg["zoo"]
        print(f"zoo {zoo['dir']}: seed {row['seed']} -> {row['file']}, speed-up "
              f"{row['speed_up']:.3f}x ({row['macs']:,} MACs), val/acc {row['val_acc']}, "
              f"test/acc {row['test_acc']} [{time.perf_counter() - t0:.0f} s]")
    return 0


# ---------------------------------------------------------------------------------------------
# run: prune one network (docs/pruning.md)
# ---------------------------------------------------------------------------------------------
RUN_SECTIONS = ("prune", "base", "finetune", "final")
RUN_KEYS = {"dir", "speed_up", "iterative_steps", "input_size", "reg", "alpha", "seed"}
METHODS = ("metanetwork", "none", "sparse")
# The first stage's name per method: everything after it is shared by all methods.
FIRST_STAGE = {"metanetwork": "feedforward_finetune", "none": "finetune", "sparse": "sparse"}
SECOND_STAGE = "prune_finetune"
REPORT, RUN_FILE, EVAL_FILE = "report.json", "run.json", "eval.json"
CLASSIFIER = "lightning_modules.ImageClassifier"


class PruneRunError(ValueError):
    """Bad input to ``prune.py run``: the message names the problem and the fix."""


def load_prune_config(path: str | os.PathLike, speed_up: float | None = None,
                      seed: int | None = None, data_root: str | None = None) -> dict:
    """Read a prune.yaml (sections ``prune``, ``base``, ``finetune``, ``final``) and apply the
    command-line overrides; ``prune`` comes back complete (defaults filled in)."""
    path = Path(path)
    where = f"prune config {str(path)!r}"
    cfg = read_yaml_config(path, "prune", PruneRunError, RUN_SECTIONS)
    for key in RUN_SECTIONS:
        cfg.setdefault(key, {})
        if not isinstance(cfg[key], dict):
            raise PruneRunError(f"{where}: section {key!r} must be a mapping")
        if "seed_everything" in cfg[key]:
            raise PruneRunError(f"{where}: do not set seed_everything; --seed (or prune.seed) "
                                "seeds every stage")
    if not cfg["base"].get("data"):
        raise PruneRunError(f"{where}: section 'base' needs a data section (a train.py fit config)")
    prune = cfg["prune"]
    unknown = sorted(set(prune) - RUN_KEYS)
    if unknown:
        raise PruneRunError(f"{where}: unknown prune keys {unknown}; allowed: {sorted(RUN_KEYS)}")
    defaults = {"dir": f"runs/prune/{path.parent.name}", "iterative_steps": 200,
                "input_size": [3, 32, 32], "reg": 5e-4, "alpha": 4.0, "seed": 0}
    for key, value in defaults.items():
        prune.setdefault(key, value)
    for key, value in (("speed_up", speed_up), ("seed", seed)):
        if value is not None:
            prune[key] = value
    if prune.get("speed_up") is None:
        raise PruneRunError(f"{where}: no speed-up target; set prune.speed_up or pass --speed_up")
    prune["speed_up"], prune["seed"] = float(prune["speed_up"]), int(prune["seed"])
    if data_root is not None:
        cfg["base"]["data"].setdefault("init_args", {})["root"] = data_root
    return cfg


def run_dir(cfg: dict, network: str | os.PathLike, method: str, out: str | None) -> Path:
    """``--out``, else ``<prune.dir>/<network file stem>_<method>_<S>x_seed<N>``."""
    if out:
        return Path(out)
    p = cfg["prune"]
    return Path(p["dir"]) / f"{Path(network).stem}_{method}_{p['speed_up']:g}x_seed{p['seed']}"


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _atomic_write(path: Path, write: Callable[[str], Any]) -> Path:
    """``networks.atomic_write``, imported late: prune.py answers finished runs without torch."""
    from networks import atomic_write

    return atomic_write(path, write)


def _write_json(path: Path, obj: Any) -> Path:
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(obj, indent=1) + "\n"))


def run_settings(cfg: dict, args: argparse.Namespace) -> dict:
    """What defines a run (``run.json``): a run dir never mixes outputs of two settings."""
    for what, value in (("network file", args.network), ("metanetwork checkpoint", args.metanetwork)):
        if value is not None and not Path(value).is_file():
            raise PruneRunError(f"{what} {value!r} does not exist; check the path")
    if args.method == "metanetwork" and not args.metanetwork:
        raise PruneRunError("--method metanetwork needs --metanetwork PATH (a meta-training "
                            "checkpoint); or use --method none / sparse")
    meta = args.metanetwork if args.method == "metanetwork" else None
    return json.loads(json.dumps({
        "method": args.method, "speed_up": cfg["prune"]["speed_up"], "seed": cfg["prune"]["seed"],
        "network": str(Path(args.network).resolve()), "network_sha256": _sha256(Path(args.network)),
        "metanetwork": str(Path(meta).resolve()) if meta else None,
        "metanetwork_sha256": _sha256(Path(meta)) if meta else None,
        "config": {k: cfg[k] for k in RUN_SECTIONS}}))


def check_inputs(cfg: dict, network_path: str, metanetwork_path: str | None) -> dict:
    """Every check that can fail before training, so bad input costs seconds, not epochs.

    Returns ``{"arch", "base_macs", "macs", "params", "speed_up"}`` of the input network."""
    import networks
    from callbacks import load_metanetwork
    from callbacks.feedforward import check_layout, network_graph
    from callbacks.pruning import base_macs, example_input

    p = cfg["prune"]
    example = example_input(p["input_size"])
    network, record = networks.load_network(network_path)  # missing, corrupt, not a network
    arch, source = record["arch"], f"network file {network_path!r}"
    classes = (cfg["base"]["data"].get("init_args") or {}).get("num_classes")
    if isinstance(classes, int) and classes != arch["num_classes"]:
        raise PruneRunError(f"{source} has {arch['num_classes']} classes but the config's data "
                            f"has num_classes={classes}; use the config of the network's task")
    if metanetwork_path is not None:
        metanetwork = load_metanetwork(metanetwork_path)
        graph = network_graph(network.eval(), example, source)
        check_layout(metanetwork, graph, f"metanetwork checkpoint {metanetwork_path!r}", source)
    base, macs = base_macs(arch, example), networks.count_macs(network, example)
    target, current = p["speed_up"], base / macs
    if target <= current:
        raise PruneRunError(
            f"speed-up target {target:g}x is not above the network's current speed-up "
            f"{current:.3f}x ({source} is already pruned: {macs:,} of {base:,} MACs of the "
            f"unpruned {arch['name']}); pass a --speed_up above {current:.3f}")
    # Dry run on a copy: an unreachable target fails now rather than after the first finetune.
    # (The real prune acts on finetuned weights; reachability depends on the structure.)
    try:
        networks.prune_to_speed_up(copy.deepcopy(network).eval(), example, target, base,
                                   int(p["iterative_steps"]))
    except ValueError as e:
        raise PruneRunError(
            f"speed-up target {target:g}x is unreachable for {source}: {e}. Lower --speed_up, "
            "or raise prune.iterative_steps") from e
    return {"arch": arch, "base_macs": base, "macs": macs,
            "params": networks.count_params(network), "speed_up": current}


def run_stage_config(cfg: dict, section: str, out: Path, stage: str, weights: str | os.PathLike,
                     arch: dict, callbacks: list[dict]) -> dict:
    """The LightningCLI config of one stage: ``section`` merged over ``base``, the classifier
    built from ``weights`` (architecture from the file), logs in ``<out>/<stage>``."""
    config = deep_merge(cfg["base"], cfg[section])
    config["seed_everything"] = cfg["prune"]["seed"]
    model = config.setdefault("model", {})
    model.setdefault("class_path", CLASSIFIER)
    model.setdefault("init_args", {}).update(
        network=arch["name"], num_classes=arch["num_classes"],
        network_kwargs=dict(arch["kwargs"]), weights=str(weights))
    trainer = config.setdefault("trainer", {})
    trainer["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                         "init_args": {"save_dir": str(out), "name": "", "version": stage}}
    trainer["default_root_dir"] = str(out / stage)
    trainer["callbacks"] = list(trainer.get("callbacks") or [
        {"class_path": "lightning.pytorch.callbacks.LearningRateMonitor",
         "init_args": {"logging_interval": "epoch"}}]) + callbacks
    return config


def run_stage(config: dict, output: Path, name: str) -> Path:
    """Fit one stage unless its output network file exists (a killed fit resumes)."""
    if output.is_file():
        print(f"stage {name} done already: {output}", file=sys.stderr)
        return output
    fit_stage(config)
    _wait_for(output)
    if not output.is_file():
        raise RuntimeError(f"stage {name} finished without writing {output}")
    return output


def eval_cli(cfg: dict, arch: dict, weights: str | os.PathLike, out: Path) -> Any:
    """A LightningCLI (not run) holding the config's data and a classifier, on one device
    (exact val/test accuracy: no distributed sampler padding), for evaluating network files."""
    import train

    config = run_stage_config(cfg, "final", out, "eval", weights, arch, [])
    config["trainer"].update(logger=False, callbacks=[], devices=1, num_nodes=1,
                             strategy="auto", enable_progress_bar=False,
                             enable_model_summary=False)
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    return train.main(["--config", yaml.safe_dump(config, sort_keys=False)], run=False)


def evaluate_networks(get_cli: Callable[[], Any], files: dict[str, Path], cache: Path) -> dict:
    """``{name: {"file", "val_acc", "test_acc"}}`` of network files on the val and test
    splits; cached in ``cache`` (each network is evaluated once, even across reruns)."""
    import networks

    results = json.loads(cache.read_text()) if cache.is_file() else {}
    for name, file in files.items():
        if name in results:
            continue
        cli = get_cli()
        cli.model.network = networks.load_network(file)[0]
        val = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        test = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)[0]
        results[name] = {"file": str(file), "val_acc": float(val["val/acc"]),
                         "test_acc": float(test["test/acc"])}
        _write_json(cache, results)
    return results


def final_curve(get_cli: Callable[[], Any], network: Any, example: Any, base: int,
                max_speed_up: float, steps: int, out: Path) -> bool:
    """``curve.png``/``curve.csv``: val accuracy of the final network pruned further without
    finetuning (callbacks/curve.py), up to ``max_speed_up``. False when that module is absent."""
    try:
        from callbacks.curve import evaluator, save_curves
        from networks import accuracy_curve
    except ImportError:
        return False
    cli = get_cli()
    cli.datamodule.setup("validate")
    device = cli.trainer.strategy.root_device
    points = accuracy_curve(network.to(device).eval(), example.to(device), base,
                            evaluator(cli.datamodule.val_dataloader(), device), max_speed_up,
                            steps)
    save_curves({"final network, no finetuning": points}, out)
    return True


def export_program(network: Any, example: Any, path: Path) -> Path:
    """``torch.export`` the network (eval mode, any batch size) to a ``.pt2`` that loads with
    plain PyTorch: ``torch.export.load(path).module()(x)``."""
    import torch

    batch = torch.export.Dim("batch")
    program = torch.export.export(network.eval(), (example.repeat(2, 1, 1, 1),),
                                  dynamic_shapes=({0: batch},))
    return _atomic_write(path, lambda tmp: torch.export.save(program, tmp))


def plot_stages(path: Path, accuracy: dict, macs: dict, title: str) -> Path:
    """Fallback plot: val/test accuracy of each stage's network against its MACs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    names = [n for n in accuracy if accuracy[n]]
    for split, marker in (("val_acc", "o"), ("test_acc", "s")):
        xs = [macs[n] / 1e6 for n in names]
        ys = [100 * accuracy[n][split] for n in names]
        ax.plot(xs, ys, marker=marker, label=split.replace("_acc", ""))
        for x, y, n in zip(xs, ys, names):
            ax.annotate(n, (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set_xlabel("MMACs")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    plt.close(fig)
    return path


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="configs/<task>/prune.yaml")
    parser.add_argument("--network", required=True, help="network file to prune (networks.save_network)")
    parser.add_argument("--metanetwork", default=None,
                        help="meta-training checkpoint (needed by --method metanetwork)")
    parser.add_argument("--method", choices=METHODS, default="metanetwork",
                        help="metanetwork: feedforward+finetune; none: finetune only; "
                             "sparse: DepGraph sparse training (default metanetwork)")
    parser.add_argument("--speed_up", type=float, default=None, help="target; default prune.speed_up")
    parser.add_argument("--out", default=None,
                        help="run directory; default <prune.dir>/<network>_<method>_<S>x_seed<N>")
    parser.add_argument("--data_root", default=None, help="overrides data.init_args.root")
    parser.add_argument("--seed", type=int, default=None, help="seeds every stage; default prune.seed or 0")


def run_command(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cfg = load_prune_config(args.config, args.speed_up, args.seed, args.data_root)
    out = run_dir(cfg, args.network, args.method, args.out)
    settings = run_settings(cfg, args)
    if (out / RUN_FILE).is_file():
        stored = json.loads((out / RUN_FILE).read_text())
        if stored != settings:
            diff = sorted(k for k in settings if stored.get(k) != settings[k])
            raise PruneRunError(
                f"run directory {str(out)!r} holds a run with other settings (differs in "
                f"{', '.join(diff)}); pass another --out, or delete the directory to start over")
        if (out / REPORT).is_file():
            print(f"done already: {out / REPORT}", file=sys.stderr)
            return 0
    import networks  # after the "done already" exit: a finished run imports no torch

    info = check_inputs(cfg, args.network, settings["metanetwork"])
    if _is_rank_zero() and not (out / RUN_FILE).is_file():
        _write_json(out / RUN_FILE, settings)
    p, arch = cfg["prune"], info["arch"]

    # Stage 1: feedforward + finetune, identity + finetune, or sparse training.
    first = FIRST_STAGE[args.method]
    extra: list[dict] = []
    if args.method == "metanetwork":
        extra = [{"class_path": "callbacks.MetanetworkFeedforward",
                  "init_args": {"checkpoint": str(args.metanetwork), "input_size": p["input_size"]}},
                 {"class_path": "callbacks.SaveNetwork", "init_args": {"filename": "feedforward.pt"}}]
    elif args.method == "sparse":
        extra = [{"class_path": "callbacks.SparseTraining",
                  "init_args": {"reg": float(p["reg"]), "alpha": float(p["alpha"]),
                                "input_size": p["input_size"]}}]
    stage1 = run_stage_config(cfg, "finetune", out, first, args.network, arch, extra)
    finetuned = run_stage(stage1, out / first / "network.pt", first)

    # Stage 2: prune to S (against the unpruned architecture) + finetune.
    prune_cb = [{"class_path": "callbacks.PruneToSpeedUp",
                 "init_args": {"speed_up": p["speed_up"], "iterative_steps": int(p["iterative_steps"]),
                               "input_size": p["input_size"]}},
                {"class_path": "callbacks.SaveNetwork", "init_args": {"filename": "pruned.pt"}}]
    stage2 = run_stage_config(cfg, "final", out, SECOND_STAGE, finetuned, arch, prune_cb)
    final = run_stage(stage2, out / SECOND_STAGE / "network.pt", SECOND_STAGE)
    if not _is_rank_zero():
        return 0

    # Evaluation, export, report (report.json last: its presence means the run is complete).
    files = {"original": Path(args.network), "feedforward": out / first / "feedforward.pt",
             "finetuned": finetuned, "pruned": out / SECOND_STAGE / "pruned.pt", "final": final}
    files = {k: f for k, f in files.items() if f.is_file()}
    cli: list = []  # built on first use: a finished run whose evaluations exist loads no data

    def get_cli() -> Any:
        if not cli:
            cli.append(eval_cli(cfg, arch, args.network, out))
        return cli[0]

    acc = evaluate_networks(get_cli, files, out / EVAL_FILE)
    from callbacks.pruning import example_input

    example = example_input(p["input_size"])
    network, _ = networks.load_network(final)
    macs, params = networks.count_macs(network, example), networks.count_params(network)
    reached = info["base_macs"] / macs
    if not (out / "network.pt").is_file():
        networks.save_network(network, out / "network.pt", arch=arch, metadata={
            "method": args.method, "speed_up": reached, "macs": macs, "base_macs": info["base_macs"],
            "val_acc": acc["final"]["val_acc"], "test_acc": acc["final"]["test_acc"]})
    if not (out / "network.pt2").is_file():
        export_program(network, example, out / "network.pt2")
    accuracy = {k: ({"val": acc[k]["val_acc"], "test": acc[k]["test_acc"]} if k in acc else None)
                for k in ("original", "feedforward", "finetuned", "pruned", "final")}
    curve_done = (out / "curve.png").is_file() or final_curve(
        get_cli, copy.deepcopy(network), example, info["base_macs"], 2 * p["speed_up"],
        int(p["iterative_steps"]), out)
    if not curve_done:
        stage_macs = {"original": info["macs"], "feedforward": info["macs"],
                      "finetuned": info["macs"], "pruned": macs, "final": macs}
        plot_stages(out / "curve.png", {k: acc.get(k) for k in stage_macs}, stage_macs,
                    f"{arch['name']} {args.method}: {reached:.2f}x (target {p['speed_up']:g}x)")
    report = {
        "format": "metaprune.prune_run/v1", "method": args.method,
        "network": settings["network"], "metanetwork": settings["metanetwork"],
        "architecture": arch,
        "speed_up": {"target": p["speed_up"], "reached": reached, "before": info["speed_up"]},
        "macs": {"unpruned": info["base_macs"], "before": info["macs"], "after": macs},
        "params": {"before": info["params"], "after": params},
        "accuracy": accuracy,
        "seeds": {"seed_everything": p["seed"],
                  "data_split": (cfg["base"]["data"].get("init_args") or {}).get("seed")},
        "files": {"network": "network.pt", "exported": "network.pt2", "curve": "curve.png",
                  "curve_csv": "curve.csv" if (out / "curve.csv").is_file() else None,
                  "stages": {k: str(Path(f).resolve()) for k, f in files.items()}},
        "config": {"prune": p, "stages": {first: stage1, SECOND_STAGE: stage2}},
        "time_s": time.perf_counter() - t0,
    }
    _write_json(out / REPORT, report)
    fin = accuracy["final"]
    print(f"{out}: {args.method} {arch['name']} {info['macs']:,} -> {macs:,} MACs, speed-up "
          f"{reached:.3f}x (target {p['speed_up']:g}x), final val/acc {fin['val']:.4f} "
          f"test/acc {fin['test']:.4f} [{time.perf_counter() - t0:.0f} s]")
    return 0


# ---------------------------------------------------------------------------------------------
# demo: the whole pipeline on a built-in default (docs/pruning.md, "The demo pipeline")
# ---------------------------------------------------------------------------------------------
DEMO_CONFIG = Path(__file__).resolve().parent / "configs" / "demo" / "demo.yaml"
DEMO_SECTIONS = ("demo", "data", "zoo", "meta", "prune", "select", "fast")
DATA_ENV = "METAPRUNE_DATA"      # where the demo looks for CIFAR-10 when --data_root is not given
DEFAULT_DATA = "data/cifar10"    # otherwise: downloaded here (torchvision) on first use
DEMO_FILE = "demo.json"          # <out>/demo.json: the demo's settings, written on first start
RESULTS = "results.json"


class DemoError(ValueError):
    """Bad demo input (config, data, an output folder holding another demo)."""


def load_demo_config(path: str | os.PathLike, fast: bool = False) -> dict:
    """demo.yaml with ``fast`` merged over it when asked; every section present."""
    path = Path(path)
    where = f"demo config {str(path)!r}"
    cfg = read_yaml_config(path, "demo", DemoError, DEMO_SECTIONS)
    if not isinstance(cfg.get("demo"), dict):
        raise DemoError(f"{where} must be a mapping with a 'demo' section")
    cfg = {k: (cfg.get(k) or {}) for k in DEMO_SECTIONS}
    if fast:
        cfg = deep_merge(cfg, cfg["fast"])
    demo = cfg["demo"]
    for key in ("configs", "zoo_seeds", "target_seed", "speed_up", "methods"):
        if key not in demo:
            raise DemoError(f"{where}: demo.{key} is required")
    if int(demo["target_seed"]) in [int(s) for s in demo["zoo_seeds"]]:
        raise DemoError(f"{where}: demo.target_seed {demo['target_seed']} is one of demo.zoo_seeds; "
                        "the network to prune must be held out of meta-training")
    bad = sorted(set(demo["methods"]) - set(METHODS))
    if bad:
        raise DemoError(f"{where}: unknown methods {bad}; allowed: {list(METHODS)}")
    demo["configs"] = {k: str((path.parent / v).resolve()) for k, v in demo["configs"].items()}
    return cfg


def demo_data(data_root: str | None) -> tuple[dict, str]:
    """The image data overrides (root, download) and a line saying where the data comes from:
    --data_root, else $METAPRUNE_DATA, else CIFAR-10 downloaded to data/cifar10."""
    if data_root:
        return {"root": str(Path(data_root).expanduser().resolve())}, "--data_root"
    if os.environ.get(DATA_ENV):
        return {"root": str(Path(os.environ[DATA_ENV]).expanduser().resolve())}, f"${DATA_ENV}"
    return ({"root": str(Path(DEFAULT_DATA).resolve()), "download": True},
            f"downloaded on first use (no --data_root, ${DATA_ENV} unset)")


def _read_yaml(path: str) -> dict:
    try:
        return yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise DemoError(f"stage config {path!r} cannot be read: {e}") from e


def _merge_data(section: dict, data: dict) -> None:
    """``data`` into ``section['init_args']`` (an ImageDataModule spec), in place."""
    section.setdefault("init_args", {}).update(copy.deepcopy(data))


def demo_stage_configs(cfg: dict, out: Path, data: dict) -> dict[str, dict]:
    """The zoo, meta and prune stage configs of the demo: the shipped configs with the demo's
    overrides, the data, and every output path under ``out`` (stable, so reruns skip)."""
    paths, data = cfg["demo"]["configs"], deep_merge(cfg["data"], data)
    zoo = deep_merge(_read_yaml(paths["zoo"]), cfg["zoo"])
    zoo["zoo"]["dir"] = str(out / "zoo")
    _merge_data(zoo["pretrain"]["data"], data)
    if isinstance((zoo.get("finetune") or {}).get("data"), dict):
        _merge_data(zoo["finetune"]["data"], data)
    meta = deep_merge(_read_yaml(paths["meta"]), cfg["meta"])
    meta["data"]["init_args"]["zoo"] = str(out / "zoo")
    _merge_data(meta["data"]["init_args"]["images"], data)
    meta.setdefault("trainer", {})["logger"] = {
        "class_path": "lightning.pytorch.loggers.TensorBoardLogger",
        "init_args": {"save_dir": str(out), "name": "", "version": "meta"}}
    meta["trainer"]["default_root_dir"] = str(out / "meta")
    prune_cfg = deep_merge(_read_yaml(paths["prune"]), cfg["prune"])
    prune_cfg["prune"].update(dir=str(out / "prune"), speed_up=float(cfg["demo"]["speed_up"]))
    _merge_data(prune_cfg["base"]["data"], data)
    return {"zoo": zoo, "meta": meta, "prune": prune_cfg}


def _fmt_count(n: float) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def demo_table(reports: dict[str, dict]) -> str:
    """The demo's result table (markdown) from each method's report.json."""
    pct = lambda a: "-" if a is None else f"{100 * a:.1f}%"  # noqa: E731
    lines = ["| method | speed-up | MACs | params | test acc before | test acc after | val acc after |",
             "|---|---|---|---|---|---|---|"]
    for method, r in reports.items():
        acc = r["accuracy"]
        lines.append(
            f"| {method} | {r['speed_up']['reached']:.2f}x (target {r['speed_up']['target']:g}x) "
            f"| {_fmt_count(r['macs']['before'])} -> {_fmt_count(r['macs']['after'])} "
            f"| {_fmt_count(r['params']['before'])} -> {_fmt_count(r['params']['after'])} "
            f"| {pct(acc['original']['test'])} | {pct(acc['final']['test'])} "
            f"| {pct(acc['final']['val'])} |")
    return "\n".join(lines)


def add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data_root", default=None,
                        help=f"CIFAR-10 (ImageFolder train/ test/, or torchvision's folder); default "
                             f"${DATA_ENV}, else downloaded to {DEFAULT_DATA}")
    parser.add_argument("--out", default=None,
                        help="output folder; default runs/demo_pipeline (runs/demo_pipeline_fast with --fast)")
    parser.add_argument("--fast", action="store_true",
                        help="smoke run: every stage on a few batches (minutes; numbers mean nothing)")
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="demo config (configs/demo/demo.yaml)")


def demo_command(args: argparse.Namespace) -> int:
    t0 = time.perf_counter()
    cfg = load_demo_config(args.config, args.fast)
    demo = cfg["demo"]
    out = Path(args.out or ("runs/demo_pipeline_fast" if args.fast else "runs/demo_pipeline")).resolve()
    data, data_source = demo_data(args.data_root)
    stages = demo_stage_configs(cfg, out, data)
    settings = json.loads(json.dumps({"demo": demo, "select": cfg["select"], "stages": stages}))
    if (out / DEMO_FILE).is_file():
        stored = json.loads((out / DEMO_FILE).read_text())
        if stored != settings:
            diff = sorted(k for k in stages if stored.get("stages", {}).get(k) != stages[k])
            diff += [k for k in ("demo", "select") if stored.get(k) != settings[k]]
            raise DemoError(f"output folder {str(out)!r} holds a demo with other settings (differs in "
                            f"{', '.join(diff)}: e.g. another --data_root or --fast); pass another "
                            "--out, or delete the folder to start over")
    elif _is_rank_zero():
        _write_json(out / DEMO_FILE, settings)
    configs = {}
    for name, stage in stages.items():  # the stage configs, as files the subcommands read
        configs[name] = out / "configs" / f"{name}.yaml"
        if not configs[name].is_file() or yaml.safe_load(configs[name].read_text()) != stage:
            text = yaml.safe_dump(stage, sort_keys=False)
            _atomic_write(configs[name], lambda tmp, text=text: Path(tmp).write_text(text))
    print(f"demo: data {data['root']} ({data_source}); outputs in {out}", file=sys.stderr)
    times: dict[str, float] = {}

    def timed(name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        times[name] = round(time.perf_counter() - start, 1)
        return result

    # 1. the zoo (meta-training members) and the held-out target, each a `prune.py zoo` run.
    for seed in demo["zoo_seeds"]:
        timed(f"zoo seed{seed}", lambda s=seed: main(["zoo", "--config", str(configs["zoo"]),
                                                      "--seed", str(s)]))
    target_seed = int(demo["target_seed"])
    timed(f"target seed{target_seed}", lambda: main([
        "zoo", "--config", str(configs["zoo"]), "--seed", str(target_seed),
        "--zoo_dir", str(out / "target")]))
    from callbacks import find_member

    row = find_member(out / "target", target_seed)
    if row is None:  # a DDP rank > 0, or a stage that did not register: nothing to prune yet
        return 0
    target = out / "target" / row["file"]

    # 2. meta-training (train.main through fit_stage: resumes from last.ckpt when killed).
    meta_done = out / "meta" / "done.json"
    if meta_done.is_file():
        print(f"meta-training done already: {meta_done}", file=sys.stderr)
    else:
        timed("meta-train", lambda: fit_stage(stages["meta"]))
        if not _is_rank_zero():
            return 0
        ckpts = sorted(p.name for p in (out / "meta" / "checkpoints").glob("*.ckpt"))
        _write_json(meta_done, {"checkpoints": ckpts})

    # 3. checkpoint selection on the meta-val members (validation data only).
    selection = out / "meta" / "selection"
    best = selection / "best.ckpt"
    if best.is_file():
        print(f"selection done already: {best}", file=sys.stderr)
    else:
        s = cfg["select"]
        argv = ["select", "--config", str(configs["meta"]), "--run", str(out / "meta"),
                "--out", str(selection)]
        for key, value in s.items():
            argv += [f"--{key}", *([str(v) for v in value] if isinstance(value, list) else [str(value)])]
        timed("select", lambda: main(argv))

    # 4. prune the held-out network with every method (`prune.py run`, one folder each).
    reports = {}
    for method in demo["methods"]:
        run_out = out / "prune" / method
        argv = ["run", "--config", str(configs["prune"]), "--network", str(target),
                "--method", method, "--out", str(run_out)]
        if method == "metanetwork":
            argv += ["--metanetwork", str(best)]
        timed(f"prune {method}", lambda argv=argv: main(argv))
        reports[method] = json.loads((run_out / REPORT).read_text())

    table = demo_table(reports)
    total = time.perf_counter() - t0
    # Seconds per stage as first computed (a rerun's skips do not overwrite them); the result
    # files are rewritten only when their content changes, so a finished demo's rerun writes nothing.
    old = json.loads((out / RESULTS).read_text()) if (out / RESULTS).is_file() else {}
    seconds = dict(old.get("seconds") or {})
    seconds.update({k: v for k, v in times.items() if k not in seconds})
    results = {"table": table, "target": str(target), "metanetwork": str(best),
               "reports": {m: str(out / "prune" / m / REPORT) for m in reports},
               "seconds": seconds, "total_s": round(sum(seconds.values()), 1)}
    if old != json.loads(json.dumps(results)):
        _write_json(out / RESULTS, results)
    if not (out / "results.md").is_file() or (out / "results.md").read_text() != table + "\n":
        _atomic_write(out / "results.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    arch = reports[demo["methods"][0]]["architecture"]
    print(f"\nmeta pruning demo: {arch['name']} {arch['kwargs']} seed {target_seed} (held out of the "
          f"zoo of seeds {list(demo['zoo_seeds'])}), {len(reports)} methods at "
          f"{float(demo['speed_up']):g}x, same finetune budgets\n")
    print(table)
    print(f"\nreports:     {out / 'prune'}/<method>/report.json   (table: {out / 'results.md'})")
    print(f"plots:       {out / 'prune'}/<method>/curve.png, {selection / 'selection.png'}")
    print(f"tensorboard: tensorboard --logdir {out}")
    print(f"networks:    {out / 'prune'}/<method>/network.pt (+ .pt2), metanetwork {best}")
    print(f"[this run {total:.0f} s; when first computed: {results['total_s']:.0f} s in all, "
          f"{', '.join(f'{k} {v:.0f} s' for k, v in seconds.items())}]")
    return 0


# ---------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------
Subcommand = tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int], str]


def _lazy(module: str, name: str) -> Callable:
    """``module.name``, imported on the first call: subcommands living in modules that import
    torch/Lightning keep ``prune.py --help`` fast."""
    def call(*args: Any) -> Any:
        import importlib

        return getattr(importlib.import_module(module), name)(*args)
    return call


SUBCOMMANDS: dict[str, Subcommand] = {
    "zoo": (add_zoo_arguments, zoo_command,
            "train, prune and finetune one zoo member (docs/zoo.md)"),
    "run": (add_run_arguments, run_command,
            "prune a network to a speed-up: metanetwork/none/sparse, finetunes, export (docs/pruning.md)"),
    "curve": (_lazy("callbacks.curve", "add_curve_arguments"), _lazy("callbacks.curve", "curve_command"),
              "accuracy-vs-speed-up curve of a network, no finetuning (docs/pruning.md)"),
    "select": (_lazy("callbacks.selection", "add_select_arguments"),
               _lazy("callbacks.selection", "select_command"),
               "pick the best metanetwork checkpoint of a meta-training run by curve area"),
    "demo": (add_demo_arguments, demo_command,
             "the whole pipeline on a built-in default: zoo, meta-train, select, prune 3 ways, table"),
}


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; only ``command``'s arguments are added (all when None), so that parsing
    one subcommand never imports another's dependencies."""
    parser = argparse.ArgumentParser(prog="prune.py", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (add_arguments, _, help_text) in SUBCOMMANDS.items():
        subparser = sub.add_parser(name, help=help_text, description=help_text)
        if command in (None, name):
            add_arguments(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = next((a for a in argv if not a.startswith("-")), "")
    args = build_parser(command if command in SUBCOMMANDS else "").parse_args(argv)
    return SUBCOMMANDS[args.command][1](args)


# Errors that mean bad input (their messages name the problem and the fix): printed as one
# line instead of a traceback. Matched by name so that `--help` needs no torch import.
USER_ERRORS = {"PruneRunError", "DemoError", "SelectionError", "ZooConfigError", "ZooError",
               "CheckpointError", "MetanetworkError", "UnsupportedArchitectureError", "DatasetError"}


def cli(argv: list[str] | None = None) -> int:
    try:
        return main(argv)
    except ValueError as e:
        if type(e).__name__ not in USER_ERRORS:
            raise
        print(f"prune.py: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())

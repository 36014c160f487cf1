"""``prune.py demo`` (docs/pruning.md, "The demo pipeline"): the whole pipeline
(docs/method.md) on a built-in default, configs/demo/demo.yaml: ``zoo`` for the zoo seeds and the
held-out targets, meta-training, ``select``, ``run`` with every method, a table. Data:
``--data_root``, else ``$METAPRUNE_DATA``, else CIFAR-10 downloaded to data/cifar10."""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import yaml

from metaprune.errors import UserError

from .common import (
    check_stage_config,
    fit_stage,
    is_rank_zero,
    merged,
    read_config,
    tensorboard_logger,
    write_json,
    write_text,
)
from .config_files import load_config_file
from .console import Stages
from .demo_results import print_summary, write_results
from .options import DATA_ENV, DEFAULT_DATA, DemoOptions, Method, SpeedUp, WeightFraction, ZooOptions
from .results import Target, run_key
from .run import REPORT, RunRequest, prune_run
from .select import SelectRequest, select_checkpoint
from .zoo import check_zoo_stages, load_zoo_config, zoo_member

DEMO_FILE = "demo.json"          # <out>/demo.json: the demo's settings, written on first start


class DemoError(UserError):
    """Bad demo input (config, data, an output folder holding another demo)."""


@dataclass
class DemoSettings:
    """The ``demo`` section of demo.yaml (and of benchmarks/quality_cifar10.yaml).

    Args:
        configs: the stage configs (keys zoo, meta, prune), relative to the demo config.
        zoo_seeds: the meta-training zoo's members.
        target_seeds: the held-out networks to prune (never in the zoo).
        methods: any of metanetwork, none, sparse.
        speed_ups: the targets in MACs (channels removed); stage 1 runs once per network and
            method, then each target.
        weight_sparsities: instead of ``speed_ups``, targets in weight sparsity (weights zeroed
            by magnitude; the metanetwork must be meta-trained with ``sparsity: weights``).
        zoo_speed_ups: more members per zoo seed, pruned to these initial speed-ups instead of
            the zoo config's (variant ``s<speed-up>``, sharing the seed's pretrained network:
            a more diverse zoo at the cost of a prune and a finetune each, docs/zoo.md).
        smoke: a smoke run (``--fast``: a few batches per stage, no latency or ONNX): its
            numbers mean nothing, and every result file and the printed table say so.
    """

    configs: dict[str, str]
    zoo_seeds: list[int]
    target_seeds: list[int]
    methods: list[Method]
    speed_ups: list[SpeedUp] = field(default_factory=list)
    weight_sparsities: list[WeightFraction] = field(default_factory=list)
    zoo_speed_ups: list[SpeedUp] = field(default_factory=list)
    smoke: bool = False

    @property
    def targets(self) -> list[Target]:
        """The targets in order: the speed-ups, or the weight sparsities."""
        return ([Target(float(s)) for s in self.speed_ups]
                + [Target(float(s), weights=True) for s in self.weight_sparsities])


@dataclass
class DemoConfig:
    """A demo.yaml: the demo's settings, the image data overrides, each stage's differences
    from its shipped config, ``prune.py select``'s options and the ``--fast`` overlay.
    ``target``: the held-out networks' differences from the zoo stage (empty: the zoo's own
    recipe; e.g. another architecture, to measure a metanetwork on networks of a family it
    was not meta-trained on)."""

    demo: DemoSettings
    data: dict = field(default_factory=dict)
    zoo: dict = field(default_factory=dict)
    target: dict = field(default_factory=dict)
    meta: dict = field(default_factory=dict)
    prune: dict = field(default_factory=dict)
    select: dict = field(default_factory=dict)
    fast: dict = field(default_factory=dict)


def load_demo_config(path: str | os.PathLike, fast: bool = False) -> DemoConfig:
    """demo.yaml, with its ``fast`` section merged over it when asked; stage config paths
    resolved against the file's folder."""
    path = Path(path)
    where = f"demo config {str(path)!r}"
    cfg = read_config(path, DemoConfig, DemoError, "demo", overlay="fast" if fast else None)
    demo = cfg.demo
    missing = sorted({"zoo", "meta", "prune"} - set(demo.configs))
    if missing:
        raise DemoError(f"{where}: demo.configs has no {missing}; name the zoo, meta and prune "
                        "stage configs")
    for key in ("zoo_seeds", "target_seeds", "methods"):
        if not getattr(demo, key):
            raise DemoError(f"{where}: demo.{key} must be a non-empty list")
    if bool(demo.speed_ups) == bool(demo.weight_sparsities):
        raise DemoError(f"{where}: give the targets as demo.speed_ups (channels removed) or as "
                        "demo.weight_sparsities (weights zeroed), "
                        f"{'not both' if demo.speed_ups else 'one of them a non-empty list'}")
    shared = sorted(set(demo.target_seeds) & set(demo.zoo_seeds))
    if shared:
        raise DemoError(f"{where}: demo.target_seeds {shared} are also in demo.zoo_seeds; the "
                        "networks to prune must be held out of meta-training")
    demo.configs = {k: str((path.parent / v).resolve()) for k, v in demo.configs.items()}
    return cfg


def demo_data(data_root: str | None) -> tuple[dict, str]:
    """The image data overrides (root, download) and a line saying where the data comes from:
    --data_root, else $METAPRUNE_DATA, else CIFAR-10 downloaded to data/cifar10."""
    if data_root:  # the command line fills in $METAPRUNE_DATA when --data_root is not given
        given = "--data_root" if data_root != os.environ.get(DATA_ENV) else f"${DATA_ENV}"
        return {"root": str(Path(data_root).expanduser().resolve())}, given
    if os.environ.get(DATA_ENV):
        return {"root": str(Path(os.environ[DATA_ENV]).expanduser().resolve())}, f"${DATA_ENV}"
    return ({"root": str(Path(DEFAULT_DATA).resolve()), "download": True},
            f"downloaded on first use (no --data_root, ${DATA_ENV} unset)")


def _read_yaml(path: str) -> dict:
    return load_config_file(path, DemoError, "stage")


def _merge_data(section: dict, data: dict) -> None:
    """``data`` into ``section['init_args']`` (an ImageDataModule spec), in place."""
    section.setdefault("init_args", {}).update(copy.deepcopy(data))


def demo_stage_configs(cfg: DemoConfig, out: Path, data: dict) -> dict[str, dict]:
    """The zoo, meta and prune stage configs of the demo: the shipped configs with the demo's
    overrides, the data, and every output path under ``out`` (stable, so reruns skip)."""
    paths, data = cfg.demo.configs, merged(cfg.data, data)
    zoo = merged(_read_yaml(paths["zoo"]), cfg.zoo)
    zoo["zoo"]["dir"] = str(out / "zoo")
    _merge_data(zoo["pretrain"]["data"], data)
    if isinstance((zoo.get("finetune") or {}).get("data"), dict):
        _merge_data(zoo["finetune"]["data"], data)
    meta = merged(_read_yaml(paths["meta"]), cfg.meta)
    meta["data"]["init_args"]["zoo"] = str(out / "zoo")
    _merge_data(meta["data"]["init_args"]["images"], data)
    meta.setdefault("trainer", {})["logger"] = tensorboard_logger(out, version="meta")
    meta["trainer"]["default_root_dir"] = str(out / "meta")
    prune_cfg = merged(_read_yaml(paths["prune"]), cfg.prune)
    first = cfg.demo.targets[0]
    if first.weights:  # the shipped prune configs name a speed-up: a run has one target
        prune_cfg["prune"].pop("speed_up", None)
    prune_cfg["prune"].update(dir=str(out / "prune"), **first.option)
    _merge_data(prune_cfg["base"]["data"], data)
    stages = {"zoo": zoo, "meta": meta, "prune": prune_cfg}
    if cfg.target:  # only then a stage of its own: earlier demo folders keep their settings
        stages["target"] = merged(zoo, cfg.target)
        stages["target"]["zoo"]["dir"] = str(out / "target")
    return stages


def target_config(configs: dict[str, Path]) -> Path:
    """The zoo config that builds the held-out networks: the ``target`` stage, else the zoo's."""
    return configs.get("target", configs["zoo"])


STAGES = ("held-out networks", "zoo", "meta-training", "checkpoint selection", "pruning")
METANETWORK_STAGES = ("zoo", "meta-training", "checkpoint selection")  # skipped without one


def select_request(cfg: DemoConfig, config: Path, run: Path, out: Path) -> SelectRequest:
    """The checkpoint selection of the demo: ``prune.py select``'s options from its ``select``
    section (an unknown option is named)."""
    try:
        return SelectRequest(str(config), str(run), out=str(out), **cfg.select)
    except TypeError as e:
        raise DemoError(f"demo config: section 'select': {e}; its keys are prune.py select's "
                        "options (docs/pruning.md)") from None


def check_demo(cfg: DemoConfig, stages: dict[str, dict], configs: dict[str, Path], data: dict) -> None:
    """Everything that can be checked before training: the data is there (unless it is to be
    downloaded) and every stage config of every step parses, each error naming its file,
    section and key."""
    from datamodules import DatasetError, ImageDataModule

    from .run import load_prune_config
    from .run_stages import stage_configs

    select_request(cfg, configs["meta"], Path("meta"), Path("selection"))
    if not data.get("download"):
        images = stages["zoo"]["pretrain"]["data"].get("init_args") or {}
        try:
            ImageDataModule(**images).num_classes  # noqa: B018 (reading it checks the data)
        except DatasetError as e:
            raise DemoError(f"{e} (the demo reads it from --data_root, else ${DATA_ENV}; without "
                            f"either it downloads CIFAR-10 to {DEFAULT_DATA})") from None
    # the held-out networks share the zoo's config (only the seed differs) unless a target
    # section changes it
    for name in [n for n in ("zoo", "target") if n in configs]:
        check_zoo_stages(load_zoo_config(configs[name], seed=cfg.demo.zoo_seeds[0]), configs[name])
    check_stage_config(stages["meta"], f"meta config {str(configs['meta'])!r}", DemoError)
    check_meta_kind(cfg.demo, stages["meta"], configs["meta"])
    model = stages["target" if "target" in stages else "zoo"]["pretrain"]["model"]["init_args"]
    arch = {"name": model["network"], "num_classes": model.get("num_classes", 10),
            "kwargs": model.get("network_kwargs") or {}}
    prune = load_prune_config(configs["prune"])
    for method in cfg.demo.methods:
        args = RunRequest(str(configs["prune"]), network="network.pt", method=method,
                          metanetwork="best.ckpt")
        for section, stage in zip(("finetune", "final"),
                                  stage_configs(prune, args, configs["prune"].parent, arch)):
            check_stage_config(stage, f"prune config {str(configs['prune'])!r}, section "
                               f"{section!r} (merged over 'base')", DemoError)


def check_meta_kind(demo: DemoSettings, meta: dict, config: Path) -> None:
    """A demo whose metanetwork is meta-trained for one kind of pruning (channels, or weights
    with ``sparsity: weights``) but whose targets are of the other is refused before training."""
    if "metanetwork" not in demo.methods:
        return
    kind = ((meta.get("model") or {}).get("init_args") or {}).get("sparsity", "channels")
    wanted = "weights" if demo.weight_sparsities else "channels"
    if kind != wanted:
        targets = "demo.weight_sparsities" if demo.weight_sparsities else "demo.speed_ups"
        raise DemoError(f"meta config {str(config)!r}: model.init_args.sparsity is {kind!r}, but "
                        f"the demo's targets are {targets}; set the meta section's "
                        f"model.init_args.sparsity to {wanted!r}")


class Timings(dict):
    """Seconds per named step: ``timings(name, fn)`` runs ``fn`` and records its wall time."""

    def __call__(self, name: str, fn: Callable[[], Any]) -> Any:
        start = time.perf_counter()
        result = fn()
        self[name] = round(time.perf_counter() - start, 1)
        return result


def demo_settings(cfg: DemoConfig, stages: dict[str, dict]) -> dict:
    """What ``<out>/demo.json`` records: the demo's settings, ``select``'s and the stage
    configs, as JSON values. ``smoke`` is recorded only when true, so folders written before
    the option existed keep their settings."""
    demo = dataclasses.asdict(cfg.demo)
    for key in ("smoke", "weight_sparsities"):
        if not demo[key]:
            del demo[key]
    return json.loads(json.dumps({"demo": demo, "select": cfg.select, "stages": stages}))


def demo_folder(cfg: DemoConfig, out: Path, data: dict) -> tuple[dict[str, dict], dict[str, Path]]:
    """The stage configs of ``cfg`` with every output under ``out``, written there (a folder
    of other settings is refused): ``(stages, their files)``."""
    stages = demo_stage_configs(cfg, out, data)
    return stages, write_demo_configs(out, demo_settings(cfg, stages), stages)


def write_demo_configs(out: Path, settings: dict, stages: dict[str, dict]) -> dict[str, Path]:
    """``<out>/demo.json`` (refusing a folder that holds another demo) and the stage configs as
    files the subcommands read, ``<out>/configs/<stage>.yaml``."""
    if (out / DEMO_FILE).is_file():
        stored = json.loads((out / DEMO_FILE).read_text())
        if stored != settings:
            diff = sorted(k for k in stages if stored.get("stages", {}).get(k) != stages[k])
            diff += [k for k in ("demo", "select") if stored.get(k) != settings[k]]
            raise DemoError(f"output folder {str(out)!r} holds a demo with other settings (differs in "
                            f"{', '.join(diff)}: e.g. another --data_root or --fast); pass another "
                            "--out, or delete the folder to start over")
    elif is_rank_zero():
        write_json(out / DEMO_FILE, settings)
    configs = {}
    for name, stage in stages.items():
        configs[name] = out / "configs" / f"{name}.yaml"
        if not configs[name].is_file() or yaml.safe_load(configs[name].read_text()) != stage:
            write_text(configs[name], yaml.safe_dump(stage, sort_keys=False))
    return configs


def metanetwork_stages(cfg: DemoConfig, stages: dict[str, dict], configs: dict[str, Path],
                       out: Path, console: Stages, timed: Callable[[str, Callable[[], Any]], Any]
                       ) -> Path | None:
    """The zoo, meta-training (resumes from last.ckpt when killed) and checkpoint selection on
    the meta-val members (validation data only): the selected checkpoint, or None on a DDP
    rank > 0."""
    demo = cfg.demo
    variants = [(None, None)] + [(float(r), f"s{float(r):g}") for r in demo.zoo_speed_ups]
    with console.stage("zoo", len(demo.zoo_seeds) * len(variants), "members") as step:
        for seed in demo.zoo_seeds:
            for speed_up, variant in variants:
                timed(f"zoo seed{seed}" + (f" {variant}" if variant else ""),
                      partial(zoo_member, ZooOptions(str(configs["zoo"]), seed=seed,
                                                     speed_up=speed_up, variant=variant)))
                step()
    meta_done = out / "meta" / "done.json"
    with console.stage("meta-training", 1, "run") as step:
        if meta_done.is_file():
            print(f"meta-training done already: {meta_done}", file=sys.stderr)
        else:
            timed("meta-train", lambda: fit_stage(stages["meta"]))
            if not is_rank_zero():
                return None
            ckpts = sorted(p.name for p in (out / "meta" / "checkpoints").glob("*.ckpt"))
            write_json(meta_done, {"checkpoints": ckpts})
        step()
    selection = out / "meta" / "selection"
    best = selection / "best.ckpt"
    with console.stage("checkpoint selection", 1, "run") as step:
        if best.is_file():
            print(f"selection done already: {best}", file=sys.stderr)
        else:
            timed("select", partial(select_checkpoint,
                                    select_request(cfg, configs["meta"], out / "meta", selection)))
        step()
    return best


def prune_network(demo: DemoSettings, config: Path, out: Path, seed: int, target: Path,
                  metanetwork: Path | None, timed: Callable[[str, Callable[[], Any]], Any],
                  step: Callable[[], None]) -> dict[str, dict]:
    """One held-out network pruned by every method to every target (``prune.py run``, one
    folder each under ``<out>/prune``; stage 1 does not depend on the target, so later targets
    reuse the first's): the reports, keyed by ``run_key``."""
    reports = {}
    for method in demo.methods:
        first = None
        for goal in demo.targets:
            key = run_key(seed, goal, method)
            run_out = out / "prune" / key
            request = RunRequest(str(config), network=str(target), method=method,
                                 speed_up=None if goal.weights else goal.value,
                                 weight_sparsity=goal.value if goal.weights else None,
                                 out=str(run_out),
                                 reuse_first_stage=str(first) if first else None,
                                 metanetwork=str(metanetwork) if method == "metanetwork" else None)
            timed(f"prune {key}", partial(prune_run, request))
            reports[key] = json.loads((run_out / REPORT).read_text())
            first = first or run_out
            step()
    return reports


def demo_command(args: DemoOptions) -> int:
    """``prune.py demo``: the whole pipeline on a built-in default."""
    t0 = time.perf_counter()
    cfg = load_demo_config(args.config, args.fast)
    demo = cfg.demo
    out = Path(args.out or ("runs/demo_pipeline_fast" if args.fast else "runs/demo_pipeline")).resolve()
    data, data_source = demo_data(args.data_root)
    stages = demo_stage_configs(cfg, out, data)
    settings = demo_settings(cfg, stages)
    with tempfile.TemporaryDirectory() as tmp:  # checked before --out is touched
        check_demo(cfg, stages, write_demo_configs(Path(tmp) / "demo", settings, stages), data)
    configs = write_demo_configs(out, settings, stages)
    print(f"demo: data {data['root']} ({data_source}); outputs in {out}", file=sys.stderr)
    console = Stages([s for s in STAGES if "metanetwork" in demo.methods
                       or s not in METANETWORK_STAGES], out / "logs")
    timed = times = Timings()

    # 1. the held-out targets, each a `prune.py zoo` run.
    targets = {}
    with console.stage("held-out networks", len(demo.target_seeds), "networks") as step:
        for seed in demo.target_seeds:
            _, row = timed(f"target seed{seed}", partial(zoo_member, ZooOptions(
                str(target_config(configs)), seed=seed, zoo_dir=str(out / "target"))))
            if row is None:  # a DDP rank > 0, or a stage that did not register: nothing to prune yet
                return 0
            targets[int(seed)] = out / "target" / row["file"]
            step()

    # 2.-4. the zoo, meta-training and checkpoint selection, when a method needs a metanetwork
    # (a benchmark of the baselines alone skips them).
    best = None
    if "metanetwork" in demo.methods:
        best = metanetwork_stages(cfg, stages, configs, out, console, timed)
        if best is None:
            return 0

    # 5. prune every held-out network with every method to every target.
    reports = {}
    cells = len(targets) * len(demo.methods) * len(demo.targets)
    with console.stage("pruning", cells, "runs") as step:
        for seed, target in targets.items():
            reports.update(prune_network(demo, configs["prune"], out, seed, target, best, timed, step))

    total = time.perf_counter() - t0
    results = write_results(out, demo, reports, targets, best, times)
    print_summary(out, demo, reports, best, results, total)
    return 0


"""What every pipeline command shares: typed config files, Lightning stages built by ``pipeline.train.main``,
rank checks under DDP, and atomic writes of result files."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

import yaml

from metaprune.errors import UserError

from .config_files import load_config_file, merged
from .options import plain

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")  # a config schema


def read_config(path: str | os.PathLike, schema: type[C], error: type[UserError], kind: str,
                overlay: str | None = None, overrides: dict | None = None) -> C:
    """A YAML config file parsed into the dataclass ``schema`` by jsonargparse: unknown keys,
    missing required ones and wrong types fail with ``error`` naming ``kind`` config, the file
    and the key. Component files named under ``_base_`` are merged in first
    (:mod:`pipeline.config_files`). Sections typed ``dict`` (stage configs for LightningCLI)
    come back as they are, ``${...}`` interpolations included; ``check_stage_config`` checks
    them. ``overlay``: the name of a section merged over the whole file first (demo.yaml's
    ``fast``); ``overrides``: a nested mapping merged over the result (command-line
    ``--section.key VALUE``), each top key a section of ``schema``."""
    import argparse

    from jsonargparse import ArgumentParser

    where = f"{kind} config {str(path)!r}"
    raw = load_config_file(path, error, kind)
    sections = [f.name for f in dataclasses.fields(schema)]
    if not isinstance(raw, dict):
        raise error(f"{where} must be a mapping with the sections {', '.join(sections)}")
    if overlay is not None and isinstance(raw.get(overlay), dict):
        raw = merged(raw, raw[overlay])
    if overrides:
        unknown = sorted(set(overrides) - set(sections))
        if unknown:
            raise error(f"command-line override --{unknown[0]}...: {unknown[0]!r} is not a section "
                        f"of a {kind} config; sections: {', '.join(sections)}")
        raw = merged(raw, overrides)
    parser = ArgumentParser(exit_on_error=False)
    parser.add_class_arguments(schema, as_group=False)
    try:
        parsed = parser.instantiate(parser.parse_object(raw))
    except argparse.ArgumentError as e:
        raise error(f"{where}: {one_line(str(e))}; fix that key and rerun") from None
    return schema(**{name: plain(parsed[name]) for name in sections})


def refuse_stage_seeds(sections: Iterable[dict], where: str, error: type[UserError],
                       seeded_by: str) -> None:
    """Stage sections must not set ``seed_everything``: ``seeded_by`` (a command-line option)
    seeds every stage, so that a run is reproduced by its command line."""
    if any("seed_everything" in section for section in sections):
        raise error(f"{where}: do not set seed_everything; {seeded_by}")


def split_overrides(argv: list[str]) -> tuple[list[str], list[str]]:
    """``argv`` split into the command's own options and the config overrides among them:
    ``--a.b VALUE`` / ``--a.b=VALUE`` (an option whose name has a dot)."""
    rest: list[str] = []
    overrides: list[str] = []
    tokens = iter(range(len(argv)))
    for i in tokens:
        token = argv[i]
        if not (token.startswith("--") and "." in token.partition("=")[0]):
            rest.append(token)
            continue
        overrides.append(token)
        if "=" not in token and i + 1 < len(argv) and not argv[i + 1].startswith("--"):
            overrides.append(argv[next(tokens)])
    return rest, overrides


def parse_overrides(tokens: list[str]) -> dict:
    """Command-line config overrides, ``--a.b.c VALUE`` or ``--a.b.c=VALUE`` (VALUE read as
    YAML: ``2``, ``false``, ``[1, 64]``), as one nested mapping; ValueError naming the token
    that is not of that form."""
    out: dict = {}
    rest = list(tokens)
    while rest:
        token = rest.pop(0)
        key, eq, value = token[2:].partition("=")
        if not token.startswith("--") or "." not in key or not all(key.split(".")):
            raise ValueError(f"unrecognized argument {token!r} (a config override is "
                             "--section.key VALUE, e.g. --base.trainer.max_epochs 1)")
        if not eq:
            if not rest or rest[0].startswith("--"):
                raise ValueError(f"config override {token} has no value")
            value = rest.pop(0)
        *parents, leaf = key.split(".")
        node = out
        for name in parents:
            node = node.setdefault(name, {})
            if not isinstance(node, dict):
                raise ValueError(f"config override --{key}: {name!r} is given a value already")
        node[leaf] = yaml.safe_load(value)
    return out


def tensorboard_logger(save_dir: str | os.PathLike, name: str = "",
                       version: str | None = None) -> dict:
    """The LightningCLI spec of a stage's TensorBoard logger (logs in
    ``<save_dir>/<name>/<version>``), without Lightning's ``hp_metric`` placeholder (a -1 that
    every run would log and nothing fills)."""
    return {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
            "init_args": {"save_dir": str(save_dir), "name": name, "version": version,
                          "default_hp_metric": False}}


def is_rank_zero() -> bool:
    """Whether this process is the global rank 0 (or not part of a distributed run)."""
    ranks = ("LOCAL_RANK", "NODE_RANK", "RANK", "SLURM_PROCID")
    return all(os.environ.get(k, "0") == "0" for k in ranks)


def wait_for(path: Path, timeout_s: float = 600.0) -> None:
    """Ranks > 0 under a relaunching DDP strategy may get here before rank 0 wrote ``path``."""
    deadline = time.monotonic() + timeout_s
    while not path.is_file() and not is_rank_zero() and time.monotonic() < deadline:
        time.sleep(1.0)


STAGE_FILE = "stage.json"  # <log dir>/stage.json: what the checkpoints beside it were trained from


def stage_fingerprint(config: dict) -> dict:
    """What a stage's checkpoints depend on: its config and the content of the network file it
    starts from (``model.init_args.weights``), which a rebuilt earlier stage may have changed
    under the same path."""
    import hashlib

    weights = ((config.get("model") or {}).get("init_args") or {}).get("weights")
    digest = (hashlib.sha256(Path(weights).read_bytes()).hexdigest()
              if isinstance(weights, str) and Path(weights).is_file() else None)
    return json.loads(json.dumps({"config": config, "weights_sha256": digest}))


def stale_checkpoints_aside(folder: Path, fingerprint: dict) -> bool:
    """Before a fit resumes from ``folder/checkpoints``: when they were trained from another
    config or another input network (``stage.json``), rank 0 moves them aside to
    ``checkpoints.superseded-<n>`` (nothing is deleted) and the stage starts over on every rank
    (returns True); rank 0 then records this fit's fingerprint. A folder from before
    fingerprints existed resumes as it is."""
    record, checkpoints = folder / STAGE_FILE, folder / "checkpoints"
    stale = (record.is_file() and checkpoints.exists()
             and json.loads(record.read_text()) != fingerprint)
    if is_rank_zero():
        if stale:
            n = 1 + sum(1 for _ in folder.glob("checkpoints.superseded-*"))
            checkpoints.rename(folder / f"checkpoints.superseded-{n}")
            print(f"{checkpoints}: trained from another config or input network; moved aside "
                  f"to checkpoints.superseded-{n}, the stage starts over", file=sys.stderr)
        write_json(record, fingerprint)
    return stale


def fit_stage(config: dict, test: bool = False) -> Any:
    """Run one Lightning fit (optionally followed by a test of the best checkpoint) from a
    LightningCLI config dict; resumes from ``<log_dir>/checkpoints/last.ckpt`` when present."""
    from .train import main

    # main warns when sys.argv (ours) and args both exist; sys.argv must stay as it is
    # (a relaunching DDP strategy starts the other ranks with it).
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    cli = main(["--config", yaml.safe_dump(config, sort_keys=False)], run=False)
    folder = Path(cli.trainer.log_dir or cli.trainer.default_root_dir)
    last = folder / "checkpoints" / "last.ckpt"
    stale = stale_checkpoints_aside(folder, stage_fingerprint(config))
    ckpt_path = str(last) if last.is_file() and not stale else None
    if ckpt_path:
        print(f"resuming from {ckpt_path}", file=sys.stderr)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    if test:
        has_best = bool(getattr(cli.trainer.checkpoint_callback, "best_model_path", ""))
        cli.trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best" if has_best else None)
    return cli


def check_stage_config(config: dict, where: str, error: type[ValueError]) -> None:
    """Parse and type-check a stage's LightningCLI config without building anything, so a typo
    in a later stage fails before the first one trains; ``error`` names ``where`` (file and
    section) and the offending key in one line."""
    import argparse

    from .train import TrainCLI

    class _Check(TrainCLI):  # parse and validate only: nothing instantiated, no seeding
        def _set_seed(self) -> None: ...
        def before_instantiate_classes(self) -> None: ...
        def instantiate_classes(self) -> None: ...

    warnings.filterwarnings("ignore", message="LightningCLI's args parameter")
    try:
        _Check(args=["--config", yaml.safe_dump(config, sort_keys=False)], run=False,
               subclass_mode_model=True, subclass_mode_data=True, seed_everything_default=0,
               parser_kwargs={"parser_mode": "omegaconf", "exit_on_error": False})
    except argparse.ArgumentError as e:
        raise error(f"{where}: {one_line(str(e))}; fix that key and rerun") from None


def one_line(message: str) -> str:
    """jsonargparse's nested validation report reduced to ``key[ VALUE]: reason``: for a
    class_path, the reason the class refused; for a union (an optional value), the first reason
    that is not about None, and the value given."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    if not lines or not lines[0].startswith("Parser key") or len(lines) < 2:
        return lines[0] if lines else message
    key, detail, inside = lines[0].removeprefix("Parser key").strip(' ":'), [], False
    for line in lines[1:]:
        if line.startswith("- Problem with given class_path"):
            inside = True
        elif inside and (line.startswith("- ") or line.startswith("Given value")):
            break
        elif inside:
            detail.append(line)
    if detail:
        return f"{key}: {' '.join(detail)}"
    reasons = [line[2:] for line in lines[1:] if line.startswith("- ") and "NoneType" not in line]
    given = next((line.partition(":")[2].strip() for line in lines if line.startswith("Given value:")), "")
    reason = reasons[0] if reasons else lines[1]
    if reason.startswith("Expected a <class 'list'>"):  # e.g. --seeds 1 2 (argparse's nargs)
        reason += "; a list is written in YAML, e.g. [1,2]"
    return f"{key}{' ' + given if given else ''}: {reason}"


def atomic_write(path: Path, write: Callable[[str], Any]) -> Path:
    """``networks.atomic_write``, imported late: finished runs are answered without torch."""
    from networks import atomic_write

    return atomic_write(path, write)


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` into ``path`` atomically."""
    return atomic_write(Path(path), lambda tmp: Path(tmp).write_bytes(data))


def save_png(fig, path: str | os.PathLike) -> Path:
    """A matplotlib figure as a PNG at ``path``, atomically; the figure is closed."""
    import io

    import matplotlib.pyplot as plt

    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=120)
    plt.close(fig)
    return write_bytes(path, png.getvalue())


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` into ``path`` atomically."""
    return write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> Path:
    """Write ``obj`` as indented JSON to ``path`` atomically."""
    return write_text(path, json.dumps(obj, indent=1) + "\n")


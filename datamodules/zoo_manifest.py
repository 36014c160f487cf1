"""The zoo of target networks: member files plus ``manifest.json`` (see docs/zoo.md).

Layout of a zoo directory::

    manifest.json          {"format": "metaprune.zoo/v1", "members": [row, ...]}
    members/seed<N>.pt     network files (networks.save_network; load with weights_only=True)
    members/seed<N>-<V>.pt variant V of the same trained network (e.g. another initial speed-up)
    runs/seed<N>[-<V>]/... TensorBoard logs and checkpoints of the runs that made them

A row: ``seed, variant, architecture, widths, macs, params, base_macs, speed_up, val_acc,
test_acc, file`` (``file`` relative to the zoo directory). A member is keyed by ``(seed,
variant)``; ``variant`` is "" for the member made the config's way, and rows written before
variants existed read as "". Write order makes a crash harmless: the member
file is written to a temporary name and renamed, and only then the manifest is rewritten to a
temporary name and renamed. A member file without a row is an unfinished member: the next run
for that seed overwrites it. A row always points at a complete file.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from torch import nn

import networks
from metaprune.errors import UserError

MANIFEST = "manifest.json"
FORMAT = "metaprune.zoo/v1"
ROW_KEYS: dict[str, type | tuple[type, ...]] = {
    "seed": int, "architecture": dict, "widths": dict, "macs": int, "params": int, "base_macs": int,
    "speed_up": float, "val_acc": (float, type(None)), "test_acc": (float, type(None)), "file": str}
VARIANT = re.compile(r"[A-Za-z0-9_.]*")


class ZooError(UserError):
    """A zoo directory or its manifest is missing, broken or inconsistent."""


def _is_variant(variant: Any) -> bool:
    return isinstance(variant, str) and VARIANT.fullmatch(variant) is not None


def member_name(seed: int, variant: str = "") -> str:
    """``seed<N>``, or ``seed<N>-<variant>``: the member's file stem and run folder name."""
    if not _is_variant(variant):
        raise ZooError(f"zoo member variant {variant!r}: use letters, digits, '_' and '.' only "
                       "(it becomes part of a file name), e.g. 's1.6'")
    return f"seed{int(seed)}" + (f"-{variant}" if variant else "")


def member_file(seed: int, variant: str = "") -> str:
    """Path of a member file, relative to the zoo directory."""
    return f"members/{member_name(seed, variant)}.pt"


def member_key(row: dict) -> tuple[int, str]:
    """A row's key in the manifest: ``(seed, variant)``."""
    return int(row["seed"]), row["variant"]


def widths(model: nn.Module) -> dict[str, int]:
    """Output width of every layer whose shape record names one (Conv, Linear and registered
    types; ``networks.layers``), ``{module path: channels}``."""
    out = {}
    for path, m in model.named_modules():
        shape = networks.layer_shape(m)
        if shape is not None and shape.width is not None:
            out[path] = int(getattr(m, shape.width))
    return out


def _check_row(row: Any, i: int, where: str) -> None:
    if not isinstance(row, dict):
        raise ZooError(f"{where}: members[{i}] is a {type(row).__name__}, expected an object")
    missing = sorted(set(ROW_KEYS) - set(row))
    if missing:
        raise ZooError(f"{where}: members[{i}] lacks {', '.join(missing)}")
    for key, kind in ROW_KEYS.items():
        value = row[key]
        ok = isinstance(value, kind) and not isinstance(value, bool)
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            ok = True
        if not ok:
            raise ZooError(f"{where}: members[{i}].{key}={value!r} has the wrong type")
    variant = row.get("variant", "")
    if not _is_variant(variant):
        raise ZooError(f"{where}: members[{i}].variant={variant!r} is not a variant name "
                       "(letters, digits, '_' and '.')")
    arch = row["architecture"]
    if not {"name", "num_classes", "kwargs"} <= set(arch):
        raise ZooError(f"{where}: members[{i}].architecture needs name, num_classes and kwargs")
    if row["macs"] <= 0 or abs(row["base_macs"] / row["macs"] - row["speed_up"]) > 1e-6 * row["speed_up"]:
        raise ZooError(f"{where}: members[{i}] speed_up={row['speed_up']} is not "
                       f"base_macs/macs={row['base_macs']}/{row['macs']}")


def read_manifest(zoo_dir: str | os.PathLike, check_files: bool = True,
                  missing_ok: bool = False) -> dict:
    """Read and validate ``<zoo_dir>/manifest.json``; errors name the file and what is wrong.

    ``check_files``: every row's member file must exist. ``missing_ok``: a zoo without a
    manifest yet reads as ``{"format": ..., "members": []}``.
    """
    path = Path(zoo_dir) / MANIFEST
    where = f"zoo manifest {str(path)!r}"
    if not path.is_file():
        if missing_ok:
            return {"format": FORMAT, "members": []}
        raise ZooError(f"{where} does not exist; create the zoo with "
                       "`python prune.py zoo --config configs/<task>/zoo.yaml --seed N`")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ZooError(f"{where} cannot be read as JSON ({e}); it was edited by hand or "
                       "damaged. Restore it, or delete it and rerun the zoo command per seed "
                       "(members whose file exists are re-registered after a finetune)") from e
    if not isinstance(manifest, dict) or not isinstance(manifest.get("members"), list):
        raise ZooError(f"{where} must be an object with a 'members' list")
    if manifest.get("format", FORMAT) != FORMAT:
        raise ZooError(f"{where} has format {manifest['format']!r}, expected {FORMAT!r}")
    seen = set()
    for i, row in enumerate(manifest["members"]):
        _check_row(row, i, where)
        row.setdefault("variant", "")
        key = member_key(row)
        name = member_name(*key)
        if key in seen:
            raise ZooError(f"{where}: member {name} appears twice")
        seen.add(key)
        if check_files and not (Path(zoo_dir) / row["file"]).is_file():
            raise ZooError(f"{where}: members[{i}] ({name}) points at "
                           f"{row['file']!r}, which does not exist in {str(zoo_dir)!r}")
    manifest.setdefault("format", FORMAT)
    return manifest


def find_member(zoo_dir: str | os.PathLike, seed: int, variant: str = "") -> dict | None:
    """The manifest row of member ``(seed, variant)``, or None (no manifest yet counts as no
    row)."""
    rows = read_manifest(zoo_dir, missing_ok=True)["members"]
    return next((r for r in rows if member_key(r) == (int(seed), variant)), None)


@contextlib.contextmanager
def _locked(zoo_dir: Path) -> Iterator[None]:
    """Serialize manifest updates of concurrent runs (different seeds) on one zoo (POSIX)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, runs must not overlap
        yield
        return
    zoo_dir.mkdir(parents=True, exist_ok=True)
    with open(zoo_dir / f".{MANIFEST}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_manifest(zoo_dir: str | os.PathLike, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically (temporary file in the same folder, then rename)."""
    text = json.dumps(manifest, indent=1) + "\n"
    return networks.atomic_write(Path(zoo_dir) / MANIFEST, lambda tmp: Path(tmp).write_text(text))


def add_member(zoo_dir: str | os.PathLike, row: dict) -> Path:
    """Add (or replace) the row of member ``(row['seed'], row['variant'])``; its member file
    must already exist (a row without ``variant`` gets "")."""
    zoo_dir, row = Path(zoo_dir), {"variant": "", **row}
    if not (zoo_dir / row["file"]).is_file():
        raise ZooError(f"refusing to register {member_name(*member_key(row))}: {row['file']!r} does not "
                       f"exist in {str(zoo_dir)!r}")
    _check_row(row, 0, "new zoo row")
    with _locked(zoo_dir):
        manifest = read_manifest(zoo_dir, check_files=False, missing_ok=True)
        members = [r for r in manifest["members"] if member_key(r) != member_key(row)] + [row]
        manifest["members"] = sorted(members, key=member_key)
        return write_manifest(zoo_dir, manifest)



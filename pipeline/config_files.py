"""Reading YAML config files that are composed from component files.

Any mapping in a config file may name component files under the key ``_base_`` (one path, or a
list merged in order), relative to the file that names them. The mapping's own keys are then
merged over the components': mappings recursively, any other value replaced (the rule of
:func:`merged`). So a task config says which data it uses and only what it changes::

    data:
      _base_: ../data/cifar10.yaml     # class_path, root, dataset, num_classes, ...
      init_args: {subset: 500}         # this task's own setting

Components may name components of their own; a file that includes itself is refused.
``${...}`` interpolations are left as they are, for LightningCLI to resolve in the composed
document. Every reader of config files (``train.py``, every ``prune.py`` command, the
benchmarks, registration hashes) reads them through :func:`load_config_file`, so a composed
file means the same everywhere.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from metaprune.errors import UserError

BASE_KEY = "_base_"


def load_config_file(path: str | os.PathLike, error: type[UserError] = UserError,
                     kind: str = "") -> Any:
    """The YAML document at ``path`` with every ``_base_`` resolved; ``error`` (naming the
    file, and the key for a bad ``_base_``) for a missing, unreadable or invalid file."""
    return _compose(Path(path), error, f"{kind} config " if kind else "config ", ())


def uses_components(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a YAML file that names component files anywhere (a cheap text
    check: a false positive only costs composing a file that needs none). False for anything
    else, such as config text given in place of a file name."""
    try:
        return BASE_KEY in Path(path).read_text()
    except (OSError, ValueError):  # not a file; a name too long for one, or with a NUL byte
        return False


def _compose(path: Path, error: type[UserError], kind: str, chain: tuple[Path, ...]) -> Any:
    where = f"{kind}{str(path)!r}"
    resolved = path.resolve()
    if resolved in chain:
        cycle = " -> ".join(str(p) for p in (*chain, resolved))
        raise error(f"{where} includes itself ({cycle}); remove one of these _base_ entries")
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise error(f"{where} does not exist; check the path") from None
    except OSError as e:
        raise error(f"{where} cannot be read ({e.strerror})") from None
    except yaml.YAMLError as e:
        raise error(f"{where} is not valid YAML: {e}") from None
    return _resolve(raw, path, error, kind, (*chain, resolved), "")


def _resolve(node: Any, path: Path, error: type[UserError], kind: str,
             chain: tuple[Path, ...], key: str) -> Any:
    """``node`` (found at ``key`` in the file ``path``) with its components merged in."""
    if isinstance(node, list):
        return [_resolve(v, path, error, kind, chain, f"{key}[{i}]") for i, v in enumerate(node)]
    if not isinstance(node, dict):
        return node
    own = {k: _resolve(v, path, error, kind, chain, f"{key}.{k}" if key else str(k))
           for k, v in node.items() if k != BASE_KEY}
    if BASE_KEY not in node:
        return own
    at = f"{kind}{str(path)!r}, key {key + '.' if key else ''}{BASE_KEY}"
    names = node[BASE_KEY]
    names = [names] if isinstance(names, str) else names
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise error(f"{at}: give a file path or a list of file paths (relative to this file), "
                    f"not {node[BASE_KEY]!r}")
    parts = []
    for name in names:
        part = _compose(path.parent / name, error, kind, chain)
        if not isinstance(part, dict):
            raise error(f"{at}: {name!r} must hold a mapping to merge into, not "
                        f"{type(part).__name__}")
        parts.append(part)
    return merged(*parts, own)


def merged(*configs: dict) -> dict:
    """The configs merged left to right by OmegaConf (mappings recursively, anything else
    replaced), as a plain dict; ``${...}`` interpolations are left for LightningCLI."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        out = OmegaConf.to_container(OmegaConf.merge(*configs), resolve=False)
    except (TypeError, OmegaConfBaseException) as e:
        raise UserError(f"configs cannot be merged ({e}): a later one gives a list where an "
                        "earlier one gives a mapping, or the reverse; give the same kind of "
                        "value in both") from None
    assert isinstance(out, dict)
    return out

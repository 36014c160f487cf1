"""Save and load target networks, pruned or not, without pickling code.

A network pruned by torch_pruning has smaller layers than its constructor makes. The file
records how to build the unpruned architecture (registry name, class count, kwargs) plus the
actual shape attributes of every Conv/Linear/BatchNorm layer; loading rebuilds the network,
resizes those layers to the recorded shapes and loads the weights. Everything in the file is a
tensor or a plain Python value, so it loads with ``torch.load(..., weights_only=True)``.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from metaprune.errors import UserError

from .layers import ShapeValue, layer_shape
from .registry import build, build_arch

FORMAT = "metaprune.network/v1"


class CheckpointError(UserError):
    """A checkpoint file is missing, truncated, of the wrong kind or inconsistent."""


def layer_shapes(model: nn.Module) -> dict[str, dict[str, int | list[int]]]:
    """``{module path: {shape attribute: value}}`` of every layer with a shape record
    (``networks.layers``: Conv, Linear, BatchNorm and registered types): what a pruned model
    needs beyond its constructor to take its state dict back."""
    layers = {}
    for path, module in model.named_modules():
        shape = layer_shape(module)
        if shape is not None:
            layers[path] = {a: _plain(getattr(module, a)) for a in shape.attrs}
    return layers


def _plain(value) -> int | list[int]:
    """A shape attribute as a plain value a weights-only file holds (a tuple as a list)."""
    return int(value) if isinstance(value, int) else [int(v) for v in value]


def apply_layer_shapes(model: nn.Module, layers: Mapping[str, Mapping[str, ShapeValue | list[int]]],
                       state: dict[str, torch.Tensor], source: str) -> None:
    """Resize ``model``'s layers in place to ``layers`` (from :func:`layer_shapes`), and every
    module's own parameters and buffers to ``state``'s shapes (a layer scale or positional
    embedding has no shape attribute but follows the channels), so that
    ``model.load_state_dict(state)`` fits; the values are not loaded here."""
    modules = dict(model.named_modules())
    for path, attrs in layers.items():
        if path not in modules:
            raise CheckpointError(f"{source}: layer {path!r} does not exist in {type(model).__name__}")
        for attr, value in attrs.items():
            setattr(modules[path], attr, tuple(value) if isinstance(value, list) else value)
    for path, module in modules.items():
        prefix = f"{path}." if path else ""
        for name, p in list(module.named_parameters(recurse=False)):
            key = prefix + name
            if key in state and p.shape != state[key].shape:
                module._parameters[name] = nn.Parameter(p.new_empty(state[key].shape), p.requires_grad)
        for name, b in list(module.named_buffers(recurse=False)):
            key = prefix + name
            if key in state and b is not None and b.shape != state[key].shape:
                module._buffers[name] = b.new_empty(state[key].shape)


def reshape_to_state(model: nn.Module, state: dict[str, torch.Tensor], prefix: str = "") -> None:
    """Resize ``model``'s layers with a shape record (``networks.layers``) to the shapes of
    ``state`` (a state dict of a pruned copy), so that ``load_state_dict(state)`` fits. A
    depthwise conv stays depthwise (its groups follow its channels), as channel pruning keeps
    it."""
    layers = {}
    for path, m in model.named_modules():
        shape = layer_shape(m)
        if shape is None:
            continue
        local = [n for n, _ in m.named_parameters(recurse=False)] + \
            [n for n, _ in m.named_buffers(recurse=False)]
        keys = {n: f"{prefix}{path}.{n}" if path else f"{prefix}{n}" for n in local}
        attrs = shape.infer(m, {n: state[k] for n, k in keys.items() if k in state})
        if attrs is not None:
            layers[path] = attrs
    unprefixed = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    apply_layer_shapes(model, layers, unprefixed, type(model).__name__)


def network_record(model: nn.Module, arch: dict[str, Any], metadata: dict | None = None) -> dict:
    """The dictionary stored in a network file (see module docstring)."""
    layers = layer_shapes(model)
    return {
        "format": FORMAT,
        "arch": {"name": arch["name"], "num_classes": int(arch["num_classes"]),
                 "kwargs": dict(arch.get("kwargs", {}))},
        "layers": layers,
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "metadata": dict(metadata or {}),
    }


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """``write(tmp)`` to a temporary file next to ``path``, flush it to disk, then rename over
    ``path``: readers see the old file or the new one, never a half file, and a failed write
    leaves the old file untouched. The temporary name keeps ``path``'s suffix (some writers,
    e.g. torch.export.save, look at it)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def atomic_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def save_network(model: nn.Module, path: str | os.PathLike, arch: dict[str, Any],
                 metadata: dict | None = None) -> Path:
    """Save ``model`` (built by ``networks.build(**arch)``, possibly pruned) to ``path``.

    ``arch`` is ``{"name": ..., "num_classes": ..., "kwargs": {...}}``.
    """
    return atomic_save(network_record(model, arch, metadata), path)


def safe_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load(weights_only=True)`` with errors that name the file and the fix."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist; check the path")
    with open(path, "rb") as f:
        head = f.read(8)
    if not head.startswith((b"PK\x03\x04", b"\x80")):  # torch.save: a zip archive or a pickle
        raise CheckpointError(f"{what} {str(path)!r} is not a file saved by torch.save (it begins "
                              f"with {head!r}); pass a file this project wrote")
    if head.startswith(b"PK") and not zipfile.is_zipfile(path):  # the archive's directory is at its end
        raise CheckpointError(f"{what} {str(path)!r} is truncated ({path.stat().st_size:,} bytes; "
                              "the end of its archive is missing): an interrupted copy or write; "
                              "copy it again or re-create it")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, foreign pickle, ...
        raise CheckpointError(
            f"{what} {str(path)!r} cannot be read safely ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:200]}). The file is truncated, corrupt or carries "
            "pickled code; re-create it with this project's save functions"
        ) from e


def network_from_record(record: dict, source: str = "<record>") -> nn.Module:
    """Rebuild the module stored by :func:`network_record` (identical outputs, bit for bit)."""
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        kind = record.get("format", "unknown") if isinstance(record, dict) else type(record).__name__
        raise CheckpointError(
            f"{source} is not a target-network file (format {kind!r}, expected {FORMAT!r}). "
            "Pass a network saved by networks.save_network (e.g. a zoo member or pruned export), "
            "not a metanetwork or Lightning checkpoint"
        )
    arch = record["arch"]
    model = build(arch["name"], arch["num_classes"], **arch["kwargs"])
    state = record["state_dict"]
    apply_layer_shapes(model, record["layers"], state, source)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{source}: weights do not fit {arch['name']}: {e}") from e
    for key, t in state.items():
        if t.is_floating_point() and not torch.isfinite(t).all():
            raise CheckpointError(
                f"{source}: tensor {key!r} contains NaN or Inf; the network diverged or the file "
                "is damaged. Retrain or pick an earlier checkpoint"
            )
    return model


def network_from_state_dict(arch: dict[str, Any], state: dict[str, torch.Tensor], source: str,
                            pruned: bool = False) -> nn.Module:
    """The registry architecture ``arch`` with the weights ``state`` (a plain state dict).

    ``pruned=True`` resizes the layers to the state's shapes first (a pruned copy of the
    architecture); otherwise any key or shape that does not match is refused, the first ones
    named."""
    model = build_arch(arch)
    if pruned:
        reshape_to_state(model, state)
    expected = model.state_dict()
    problems = [f"missing {k}" for k in expected if k not in state]
    problems += [f"unexpected {k}" for k in state if k not in expected]
    problems += [f"{k}: {tuple(state[k].shape)} in the file, {tuple(v.shape)} in {arch['name']}"
                 for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if problems:
        raise CheckpointError(
            f"{source} does not match {arch['name']} with {arch['num_classes']} classes "
            f"{arch.get('kwargs') or ''}({len(problems)} problems; first: {'; '.join(problems[:3])}). "
            "Pass the architecture and class count the weights were saved from")
    model.load_state_dict(state)
    return model


def load_network(path: str | os.PathLike) -> tuple[nn.Module, dict]:
    """Load a network file; returns ``(module, record)`` (``record`` holds arch and metadata)."""
    record = safe_load(path, "network file")
    return network_from_record(record, source=f"network file {str(path)!r}"), record

"""No load in the project unpickles code: every torch.load / load_from_checkpoint call passes
weights_only=True (a scan of the sources), so a malicious checkpoint cannot run code."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
LOADERS = {"load", "load_from_checkpoint"}


def _unsafe_loads(source: str) -> list[int]:
    lines = []
    for node in ast.walk(ast.parse(source)):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                and node.func.attr in LOADERS):
            continue
        owner = node.func.value
        is_torch = isinstance(owner, ast.Name) and owner.id == "torch"
        if node.func.attr == "load" and not is_torch:
            continue  # json.load, yaml loaders, ...
        safe = any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                   and k.value.value is True for k in node.keywords)
        if not safe:
            lines.append(node.lineno)
    return lines


def test_scanner_catches_an_unsafe_load():
    assert _unsafe_loads("import torch\ntorch.load('x')\nM.load_from_checkpoint('y')\n") == [2, 3]
    assert _unsafe_loads("torch.load('x', weights_only=True)\njson.load(f)\n") == []


def test_every_load_in_the_project_is_weights_only():
    offenders = []
    for path in sorted(ROOT.rglob("*.py")):
        if any(part in {"tests", ".venv", "venv", "build"} for part in path.relative_to(ROOT).parts):
            continue
        offenders += [f"{path.relative_to(ROOT)}:{n}" for n in _unsafe_loads(path.read_text())]
    assert not offenders, f"loads without weights_only=True: {offenders}"

"""The layering of docs/decisions.md ("Layers and their folders"), read from the source: no
module imports a package of a higher layer, and the pure-torch layer never imports Lightning
(lazy imports inside functions count: they run too)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# lowest first: the torch-free base, pure torch, Lightning glue, commands
LAYER = {"metaprune": 0, "networks": 1, "graph": 1, "objective": 1,
         "datamodules": 2, "lightning_modules": 2, "callbacks": 2, "pipeline": 3}
LIGHTNING = ("lightning", "pytorch_lightning", "torchmetrics")


def imported(path: Path) -> list[tuple[int, str]]:
    """(line, top-level package) of every absolute import in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.split(".")[0]))
    return found


def violations(package: str) -> list[str]:
    level, out = LAYER[package], []
    for path in sorted((ROOT / package).rglob("*.py")):
        for line, top in imported(path):
            if LAYER.get(top, -1) > level or (level <= 1 and top in LIGHTNING):
                out.append(f"{path.relative_to(ROOT)}:{line} imports {top}")
    return out


def test_the_scanner_sees_an_upward_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from pipeline.run import prune_run\n    import lightning.pytorch\n")
    assert imported(module) == [(2, "pipeline"), (3, "lightning")]


@pytest.mark.parametrize("package", sorted(LAYER))
def test_no_package_imports_a_higher_layer(package: str) -> None:
    assert violations(package) == []

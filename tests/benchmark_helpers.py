"""The scripts of benchmarks/ as modules, for tests (benchmarks/ is not a package)."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def benchmark_module(name: str) -> ModuleType:
    """``benchmarks/<name>.py`` loaded as the module ``name``, registered in ``sys.modules``
    (dataclasses look their module up there). A script that imports another by name (as when
    run from benchmarks/) needs benchmarks/ on the path: ``monkeypatch.syspath_prepend``."""
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module

"""The quality benchmark's runs again with a per-layer pruning cap, stage 1 reused.

    python benchmarks/quality_rerun.py --runs runs/quality_fresh/prune --max_pruning_ratio 0.67 \
        --methods none sparse --out runs/capped/quality_fresh

Every finished run under ``--runs`` (``seed<N>/<S>x/<method>/``, as ``quality_cifar10.py`` and
``quality_variant.py`` write them) runs again with its own stored settings plus
``prune.max_pruning_ratio``, taking stage 1 from the original run (``--reuse_first_stage``):
the same network, stage 1, budgets and seeds; only stage 2's pruning and the curves change.
The runs mirror ``--runs`` under ``<out>/prune`` (resumable, cell by cell); pool them with
``quality_pool.py`` as any benchmark folder. Nothing is selected here.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
from pathlib import Path

import yaml

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline import results  # noqa: E402
from pipeline.common import atomic_write  # noqa: E402
from pipeline.run import RUN_FILE, RunRequest, prune_run  # noqa: E402


def capped_config(settings: dict, cap: float, folder: Path) -> Path:
    """The run's stored config (run.json) with ``prune.max_pruning_ratio``, as a prune.yaml in
    ``folder`` named by its content (runs that share a config share the file)."""
    config = json.loads(json.dumps(settings["config"]))
    config["prune"]["max_pruning_ratio"] = cap
    text = yaml.safe_dump(config, sort_keys=True)
    path = folder / f"prune-{hashlib.sha256(text.encode()).hexdigest()[:12]}.yaml"
    if not path.is_file():
        atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", required=True, help="a benchmark's prune/ folder")
    parser.add_argument("--max_pruning_ratio", type=float, required=True,
                        help="the per-layer cap of stage 2 and the curves, in (0, 1]")
    parser.add_argument("--methods", nargs="*", default=None,
                        help="run folders to redo (e.g. none sparse variant); default all")
    parser.add_argument("--out", required=True, help="output folder")
    args = parser.parse_args(argv)
    runs, out = Path(args.runs).resolve(), Path(args.out).resolve()
    done = results.run_folders(runs)
    done = [d for d in done if args.methods is None or d.name in args.methods]
    if not done:
        parser.error(f"--runs {args.runs!r} holds no finished run"
                     + (f" of {args.methods}" if args.methods else ""))
    for i, source in enumerate(done, 1):
        settings = json.loads((source / RUN_FILE).read_text())
        rel = source.relative_to(runs)
        print(f"[{i}/{len(done)}] {rel}", file=sys.stderr)
        prune_run(RunRequest(str(capped_config(settings, args.max_pruning_ratio, out / "configs")),
                             network=settings["network"], method=settings["method"],
                             metanetwork=settings["metanetwork"], speed_up=settings["speed_up"],
                             seed=settings["seed"], out=str(out / "prune" / rel),
                             reuse_first_stage=str(source)))
    return 0


if __name__ == "__main__":
    sys.exit(main())

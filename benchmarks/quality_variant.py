"""A metanetwork variant on the quality benchmark's held-out networks, paired with its baselines.

    python benchmarks/quality_variant.py --benchmark runs/quality_cifar10 \
        --metanetwork runs/variants/paper_dense/selection/best.ckpt --out runs/variants/paper_dense

Prunes every held-out network of a finished (or running) ``benchmarks/quality_cifar10.py``
folder with ``--method metanetwork`` and this metanetwork, to every speed-up, with the
benchmark's own prune config (same budgets, same seeds), each cell a ``prune.py run`` folder
under ``<out>/prune`` (resumable). Then writes ``<out>/variant.md``: the paired differences of
this variant against the benchmark's ``none``, ``sparse`` and ``metanetwork`` runs on the same
networks (stage-1 curve area and final test accuracy, 95% CI; ``pipeline.paired``), and
``<out>/variant.png``, their forest plot. The
variant's metanetwork should be selected as the benchmark's is (``prune.py select`` on the
meta-val members), never on these networks.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from pipeline import demo as pipeline_demo  # noqa: E402
from pipeline import results  # noqa: E402
from pipeline.common import atomic_write  # noqa: E402
from pipeline.paired import paired, paired_table, save_paired_plot  # noqa: E402
from pipeline.run import RunRequest, prune_run  # noqa: E402

VARIANT = "variant"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--benchmark", required=True, help="a quality_cifar10.py --out folder")
    parser.add_argument("--metanetwork", required=True, help="the variant's selected checkpoint")
    parser.add_argument("--out", required=True, help="output folder of this variant")
    parser.add_argument("--target_seeds", type=int, nargs="+",
                        help="prune only these of the benchmark's held-out networks (e.g. two "
                             "processes on disjoint halves use two cores); the table pairs "
                             "whatever has finished")
    args = parser.parse_args(argv)
    bench, out = Path(args.benchmark).resolve(), Path(args.out).resolve()
    demo = json.loads((bench / pipeline_demo.DEMO_FILE).read_text())["demo"]
    unknown = sorted(set(args.target_seeds or []) - set(demo["target_seeds"]))
    if unknown:
        parser.error(f"--target_seeds {unknown} are not held-out networks of {bench} "
                     f"(it has {demo['target_seeds']})")
    config = bench / "configs" / "prune.yaml"
    reports: dict[str, dict] = {}
    for seed in args.target_seeds or demo["target_seeds"]:
        network = bench / "target" / "members" / f"seed{seed}.pt"
        first = None
        for speed_up in demo["speed_ups"]:
            key = results.run_key(seed, speed_up, VARIANT)
            run = out / "prune" / key
            prune_run(RunRequest(str(config), network=str(network), method="metanetwork",
                                 metanetwork=str(Path(args.metanetwork).resolve()),
                                 speed_up=speed_up, out=str(run),
                                 reuse_first_stage=str(first) if first else None))
            first = first or run
    reports.update(results.read_reports(out / "prune", VARIANT))  # this call's runs and others'
    reports.update(results.read_reports(bench / "prune"))
    values = results.measures(reports)
    diffs = [paired(per, VARIANT, other, measure) for measure, per in values.items()
             for other in ("none", "sparse", "metanetwork") if other in per and VARIANT in per]
    text = (f"# variant {args.metanetwork} on {bench}\n\nPaired differences (variant - "
            f"baseline, percentage points) over the held-out networks {demo['target_seeds']}:"
            f"\n\n{paired_table(diffs)}\n")
    atomic_write(out / "variant.md", lambda tmp: Path(tmp).write_text(text))
    save_paired_plot(diffs, out / "variant.png", f"{Path(args.metanetwork).name} on {bench.name}: "
                     "variant - baseline per network")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

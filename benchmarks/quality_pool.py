"""Paired differences over the held-out networks of several quality-benchmark folders at once.

    python benchmarks/quality_pool.py \
        --runs runs/quality_cifar10/prune runs/quality_confirm/prune \
        --variant metanetwork=runs/variants/paper_distill/prune [--out pooled.md] [--plot pooled.png]

Every ``<folder>/seed<N>/<S>x/<method>/report.json`` under ``--runs`` counts, keyed by network
and method; ``--variant METHOD=FOLDER`` makes the runs in FOLDER (``quality_variant.py``'s
``<out>/prune``, whose method is ``variant``) stand for METHOD, replacing that method's runs of
the same networks. Networks must be held out of meta-training in every folder; nothing here is
selected, it only pools what was run. Prints and optionally writes the paired table and its
forest plot (each network a dot, the mean on its 95% interval).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from pipeline import results  # noqa: E402
from pipeline.common import atomic_write  # noqa: E402
from pipeline.paired import paired_table, save_paired_plot  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", nargs="+", required=True, help="prune/ folders of benchmarks")
    parser.add_argument("--variant", nargs="*", default=[], metavar="METHOD=FOLDER",
                        help="runs that stand for METHOD (replacing its runs of the same networks)")
    parser.add_argument("--out", default=None, help="also write the table to this markdown file")
    parser.add_argument("--plot", default=None, help="also draw the differences into this PNG")
    args = parser.parse_args(argv)
    reports: dict[str, dict] = {}
    for folder in args.runs:
        reports.update(results.read_reports(Path(folder)))
    for spec in args.variant:
        method, _, folder = spec.partition("=")
        if not folder:
            parser.error(f"--variant {spec!r}: write METHOD=FOLDER")
        reports = {k: r for k, r in reports.items() if r["method"] != method
                   or not (Path(folder) / k.rsplit("/", 1)[0]).is_dir()}
        reports.update(results.read_reports(Path(folder), method))
    networks = sorted({results.network_of(k) for k in reports})
    diffs = results.paired_differences(results.measures(reports))
    text = f"Held-out networks: {', '.join(networks)} ({len(reports)} runs)\n\n{paired_table(diffs)}\n"
    if args.out:
        atomic_write(Path(args.out), lambda tmp: Path(tmp).write_text(text))
    if args.plot:
        save_paired_plot(diffs, args.plot, f"held-out networks {networks[0]}-{networks[-1]} "
                         f"({len(networks)}), paired differences")
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())

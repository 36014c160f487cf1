"""The pruning pipeline of docs/method.md, one subcommand per step.

    python prune.py zoo --config configs/<task>/zoo.yaml [--seed N] [--zoo_dir DIR] [--data_root PATH]
    python prune.py run --config configs/<task>/prune.yaml --network PATH [--metanetwork PATH]
        [--method metanetwork|none|sparse] [--speed_up S] [--out DIR] [--data_root PATH] [--seed N]
        [--SECTION.KEY VALUE ...]
    python prune.py curve --network PATH|[A,B] ... / select --config ... --run DIR
    python prune.py measure --network PATH [--batch_sizes [1,64]] / import_paper ...
    python prune.py demo [--data_root PATH] [--out DIR] [--fast]

The commands live in pipeline/ (one module each: zoo, run, curve, select, measure,
import_paper, demo); this file only starts them. Each subcommand's options are one dataclass in
pipeline/options.py, from which jsonargparse builds its command line (pipeline/cli.py); the
command's module is imported only when it runs, so ``prune.py --help`` loads no torch.
"""
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see train.py

from pipeline.cli import SUBCOMMANDS, build_parser, cli, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(cli())

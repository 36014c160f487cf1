"""The pruning pipeline of docs/method.md, one subcommand per step.

    python prune.py zoo --config configs/<task>/zoo.yaml [--seed N] [--zoo_dir DIR] [--data_root PATH]
    python prune.py run --config configs/<task>/prune.yaml --network PATH [--metanetwork PATH]
        [--method metanetwork|none|sparse] [--speed_up S] [--out DIR] [--data_root PATH] [--seed N]
    python prune.py curve --network PATH ... / select --config ... --run DIR
    python prune.py demo [--data_root PATH] [--out DIR] [--fast]

The commands live in pipeline/ (zoo, run, demo, cli) and callbacks/ (curve, selection); this file
only starts them. Subcommands are registered in ``pipeline.cli.SUBCOMMANDS``: each is a pair of
functions, one adding its arguments to an argparse subparser and one running it with the parsed
namespace, imported on first use (``prune.py --help`` loads no torch).
"""
import os
import sys

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP; see train.py

from pipeline.cli import SUBCOMMANDS, build_parser, cli, main  # noqa: E402,F401

if __name__ == "__main__":
    sys.exit(cli())

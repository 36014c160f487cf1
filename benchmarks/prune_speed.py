"""Progressive pruning speed: the plain loop (torch_pruning's MAC counter after every step)
against ``networks.prune_to_speed_up`` (empty-batch MAC counter), in one process.

    python benchmarks/prune_speed.py [--only resnet56|resnet50] [--repeats 2]

Both prune identical copies of one network with the same criterion and 200 iterative steps;
the script checks that they stop at the same step with identical layer widths and speed-up.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads OpenMP (see train.py)

import copy
import gc
import sys
import time
from typing import Literal

import torch
import torchvision
from jsonargparse.typing import PositiveInt

import networks
from datamodules.zoo_manifest import widths
from pipeline.command_line import cli, summary

CASES = {  # name: (build, input size, target speed-up)
    "resnet56": (lambda: networks.build("resnet56_cifar", 10), (1, 3, 32, 32), 2.0),
    "resnet50": (lambda: torchvision.models.resnet50(), (1, 3, 224, 224), 2.31),
}


def run(name: str, repeats: int = 2) -> dict:
    build, size, target = CASES[name]
    torch.manual_seed(0)
    model = build().eval()
    example = torch.zeros(size)
    base = networks.count_macs(model, example)
    results: dict[str, list] = {}
    # Alternating order, the garbage of the previous loop collected before each timing (the
    # torch_pruning graphs are cyclic: left to the collector, they were freed during, and
    # billed to, whichever loop ran next); the best of ``repeats`` per loop.
    for label, counter in [("plain", networks.count_macs), ("fast", None)] * repeats:
        work = copy.deepcopy(model)
        gc.collect()
        start = time.perf_counter()
        reached = networks.prune_to_speed_up(work, example, target, base, mac_counter=counter)
        elapsed = time.perf_counter() - start
        best = results.get(label)
        results[label] = [min(elapsed, best[0]) if best else elapsed, reached, widths(work)]
        del work
    (t_plain, s_plain, w_plain), (t_fast, s_fast, w_fast) = results["plain"], results["fast"]
    assert w_plain == w_fast and s_plain == s_fast, f"{name}: results differ"
    row = {"network": name, "target": target, "reached": s_fast, "plain_s": t_plain,
           "fast_s": t_fast, "ratio": t_plain / t_fast}
    print(f"{name} to {target}x: reached {s_fast:.4f}x, identical widths; plain loop "
          f"{t_plain:.2f} s, ours {t_fast:.2f} s, {t_plain / t_fast:.2f}x faster", flush=True)
    return row


def prune_speed(*, only: Literal["resnet50", "resnet56"] | None = None, repeats: PositiveInt = 2) -> None:
    """Both loops on each network.

    Args:
        only: this network alone (default: both)
        repeats: runs of each loop (best counts)
    """
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    for name in [only] if only else list(CASES):
        run(name, repeats)


def main(argv: list[str] | None = None) -> int:
    return cli(prune_speed, argv, prog="prune_speed.py", description=summary(__doc__))


if __name__ == "__main__":
    sys.exit(main())

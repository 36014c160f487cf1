"""``prune.py measure`` (docs/pruning.md): measured latency of a network file beside its MACs.

Pruning promises speed, and MACs are only a proxy for it (small layers, memory traffic and
kernel choice decide the rest). This command times the network's forward and that of its
unpruned architecture (same build recipe, untrained weights: the time does not depend on the
values) at each batch size, and prints both speed-ups against the unpruned architecture: by
MACs, the number every report uses, and measured.
"""
from __future__ import annotations

from pathlib import Path

from metaprune.errors import UserError

from .common import write_json
from .options import MeasureOptions, Runtime


class MeasureError(UserError):
    """Bad input to ``prune.py measure``."""


def compare(network, arch: dict, input_size: list[int], batch_sizes: list[int], device: str,
            min_run_time: float, runtime: Runtime = "torch") -> dict:
    """MACs and measured latency of ``network`` and of its unpruned architecture; speed-ups
    of ``network`` against it, by MACs and measured per batch size."""
    import networks
    from networks.latency import compare_latency

    example = networks.example_input(input_size)
    unpruned = networks.build_arch(arch)
    macs, base = networks.count_macs(network, example), networks.count_macs(unpruned, example)
    return {"macs": macs, "base_macs": base, "speed_up": base / macs,
            "latency": compare_latency(network, unpruned, input_size, batch_sizes, device,
                                       min_run_time, runtime)}


def measure_table(result: dict) -> str:
    """A markdown table of :func:`compare`'s result."""
    lines = ["| batch | runtime, device (threads) | unpruned ms | this network ms | speed-up measured "
             "| speed-up by MACs |", "|---|---|---|---|---|---|"]
    for row in result["latency"]:
        lines.append(f"| {row['batch_size']} | {row['runtime']}, {row['device']} ({row['threads']}) "
                     f"| {row['unpruned_latency_ms']:.3f} +- {row['unpruned_iqr_ms'] / 2:.3f} "
                     f"| {row['latency_ms']:.3f} +- {row['iqr_ms'] / 2:.3f} "
                     f"| {row['speed_up_measured']:.2f}x | {result['speed_up']:.2f}x |")
    return "\n".join(lines)


def measure_command(args: MeasureOptions) -> int:
    """``prune.py measure``: MACs and measured latency of a network file against its unpruned architecture."""
    import torch

    import networks

    if args.device == "cuda" and not torch.cuda.is_available():
        raise MeasureError("--device cuda: no CUDA device is available here (torch "
                           f"{torch.__version__}); measure on the CPU with --device cpu, or on a "
                           "machine with a GPU")
    network, record = networks.load_network(args.network)
    result = compare(network, record["arch"], list(args.input_size), args.batch_sizes, args.device,
                     args.min_run_time, args.runtime)
    print(f"{args.network}: {record['arch']['name']}, {result['macs']:,} of {result['base_macs']:,} "
          f"MACs; latency median +- half the interquartile range\n")
    print(measure_table(result))
    if args.out:
        write_json(Path(args.out), {"network": str(args.network), **result})
    return 0

"""Cost of one meta-training step against its floor (issue 4).

    python benchmarks/meta_step.py [--batch 500] [--batches [1,8]] [--device cpu] [--channel_gates]
        [--message_passing joint|paper]

For a ResNet-56 pruned to 1.32x (a zoo member), measures in one process:
- floor: plain forward+backward of the network over B batches of images (eval mode);
- step: one meta-training step (encode, metanetwork 8x64, decode, the same B forward+backward
  passes, the sparsity regularizer, one backward through the metanetwork);
- with ``--channel_gates``, also the same step with a metanetwork that has channel gates.
``--message_passing`` picks the metanetwork's layer (default ``joint``, the layer the numbers in
benchmarks/RESULTS.md were measured with; ``paper`` for the paper's).
Each configuration runs in a fresh subprocess so its peak memory (ru_maxrss on CPU,
max_memory_allocated on CUDA) is its own. The last line is ``ratio=<step/floor at B=max>``.
"""
from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from typing import Literal

import torch
from jsonargparse.typing import PositiveInt

from pipeline.command_line import cli


def measure(batches: int, batch: int, device: str, what: str, message_passing: str) -> dict:
    import networks
    from graph import Metanetwork
    from objective import MemberState, meta_loss

    torch.manual_seed(0)
    dev = torch.device(device)
    example = torch.randn(1, 3, 32, 32)
    model = networks.build("resnet56_cifar", 10).eval()
    networks.prune_to_speed_up(model, example, 1.32, networks.count_macs(model, example),
                               iterative_steps=200)
    images = torch.randn(batches, batch, 3, 32, 32, device=dev)
    labels = torch.randint(0, 10, (batches, batch), device=dev)
    member = MemberState.build(model, example, reg=10.0, alpha=16.0, device=dev)
    meta = Metanetwork.for_graph(member.graph, num_layers=8, hidden=64,
                                 channel_gates=what == "gated_step",
                                 message_passing=message_passing).to(dev)
    work = member.work

    def floor(images, labels):
        for x, y in zip(images, labels):
            torch.nn.functional.cross_entropy(work(x), y).backward()

    def step(images, labels):
        meta.zero_grad()
        _, _, surrogate = meta_loss(meta, member, images, labels, alpha=16.0)
        surrogate.backward()

    fn = floor if what == "floor" else step
    fn(images[:1], labels[:1])  # warm-up (allocations, caches) on one batch
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(2 if batches == 1 else 1):
        start = time.perf_counter()
        fn(images, labels)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    peak = (torch.cuda.max_memory_allocated() if dev.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"seconds": min(times), "peak_mib": peak / 2 ** 20}


def meta_step(*, batch: PositiveInt = 500, batches: tuple[PositiveInt, ...] = (1, 8),
              device: str = "cpu", channel_gates: bool = False,
              message_passing: Literal["joint", "paper"] = "joint",
              child: tuple[PositiveInt, Literal["floor", "step", "gated_step"]] | None = None) -> None:
    """Time the floor and the step at each number of batches, each in a fresh process.

    Args:
        batch: images per batch
        batches: numbers of batches B per step, e.g. [1,8]
        device: cpu, cuda, ...
        channel_gates: also time the step of a metanetwork with channel gates
        message_passing: the metanetwork's layer
        child: internal: [B,WHAT]: the child process that measures one configuration
    """
    if child:
        print(json.dumps(measure(child[0], batch, device, child[1], message_passing)))
        return
    print(f"torch {torch.__version__}, device {device}, {torch.get_num_threads()} threads, "
          f"ResNet-56 pruned 1.32x, batches of {batch}")
    ratio = None
    for b in batches:
        res = {}
        for what in ("floor", "step") + (("gated_step",) if channel_gates else ()):
            out = subprocess.run([sys.executable, __file__, "--batch", str(batch),
                                  "--device", device, "--message_passing",
                                  message_passing, "--child", f"[{b},{what}]"],
                                 check=True, capture_output=True, text=True).stdout
            res[what] = json.loads(out.strip().splitlines()[-1])
        ratio = res["step"]["seconds"] / res["floor"]["seconds"]
        print(f"B={b}: floor {res['floor']['seconds']:.2f} s, step {res['step']['seconds']:.2f} s,"
              f" step/floor {ratio:.3f}; peak memory floor {res['floor']['peak_mib']:.0f} MiB, "
              f"step {res['step']['peak_mib']:.0f} MiB", flush=True)
        if "gated_step" in res:
            gated = res["gated_step"]
            print(f"B={b}: step with channel gates {gated['seconds']:.2f} s, step/floor "
                  f"{gated['seconds'] / res['floor']['seconds']:.3f}, peak {gated['peak_mib']:.0f}"
                  " MiB", flush=True)
    print(f"ratio={ratio:.3f}")


def main(argv: list[str] | None = None) -> int:
    return cli(meta_step, argv, prog="meta_step.py", description=__doc__.splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())

"""What meta-training did to the held-out zoo members (issue 4, docs/meta_training.md).

    python benchmarks/meta_effect.py runs/demo/meta/version_0

For every checkpoint of a meta-training run (``epoch*.ckpt`` in its ``checkpoints`` folder,
oldest first; the run's ``config.yaml`` names the zoo, the member split and the images), each
meta-val member (never trained on) is decoded by the metanetwork and compared with the
original on the whole val split: cross-entropy, accuracy, the fraction of channel groups whose
normalized group norm is below 0.01 (``networks.NEAR_ZERO``) and the 10% quantile of those
norms. Writes ``meta_effect.md`` next to the checkpoints and prints it.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch
import torch.nn.functional as F

import networks
from lightning_modules import MetaPruningModule
from objective import MemberState
from pipeline.command_line import cli, summary
from pipeline.select import zoo_datamodule


@torch.no_grad()
def evaluate(member: MemberState, weights: dict, loader) -> dict:
    state = member.work.state_dict()
    member.work.load_state_dict({k: weights.get(k, v) for k, v in state.items()})
    loss = correct = count = 0
    for x, y in loader:
        out = member.work(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        count += len(y)
    norms = networks.group_norms(member.pruner)
    return {"ce": loss / count, "acc": correct / count,
            "near_zero": (norms < networks.NEAR_ZERO).float().mean().item(),
            "q10": norms.quantile(0.1).item()}


def meta_effect(run: Path) -> None:
    """Every checkpoint of one meta-training run on its meta-val members.

    Args:
        run: a meta-training log folder (with config.yaml and checkpoints/)
    """
    checkpoints = sorted((run / "checkpoints").glob("epoch*.ckpt"))
    if not checkpoints:
        sys.exit(f"no epoch*.ckpt in {run / 'checkpoints'}: pass the folder of a "
                 "meta-training run (runs/<task>/meta/version_<n>)")
    zoo = zoo_datamodule(run / "config.yaml")
    loader = torch.utils.data.DataLoader(zoo.images.val_set, batch_size=500)
    lines = [f"Meta-val members of {run} on the whole val split "
             f"({len(zoo.images.val_set)} images)", "",
             "| checkpoint | member | val CE | val acc | near-zero groups | norm q10 |",
             "|---|---|---|---|---|---|"]
    first = MetaPruningModule.restore(checkpoints[0])
    hparams = first.hparams
    members = {i: MemberState.build(zoo.members[i].network, zoo.example_input(), hparams.reg,
                                    hparams.alpha, options=first.metanetwork.graph_options)
               for i in zoo.val_ids}

    def row(name: str, i: int, weights: dict) -> None:
        r = evaluate(members[i], weights, loader)
        lines.append(f"| {name} | {i} | {r['ce']:.3f} | {100 * r['acc']:.1f}% | "
                     f"{100 * r['near_zero']:.1f}% | {r['q10']:.3f} |")
        print(lines[-1], flush=True)

    for i, member in members.items():
        row("original", i, member.graph.decode(member.data))
    for path in checkpoints:
        module = MetaPruningModule.restore(path).eval()
        for i, member in members.items():
            row(path.stem, i, member.graph.decode(module.metanetwork(member.data)))
    text = "\n".join(lines) + "\n"
    out = networks.atomic_write(run / "meta_effect.md", lambda tmp: Path(tmp).write_text(text))
    print(f"wrote {out}")


def main(argv: list[str] | None = None) -> int:
    return cli(meta_effect, argv, prog="meta_effect.py", description=summary(__doc__))


if __name__ == "__main__":
    sys.exit(main())

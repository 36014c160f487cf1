"""Does the meta-training objective, or the metanetwork, fail to sparsify? (docs/meta_training.md)

    python benchmarks/meta_probe.py --member zoo/demo/members/seed4.pt \
        --data_root ../shared/data/cifar10-jpeg --mode direct --reg 0.01 --steps 200
    python benchmarks/meta_probe.py ... --mode metanetwork --reg 0.01 --ratio 0.1 --steps 300

One zoo member, the meta-training loss of docs/method.md (cross-entropy summed over 4 batches
of 128 + the group-sparsity regularizer), AdamW lr 1e-3, cycling over 12 fixed training batches.
``direct`` optimizes the decoded weights W' themselves; ``metanetwork`` trains a 4 x 32
metanetwork on this single member (``--gated``: with channel gates, see graph/metanetwork.py;
``--lr``: its AdamW learning rate). Every 25 steps (40 for direct) it prints the train and val
cross-entropy and the normalized group norms (near-zero fraction, min, 10% quantile, median).
"""
from __future__ import annotations

import argparse
import itertools
import os
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import networks  # noqa: E402
from datamodules import ImageDataModule  # noqa: E402
from graph import Metanetwork  # noqa: E402
from objective import MemberState, meta_loss, weight_gradients  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--member", required=True, help="a zoo member file")
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--mode", choices=("direct", "metanetwork"), required=True)
    parser.add_argument("--reg", type=float, default=0.01)
    parser.add_argument("--ratio", type=float, default=0.1, help="metanetwork residual ratios")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--gated", action="store_true", help="metanetwork with channel gates")
    parser.add_argument("--lr", type=float, default=1e-3, help="metanetwork learning rate")
    args = parser.parse_args()
    torch.manual_seed(0)
    network, _ = networks.load_network(args.member)
    dm = ImageDataModule(args.data_root, dataset="cifar10", num_classes=10, subset=500, seed=0,
                         batch_size=128, num_workers=0, val_fraction=0.1)
    dm.setup("fit")
    batches = list(itertools.islice(iter(dm.train_dataloader()), 12))
    val_x, val_y = next(iter(dm.val_dataloader()))
    state = MemberState.build(network, torch.randn(1, 3, 32, 32), args.reg, 16.0)
    if args.mode == "direct":
        leaves = {k: v.detach().clone().requires_grad_() for k, v in state.work.named_parameters()}
        optimizer = torch.optim.AdamW(leaves.values(), lr=1e-3, weight_decay=0.0)
        current = lambda: {k: v.detach() for k, v in leaves.items()}  # noqa: E731
    else:
        meta = Metanetwork.for_graph(state.graph, num_layers=4, hidden=32,
                                     node_res_ratio=args.ratio, edge_res_ratio=args.ratio,
                                     channel_gates=args.gated,
                                     message_passing="joint")  # the layer of its recorded numbers
        optimizer = torch.optim.AdamW(meta.parameters(), lr=args.lr, weight_decay=5e-4)
        current = lambda: state.graph.decode(meta(state.data))  # noqa: E731
    every = 40 if args.mode == "direct" else 25
    start = time.perf_counter()
    for step in range(args.steps + 1):
        chunk = batches[4 * (step % 3): 4 * (step % 3) + 4]
        images, labels = torch.stack([b[0] for b in chunk]), torch.stack([b[1] for b in chunk])
        optimizer.zero_grad()
        if args.mode == "direct":
            ce, _, grads = weight_gradients(state.work, current(), images, labels, state.pruner, 16.0)
            for name, leaf in leaves.items():
                leaf.grad = grads[name].clone()
        else:
            ce, _, surrogate = meta_loss(meta, state, images, labels, 16.0)
            surrogate.backward()
        optimizer.step()
        if step % every == 0:
            with torch.no_grad():
                weights = current()
                for name, p in state.work.named_parameters():
                    p.copy_(weights[name])
                val_ce = F.cross_entropy(state.work(val_x), val_y).item()
                norms = networks.group_norms(state.pruner)
            print(f"step {step} train ce {ce.item() / len(images):.3f} val ce {val_ce:.3f} "
                  f"near0 {(norms < networks.NEAR_ZERO).float().mean():.3f} min {norms.min():.3f} "
                  f"q10 {norms.quantile(0.1):.3f} q50 {norms.median():.3f} "
                  f"[{time.perf_counter() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    main()

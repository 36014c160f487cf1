"""``prune.py import_paper``: turn the paper's saved metanetwork into our checkpoint.

The paper's code saves its GNN's state_dict (``nodeEnc``, ``edgeEnc``, ``convs.<l>.lin1..4``,
...; docs/graph.md). This command maps it onto our metanetwork for one architecture
(``Metanetwork.from_paper_state_dict``) and writes a meta-training checkpoint that
``prune.py run --metanetwork`` and ``prune.py select`` read like any other.
"""
from __future__ import annotations

import argparse


def add_import_paper_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``prune.py import_paper``."""
    parser.add_argument("--state_dict", required=True,
                        help="file saved by the paper's code: its metanetwork's state_dict (or a "
                             "dict holding it under 'state_dict'); loaded with weights_only=True")
    parser.add_argument("--arch", required=True,
                        help="architecture the metanetwork was trained for, e.g. resnet56_cifar, "
                             "vgg19_bn_cifar, resnet50 (networks.available())")
    parser.add_argument("--num_classes", type=int, required=True, help="e.g. 10 for CIFAR-10")
    parser.add_argument("--input_size", type=int, nargs=3, default=[3, 32, 32],
                        metavar=("C", "H", "W"), help="one input image (default 3 32 32)")
    parser.add_argument("--identity_edges", choices=("dense", "diagonal"), required=True,
                        help="the paper's identity layout: dense for the CIFAR ResNets, diagonal "
                             "for ResNet-50 (VGG has none: either)")
    parser.add_argument("--node_res_ratio", type=float, required=True,
                        help="the paper's node residual ratio (ResNet-56 0.01, ResNet-50 0.002)")
    parser.add_argument("--edge_res_ratio", type=float, required=True,
                        help="the paper's edge residual ratio (ResNet-56 0.01, VGG-19 0.05)")
    parser.add_argument("--out", required=True, help="checkpoint to write (.ckpt)")


def import_paper_command(args: argparse.Namespace) -> int:
    """``prune.py import_paper``: the paper's saved metanetwork as our checkpoint."""
    import lightning
    import torch

    import networks
    from callbacks.feedforward import MetanetworkError, network_graph
    from graph import GraphOptions, Metanetwork, PaperWeightsError
    from lightning_modules import MetaPruningModule

    source = f"paper metanetwork file {args.state_dict!r}"
    loaded = networks.safe_load(args.state_dict, "paper metanetwork file")
    state = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise MetanetworkError(f"{source} holds no state_dict of tensors; save the paper's GNN "
                               "with torch.save(model.state_dict(), path)")
    network = networks.build(args.arch, args.num_classes).eval()
    graph = network_graph(network, networks.example_input(args.input_size), f"architecture {args.arch!r}",
                          GraphOptions(args.identity_edges))
    try:
        meta = Metanetwork.from_paper_state_dict(state, graph, args.node_res_ratio,
                                                 args.edge_res_ratio)
    except PaperWeightsError as e:
        raise MetanetworkError(f"{source} does not fit {args.arch!r}: {e}") from e
    module = MetaPruningModule(
        num_layers=len(meta.layers), hidden=meta.hidden,
        node_res_ratio=args.node_res_ratio, edge_res_ratio=args.edge_res_ratio,
        zero_init_decoders=False, message_passing="paper", identity_edges=args.identity_edges,
        layout=graph.layout)
    module.gnn.load_state_dict(meta.float().state_dict())
    checkpoint = {"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams),
                  "pytorch-lightning_version": lightning.__version__}
    out = networks.atomic_write(args.out, lambda tmp: torch.save(checkpoint, tmp))
    print(f"wrote {out}: the paper's metanetwork ({len(meta.layers)} layers x "
          f"{meta.layers[0].hidden}) for {args.arch}, {args.identity_edges} identity edges")
    return 0

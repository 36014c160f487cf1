"""``prune.py import_paper``: turn the paper's saved metanetwork into our checkpoint.

The paper's code saves its GNN's state_dict (``nodeEnc``, ``edgeEnc``, ``convs.<l>.lin1..4``,
...; docs/graph.md). This command maps it onto our metanetwork for one architecture
(``Metanetwork.from_paper_state_dict``) and writes a meta-training checkpoint that
``prune.py run --metanetwork`` and ``prune.py select`` read like any other.
"""
from __future__ import annotations

from .options import ImportPaperOptions


def import_paper_command(args: ImportPaperOptions) -> int:
    """``prune.py import_paper``: the paper's saved metanetwork as our checkpoint."""
    import lightning
    import torch

    import networks
    from graph import GraphOptions, Metanetwork, MetanetworkError, PaperWeightsError, network_graph
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

"""Applying a metanetwork to a network, in plain torch: the network's graph (an unsupported
architecture named with the fix), the layout check against the metanetwork, and the
feedforward that replaces the network's weights by the metanetwork's output. The Lightning
callback (callbacks.MetanetworkFeedforward) and the commands (pipeline/) both call these."""
from __future__ import annotations

import torch
from torch import nn

import networks

from .errors import MetanetworkError, UnsupportedArchitectureError
from .metanetwork import Metanetwork
from .network_graph import GraphOptions, NetworkGraph


def network_graph(network: nn.Module, example: torch.Tensor, source: str,
                  options: GraphOptions | None = None) -> NetworkGraph:
    """The graph of ``network`` built with ``options`` (default: ``GraphOptions()``); an
    unsupported architecture raises with the fix."""
    try:
        return (options or GraphOptions()).graph(network, example)
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(
            f"{source} cannot be encoded as a graph for the metanetwork: {e}. Prune it with "
            "--method none or --method sparse (they need no graph), or use an architecture "
            "the encoder supports (docs/graph.md)") from e


def check_layout(metanetwork: Metanetwork, graph: NetworkGraph, metanetwork_source: str,
                 network_source: str) -> None:
    """Raise ``MetanetworkError`` naming both layouts and both files when they differ."""
    try:
        metanetwork.check_layout(graph)
    except ValueError as e:
        raise MetanetworkError(
            f"{metanetwork_source} was meta-trained for graph layout {metanetwork.layout}, but "
            f"{network_source} has graph layout {graph.layout}. Use a metanetwork meta-trained "
            "on a zoo of this architecture (configs/<task>/meta.yaml), or a network of the "
            "architecture the metanetwork was trained for") from e


@torch.no_grad()
def feedforward(metanetwork: Metanetwork, network: nn.Module, example: torch.Tensor,
                metanetwork_source: str = "metanetwork", network_source: str = "network") -> None:
    """Replace ``network``'s weights in place by the metanetwork's output for them."""
    with networks.evaluating(network):
        device = next(network.parameters()).device
        graph = network_graph(network, example.to(device), network_source,
                              metanetwork.graph_options)
        check_layout(metanetwork, graph, metanetwork_source, network_source)
        weights = graph.decode(metanetwork.to(device).eval()(graph.encode(network)))
        # decode returns every floating tensor; integer buffers (num_batches_tracked) stay.
        state = network.state_dict()
        state.update({k: v.detach().to(state[k].dtype) for k, v in weights.items()})
        network.load_state_dict(state)

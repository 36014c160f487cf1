"""Reading encoded graphs in tests: edges with their features, relabelled."""
from __future__ import annotations

import torch
from torch_geometric.data import Data

from graph import edge_attr_key


def edges(data: Data, sigma: torch.Tensor | None = None) -> dict:
    """Per edge type: edge (src, dst), relabelled by ``sigma`` if given -> its features."""
    out = {}
    for area in data.graph.edge_types:
        src, dst = data.edge_index[:, data.edge_type == area]
        if sigma is not None:
            src, dst = sigma[src], sigma[dst]
        for s, d, f in zip(src.tolist(), dst.tolist(), data[edge_attr_key(area)]):
            out[area, s, d] = f
    return out

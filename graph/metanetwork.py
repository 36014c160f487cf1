"""The GNN metanetwork: reads a network graph, writes one of the same layout (DESIGN section 5).

Message passing is equivariant to permutations of hidden channels because every operation is
per node, per edge, or a symmetric aggregation over a node's edges. Each layer runs over both
edge directions with tied weights; reverse-direction edge features are multiplied by a fixed
sign vector so the two directions stay distinguishable. The output is the input plus a small
multiple of the decoded update, so an untrained metanetwork is close to the identity. Optional
channel gates (not in the reference) also scale whole channels; see ``Metanetwork._gates``.
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Data
from torch_geometric.utils import scatter

from .network_graph import NetworkGraph, edge_attr_key, running_stat_columns


def _mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim_in, elementwise_affine=False),
                         nn.Linear(dim_in, hidden), nn.SiLU(), nn.Linear(hidden, dim_out))


class MessagePassingLayer(nn.Module):
    """One pre-LayerNorm residual layer updating node and edge states.

    Edge states live in dense blocks ``[groups, out, in, hidden]`` (one per weight tensor, see
    ``graph.network_graph.EdgeBlock``), so messages are broadcast products and their
    aggregation is a dense reduction over the block's ``in`` (forward direction) or ``out``
    (reverse direction) axis, followed by a small scatter over nodes. This computes exactly the
    per-edge message passing of DESIGN section 5 without gathering node states per edge.
    The receiver's factor phi1(h_receiver) is applied after aggregation: it is common to all of
    a node's messages (max and min swap where it is negative).
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.phi_msg = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU())   # phi1 | phi2
        self.phi_edge = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU())  # phi3 | phi4
        self.aggregate = nn.Linear(4 * hidden, hidden)
        sign = torch.ones(hidden)
        sign[hidden // 2:] = -1.0
        self.register_buffer("sign", sign, persistent=False)

    def forward(self, h: torch.Tensor, edges: list[torch.Tensor], index: list[tuple],
                degree: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n, hid = h.shape[0], self.hidden
        a, b = self.phi_msg(F.layer_norm(h, (hid,))).split(hid, dim=1)
        receivers, sums, squares, maxima, minima = [], [], [], [], []
        for (src, dst), e in zip(index, edges):
            # forward direction: edge (i -> o) delivers phi2(h_i) * e to o; reduce over i
            p = b[src].unsqueeze(1) * e
            # reverse direction: delivers phi2(h_o) * sign * e to i; reduce over o
            q = (b[dst] * self.sign).unsqueeze(2) * e
            for t, dim, recv in ((p, 2, dst), (q, 1, src)):
                lo, hi = torch.aminmax(t, dim=dim)
                receivers.append(recv.reshape(-1))
                sums.append(t.sum(dim).reshape(-1, hid))
                squares.append((t * t).sum(dim).reshape(-1, hid))
                maxima.append(hi.reshape(-1, hid))
                minima.append(lo.reshape(-1, hid))
        recv = torch.cat(receivers)
        total = scatter(torch.cat(sums), recv, 0, n, reduce="sum")
        square = scatter(torch.cat(squares), recv, 0, n, reduce="sum")
        hi = scatter(torch.cat(maxima), recv, 0, n, reduce="max")
        lo = scatter(torch.cat(minima), recv, 0, n, reduce="min")
        mean = a * total / degree
        std = (a * a * square / degree - mean * mean).clamp_min(0.0).add(1e-6).sqrt()
        positive = a >= 0
        agg = torch.cat([mean, std, torch.where(positive, a * hi, a * lo),
                         torch.where(positive, a * lo, a * hi)], dim=1)
        h = h + self.aggregate(agg)
        c, d = self.phi_edge(F.layer_norm(h, (hid,))).split(hid, dim=1)
        edges = [e * (1.0 + c[src].unsqueeze(1) * d[dst].unsqueeze(2))
                 for (src, dst), e in zip(index, edges)]
        return h, edges


class Metanetwork(nn.Module):
    """GNN mapping a network graph to a modified network graph of the same layout."""

    def __init__(self, node_dim: int, edge_types: Sequence[int], num_layers: int = 8,
                 hidden: int = 64, node_res_ratio: float = 0.01, edge_res_ratio: float = 0.01,
                 frozen_node_columns: Sequence[int] = (), layout: dict | None = None,
                 zero_init_decoders: bool = True, channel_gates: bool = False,
                 gate_floor: float = 0.5, ungated_node_columns: Sequence[int] = ()) -> None:
        super().__init__()
        self.edge_types = tuple(int(a) for a in edge_types)
        self.node_res_ratio, self.edge_res_ratio = node_res_ratio, edge_res_ratio
        self.layout = layout or {"node_dim": node_dim, "edge_types": list(self.edge_types)}
        self.node_encoder = nn.Linear(node_dim, hidden)
        self.edge_encoders = nn.ModuleDict({str(a): nn.Linear(a, hidden) for a in self.edge_types})
        self.layers = nn.ModuleList(MessagePassingLayer(hidden) for _ in range(num_layers))
        self.node_decoder = _mlp(hidden, hidden, node_dim)
        self.edge_decoders = nn.ModuleDict({str(a): _mlp(hidden, hidden, a)
                                            for a in self.edge_types})
        if zero_init_decoders:
            # An untrained metanetwork is then exactly the identity, and the residual ratio
            # only sets how fast the output may move (see docs/meta_training.md).
            for decoder in [self.node_decoder, *self.edge_decoders.values()]:
                nn.init.zeros_(decoder[-1].weight)
                nn.init.zeros_(decoder[-1].bias)
        # Columns the metanetwork must not change (BN running statistics by default).
        mask = torch.ones(node_dim)
        mask[list(frozen_node_columns)] = 0.0
        self.register_buffer("node_update_mask", mask, persistent=False)
        self.gate_decoder, self.gate_floor = None, gate_floor
        if channel_gates:
            # One scale per channel (``_gates``, docs/decisions.md), exactly 1 at the start
            # whatever the other decoders' initialization. No output bias: a gate depends on
            # g minus the largest g of its layer, so a bias would cancel.
            self.gate_decoder = nn.Sequential(nn.Linear(hidden + 1, hidden), nn.SiLU(),
                                              nn.Linear(hidden, 1, bias=False))
            nn.init.zeros_(self.gate_decoder[-1].weight)
            gated = torch.ones(node_dim)
            gated[list(ungated_node_columns)] = 0.0
            self.register_buffer("gated_node_columns", gated, persistent=False)

    @classmethod
    def for_graph(cls, graph: NetworkGraph, num_layers: int = 8, hidden: int = 64,
                  node_res_ratio: float = 0.01, edge_res_ratio: float = 0.01,
                  update_running_stats: bool = False, zero_init_decoders: bool = True,
                  channel_gates: bool = False, gate_floor: float = 0.5) -> "Metanetwork":
        """A metanetwork sized for ``graph``'s layout."""
        return cls.for_layout(graph.layout, num_layers, hidden, node_res_ratio, edge_res_ratio,
                              update_running_stats, zero_init_decoders, channel_gates,
                              gate_floor)

    @classmethod
    def for_layout(cls, layout: dict, num_layers: int = 8, hidden: int = 64,
                   node_res_ratio: float = 0.01, edge_res_ratio: float = 0.01,
                   update_running_stats: bool = False, zero_init_decoders: bool = True,
                   channel_gates: bool = False, gate_floor: float = 0.5) -> "Metanetwork":
        """A metanetwork for a ``NetworkGraph.layout`` (as stored in checkpoints)."""
        running_stats = running_stat_columns(layout["bn_slots"])
        frozen = () if update_running_stats else running_stats
        return cls(layout["node_dim"], layout["edge_types"], num_layers, hidden, node_res_ratio,
                   edge_res_ratio, frozen, layout, zero_init_decoders, channel_gates,
                   gate_floor, ungated_node_columns=running_stats)

    def check_layout(self, graph: NetworkGraph) -> None:
        """Raise if ``graph`` has a different layout than the one this metanetwork reads."""
        mine = {k: self.layout.get(k) for k in graph.layout}
        if mine != graph.layout:
            raise ValueError(f"metanetwork layout {self.layout} does not match the network's graph "
                             f"layout {graph.layout}; use a metanetwork trained on this "
                             "architecture family")

    def forward(self, data: Data) -> Data:
        """Modified graph(s): a ``Data`` from ``NetworkGraph.encode`` or a ``Batch`` of them."""
        graphs = data.graph if isinstance(data.graph, list) else [data.graph]
        node_offsets = data.ptr[:-1].tolist() if hasattr(data, "ptr") and data.ptr is not None \
            else [0]
        h = self.node_encoder(data.x)
        # Each area's rows are the blocks of that area, graph after graph, in block order.
        # One split per area (not a slice per block: a slice's backward would allocate a
        # zero gradient of the whole area block for every block).
        chunks, raw_chunks = {}, {}
        for a in self.edge_types:
            rows = [b.rows for graph in graphs for b in graph.blocks if b.area == a]
            encoded = self.edge_encoders[str(a)](data[edge_attr_key(a)])
            chunks[a] = iter(encoded.split(rows))
            raw_chunks[a] = iter(data[edge_attr_key(a)].split(rows))
        index, edges, blocks, raw = [], [], [], []
        for graph, node_offset in zip(graphs, node_offsets):
            for block, (src, dst) in zip(graph.blocks, graph.block_index(data.x.device)):
                edges.append(next(chunks[block.area]).view(*block.shape, -1))
                raw.append(next(raw_chunks[block.area]).view(*block.shape, -1))
                index.append((src + node_offset, dst + node_offset))
                blocks.append(block)
        degree = self._degree(index, data.x.shape[0], h)
        for layer in self.layers:
            h, edges = layer(h, edges, index, degree)
        out = copy.copy(data)  # keeps a Batch's slicing information for to_data_list()
        out.x = data.x + self.node_res_ratio * self.node_decoder(h) * self.node_update_mask
        gates = None if self.gate_decoder is None else self._gates(h, blocks, index, raw)
        if gates is not None:
            keep = 1.0 - self.gated_node_columns
            out.x = out.x * (gates.unsqueeze(1) * self.gated_node_columns + keep)
        for a in self.edge_types:
            key = edge_attr_key(a)
            mine = [i for i, b in enumerate(blocks) if b.area == a]
            e = torch.cat([edges[i].reshape(-1, edges[i].shape[-1]) for i in mine])
            out[key] = data[key] + self.edge_res_ratio * self.edge_decoders[str(a)](e)
            if gates is not None:
                out[key] = out[key] * torch.cat([self._edge_gates(gates, blocks[i], *index[i])
                                                 for i in mine]).unsqueeze(1)
        return out

    def _gates(self, h: torch.Tensor, blocks: list, index: list[tuple],
               raw: list[torch.Tensor]) -> torch.Tensor:
        """Per-channel scales: t_c = 1 + g_c - max g over c's layer, set to exactly 0 below
        ``gate_floor``; 1 at the start.

        An additive update can only zero a channel by predicting minus each of its weights;
        one scale per channel, applied to the channel's BN/bias parameters and to every weight
        into and out of it, zeroes the whole channel group with a single output. The scales
        are relative to the layer's most open channel, so a layer cannot be shrunk as a whole:
        that shared direction is where the regularizer's pull on a shared metanetwork goes
        first, and in eval-mode BatchNorm it breaks the network instead of sparsifying it.
        The floor turns "shrunk" into "closed": the L2-type regularizer's pull fades as a
        scale nears 0, so scales settled around 0.4 without ever reaching it
        (docs/meta_training.md). Gradients pass the floor straight through, so a closed
        channel that the cross-entropy needs can reopen.

        Besides the node state, the gate decoder reads the norm of each channel's weights
        (into and out of it) relative to the largest in its layer, close to what the pruning
        criterion ranks by; from the message-passing state alone the gates generalized poorly
        to held-out networks."""
        n = h.shape[0]
        layer = self._layer_of_node(blocks, index, n, h.device)
        num_layers = int(layer.max()) + 1
        squares = h.new_zeros(n)
        for block, (src, dst), w in zip(blocks, index, raw):
            if block.key is not None:  # weights into and out of the channel, as in its group
                w2 = w.pow(2)
                squares = squares.index_add(0, dst.reshape(-1), w2.sum((2, 3)).reshape(-1))
                squares = squares.index_add(0, src.reshape(-1), w2.sum((1, 3)).reshape(-1))
        norm = squares.sqrt()
        largest = scatter(norm, layer, 0, num_layers, reduce="max")[layer]
        relative = torch.where(largest > 0, norm / largest.clamp_min(1e-30), 1.0)
        g = self.gate_decoder(torch.cat([F.layer_norm(h, h.shape[1:]),
                                         relative.unsqueeze(1)], 1)).squeeze(1)
        top = scatter(g, layer, 0, num_layers, reduce="max")
        t = 1.0 + g - top[layer]
        closed = torch.where(t < self.gate_floor, 0.0, t)
        return t + (closed - t).detach()

    @staticmethod
    def _layer_of_node(blocks: list, index: list[tuple], num_nodes: int,
                       device: torch.device) -> torch.Tensor:
        """Layer id of every node: the (last) weight tensor writing it; nodes no weight writes
        (network inputs, sums of older tensors) are layers of their own."""
        layer = torch.arange(num_nodes, device=device) + len(blocks)
        for i, (block, (_, dst)) in enumerate(zip(blocks, index)):
            if block.key is not None:
                layer[dst.reshape(-1)] = i
        return layer

    @staticmethod
    def _edge_gates(gates: torch.Tensor, block, src: torch.Tensor,
                    dst: torch.Tensor) -> torch.Tensor:
        """Scale of every edge of ``block``: gate(input channel) * gate(output channel).
        Residual identities are constant structure and stay unscaled."""
        if block.key is None:
            return gates.new_ones(block.rows)
        return (gates[dst].unsqueeze(2) * gates[src].unsqueeze(1)).reshape(-1)

    @staticmethod
    def _degree(index: list[tuple], num_nodes: int, like: torch.Tensor) -> torch.Tensor:
        """Number of edges at each node, both directions together (for mean and std)."""
        recv, counts = [], []
        for src, dst in index:
            recv += [dst.reshape(-1), src.reshape(-1)]
            counts += [like.new_full((dst.numel(),), float(src.shape[1])),
                       like.new_full((src.numel(),), float(dst.shape[1]))]
        degree = scatter(torch.cat(counts), torch.cat(recv), 0, num_nodes, reduce="sum")
        return degree.clamp_min(1.0).unsqueeze(1)

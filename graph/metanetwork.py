"""The GNN metanetwork: reads a network graph, writes one of the same layout (docs/method.md).

Message passing is equivariant to permutations of hidden channels because every operation is
per node, per edge, or a symmetric aggregation over a node's edges. Each layer runs over both
edge directions with tied weights; one direction's edge features are multiplied by a fixed
sign vector so the two directions stay distinguishable. ``message_passing="paper"`` is the
paper's layer exactly (``PaperLayer``); ``"joint"`` is our earlier variant (``JointLayer``).
The output is the input plus a small multiple of the decoded update, so an untrained
metanetwork is close to the identity. Optional channel gates (not in the paper) also scale
whole channels; see ``Metanetwork._gates``. ``graph.paper_weights`` imports the paper's own
metanetwork weights.
"""
from __future__ import annotations

import copy
from typing import Sequence, cast

import torch
import torch.nn.functional as F
from torch import nn
from torch_geometric.data import Data
from torch_geometric.utils import scatter

from .block_statistics import BlockMoments, PaperBlock, Statistics, receiver_scaled
from .network_graph import GraphOptions, NetworkGraph, edge_attr_key
from .node_slots import NodeColumns, canonical_layout


def _mlp(dim_in: int, hidden: int, dim_out: int) -> nn.Sequential:
    return nn.Sequential(nn.LayerNorm(dim_in, elementwise_affine=False),
                         nn.Linear(dim_in, hidden), nn.SiLU(), nn.Linear(hidden, dim_out))


class BlockIndex:
    """Node ids ``(src, dst)`` of every edge block (``src`` [groups, in], ``dst`` [groups,
    out]), and a gather of node rows for all blocks in one indexing operation: one gather per
    layer instead of one per block keeps the backward to a single scatter into node rows."""

    def __init__(self, index: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.index = index
        ids = [t for pair in index for t in pair]
        self._flat = torch.cat([t.reshape(-1) for t in ids])
        self._sizes = [t.numel() for t in ids]

    def gather(self, rows: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per block, ``(rows[src], rows[dst])`` shaped [groups, in, D] and [groups, out, D]."""
        parts = iter(rows[self._flat].split(self._sizes))
        return [(next(parts).view(*src.shape, -1), next(parts).view(*dst.shape, -1))
                for src, dst in self.index]


class MessagePassingLayer(nn.Module):
    """One pre-LayerNorm residual layer updating node and edge states (docs/method.md).

    Edge states live in dense blocks ``[groups, out, in, hidden]`` (one per weight tensor, see
    ``graph.network_graph.EdgeBlock``), so messages are broadcast products and their
    aggregation is a dense reduction over the block's ``out`` axis (messages to input channels)
    or ``in`` axis (messages to output channels), followed by one scatter over nodes; no node
    state is gathered per edge. ``forward`` takes ``degree`` [2N, 1]: how many messages each
    node receives from output channels (first N rows) and from input channels (last N).

    Parameters: ``phi_msg`` = [phi1 | phi2] (sender | receiver factor), ``phi_edge`` =
    [phi3 | phi4], ``aggregate`` = A, ``sign`` = sigma.
    """

    sign: torch.Tensor
    hidden: int

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.hidden = hidden
        self.phi_msg = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU())   # phi1 | phi2
        self.phi_edge = nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU())  # phi3 | phi4
        self.aggregate = nn.Linear(4 * hidden, hidden)
        sign = torch.ones(hidden)
        sign[hidden // 2:] = -1.0
        self.register_buffer("sign", sign, persistent=False)


class PaperLayer(MessagePassingLayer):
    """The paper's layer: one convolution per direction with the same weights.

    With x = LayerNorm(h): pass 1 sends phi1(x)[out] * e from each edge's output channel to
    its input channel, pass 2 sends phi1(x)[in] * sigma * e from the input to the output
    channel; the receiver t multiplies by phi2(x)[t] and aggregates [mean, std, max, min] over
    that pass's messages only, and h <- h + A(agg1) + A(agg2) (A's bias counts twice, also for
    a node that receives nothing in a pass). The edge update reads x, before the node update:
    e <- e + (phi3(x)[out] * phi4(x)[in] + phi3(x)[in] * phi4(x)[out]) * e."""

    def forward(self, h: torch.Tensor, edges: list[torch.Tensor], blocks: BlockIndex,
                degree: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n, hid = h.shape[0], self.hidden
        x = F.layer_norm(h, (hid,))
        sender, receiver = self.phi_msg(x).split(hid, dim=1)
        stats, updated = Statistics(), []
        # [c | d] = phi_edge(x), gathered once for all blocks
        for (s_in, s_out), (cd_in, cd_out), (src, dst), e in zip(
                blocks.gather(sender), blocks.gather(self.phi_edge(x)), blocks.index, edges):
            *moments, e = PaperBlock.apply(e, s_out, s_in * self.sign, cd_out, cd_in,
                                            torch.is_grad_enabled())
            stats.add(moments[:4], src)        # pass 1
            stats.add(moments[4:], dst + n)    # pass 2
            updated.append(e)
        agg = receiver_scaled(receiver.repeat(2, 1), *stats.scatter(2 * n),
                               degree.clamp_min(1.0), "paper")
        both = agg[:n] + agg[n:]  # A(agg1) + A(agg2), with one matrix product
        h = h + F.linear(both, self.aggregate.weight) + 2.0 * self.aggregate.bias
        return h, updated


class JointLayer(MessagePassingLayer):
    """Ours (before the paper's layer was reproduced): one aggregation over both directions'
    messages, the sign on the messages to input channels, std with a 1e-6 floor, and one
    edge term phi3(x')[in] * phi4(x')[out] from the node states x' after the update."""

    def forward(self, h: torch.Tensor, edges: list[torch.Tensor], blocks: BlockIndex,
                degree: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        n, hid = h.shape[0], self.hidden
        receiver, sender = self.phi_msg(F.layer_norm(h, (hid,))).split(hid, dim=1)
        stats = Statistics()
        for ((s_in, s_out), (src, dst)), e in zip(zip(blocks.gather(sender), blocks.index), edges):
            moments = BlockMoments.apply(e, s_out * self.sign, s_in, torch.is_grad_enabled())
            stats.add(moments[:4], src)
            stats.add(moments[4:], dst)
        h = h + self.aggregate(receiver_scaled(receiver, *stats.scatter(n),
                                                (degree[:n] + degree[n:]).clamp_min(1.0),
                                                "eps"))
        cd = blocks.gather(self.phi_edge(F.layer_norm(h, (hid,))))  # [c | d] per block
        edges = [torch.addcmul(e, e, c_in[..., :hid].unsqueeze(1) * d_out[..., hid:].unsqueeze(2))
                 for (c_in, d_out), e in zip(cd, edges)]
        return h, edges


# ``message_passing`` option -> layer class
LAYERS = {"paper": PaperLayer, "joint": JointLayer}


def _stacks(blocks: list) -> list[list[int]]:
    """Runs of consecutive blocks of one area with the same [out, in] shape (positions in
    ``blocks``), each stacked by the layers into one block along the group axis.

    The layers run a fixed number of tensor operations per block, whose overhead rivals the
    arithmetic on small blocks (ResNet-56: 83 blocks per graph, 27 of them 16 x 16, in 41
    stacks); stacked, each edge gets the same arithmetic. A run stops before it holds more
    edges than the graph's largest block: no tensor grows beyond what that block needs (one
    stack of all 25 64 x 64 blocks of ResNet-56 ran several times slower per edge on CPU)."""
    limit = max(b.rows for b in blocks)
    stacks: list[list[int]] = []
    last: dict[int, list[int]] = {}  # area -> its current run
    for i, b in enumerate(blocks):
        run = last.get(b.area)
        if run and blocks[run[0]].shape[1:] == b.shape[1:] \
                and sum(blocks[j].rows for j in run) + b.rows <= limit:
            run.append(i)
        else:
            last[b.area] = [i]
            stacks.append(last[b.area])
    return stacks


class Metanetwork(nn.Module):
    """GNN mapping a network graph to a modified network graph of the same layout."""

    layers: nn.ModuleList
    hidden: int
    node_update_mask: torch.Tensor
    gated_node_columns: torch.Tensor
    gate_decoder: nn.Sequential | None
    node_decoder: nn.Sequential

    def __init__(self, node_dim: int, edge_types: Sequence[int], num_layers: int = 8,
                 hidden: int = 64, node_res_ratio: float = 0.01, edge_res_ratio: float = 0.01,
                 frozen_node_columns: Sequence[int] = (), layout: dict | None = None,
                 zero_init_decoders: bool = True, channel_gates: bool = False,
                 gate_floor: float = 0.5, ungated_node_columns: Sequence[int] = (),
                 message_passing: str = "paper") -> None:
        super().__init__()
        if message_passing not in LAYERS:
            raise ValueError(f"message_passing={message_passing!r}: expected one of "
                             f"{sorted(LAYERS)}")
        self.edge_types = tuple(int(a) for a in edge_types)
        self.node_res_ratio, self.edge_res_ratio = node_res_ratio, edge_res_ratio
        self.hidden = hidden
        self.message_passing = message_passing
        # canonical: layouts stored before the identity_edges option existed were all diagonal
        self.layout = canonical_layout(layout or {"node_dim": node_dim,
                                                  "edge_types": list(self.edge_types)})
        self.node_encoder = nn.Linear(node_dim, hidden)
        self.edge_encoders = nn.ModuleDict({str(a): nn.Linear(a, hidden) for a in self.edge_types})
        self.layers = nn.ModuleList(LAYERS[message_passing](hidden) for _ in range(num_layers))
        self.node_decoder = _mlp(hidden, hidden, node_dim)
        self.edge_decoders = nn.ModuleDict({str(a): _mlp(hidden, hidden, a)
                                            for a in self.edge_types})
        if zero_init_decoders:
            # An untrained metanetwork is then exactly the identity, and the residual ratio
            # only sets how fast the output may move (see docs/meta_training.md).
            for decoder in [self.node_decoder, *self.edge_decoders.values()]:
                last = cast(nn.Linear, cast(nn.Sequential, decoder)[-1])
                nn.init.zeros_(last.weight)
                nn.init.zeros_(last.bias)
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
            nn.init.zeros_(cast(nn.Linear, self.gate_decoder[-1]).weight)
            gated = torch.ones(node_dim)
            gated[list(ungated_node_columns)] = 0.0
            self.register_buffer("gated_node_columns", gated, persistent=False)

    @classmethod
    def for_graph(cls, graph: NetworkGraph, num_layers: int = 8, hidden: int = 64,
                  node_res_ratio: float = 0.01, edge_res_ratio: float = 0.01,
                  update_running_stats: bool = False, zero_init_decoders: bool = True,
                  channel_gates: bool = False, gate_floor: float = 0.5,
                  message_passing: str = "paper") -> "Metanetwork":
        """A metanetwork sized for ``graph``'s layout."""
        return cls.for_layout(graph.layout, num_layers, hidden, node_res_ratio, edge_res_ratio,
                              update_running_stats, zero_init_decoders, channel_gates,
                              gate_floor, message_passing)

    @classmethod
    def for_layout(cls, layout: dict, num_layers: int = 8, hidden: int = 64,
                   node_res_ratio: float = 0.01, edge_res_ratio: float = 0.01,
                   update_running_stats: bool = False, zero_init_decoders: bool = True,
                   channel_gates: bool = False, gate_floor: float = 0.5,
                   message_passing: str = "paper") -> "Metanetwork":
        """A metanetwork for a ``NetworkGraph.layout`` (as stored in checkpoints)."""
        running_stats = NodeColumns.from_layout(layout).statistics()
        frozen = () if update_running_stats else running_stats
        return cls(layout["node_dim"], layout["edge_types"], num_layers, hidden, node_res_ratio,
                   edge_res_ratio, frozen, layout, zero_init_decoders, channel_gates,
                   gate_floor, ungated_node_columns=running_stats,
                   message_passing=message_passing)

    @classmethod
    def from_paper_state_dict(cls, state_dict, graph: NetworkGraph, node_res_ratio: float,
                              edge_res_ratio: float) -> "Metanetwork":
        """The paper's trained metanetwork (its code's state_dict) on our encoding of ``graph``;
        see ``graph.paper_weights``."""
        from .paper_weights import from_paper_state_dict  # that module builds on this one

        return from_paper_state_dict(state_dict, graph, node_res_ratio, edge_res_ratio)

    @property
    def graph_options(self) -> GraphOptions:
        """How the graphs this metanetwork reads are built (identity edges, attention layout):
        ``metanetwork.graph_options.graph(network, example)``."""
        return GraphOptions.of_layout(self.layout)

    def check_layout(self, graph: NetworkGraph) -> None:
        """Raise if ``graph`` has a different layout than the one this metanetwork reads."""
        if canonical_layout(self.layout) != canonical_layout(graph.layout):
            raise ValueError(f"metanetwork layout {self.layout} does not match the network's graph "
                             f"layout {graph.layout}; use a metanetwork trained on this "
                             "architecture family")

    def forward(self, data: Data) -> Data:
        """Modified graph(s): a ``Data`` from ``NetworkGraph.encode`` or a ``Batch`` of them."""
        graphs = data.graph if isinstance(data.graph, list) else [data.graph]
        node_offsets = data.ptr[:-1].tolist() if hasattr(data, "ptr") and data.ptr is not None \
            else [0]
        h = self.node_encoder(data.x)
        blocks = [b for graph in graphs for b in graph.blocks]
        index = [(src + node_offset, dst + node_offset)
                 for graph, node_offset in zip(graphs, node_offsets)
                 for src, dst in graph.block_index(data.x.device)]
        stacks = _stacks(blocks)
        # Each area's rows are the blocks of that area, graph after graph, in block order, so a
        # stack is a view of the encoder's output. One split per area (not a slice per block:
        # a slice's backward would allocate a zero gradient of the whole area block for every
        # block).
        chunks, raw_chunks = {}, {}
        for a in self.edge_types:
            key = edge_attr_key(a)
            rows = [sum(blocks[i].rows for i in m) for m in stacks if blocks[m[0]].area == a]
            chunks[a] = iter(self.edge_encoders[str(a)](data[key]).split(rows))
            raw_chunks[a] = iter(data[key].split([b.rows for b in blocks if b.area == a]))
        edges = [next(chunks[blocks[m[0]].area]).view(-1, *blocks[m[0]].shape[1:], self.hidden)
                 for m in stacks]
        raw = [next(raw_chunks[b.area]).view(*b.shape, -1) for b in blocks]
        stacked = [(torch.cat([index[i][0] for i in m]), torch.cat([index[i][1] for i in m]))
                   for m in stacks]
        degree = self._degree(stacked, data.x.shape[0], h)
        block_index = BlockIndex(stacked)
        for layer in self.layers:
            h, edges = layer(h, edges, block_index, degree)
        out = copy.copy(data)  # keeps a Batch's slicing information for to_data_list()
        out.x = data.x + self.node_res_ratio * self.node_decoder(h) * self.node_update_mask
        gates = None if self.gate_decoder is None else self._gates(h, blocks, index, raw)
        if gates is not None:
            keep = 1.0 - self.gated_node_columns
            out.x = out.x * (gates.unsqueeze(1) * self.gated_node_columns + keep)
        for a in self.edge_types:
            key = edge_attr_key(a)
            e = torch.cat([e.reshape(-1, self.hidden) for m, e in zip(stacks, edges)
                           if blocks[m[0]].area == a])
            out[key] = data[key] + self.edge_res_ratio * self.edge_decoders[str(a)](e)
            if gates is not None:
                out[key] = out[key] * torch.cat([self._edge_gates(gates, b, *ix)
                                                 for b, ix in zip(blocks, index)
                                                 if b.area == a]).unsqueeze(1)
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
        assert self.gate_decoder is not None  # forward calls this only with channel gates
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
        """[2N, 1]: messages each node receives from output channels (an edge's input channel
        receives one per edge), then from input channels."""
        recv, counts = [], []
        for src, dst in index:
            recv += [src.reshape(-1), dst.reshape(-1) + num_nodes]
            counts += [like.new_full((src.numel(),), float(dst.shape[1])),
                       like.new_full((dst.numel(),), float(src.shape[1]))]
        return scatter(torch.cat(counts), torch.cat(recv), 0, 2 * num_nodes).unsqueeze(1)

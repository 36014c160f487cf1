"""Exact, differentiable network <-> graph encoding (docs/graph.md, "Encoding").

``NetworkGraph.from_module`` traces a network once and precomputes index maps; ``encode`` is then
a handful of reshapes and one scatter, ``decode`` a handful of views and one gather, so both are
cheap, vectorized and differentiable, and ``decode(encode(sd))`` returns ``sd`` bit for bit.

Edge features are stored per kernel area (one block ``edge_attr_<area>`` per area present, never
padded to the largest kernel). Within one graph, ``edge_index`` lists the edges block by block
in ascending area, and row ``r`` of block ``a`` is the ``r``-th edge with ``edge_type == a``; the
same holds in a torch_geometric ``Batch`` of graphs, which is how the metanetwork maps blocks to
edges.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn
from torch_geometric.data import Data

from .aten_walk import trace_aten
from .errors import UnsupportedArchitectureError
from .node_slots import NODE_SLOTS, NodeColumns, canonical_layout
from .tracing import trace
from .walker_core import ATTENTION_LAYOUTS, Rows, TraceRecords

_CACHE_SIZE = 64
# How a residual identity from C channels into C channels becomes edges: "diagonal" is one
# Dirac edge per channel (i -> i); "dense" is the paper's CIFAR-ResNet encoding, all C x C
# pairs with zero features except the Dirac centre tap of the i -> i edges (docs/method.md).
IDENTITY_EDGES = ("diagonal", "dense")


def trace_auto(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], attention: str = "heads"
               ) -> tuple[TraceRecords, set[str]]:
    """The fx walk, or where it refuses ``module`` the ATen walk: every graph fx builds stays
    as it is (the reference), and what only the ATen walk models is encoded too."""
    try:
        return trace(module, example_inputs, attention)
    except UnsupportedArchitectureError as fx_refusal:
        try:
            return trace_aten(module, example_inputs, attention)
        except UnsupportedArchitectureError as aten_refusal:
            raise UnsupportedArchitectureError(
                f"both walkers refuse {type(module).__name__}; torch.fx: {fx_refusal}; "
                f"torch.export: {aten_refusal}") from aten_refusal


# How a network is walked: "fx" (torch.fx: modules and Python functions), "aten" (a
# torch.export program: ATen operations, so F.batch_norm and a BatchNorm2d are one operation)
# or "auto" (fx, else aten; the default). Both give the same graph where both can walk a
# network; the layout does not record which.
TRACERS = {"fx": trace, "aten": trace_aten, "auto": trace_auto}


@dataclass(frozen=True)
class EdgeBlock:
    """Edges of one weight tensor (or one residual identity) as a dense [groups, out, in] block.

    Its rows are ``rows`` consecutive rows of the ``area`` feature block starting at ``start``,
    in (group, out, in) order: exactly the weight's memory order, so a reshape maps one onto the
    other. ``src[g]`` are the input nodes of group ``g``, ``dst[g]`` its output nodes.
    """

    area: int
    start: int
    src: torch.Tensor           # [groups, in per group] node ids
    dst: torch.Tensor           # [groups, out per group] node ids
    # state_dict key; None for an identity residual; several keys whose same rows are zipped
    # into one feature (an attention's queries and keys made by two Linears, ``_take_zipped``)
    key: str | tuple[str, ...] | None = None
    sign: float = 1.0           # an identity's: -1 for the channels a difference subtracts

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.src.shape[0], self.dst.shape[1], self.src.shape[1]

    @property
    def rows(self) -> int:
        g, o, i = self.shape
        return g * o * i

    def edge_index(self, out: torch.Tensor | None = None) -> torch.Tensor:
        """[2, rows]: (source, target) node of every edge, written into ``out`` when given
        (a graph's edge_index is filled in place, block by block: at 600M edges a
        concatenation would need twice its memory)."""
        g, o, i = self.shape
        out = torch.empty(2, self.rows, dtype=torch.long) if out is None else out
        out[0].view(g, o, i).copy_(self.src[:, None, :].expand(g, o, i))
        out[1].view(g, o, i).copy_(self.dst[:, :, None].expand(g, o, i))
        return out


@dataclass(frozen=True)
class GraphOptions:
    """The encoder's choices where a network has more than one faithful graph: residual
    identities (``IDENTITY_EDGES``) and self-attention (``ATTENTION_LAYOUTS``: "heads", ours,
    or "paper"). A graph's layout records them, so a metanetwork rebuilds the graphs it was
    trained on (``Metanetwork.graph_options``). ``tracer`` (``TRACERS``) chooses how the
    network is walked; it changes which networks can be encoded, not their graphs
    (docs/decisions.md, "Tracer")."""

    identity_edges: str = "diagonal"
    attention: str = "heads"
    tracer: str = "auto"

    def __post_init__(self) -> None:
        if self.tracer not in TRACERS:
            raise ValueError(f"tracer={self.tracer!r}: expected one of {tuple(TRACERS)}")
        if self.identity_edges not in IDENTITY_EDGES:
            raise ValueError(f"identity_edges={self.identity_edges!r}: expected one of {IDENTITY_EDGES}")
        if self.attention not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention={self.attention!r}: expected one of {ATTENTION_LAYOUTS}")

    @classmethod
    def of_layout(cls, layout: Mapping) -> "GraphOptions":
        """The options a ``NetworkGraph.layout`` (as stored in checkpoints) was built with."""
        canonical = canonical_layout(layout)
        return cls(canonical["identity_edges"], canonical["attention"])

    def graph(self, module: nn.Module, example_inputs) -> "NetworkGraph":
        """``module``'s graph built with these options (``NetworkGraph.from_module``)."""
        return NetworkGraph.from_module(module, example_inputs, self.identity_edges, self.attention,
                                        self.tracer)


def edge_attr_key(area: int) -> str:
    """Name of the Data attribute holding the edge features of kernel area ``area``."""
    return f"edge_attr_{area}"


def _identity_features(block: EdgeBlock) -> torch.Tensor:
    """Features of an identity block: the Dirac kernel (centre tap 1, or -1 for what a
    difference subtracts) on edges i -> i, zero on the other pairs of a dense block; none for a
    membership block (area 0)."""
    groups, out, inp = block.shape
    features = torch.zeros(block.rows, block.area)
    if block.area:
        features[:, block.area // 2] = block.sign * torch.eye(out, inp).expand(groups, out, inp).reshape(-1)
    return features


def _take(tensor: torch.Tensor, rows: Rows, width: int) -> torch.Tensor:
    """``rows`` of ``tensor`` as [n, width] features (zipped row groups side by side, column
    copies side by side)."""
    part = tensor[rows.start:rows.stop:rows.step]
    if rows.zip > 1:
        part = part.reshape(rows.zip, -1, *part.shape[1:]).movedim(0, -1)
    if rows.columns > 1:
        part = part.reshape(part.shape[0], rows.columns, -1).movedim(1, -1)
    return part.reshape(-1, width)


def _take_zipped(state: Mapping[str, torch.Tensor], key: str | tuple[str, ...], rows: Rows,
                 width: int) -> torch.Tensor:
    """``_take`` of one tensor, or of several (a tuple of keys) whose same ``rows`` are zipped
    side by side into one feature, as ``Rows.zip`` zips row groups of one tensor: the queries
    and keys of an attention made by two Linears from the same input channels
    (graph/aten_cross_attention.py)."""
    if not isinstance(key, tuple):
        return _take(state[key], rows, width)
    return torch.stack([_take(state[k], rows, width // len(key)) for k in key], -1).reshape(-1, width)


def _put(features: torch.Tensor, rows: Rows, shape: tuple[int, ...]) -> torch.Tensor:
    """The inverse of ``_take``: features back to the rows' part of a tensor of ``shape``."""
    count = len(range(rows.start, shape[0] if rows.stop is None else rows.stop, rows.step))
    if rows.columns > 1:
        return features.reshape(count, -1, rows.columns).movedim(-1, 1).reshape(count, *shape[1:])
    if rows.zip > 1:
        per_group = count // rows.zip
        return features.reshape(per_group, *shape[1:], rows.zip).movedim(-1, 0).reshape(
            count, *shape[1:])
    return features.reshape(count, *shape[1:])


def _assemble(parts: dict[str, list[tuple[Rows, torch.Tensor]]]) -> dict[str, torch.Tensor]:
    """Each key's tensor from its parts (a whole tensor is one part; parts every step-th row
    interleave)."""
    def whole(chunks: list[tuple[Rows, torch.Tensor]]) -> torch.Tensor:
        if len(chunks) == 1:
            return chunks[0][1]
        ordered = [t for _, t in sorted(chunks, key=lambda c: c[0].start)]
        if chunks[0][0].step > 1:
            return torch.stack(ordered, 1).flatten(0, 1)
        return torch.cat(ordered)
    return {key: whole(chunks) for key, chunks in parts.items()}


def _as_tuple(example_inputs) -> tuple[torch.Tensor, ...]:
    return (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)


class NetworkGraph:
    """The graph layout of one architecture at one width pattern."""

    _cache: "OrderedDict[tuple, NetworkGraph]" = OrderedDict()

    def __init__(self, module: nn.Module, example_inputs, identity_edges: str = "diagonal",
                 attention: str = "heads", tracer: str = "auto") -> None:
        GraphOptions(identity_edges, attention, tracer)  # refuses unknown choices
        self.identity_edges, self.attention = identity_edges, attention
        example_inputs = _as_tuple(example_inputs)
        records, used = TRACERS[tracer](module, example_inputs, attention)
        state = module.state_dict()
        missing = [k for k, v in state.items() if v.is_floating_point() and k not in used]
        if missing:
            raise UnsupportedArchitectureError(
                f"{type(module).__name__}: tensors {missing[:5]} are not used by the network "
                "in eval mode or not by a layer the graph encodes, so the graph cannot carry "
                "them (a training-only branch such as an auxiliary classifier: build the "
                "network without it, e.g. aux_logits=False)"
            )
        rep = records.rep()
        self.num_nodes = int(rep.max()) + 1 if len(rep) else 0
        self.input_channels = records.input_channels
        # the channels of the input and of the output(s): fixed, unlike the hidden channels
        self.input_nodes = rep[:records.input_channels]
        self.output_nodes = rep[records.outputs]
        self.shapes = {k: tuple(v.shape) for k, v in state.items() if k in used}
        # tensors that follow channels outside the graph: (key, node per channel, their dim,
        # None for a tensor that follows no channel)
        self.passengers = [(key, rep[nodes], dim) for key, nodes, dim in records.passengers]
        self._build_edges(records, rep)
        self._build_nodes(records, rep)

    # -- construction -------------------------------------------------------------------------
    def _build_edges(self, records, rep: torch.Tensor) -> None:
        areas = sorted({a for _, a, *_ in records.weights} | {a for _, _, a, _ in records.identities}
                       | ({0} if records.memberships else set()))
        self.edge_types: tuple[int, ...] = tuple(areas)
        self.blocks: list[EdgeBlock] = []
        self._block_index: dict[str, list] = {}
        self._identity: dict[int, torch.Tensor] = {}
        # per area: (key, edge count, the key's rows) of each weight block, in block order
        self._edge_keys: dict[int, list[tuple[str | tuple[str, ...], int, Rows]]] = {}
        counts = []
        for area in areas:
            start = 0
            self._edge_keys[area] = []
            for key, a, src, dst, rows in records.weights:
                if a == area:
                    self.blocks.append(EdgeBlock(area, start, rep[src], rep[dst], key))
                    self._edge_keys[area].append((key, self.blocks[-1].rows, rows))
                    start += self.blocks[-1].rows
            identities = []
            for src, dst, a, sign in records.identities:
                if a == area:
                    identities.append(self._identity_block(area, start, rep[src], rep[dst], sign))
                    start += identities[-1].rows
            for src, dst in records.memberships if area == 0 else []:
                identities.append(EdgeBlock(0, start, rep[src], rep[dst]))
                start += identities[-1].rows
            if identities:
                self.blocks += identities
                self._identity[area] = torch.cat([_identity_features(b) for b in identities])
            counts.append(start)
        self._edge_counts = counts
        self.num_identity_edges = sum(len(b) for b in self._identity.values())

    def _identity_block(self, area: int, start: int, src: torch.Tensor,
                        dst: torch.Tensor, sign: float = 1.0) -> EdgeBlock:
        """Channel ``src[k]`` feeds channel ``dst[k]`` (times ``sign``): C groups of 1 x 1
        (diagonal) or one group of C x C (dense)."""
        if self.identity_edges == "diagonal":
            return EdgeBlock(area, start, src[:, None], dst[:, None], sign=sign)
        return EdgeBlock(area, start, src[None, :], dst[None, :], sign=sign)

    def _build_nodes(self, records, rep: torch.Tensor) -> None:
        # Slots are assigned per node in trace order: the first layer of a kind on a channel
        # takes slot 0, a second one on the same (merged) channel, e.g. a projection shortcut's
        # BatchNorm, slot 1. All fields one layer writes share its slot.
        next_free: dict[str, torch.Tensor] = {}
        placed = []  # (key, kind, field, nodes, slot, rows)
        layer_slot: dict[tuple[str, str], int] = {}
        for key, kind, fld, nodes, rows, name in records.channels:
            nodes = rep[nodes]
            free = next_free.setdefault(kind, torch.zeros(self.num_nodes, dtype=torch.long))
            layer = (name, kind)
            if layer not in layer_slot:
                layer_slot[layer] = int(free[nodes].max())
            # also where the layer wrote other nodes before (timm's gamma_1 and gamma_2 of one
            # block): a later layer on these nodes must not take the same slot
            free[nodes] = free[nodes].clamp(min=layer_slot[layer] + 1)
            placed.append((key, kind, fld, nodes, layer_slot[layer], rows))
        self.columns = NodeColumns.from_counts({k: int(v.max()) for k, v in next_free.items()})
        self.node_dim = self.columns.node_dim
        self._x_default = self.columns.defaults().expand(self.num_nodes, -1).clone()
        # (key, channels, is a running statistic: decoded detached, the key's rows)
        self._node_keys = [(key, len(nodes), fld in NODE_SLOTS[kind].statistics, rows)
                           for key, kind, fld, nodes, _, rows in placed]
        self._node_index = torch.cat([
            nodes * self.node_dim + self.columns.column(kind, slot, fld)
            for _, kind, fld, nodes, slot, _ in placed
        ]) if placed else torch.zeros(0, dtype=torch.long)
        self.running_stat_columns = self.columns.statistics()

    # -- public API -----------------------------------------------------------------------------
    @classmethod
    def from_module(cls, module: nn.Module, example_inputs, identity_edges: str = "diagonal",
                    attention: str = "heads", tracer: str = "auto") -> "NetworkGraph":
        """Trace ``module`` (cached per architecture, width pattern, identity and attention
        layout and tracer); ``attention``: "heads" (ours) or "paper" (docs/graph.md);
        ``tracer``: "auto" (fx, else aten), "fx" or "aten" (``TRACERS``)."""
        example_inputs = _as_tuple(example_inputs)
        key = (identity_edges, attention, tracer, type(module).__module__, type(module).__qualname__,
               tuple(type(m).__name__ for m in module.modules()),
               tuple((k, tuple(v.shape)) for k, v in module.state_dict().items()),
               tuple(tuple(x.shape) for x in example_inputs))
        graph = cls._cache.get(key)
        if graph is None:
            graph = cls(module, example_inputs, identity_edges, attention, tracer)
            cls._cache[key] = graph
            if len(cls._cache) > _CACHE_SIZE:
                cls._cache.popitem(last=False)
        else:
            cls._cache.move_to_end(key)
        return graph

    @classmethod
    def clear_cache(cls) -> None:
        """Forget every traced graph (and the memory it holds: ViT-H/14's edge structure is
        11 GB); the next ``from_module`` traces again."""
        cls._cache.clear()

    def block_index(self, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``(src, dst)`` node ids of every edge block, on ``device`` (cached)."""
        key = str(device)
        if key not in self._block_index:
            self._block_index[key] = [(b.src.to(device), b.dst.to(device)) for b in self.blocks]
        return self._block_index[key]

    @property
    def layout(self) -> dict:
        """What a metanetwork must match to read this graph."""
        return {"node_dim": self.node_dim, "edge_types": list(self.edge_types),
                **self.columns.layout(), "identity_edges": self.identity_edges,
                "attention": self.attention}

    def filled_node_columns(self) -> torch.Tensor:
        """Bool [nodes, node_dim]: which node features hold a network tensor (the rest hold
        the defaults of absent slots)."""
        filled = torch.zeros(self.num_nodes * self.node_dim, dtype=torch.bool)
        filled[self._node_index] = True
        return filled.view(self.num_nodes, self.node_dim)

    def channel_nodes(self) -> list[tuple[str, torch.Tensor]]:
        """``(state_dict key, node of each channel)`` of every per-channel tensor: node-slot
        tensors, then passengers."""
        nodes = (self._node_index // max(self.node_dim, 1)).split([n for _, n, *_ in self._node_keys])
        return [(key, n) for (key, *_), n in zip(self._node_keys, nodes)] + [
            (key, n) for key, n, dim in self.passengers if dim is not None]

    @property
    def num_edges(self) -> int:
        return sum(self._edge_counts)

    # the structure is built on first use: encoding for a metanetwork needs it, a round trip
    # (decode reads only features) does not, and at 600M edges it is 11 GB of the graph's 16
    @functools.cached_property
    def edge_index(self) -> torch.Tensor:
        """Source and target node of every edge, ``(2, num_edges)``: the edge types in order,
        within each the blocks in order."""
        offsets = dict(zip(self.edge_types, itertools.accumulate([0] + self._edge_counts)))
        index = torch.empty(2, self.num_edges, dtype=torch.long)
        for b in self.blocks:  # filled in place, block by block
            start = offsets[b.area] + b.start
            b.edge_index(index[:, start:start + b.rows])
        return index

    @functools.cached_property
    def edge_type(self) -> torch.Tensor:
        """The edge type (kernel area, 0 for head membership) of every edge, int32 (4 bytes per
        weight fewer than int64; areas stay far below 2^31)."""
        return torch.repeat_interleave(torch.tensor(self.edge_types, dtype=torch.int32),
                                       torch.tensor(self._edge_counts))

    def _state(self, weights) -> Mapping[str, torch.Tensor]:
        state = weights.state_dict() if isinstance(weights, nn.Module) else weights
        bad = [k for k, s in self.shapes.items() if k not in state or tuple(state[k].shape) != s]
        if bad:
            k = bad[0]
            got = tuple(state[k].shape) if k in state else "missing"
            raise ValueError(f"weights do not match this graph: {k!r} is {got}, expected "
                             f"{self.shapes[k]} ({len(bad)} mismatching tensors); build the "
                             "graph from this network (NetworkGraph.from_module)")
        return state

    def encode(self, weights: nn.Module | Mapping[str, torch.Tensor], structure: bool = True
               ) -> Data:
        """Graph of ``weights`` (a module or its state_dict); differentiable in the weights.
        Without ``structure``, the features alone (no ``edge_index``/``edge_type``): enough to
        decode, as a check of the encoding does."""
        state = self._state(weights)
        ref = state[next(iter(self.shapes))]
        dtype, device = ref.dtype, ref.device
        blocks = {}
        for area in self.edge_types:
            parts = [_take_zipped(state, k, rows, area) for k, _, rows in self._edge_keys[area]]
            if area in self._identity:
                parts.append(self._identity[area].to(device, dtype))
            blocks[edge_attr_key(area)] = torch.cat(parts)
        x = self._x_default.to(device, dtype).reshape(-1)
        if self._node_keys:
            values = torch.cat([_take(state[k], rows, 1).reshape(-1)
                                for k, _, _, rows in self._node_keys])
            x = x.index_put((self._node_index.to(device),), values)
        if self.passengers:  # flat, so that a Batch of different widths concatenates them
            blocks["passengers"] = torch.cat([state[k].reshape(-1) for k, *_ in self.passengers])
        if structure:
            blocks.update(edge_index=self.edge_index.to(device), edge_type=self.edge_type.to(device))
        return Data(x=x.view(self.num_nodes, self.node_dim), num_nodes=self.num_nodes, graph=self,
                    **blocks)

    def decode(self, data: Data) -> dict[str, torch.Tensor]:
        """State-dict tensors (every floating tensor of the module) read back from ``data``.

        The results are views/gathers of ``data``'s features, so gradients flow into them;
        BN running statistics come back detached (BatchNorm cannot differentiate through them).
        Identity residual edges are constant structure and are ignored.
        """
        if data.x.shape != (self.num_nodes, self.node_dim):
            raise ValueError(f"node features of shape {tuple(data.x.shape)} do not match this "
                             f"graph ({self.num_nodes} nodes x {self.node_dim}); split a Batch "
                             "with to_data_list() before decoding")
        parts: dict[str, list[tuple[Rows, torch.Tensor]]] = {}
        for area in self.edge_types:
            block = data[edge_attr_key(area)]
            counts = [n for _, n, _ in self._edge_keys[area]]
            # split, not slices: one backward for the whole block instead of one per tensor
            chunks = block.split(counts + [block.shape[0] - sum(counts)])  # the rest: identities
            for (key, _, rows), chunk in zip(self._edge_keys[area], chunks):
                if isinstance(key, tuple):  # the keys' features side by side (``_take_zipped``)
                    for one, part in zip(key, chunk.reshape(len(chunk), -1, len(key)).unbind(-1)):
                        parts.setdefault(one, []).append((rows, _put(part, rows, self.shapes[one])))
                else:
                    parts.setdefault(key, []).append((rows, _put(chunk, rows, self.shapes[key])))
        if self._node_keys:
            values = data.x.reshape(-1)[self._node_index.to(data.x.device)]
            counts = [n for _, n, *_ in self._node_keys]
            for (key, _, statistic, rows), chunk in zip(self._node_keys, values.split(counts)):
                chunk = _put(chunk, rows, self.shapes[key])
                parts.setdefault(key, []).append((rows, chunk.detach() if statistic else chunk))
        if self.passengers:
            sizes = [math.prod(self.shapes[k]) for k, *_ in self.passengers]
            for (key, *_), chunk in zip(self.passengers, data.passengers.split(sizes)):
                parts[key] = [(Rows(), chunk.reshape(self.shapes[key]))]
        return _assemble(parts)

    def __repr__(self) -> str:
        return (f"NetworkGraph(nodes={self.num_nodes}, edges={self.num_edges} "
                f"({self.num_identity_edges} identity), edge_types={list(self.edge_types)}, "
                f"node_dim={self.node_dim})")

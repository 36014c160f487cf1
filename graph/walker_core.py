"""The walker's core bookkeeping: which graph node each channel of a traced tensor is, and
the records of which channels each state_dict tensor connects (docs/graph.md, "Encoding").

:class:`Value` is the channel bookkeeping of one tensor, :class:`Rows` a part of a state_dict
tensor, :class:`TraceRecords` what a walk found (plain records; :mod:`graph.network_graph`
turns them into index maps). :class:`WalkerCore` holds the walk's state and the methods every
handler records through (``new_nodes``, ``add_weight``, ``add_channels``, ``carry``,
``passthrough``, ``channels_first``, ``fail``, ...); :mod:`graph.layer_ops` and
:mod:`graph.tensor_ops` build the layers and tensor operations on them, and
:class:`graph.walker.Walker` walks a graph with all of them. Anything that touches the channel
dimension in a way we do not model raises :class:`UnsupportedArchitectureError`: a wrong graph
would silently corrupt weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Union

import torch
from torch import fx

from .errors import UnsupportedArchitectureError
from .node_slots import NODE_SLOTS


@dataclass
class Value:
    """Channel bookkeeping for one tensor of the trace."""

    # provisional graph node of each channel, LongTensor [C]; [C1, C2, ...] while a reshape
    # spreads the channels over consecutive dims (as a channel shuffle does)
    nodes: torch.Tensor
    fresh: bool                  # a conv/linear output that nothing else has consumed yet
    area: int                    # kernel area of the layer that produced the channels
    axis: int = 1                # the first tensor dimension holding the channels (>= 1)
    # entries per channel in its dim: > 1 after a spatial map is flattened into the channel
    # dim ([B, C, H, W] -> [B, C*H*W], channel c at entries c*H*W ...), as before VGG's Linear
    spread: int = 1
    # the spread entries lie outermost instead: channel c at entries c, C + c, 2C + c, ...
    # (Swin's patch merging concatenates the channels of 2x2 neighbours)
    outer: bool = False

    @property
    def dims(self) -> range:
        """The tensor dimensions holding the channels."""
        return range(self.axis, self.axis + self.nodes.dim())


@dataclass
class Split:
    """Channel bookkeeping for a tensor whose channels a reshape spread over several dims that
    a permute then moved apart or before the batch (ATen walk only): an attention's
    ``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)`` holds query, key and value in dim
    0, heads in dim 2 and each head's channels in dim 4. Only the operations of
    :mod:`graph.aten_attention` read it; it becomes a :class:`Value` again once the batch is
    first and the channel dims are together."""

    nodes: torch.Tensor          # node per channel, one dim per entry of ``dims``
    dims: tuple[int, ...]        # the tensor dim holding each dim of ``nodes``, increasing
    batch: int                   # the tensor dim holding the batch
    fresh: bool                  # as Value.fresh
    area: int = 1


@dataclass
class Scores:
    """Attention scores ``q @ k.transpose(-2, -1)`` of the queries and keys of each head,
    before or after the softmax (ATen walk only): a token-by-token map per head, in tensor
    dim ``head``. ``queries`` and ``keys`` are the node of each channel, [heads, head size]."""

    queries: torch.Tensor
    keys: torch.Tensor
    head: int
    batch: int
    fresh: bool
    # tensors added to the scores that follow the heads or each head's channels, recorded
    # once the attention's head nodes exist (graph/aten_position.py): (state_dict key, what
    # they follow, "heads" or "channels", the tensor's dim holding it)
    followers: tuple[tuple[str, str, int], ...] = ()


@dataclass
class Logits:
    """Relative position logits (ATen walk only; graph/aten_position.py): each head's
    queries times learned per-position vectors over a head's channels (BotNet's
    ``PosEmbedRel``: ``q @ rel.transpose(-1, -2)``), then rearranged over the tokens. The
    tensor's leading ``slabs`` elements are (sample, head) pairs, outermost, and every
    operation so far acted on each slab alike. ``queries`` [heads, head size] are the query
    nodes; ``tables`` the state-dict keys of the position vectors with the dim holding a
    head's channels (one vector entry per channel, shared by all heads)."""

    queries: torch.Tensor
    tables: tuple[tuple[str, int], ...]
    slabs: int
    fresh: bool = False


@dataclass(frozen=True)
class Rows:
    """Which rows (dim 0) of a state-dict tensor a record covers: ``[start, stop)``, all by
    default. ``zip`` > 1 splits them into that many equal groups and zips the groups into one
    feature (an attention's query and key rows of one channel: one edge with 2 features)."""

    start: int = 0
    stop: int | None = None
    zip: int = 1
    # > 1: every step-th row from start (the paper's code reads an attention's in-projection
    # bias this way: entries 3i, 3i+1, 3i+2 as channel i's query, key and value biases)
    step: int = 1
    # > 1: the columns (dim 1) hold that many copies of the input channels one after another
    # (a Linear after Swin's patch merging); an edge takes its channel's column of each copy
    columns: int = 1

    def __post_init__(self) -> None:
        if sum(n > 1 for n in (self.zip, self.columns, self.step)) > 1:
            raise ValueError(f"{self}: zipped rows, column copies and steps do not combine")


@dataclass
class TraceRecords:
    """What the walk found; node ids are provisional (see ``rep``)."""

    num_nodes: int = 0
    input_channels: int = 0
    parent: list[int] = field(default_factory=list)        # union-find over provisional ids
    # (state_dict key, kernel area, src nodes [groups, in/group], dst nodes [groups, out/group],
    # rows) in trace order; the rows, in (out, in) order, are the edges of this dense block; a
    # tuple of keys zips the same rows of each into one feature (graph/aten_cross_attention.py)
    weights: list[tuple[Union[str, tuple[str, ...]], int, torch.Tensor, torch.Tensor, Rows]] = field(
        default_factory=list)
    # (state_dict key, node slot kind, field name, node per channel, rows, layer), in trace
    # order; the fields one layer writes on a channel share one slot
    channels: list[tuple[str, str, str, torch.Tensor, Rows, str]] = field(default_factory=list)
    # identity residual edges: (src nodes [C], dst nodes [C], kernel area)
    # (source nodes, destination nodes, area, sign): +1 for a sum, -1 for what a difference subtracts
    identities: list[tuple[torch.Tensor, torch.Tensor, int, float]] = field(default_factory=list)
    # featureless edges from a node to the nodes it groups (an attention head to its
    # channels): (src [groups, 1], dst [groups, members])
    memberships: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # tensors that follow channels but stay out of the graph (a class token, a positional
    # embedding): (state_dict key, node per channel, the tensor's dim holding the channels);
    # dim None for a tensor that follows no channel (the input table of Swin V2's position MLP)
    passengers: list[tuple[str, torch.Tensor, int | None]] = field(default_factory=list)
    # the channels of the network's output(s), in output order
    outputs: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))

    def new_nodes(self, count: int) -> torch.Tensor:
        ids = torch.arange(self.num_nodes, self.num_nodes + count)
        self.parent.extend(ids.tolist())
        self.num_nodes += count
        return ids

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def merge(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        """Make every node of ``src`` the same graph node as the matching node of ``dst``."""
        for s, d in zip(src.tolist(), dst.tolist()):
            self.parent[self.find(s)] = self.find(d)

    def rep(self) -> torch.Tensor:
        """Final compact node id of every provisional id, numbered by first appearance."""
        roots = torch.tensor([self.find(i) for i in range(self.num_nodes)], dtype=torch.long)
        unique_roots, compact = torch.unique(roots, sorted=True, return_inverse=True)
        del unique_roots
        return compact


def _module_path(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.keys()), "<top level>") if stack else "<top level>"


def _op_name(node: fx.Node) -> str:
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", repr(target))
    return f"{node.op} {name}"


def node_shape(node) -> torch.Size | None:
    """The shape of the tensor an fx node computes, if shape propagation recorded one."""
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


def call_arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``name`` of a call, given by position ``index`` or by keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def swap_dims(ndim: int, dim0: int, dim1: int) -> list[int]:
    """The permutation of ``ndim`` dims that a transpose of ``dim0`` and ``dim1`` makes."""
    perm = list(range(ndim))
    perm[dim0 % ndim], perm[dim1 % ndim] = dim1 % ndim, dim0 % ndim
    return perm


Env = Union[Value, Split, Scores, Logits, tuple[Union[Value, Split, None], ...], None]


# How self-attention becomes graph structure (docs/graph.md): "heads" (ours: head nodes,
# exactly the network's symmetries) or "paper" (the paper's code: query, key and value of one
# channel index tied into a 3-feature edge, no heads)
ATTENTION_LAYOUTS = ("heads", "paper")


class WalkerCore:
    """The state of a walk over an fx graph (the records, each fx node's channels, the
    state_dict keys used) and the bookkeeping that handlers of modules, functions and ATen
    operations record through."""

    def __init__(self, gm: fx.GraphModule, attention: str = "heads") -> None:
        if attention not in ATTENTION_LAYOUTS:
            raise ValueError(f"attention={attention!r}: expected one of {ATTENTION_LAYOUTS}")
        self.attention_layout = attention
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.params = set(dict(gm.named_parameters())) | set(dict(gm.named_buffers()))
        self.rec = TraceRecords()
        self.env: dict[fx.Node, Env] = {}
        self.used: set[tuple[str, Rows]] = set()

    # -- helpers -------------------------------------------------------------------------
    def fail(self, node: fx.Node, why: str) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(
            f"fx node {node.name!r} (module path {_module_path(node)!r}, operation "
            f"{_op_name(node)}): {why}. docs/graph.md lists the supported operations; "
            "graph.register_module / register_function add one"
        )

    def use_key(self, node: fx.Node, key: str, rows: Rows = Rows()) -> None:
        if (key, rows) in self.used:
            raise self.fail(node, f"parameter {key!r} is used twice (weight sharing)")
        self.used.add((key, rows))

    @property
    def used_keys(self) -> set[str]:
        return {key for key, *_ in self.used}

    def channel_args(self, node: fx.Node) -> list[tuple[fx.Node, Env]]:
        found = []

        def visit(a):
            if isinstance(a, fx.Node) and self.env.get(a) is not None:
                found.append((a, self.env[a]))
            return a

        fx.node.map_aggregate(node.args, visit)
        fx.node.map_aggregate(node.kwargs, visit)
        return found

    def passthrough(self, arg: fx.Node, value: Value) -> Value:
        # A value stays "fresh" only along a single-consumer chain from its conv.
        return replace(value, fresh=value.fresh and len(arg.users) == 1)

    def one_axis(self, node: fx.Node, value: Value, what: str) -> None:
        """Refuse ``node`` unless ``value``'s channels are one dim, one entry each (not spread
        over several dims, or over a flattened spatial map, by an earlier reshape)."""
        if value.nodes.dim() != 1:
            raise self.fail(node, f"{what} on a tensor whose channels are spread over dims "
                            f"{list(value.dims)} by an earlier reshape")
        if value.spread != 1:
            raise self.fail(node, f"{what} on a tensor whose channels were flattened together "
                            f"with a spatial map ({value.spread} entries per channel)")

    def channels_first(self, node: fx.Node, value: Value, what: str) -> None:
        """Refuse ``node`` unless ``value`` holds its channels in dim 1 (``what`` needs that)."""
        self.one_axis(node, value, what)
        if value.axis != 1:
            raise self.fail(node, f"{what} on a tensor whose channels are in dim {value.axis}, "
                            "not dim 1")

    def channels_last(self, node: fx.Node, arg: fx.Node, value: Value, what: str) -> None:
        """Refuse ``node`` unless ``value`` (the tensor of ``arg``) holds its channels in its
        last dim (``what`` acts on the last dim: Linear, LayerNorm)."""
        self.one_axis(node, value, what)
        ndim = len(node_shape(arg) or ())
        if value.axis != ndim - 1:
            raise self.fail(node, f"{what} acts on the last dim of a {ndim}-dim tensor whose "
                            f"channels are in dim {value.axis}")

    def parameter_key(self, tensor) -> str | None:
        """The state_dict key of the parameter or buffer that ``tensor`` (an fx get_attr)
        reads; None for anything else."""
        if isinstance(tensor, fx.Node) and tensor.op == "get_attr" and tensor.target in self.params:
            return str(tensor.target)
        return None

    def state_key(self, node: fx.Node, tensor) -> str:
        """The state_dict key of a parameter or buffer read by ``node``."""
        key = self.parameter_key(tensor)
        if key is None:
            raise self.fail(node, f"argument {tensor} is not a parameter or buffer of the network")
        return key

    # -- records --------------------------------------------------------------------------
    def new_nodes(self, count: int) -> torch.Tensor:
        """``count`` new graph nodes (the output channels of a layer)."""
        return self.rec.new_nodes(count)

    def add_weight(self, node: fx.Node, key: str, area: int, src: torch.Tensor,
                   dst: torch.Tensor, rows: Rows = Rows()) -> None:
        """State-dict tensor ``key`` (its ``rows``) of shape [out, in/groups, *kernel] as edges:
        ``src`` [groups, in/groups] input nodes to ``dst`` [groups, out/groups] output nodes,
        each edge ``area`` features wide."""
        self.use_key(node, key, rows)
        self.rec.weights.append((key, area, src, dst, rows))

    def add_channels(self, node: fx.Node, key: str, kind: str, field: str,
                     nodes: torch.Tensor, rows: Rows = Rows(), layer: str | None = None) -> None:
        """State-dict tensor ``key`` (its ``rows``) of ``len(nodes)`` elements as field
        ``field`` of a node slot of kind ``kind`` (``graph.NODE_SLOTS``, or one registered with
        ``register_node_slot``) on ``nodes`` [C]. The fields one ``layer`` writes (by default
        the module: ``key`` without its last part) share one slot."""
        slot = NODE_SLOTS.get(kind)
        if slot is None:
            raise self.fail(node, f"{key!r} goes to node slot kind {kind!r}, which is not "
                            f"registered (kinds: {sorted(NODE_SLOTS)}; see register_node_slot)")
        if field not in slot.fields:
            raise self.fail(node, f"{key!r} goes to field {field!r} of node slot kind {kind!r}, "
                            f"which has fields {slot.fields}")
        self.use_key(node, key, rows)
        self.rec.channels.append((key, kind, field, nodes, rows, layer or key.rsplit(".", 1)[0]))

    def retract_linear(self, node: fx.Node, nodes: torch.Tensor, what: str,
                       kept: tuple[str, ...] = ()) -> tuple[tuple[str, str | None], torch.Tensor]:
        """Take back the records of the Linear whose output channels are ``nodes``, in its row
        order: an attention found later that it reads them as ``what`` and records its
        weight its own way. Returns the keys of its weight and bias (or None) and its input
        nodes; refused unless exactly that Linear (its weight, perhaps a bias) made them, or
        then layers of the node-slot kinds ``kept`` (a BatchNorm after a 1x1 convolution:
        per-channel records on all of ``nodes``, which stay and follow them)."""
        flat = nodes.reshape(-1)
        found = [i for i, (_, area, src, dst, rows) in enumerate(self.rec.weights)
                 if area == 1 and rows == Rows() and src.shape[0] == 1
                 and dst.numel() == len(flat) and torch.equal(dst.reshape(-1), flat)]
        touched = [i for i, (*_, channels, rows, _) in enumerate(self.rec.channels)
                   if len(set(channels.tolist()) & set(flat.tolist()))]
        biases = [i for i in touched if self.rec.channels[i][1] == "bias"
                  and torch.equal(self.rec.channels[i][3], flat) and self.rec.channels[i][4] == Rows()]
        touched = [i for i in touched if not (
            self.rec.channels[i][1] in kept and torch.equal(self.rec.channels[i][3], flat)
            and self.rec.channels[i][4] == Rows() and i not in biases[:1])]
        if len(found) != 1 or touched != biases[:1]:
            raise self.fail(node, f"{what} are not the rows, in that order, of one Linear's "
                            "output")
        key, _, src, _, rows = self.rec.weights.pop(found[0])
        assert isinstance(key, str)  # zipped keys (a tuple) are no Linear's record: area 2
        self.used.discard((key, rows))
        bias = None
        if biases:
            bias, *_ = self.rec.channels.pop(biases[0])
            self.used.discard((bias, Rows()))
        return (key, bias), src.reshape(-1)

    def channel_dim(self, node: fx.Node, param: fx.Node, value: Value) -> int:
        """The dim of parameter ``param`` that broadcasting (right-aligned against ``node``'s
        output) puts on ``value``'s channels; refused unless it has their size."""
        self.one_axis(node, value, "combining with a parameter")
        shape = tuple(node_shape(param) or ())
        dim = value.axis - (len(node_shape(node) or ()) - len(shape))
        if not 0 <= dim < len(shape) or shape[dim] != len(value.nodes):
            raise self.fail(node, f"parameter {param.target!r} of shape {shape} has no dim of "
                            f"the {len(value.nodes)} channels aligned with dim {value.axis}")
        return dim

    def add_passenger(self, node: fx.Node, param: fx.Node, value: Value) -> None:
        """The parameter read by fx node ``param`` (through expand/expand_as/repeat) has one
        slice per channel of ``value`` and stays out of the graph (decoded as it was)."""
        while param.op == "call_method" and param.target in ("expand", "expand_as", "repeat"):
            source = param.args[0]
            if not isinstance(source, fx.Node):
                break
            param = source
        self.carry(node, self.state_key(node, param), value.nodes,
                   self.channel_dim(node, param, value))

    def carry(self, node: fx.Node, key: str, nodes: torch.Tensor | None = None,
              dim: int | None = None) -> None:
        """State-dict tensor ``key`` stays out of the graph and is decoded as it was; its
        ``dim`` has one slice per node of ``nodes`` (a positional embedding's channels, a bias
        table's heads), or it follows no channel (None: a constant table of a layer's own MLP)."""
        self.use_key(node, key)
        empty = torch.zeros(0, dtype=torch.long)
        self.rec.passengers.append((key, empty if nodes is None else nodes, dim))


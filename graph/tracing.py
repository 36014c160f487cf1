"""Walk a torch.fx trace and record which channels each weight connects (docs/graph.md, "Encoding").

The walk assigns every channel of every intermediate tensor a graph node. It produces plain
records (which state_dict tensor lands on which nodes/edges); :mod:`graph.network_graph` turns
them into index maps. Anything that touches the channel dimension in a way we do not model
raises :class:`UnsupportedArchitectureError`: a wrong graph would silently corrupt weights.
"""
from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field, replace
from typing import Callable, Union

import torch
import torch.nn.functional as F
import torchvision.ops
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.models import maxvit, swin_transformer

from networks.layers import LayerShape, register_layer_shape

from .errors import UnsupportedArchitectureError
from .node_slots import ATTENTION, BATCHNORM, BIAS, LAYERNORM, NODE_SLOTS, QKV_BIAS, SCALE

# Operations that act on each element (or each sample) alone: any channel layout. Dropout and
# stochastic depth are traced in eval mode, where they are the identity.
_ELEMENTWISE_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
)
_ELEMENTWISE_FUNCTIONS = (
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.elu, F.selu, F.mish, F.softplus, F.sigmoid, F.tanh, F.dropout, F.dropout2d,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torchvision.ops.stochastic_depth,
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone", "float", "detach",
)
# Pooling works on the dims after dim 1: the channels must be in dim 1.
_SPATIAL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_SPATIAL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
)
_RESHAPES = (torch.flatten, "flatten", "view", "reshape", torch.reshape, torch.unsqueeze,
             "unsqueeze", torch.squeeze, "squeeze")
_PERMUTES = (torch.permute, "permute", torch.transpose, "transpose", torch.swapaxes, "swapaxes",
             torch.swapdims, "swapdims")
_SPLITS = (torch.chunk, "chunk", torch.split, "split")
_REDUCTIONS = (torch.mean, "mean", torch.amax, "amax", torch.amin, "amin")
_MULTIPLY = (operator.mul, operator.imul, torch.mul, "mul")
_DIVIDE = (operator.truediv, operator.itruediv, torch.div, "div")


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
    # rows) in trace order; the rows, in (out, in) order, are the edges of this dense block
    weights: list[tuple[str, int, torch.Tensor, torch.Tensor, Rows]] = field(default_factory=list)
    # (state_dict key, node slot kind, field name, node per channel, rows, layer), in trace
    # order; the fields one layer writes on a channel share one slot
    channels: list[tuple[str, str, str, torch.Tensor, Rows, str]] = field(default_factory=list)
    # identity residual edges: (src nodes [C], dst nodes [C], kernel area)
    identities: list[tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=list)
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


def _arg(node: fx.Node, index: int, name: str, default=None):
    """Argument ``name`` of a call, given by position ``index`` or by keyword."""
    if name in node.kwargs:
        return node.kwargs[name]
    return node.args[index] if len(node.args) > index else default


def _dims_arg(node: fx.Node) -> list[int]:
    """The dims of ``x.permute(0, 2, 1)``, ``x.permute([0, 2, 1])`` or ``torch.permute(x, dims)``."""
    rest = node.args[1:] or (node.kwargs.get("dims"),)
    return list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else list(rest)


def swap_dims(ndim: int, dim0: int, dim1: int) -> list[int]:
    """The permutation of ``ndim`` dims that a transpose of ``dim0`` and ``dim1`` makes."""
    perm = list(range(ndim))
    perm[dim0 % ndim], perm[dim1 % ndim] = dim1 % ndim, dim0 % ndim
    return perm


Env = Union[Value, tuple[Union[Value, None], ...], None]


# How self-attention becomes graph structure (docs/graph.md): "heads" (ours: head nodes,
# exactly the network's symmetries) or "paper" (the paper's code: query, key and value of one
# channel index tied into a 3-feature edge, no heads)
ATTENTION_LAYOUTS = ("heads", "paper")


class Walker:
    """Walks an fx graph node by node and records the channels each state_dict tensor
    connects; handlers of modules, functions (and :mod:`graph.aten_walk`'s ATen operations)
    record through its methods."""

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

    # -- layers ---------------------------------------------------------------------------
    def conv(self, node: fx.Node, m: nn.Module, arg: fx.Node, value: Value) -> Value:
        if m.transposed:
            raise self.fail(node, "transposed convolutions are not supported")
        return self.convolution(node, value, type(m).__name__, tuple(m.weight.shape), m.groups,
                                f"{node.target}.weight",
                                None if m.bias is None else f"{node.target}.bias")

    def convolution(self, node: fx.Node, value: Value, what: str, shape: tuple[int, ...],
                    groups: int, weight: str, bias: str | None) -> Value:
        """A convolution of ``value``'s channels by state-dict tensor ``weight`` of ``shape``
        [out, in/groups, *kernel] in ``groups`` groups, plus ``bias`` (or None)."""
        self.channels_first(node, value, what)
        in_channels = shape[1] * groups
        if len(value.nodes) != in_channels:
            raise self.fail(node, f"expects {in_channels} channels, input has {len(value.nodes)}")
        out_nodes = self.rec.new_nodes(shape[0])
        area = math.prod(shape[2:])
        self.add_weight(node, weight, area, value.nodes.view(groups, -1), out_nodes.view(groups, -1))
        if bias is not None:
            self.add_channels(node, bias, BIAS.name, "bias", out_nodes)
        return Value(out_nodes, True, area)

    def linear(self, node: fx.Node, m: nn.Module, arg: fx.Node, value: Value) -> Value:
        return self.dense(node, arg, value, m.out_features, f"{node.target}.weight",
                          None if m.bias is None else f"{node.target}.bias")

    def dense(self, node: fx.Node, arg: fx.Node, value: Value, out_features: int, weight: str,
              bias: str | None) -> Value:
        """A Linear on the channels (last dim). After a flattened spatial map its weight
        [out, C*H*W] holds one H*W kernel per (channel, output) pair: edges of that area, as
        a conv with a kernel covering the whole map; after a patch merging, one 2x2 kernel."""
        self.channels_last(node, arg, replace(value, spread=1), "Linear")
        out_nodes = self.rec.new_nodes(out_features)
        rows = Rows(columns=value.spread) if value.outer else Rows()
        self.add_weight(node, weight, value.spread, value.nodes.view(1, -1), out_nodes.view(1, -1),
                        rows)
        if bias is not None:
            self.add_channels(node, bias, BIAS.name, "bias", out_nodes)
        return Value(out_nodes, True, 1, value.axis)

    def batchnorm(self, node: fx.Node, m: nn.Module, arg: fx.Node, value: Value) -> Value:
        return self.batch_norm(node, arg, value, type(m).__name__, m.num_features, {
            name: f"{node.target}.{name}" for name in BATCHNORM.fields
            if getattr(m, name, None) is not None})

    def batch_norm(self, node: fx.Node, arg: fx.Node, value: Value, what: str, features: int,
                   keys: dict[str, str]) -> Value:
        """A batch norm over ``features`` channels in dim 1; ``keys``: the state-dict key of
        each of its tensors present (``BATCHNORM.fields``)."""
        self.channels_first(node, value, what)
        if len(value.nodes) != features:
            raise self.fail(node, f"expects {features} channels, input has {len(value.nodes)}")
        for name in BATCHNORM.fields:
            if name in keys:
                self.add_channels(node, keys[name], BATCHNORM.name, name, value.nodes)
        return self.passthrough(arg, value)

    def pooling(self, node: fx.Node, arg: fx.Node, value: Value) -> Value:
        """Pooling works on the dims after dim 1: the channels must be in dim 1."""
        self.channels_first(node, value, "pooling")
        return self.passthrough(arg, value)

    def layer_norm(self, node: fx.Node, arg: fx.Node, value: Value, normalized_shape,
                   weight: str | None, bias: str | None) -> Value:
        """LayerNorm over the channels (in the last dim): its weight and bias become node
        features; a LayerNorm over more than the channels mixes them and is refused. Over
        merged patches (each channel ``spread`` times, outermost) each copy's weight and bias
        take a slot of their own on the channel's node."""
        self.channels_last(node, arg, replace(value, spread=1, outer=False), "LayerNorm")
        if value.spread != 1 and not value.outer:
            self.one_axis(node, value, "LayerNorm")
        count = len(value.nodes)
        if tuple(normalized_shape) != (count * value.spread,):
            raise self.fail(node, f"LayerNorm over shape {tuple(normalized_shape)}: only a "
                            f"normalization over the {count * value.spread} channel entries "
                            "of the last dim is supported")
        for copy in range(value.spread):
            rows = Rows(copy * count, (copy + 1) * count) if value.spread > 1 else Rows()
            layer = f"{node.name}[{copy}]" if value.spread > 1 else None
            for name, key in (("weight", weight), ("bias", bias)):
                if key is not None:
                    self.add_channels(node, key, LAYERNORM.name, name, value.nodes, rows, layer)
        return self.passthrough(arg, value)

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

    def attention(self, node: fx.Node, value: Value, heads: int, qkv: tuple[str, str | None],
                  proj: tuple[str, str | None]) -> tuple[Value, torch.Tensor | None]:
        """Self-attention with head nodes (after NiNo, Knyazev et al. 2025) on the channels
        of ``value``; ``qkv`` and ``proj`` are the state-dict keys of the weight and bias (or
        None) of its input projection ([3C, C]: queries, keys, values, head by head) and of
        its output projection. Channel i of a head's queries and keys is one node (one edge
        per input channel with the query and key weights as 2 features: the scores need both
        permuted alike), channel i of its values another (it feeds the output projection's
        input i), and a featureless membership edge ties each head's nodes to a head node, so
        that only whole heads and channels within a head can be permuted: exactly the
        network's symmetries. Returns the output's value and the head nodes (None in the
        paper's layout, ``_paper_attention``)."""
        if self.attention_layout == "paper":
            return self._paper_attention(node, value, qkv, proj), None
        width = len(value.nodes)
        head_nodes, qk, v = self.new_nodes(heads), self.new_nodes(width), self.new_nodes(width)
        out, inputs = self.new_nodes(width), value.nodes.view(1, -1)
        (weight, bias), (proj_weight, proj_bias) = qkv, proj
        self.add_weight(node, weight, 2, inputs, qk.view(1, -1), Rows(0, 2 * width, zip=2))
        self.add_weight(node, weight, 1, inputs, v.view(1, -1), Rows(2 * width, 3 * width))
        if bias is not None:
            for i, name in enumerate(ATTENTION.fields):
                self.add_channels(node, bias, ATTENTION.name, name, qk, Rows(i * width, (i + 1) * width))
            self.add_channels(node, bias, BIAS.name, "bias", v, Rows(2 * width, 3 * width))
        self.add_weight(node, proj_weight, 1, v.view(1, -1), out.view(1, -1))
        if proj_bias is not None:
            self.add_channels(node, proj_bias, BIAS.name, "bias", out)
        for members in (qk, v):
            self.rec.memberships.append((head_nodes[:, None], members.view(heads, -1)))
        return Value(out, True, 1, value.axis), head_nodes

    def _paper_attention(self, node: fx.Node, value: Value, qkv: tuple[str, str | None],
                         proj: tuple[str, str | None]) -> Value:
        """The paper's code's attention layout (its ViT conversion): channel i of the queries,
        keys and values is one node, fed by one 3-feature edge (query, key, value weight) per
        input channel; its bias features are in-projection bias entries 3i, 3i+1, 3i+2, as
        that code reads them (so not channel i's own biases). No head structure: the graph
        cannot tell a permutation across heads, which is no symmetry, from one within."""
        width = len(value.nodes)
        inner, out = self.new_nodes(width), self.new_nodes(width)
        (weight, bias), (proj_weight, proj_bias) = qkv, proj
        self.add_weight(node, weight, 3, value.nodes.view(1, -1), inner.view(1, -1),
                        Rows(0, 3 * width, zip=3))
        if bias is not None:
            for i, name in enumerate(QKV_BIAS.fields):
                self.add_channels(node, bias, QKV_BIAS.name, name, inner, Rows(i, step=3))
        self.add_weight(node, proj_weight, 1, inner.view(1, -1), out.view(1, -1))
        if proj_bias is not None:
            self.add_channels(node, proj_bias, BIAS.name, "bias", out)
        return Value(out, True, 1, value.axis)

    # -- functions ------------------------------------------------------------------------
    def add(self, node: fx.Node, args: list[tuple[fx.Node, Value]]) -> Value:
        if len(args) == 1:  # tensor + python scalar, or + a parameter (positional embedding)
            arg, value = args[0]
            for other in node.args:
                if isinstance(other, fx.Node) and other is not arg:
                    self.add_passenger(node, other, value)
            return self.passthrough(arg, value)
        (na, a), (nb, b) = args
        if len(a.nodes) != len(b.nodes) or node_shape(na) != node_shape(nb):
            raise self.fail(node, f"residual add of tensors with shapes {tuple(node_shape(na) or ())} "
                            f"and {tuple(node_shape(nb) or ())} (broadcasting over channels)")
        self.same_layout(node, a, b, "adding")
        if torch.equal(a.nodes, b.nodes):
            return replace(a, fresh=False)
        fresh_a, fresh_b = a.fresh and len(na.users) == 1, b.fresh and len(nb.users) == 1
        if fresh_b and not fresh_a:
            (na, a), (nb, b), fresh_a, fresh_b = (nb, b), (na, a), fresh_b, fresh_a
        if fresh_a and fresh_b:  # projection shortcut: b's channels are a's channels
            self.rec.merge(b.nodes, a.nodes)
            return replace(a, fresh=False)
        if fresh_a:  # identity shortcut from an older tensor into a's channels
            self.rec.identities.append((b.nodes, a.nodes, a.area))
            return replace(a, fresh=False)
        # Sum of two older tensors: new nodes fed by identity edges from both.
        out = self.rec.new_nodes(len(a.nodes))
        self.rec.identities += [(a.nodes, out, 1), (b.nodes, out, 1)]
        return Value(out, False, 1, a.axis)

    def same_layout(self, node: fx.Node, a: Value, b: Value, what: str) -> None:
        """Refuse combining two channel tensors element by element unless their channels lie
        in the same single dim and are equally many."""
        self.one_axis(node, a, what)
        self.one_axis(node, b, what)
        if a.axis != b.axis or len(a.nodes) != len(b.nodes):
            raise self.fail(node, f"{what} tensors with {len(a.nodes)} and {len(b.nodes)} "
                            f"channels in dims {a.axis} and {b.axis}")

    def multiply(self, node: fx.Node, args: list[tuple[fx.Node, Value]]) -> Value:
        if len(args) == 2:
            return self.gate(node, args)
        arg, value = args[0]
        others = [a for a in (*node.args, *node.kwargs.values()) if a is not arg]
        if all(isinstance(a, (int, float)) for a in others):
            return self.passthrough(arg, value)
        if len(others) == 1 and self.parameter_key(others[0]) is not None:
            return self.channel_scale(node, arg, value, others[0])
        raise self.fail(node, "multiplying by a tensor that is neither a channel tensor nor a "
                        "parameter of the network")

    def divide(self, node: fx.Node, args: list[tuple[fx.Node, Value]]) -> Value:
        arg, value = args[0]
        if len(args) == 1 and node.args[0] is arg and all(
                isinstance(a, (int, float)) for a in (*node.args[1:], *node.kwargs.values())):
            return self.passthrough(arg, value)
        raise self.fail(node, "dividing by a tensor (or a number by channels)")

    def channel_scale(self, node: fx.Node, arg: fx.Node, value: Value, param: fx.Node) -> Value:
        """``value * p`` with a parameter ``p`` of one factor per channel (layer scale): the
        factors become node features."""
        self.channel_dim(node, param, value)
        shape = tuple(node_shape(param) or ())
        if math.prod(shape) != len(value.nodes):
            raise self.fail(node, f"multiplying by parameter {param.target!r} of shape {shape}: "
                            "only one factor per channel is supported")
        self.add_channels(node, self.state_key(node, param), SCALE.name, "weight", value.nodes)
        return self.passthrough(arg, value)

    def gate(self, node: fx.Node, args: list[tuple[fx.Node, Value]]) -> Value:
        """``x * g`` channel by channel (squeeze-excitation): channel i of the gate ``g``, the
        fresh output of its own layer, is channel i of ``x``, so its node becomes x's node
        (pruning one prunes the other), as a projection shortcut's channels do in a sum."""
        (na, a), (nb, b) = args
        self.same_layout(node, a, b, "multiplying")
        if torch.equal(a.nodes, b.nodes):
            return replace(a, fresh=False)
        fresh_a, fresh_b = a.fresh and len(na.users) == 1, b.fresh and len(nb.users) == 1
        if fresh_a and not fresh_b:
            a, b, fresh_b = b, a, fresh_a
        if not fresh_b:
            raise self.fail(node, "multiplying two tensors whose channels both feed other "
                            "operations (a gate must be used only by the multiplication)")
        self.rec.merge(b.nodes, a.nodes)
        return replace(a, fresh=False)

    def cat(self, node: fx.Node, args: list[tuple[fx.Node, Value]]) -> Value:
        dim = _arg(node, 1, "dim", 0)
        ndim = len(node_shape(node) or ())
        tensors = node.args[0]
        values = [self.env.get(t) for t in tensors]
        first = next((v for v in values if isinstance(v, Value)), None)
        if first is not None and dim % ndim not in first.dims and all(
                not isinstance(v, Value) or (v.axis == first.axis and torch.equal(v.nodes, first.nodes))
                for v in values):
            # along tokens or space: the same channels; a parameter joining them (a class
            # token) follows them out of the graph
            for t, v in zip(tensors, values):
                if not isinstance(v, Value):
                    self.add_passenger(node, t, first)
            return replace(first, fresh=False)
        if any(not isinstance(v, Value) for v in values):
            raise self.fail(node, "concatenating a tensor without channel structure")
        for v in values:
            self.one_axis(node, v, "concatenation")
        axis = values[0].axis
        if ndim < 2 or dim % ndim != axis or any(v.axis != axis for v in values):
            raise self.fail(node, f"concatenation along dim {dim}; the channels are in dim "
                            f"{axis} (only concatenation along the channels is supported)")
        return Value(torch.cat([v.nodes for v in values]), False, 1, axis)

    def reshape(self, node: fx.Node, arg: fx.Node, value: Value) -> Value:
        """A reshape keeps every channel apart when the dims before the channels hold as many
        elements after it as before, and so do the channel dims: then in row-major order
        each element keeps its channel. The channels may be split over several dims (or
        merged back), as a channel shuffle does."""
        src, dst = node_shape(arg), node_shape(node)
        if src is None or dst is None:
            raise self.fail(node, "a reshape whose shapes the trace could not see")
        if value.spread != 1:
            self.one_axis(node, value, "a reshape")
        before, count = math.prod(src[:value.axis]), value.nodes.numel()
        starts = [k for k in range(1, len(dst)) if math.prod(dst[:k]) == before]
        for k in sorted(starts, key=lambda k: dst[k] == 1 and count != 1):  # skip leading 1s
            ends = [j for j in range(k + 1, len(dst) + 1) if math.prod(dst[k:j]) == count]
            if ends:
                nodes = value.nodes.reshape(dst[k:ends[0]])
                return replace(self.passthrough(arg, value), nodes=nodes, axis=k)
            # the dims after one channel dim flattened into it: a spatial map per channel
            inner = [math.prod(src[value.axis + 1:m]) for m in range(value.axis + 2, len(src) + 1)]
            if value.nodes.dim() == 1 and dst[k] in [count * i for i in inner]:
                return replace(self.passthrough(arg, value), axis=k, spread=dst[k] // count)
        raise self.fail(node, f"reshape from {tuple(src)} to {tuple(dst)} mixes the channel "
                        f"dimension (dims {list(value.dims)}) with others")

    def permute(self, node: fx.Node, arg: fx.Node, value: Value) -> Value:
        ndim = len(node_shape(arg) or ())
        if node.target in ("permute", torch.permute):
            perm = [d % ndim for d in _dims_arg(node)]
        else:
            perm = swap_dims(ndim, _arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
        return self.move_dims(node, arg, value, perm)

    def move_dims(self, node: fx.Node, arg: fx.Node, value: Value, perm: list[int]) -> Value:
        """Moving dims (output dim i is input dim ``perm[i]``) keeps the channels if the batch
        stays first and the channel dims stay together; their new order reorders the channel
        nodes (a channel shuffle's transpose)."""
        where = [perm.index(d) for d in value.dims]  # new position of each channel dim
        if perm[0] != 0 or max(where) - min(where) != len(where) - 1:
            raise self.fail(node, f"permutation {perm} moves the batch dim or separates the "
                            f"channel dims {list(value.dims)}")
        order = sorted(range(len(where)), key=where.__getitem__)
        return replace(self.passthrough(arg, value), nodes=value.nodes.permute(order),
                       axis=min(where))

    def split(self, node: fx.Node, arg: fx.Node, value: Value) -> tuple[Value, ...]:
        """``chunk``/``split``: pieces along the channels take their share of the nodes; pieces
        along another dim keep them all."""
        metas = node.meta.get("tensor_meta")
        if not isinstance(metas, (tuple, list)):
            raise self.fail(node, "a split whose pieces the trace could not see")
        return self.pieces(node, arg, value, _arg(node, 2, "dim", 0), [m.shape for m in metas])

    def pieces(self, node: fx.Node, arg: fx.Node, value: Value, dim: int,
               shapes: list[torch.Size]) -> tuple[Value, ...]:
        """The pieces, of ``shapes``, of splitting ``value`` (the tensor of ``arg``) along
        ``dim``."""
        dim %= max(len(node_shape(arg) or ()), 1)
        if dim not in value.dims:
            return tuple(replace(value, fresh=False) for _ in shapes)
        self.one_axis(node, value, "a split along the channels")
        pieces = value.nodes.split([shape[dim] for shape in shapes])
        return tuple(Value(p, False, value.area, value.axis) for p in pieces)

    def reduce(self, node: fx.Node, arg: fx.Node, value: Value) -> Value:
        """Mean/max/min over dims other than batch and channels."""
        ndim = len(node_shape(arg) or ())
        dims = _arg(node, 1, "dim")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        dims = [d % ndim for d in dims]
        if not dims or 0 in dims or any(d in value.dims for d in dims):
            raise self.fail(node, f"reduction over dims {dims} touches batch or channels")
        axis = value.axis
        if not _arg(node, 2, "keepdim", False):
            axis -= sum(d < value.axis for d in dims)
        return replace(self.passthrough(arg, value), axis=axis)

    # -- walk -----------------------------------------------------------------------------
    def step(self, node: fx.Node) -> Env:
        if node.op == "placeholder":
            if self.rec.num_nodes:
                raise self.fail(node, "networks with more than one input tensor")
            shape = node_shape(node)
            if shape is None or len(shape) < 2:
                raise self.fail(node, "the input must be a tensor [batch, channels, ...]")
            self.rec.input_channels = shape[1]
            return Value(self.rec.new_nodes(shape[1]), False, 1)
        if node.op == "get_attr":
            return None
        args = self.channel_args(node)
        if node.op == "output":
            values = [v for _, v in args if isinstance(v, Value)]
            if values:
                self.rec.outputs = torch.cat([v.nodes.reshape(-1) for v in values])
            return None
        if not args:
            return None  # shape arithmetic and the like: no channels involved
        if node.op == "call_function" and node.target is operator.getitem:
            return self.getitem(node, args)
        if any(not isinstance(v, Value) for _, v in args):
            raise self.fail(node, "a tuple of channel tensors used other than by indexing")
        arg, value = args[0]
        if node.op == "call_module":
            m = self.modules[node.target]
            handler = module_handler(type(m))
            if handler is None:
                raise self.fail(node, f"module type {type(m).__name__} is not supported "
                                "(graph.register_module adds a type)")
            return handler(self, node, m, arg, value)
        function = _FUNCTION_HANDLERS.get(node.target)
        if function is not None:
            return function(self, node, args)
        if node_shape(node) is None:
            return None  # x.size(), x.dim() and the like: no channels in the result
        raise self.fail(node, "this operation on channel tensors is not supported")

    def getitem(self, node: fx.Node, args) -> Env:
        """An output of a multi-output call, or ``x[:, 0]`` (a token) and other indexing that
        leaves the channel dims whole."""
        (source, env), = args[:1]
        index = node.args[1]
        if isinstance(env, tuple):
            return env[index]
        index = index if isinstance(index, tuple) else (index,)
        whole = slice(None)
        if isinstance(env, Value) and all(isinstance(i, int) or i == whole for i in index):
            touched = [d for d, i in enumerate(index) if i != whole]
            if 0 not in touched and not set(touched) & set(env.dims):
                axis = env.axis - sum(d < env.axis for d, i in enumerate(index) if isinstance(i, int))
                return replace(self.passthrough(source, env), axis=axis)
        raise self.fail(node, f"indexing {index} of a tensor whose channels are in dims "
                        f"{list(env.dims) if isinstance(env, Value) else '?'} (only whole "
                        "channel dims and integer or full indices elsewhere are supported)")

    def run(self) -> TraceRecords:
        for node in self.gm.graph.nodes:
            self.env[node] = self.step(node)
        return self.rec


# -- the registries: how each module type and each function maps channels -------------------
ModuleHandler = Callable[[Walker, fx.Node, nn.Module, fx.Node, Value], Env]
FunctionHandler = Callable[[Walker, fx.Node, list], Env]
_MODULE_HANDLERS: dict[type, ModuleHandler] = {}
_FUNCTION_HANDLERS: dict[object, FunctionHandler] = {}


def register_module(*types: type, shape: LayerShape | None = None
                    ) -> Callable[[ModuleHandler], ModuleHandler]:
    """Decorator: ``handler(walker, node, module, arg, value) -> Value`` encodes modules of
    ``types`` (and their subclasses that keep its ``forward``, unless a subclass has its own
    handler; a subclass with its own ``forward`` is traced through).

    The handler gets the walker (``new_nodes``, ``add_weight``, ``add_channels``,
    ``passthrough``, ``channels_first``, ``channels_last``, ``fail``), the fx node of the call,
    the module, the input node and its channel ``Value``, and returns the output's ``Value``.
    Registered types are traced as leaves: torch.fx records one call instead of inlining their
    forward. ``shape``: how the type's constructor attributes follow its tensors
    (``networks.LayerShape``), for a type whose tensors channel pruning resizes, so that
    network files and zoo manifests record it too. docs/graph.md has an example."""
    def register(handler: ModuleHandler) -> ModuleHandler:
        for t in types:
            _MODULE_HANDLERS[t] = handler
        if shape is not None:
            register_layer_shape(shape, *types)
        return handler
    return register


def register_function(*targets) -> Callable[[FunctionHandler], FunctionHandler]:
    """Decorator: ``handler(walker, node, args) -> Value`` encodes calls of ``targets``
    (functions, or method names as strings); ``args`` are the call's (fx node, ``Value``)
    pairs that carry channels, in argument order."""
    def register(handler: FunctionHandler) -> FunctionHandler:
        for t in targets:
            _FUNCTION_HANDLERS[t] = handler
        return handler
    return register


def module_handler(module_type: type) -> ModuleHandler | None:
    """The handler of ``module_type``: its own, else that of its nearest registered base if
    ``module_type`` keeps that base's ``forward`` (an overriding forward computes something
    else, so it is traced through instead)."""
    for t in module_type.__mro__:
        if t in _MODULE_HANDLERS:
            keeps_forward = (t is module_type
                             or getattr(module_type, "forward", None) is getattr(t, "forward", None))
            return _MODULE_HANDLERS[t] if keeps_forward else None
    return None


def _first(handler: Callable[[Walker, fx.Node, fx.Node, Value], Env]) -> FunctionHandler:
    """A function handler of the first channel argument alone."""
    return lambda walker, node, args: handler(walker, node, *args[0])


def _layer_norm_function(walker: Walker, node: fx.Node, args) -> Value:
    arg, value = args[0]
    weight, bias = _arg(node, 2, "weight"), _arg(node, 3, "bias")
    return walker.layer_norm(node, arg, value, _arg(node, 1, "normalized_shape"),
                             None if weight is None else walker.state_key(node, weight),
                             None if bias is None else walker.state_key(node, bias))


register_module(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
                nn.ConvTranspose3d)(Walker.conv)
register_module(nn.Linear)(Walker.linear)
register_module(nn.modules.batchnorm._BatchNorm, nn.SyncBatchNorm)(Walker.batchnorm)


@register_module(nn.LayerNorm)
def _layer_norm_module(walker: Walker, node: fx.Node, m: nn.Module, arg: fx.Node,
                       value: Value) -> Value:
    keys = [None if getattr(m, name) is None else f"{node.target}.{name}"
            for name in ("weight", "bias")]
    return walker.layer_norm(node, arg, value, m.normalized_shape, *keys)


@register_module(nn.MultiheadAttention)
def _attention(walker: Walker, node: fx.Node, m: nn.Module, arg: fx.Node, value: Value
               ) -> tuple[Value, None]:
    """Self-attention (``Walker.attention``); its in_proj_weight/in_proj_bias are the
    input projection."""
    query, key, val = (_arg(node, i, name) for i, name in enumerate(("query", "key", "value")))
    if not (query is key is val):
        raise walker.fail(node, "attention whose query, key and value are different tensors "
                          "(only self-attention is supported)")
    if not m._qkv_same_embed_dim or m.bias_k is not None or m.add_zero_attn:
        raise walker.fail(node, "attention with separate key/value sizes, bias_k/bias_v or "
                          "add_zero_attn")
    walker.channels_last(node, arg, value, "MultiheadAttention")
    p = str(node.target)
    out, _ = walker.attention(
        node, value, m.num_heads,
        (f"{p}.in_proj_weight", None if m.in_proj_bias is None else f"{p}.in_proj_bias"),
        (f"{p}.out_proj.weight", None if m.out_proj.bias is None else f"{p}.out_proj.bias"))
    return out, None


def attention_module(qkv: str, proj: str, heads: str, head_tensors: dict[str, int],
                      fixed: tuple[str, ...] = ()) -> ModuleHandler:
    """A handler for a self-attention module whose Linears ``qkv`` (queries, keys, values,
    head by head) and ``proj`` are submodules and whose head count is attribute ``heads``
    (``Walker.attention``). Its per-head tensors ``head_tensors`` (name: the dim holding
    the heads; e.g. a relative position bias table) travel with the head nodes outside the
    graph; ``fixed`` tensors follow no channel."""
    def handler(walker: Walker, node: fx.Node, m: nn.Module, arg: fx.Node, value: Value) -> Value:
        walker.channels_last(node, arg, value, type(m).__name__)
        prefix = str(node.target)
        out, head_nodes = walker.attention(node, value, getattr(m, heads), *(
            (f"{prefix}.{name}.weight",
             None if m.get_submodule(name).bias is None else f"{prefix}.{name}.bias")
            for name in (qkv, proj)))
        state = m.state_dict()
        for name, dim in head_tensors.items():
            if name in state:  # with the head nodes; in a layout without heads, with none
                walker.carry(node, f"{prefix}.{name}", head_nodes,
                             None if head_nodes is None else dim)
        for name in fixed:
            if name in state:
                walker.carry(node, f"{prefix}.{name}")
        return out
    return handler


# Swin's shifted-window attention (the windows, the shift and the mask act on tokens only):
# V1 has a per-head relative position bias table; V2 per-head logit scales and a position MLP
# whose last layer is per head and whose first layer and input table follow no channel.
register_module(swin_transformer.ShiftedWindowAttention, swin_transformer.ShiftedWindowAttentionV2)(
    attention_module("qkv", "proj", "num_heads",
                      {"relative_position_bias_table": 1, "logit_scale": 0, "cpb_mlp.2.weight": 0},
                      ("cpb_mlp.0.weight", "cpb_mlp.0.bias", "relative_coords_table")))
# MaxViT's block and grid attention (over the tokens of a window or a grid)
register_module(maxvit.RelativePositionalMultiHeadAttention)(
    attention_module("to_qkv", "merge", "n_heads", {"relative_position_bias_table": 1}))


@register_function(swin_transformer._patch_merging_pad)
def _patch_merging(walker: Walker, node: fx.Node, args) -> Value:
    """Swin's patch merging: the channels of each 2x2 neighbourhood concatenated, [..., H, W,
    C] -> [..., H/2, W/2, 4C]: each channel 4 times, outermost (a Linear after it is a 2x2
    stride-2 conv)."""
    arg, value = args[0]
    walker.channels_last(node, arg, value, "patch merging")
    return replace(walker.passthrough(arg, value), spread=4, outer=True)


register_module(nn.Flatten)(lambda walker, node, m, arg, value: walker.reshape(node, arg, value))
register_module(*_ELEMENTWISE_MODULES)(
    lambda walker, node, m, arg, value: walker.passthrough(arg, value))
register_module(*_SPATIAL_MODULES)(lambda walker, node, m, arg, value: walker.pooling(node, arg, value))
register_function(*_ELEMENTWISE_FUNCTIONS)(_first(lambda w, node, arg, value: w.passthrough(arg, value)))
register_function(*_SPATIAL_FUNCTIONS)(_first(Walker.pooling))
register_function(*_RESHAPES)(_first(Walker.reshape))
register_function(*_PERMUTES)(_first(Walker.permute))
register_function(*_SPLITS)(_first(Walker.split))
register_function(*_REDUCTIONS)(_first(Walker.reduce))
register_function(operator.add, operator.iadd, torch.add, "add")(Walker.add)
register_function(*_MULTIPLY)(Walker.multiply)
register_function(*_DIVIDE)(Walker.divide)
register_function(torch.cat, torch.concat)(Walker.cat)
register_function(F.layer_norm)(_layer_norm_function)


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every registered module type as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_handler(type(m)) is not None or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(module: nn.Module) -> fx.GraphModule:
    """``module``'s fx graph in eval mode (the function its weights define: no dropout or
    stochastic depth), every registered module type one call (a leaf)."""
    was_training = module.training
    module.eval()
    try:
        return fx.GraphModule(module, _Tracer().trace(module), type(module).__name__)
    except Exception as e:
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} cannot be traced with torch.fx ({type(e).__name__}: {e}); "
            "data-dependent control flow in forward() is not supported"
        ) from e
    finally:
        module.train(was_training)


def trace(module: nn.Module, example_inputs: tuple[torch.Tensor, ...], attention: str = "heads"
          ) -> tuple[TraceRecords, set]:
    """Trace ``module`` on ``example_inputs`` with self-attention in layout ``attention``
    (``ATTENTION_LAYOUTS``); returns the records and the keys they cover."""
    gm = symbolic_trace(module)
    was_training = module.training
    module.eval()  # shape propagation must not touch BN running statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        module.train(was_training)
    walker = Walker(gm, attention)
    return walker.run(), walker.used_keys

"""Walk a torch.fx trace and record which channels each weight connects (DESIGN section 4).

The walk assigns every channel of every intermediate tensor a graph node. It produces plain
records (which state_dict tensor lands on which nodes/edges); :mod:`graph.network_graph` turns
them into index maps. Anything that touches the channel dimension in a way we do not model
raises :class:`UnsupportedArchitectureError`: a wrong graph would silently corrupt weights.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field, replace
from typing import Callable

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.passes.shape_prop import ShapeProp

from networks.layers import LayerShape, register_layer_shape

from .errors import UnsupportedArchitectureError
from .node_slots import BATCHNORM, BIAS, NODE_SLOTS

# Leaf modules and functions that act on each channel separately (or only on spatial dims).
_PASSTHROUGH_MODULES = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid,
    nn.Tanh, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Identity,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d,
    nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d,
)
_PASSTHROUGH_FUNCTIONS = {
    F.relu, F.relu_, F.relu6, F.leaky_relu, F.silu, F.gelu, F.hardswish, F.hardsigmoid,
    F.hardtanh, F.elu, F.selu, F.mish, F.softplus, F.sigmoid, F.tanh, F.dropout, F.dropout2d,
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d,
    F.adaptive_max_pool1d, F.adaptive_max_pool2d, F.adaptive_max_pool3d,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh,
}
_PASSTHROUGH_METHODS = {"relu", "relu_", "sigmoid", "sigmoid_", "tanh", "contiguous", "clone",
                        "float", "detach"}
# Reshapes are fine only while they keep [batch, channels] and add or drop trailing 1-dims.
_RESHAPES = {torch.flatten, "flatten", "view", "reshape", torch.unsqueeze, "unsqueeze",
             torch.squeeze, "squeeze"}
_MEAN = {torch.mean, "mean", torch.amax, "amax", "amin", torch.amin}


@dataclass
class Value:
    """Channel bookkeeping for one tensor of the trace."""

    nodes: torch.Tensor          # provisional graph node of each channel, LongTensor [C]
    fresh: bool                  # a conv/linear output that nothing else has consumed yet
    area: int                    # kernel area of the layer that produced the channels
    axis: int = 1                # the tensor dimension holding the channels (>= 1)


@dataclass
class TraceRecords:
    """What the walk found; node ids are provisional (see ``rep``)."""

    num_nodes: int = 0
    input_channels: int = 0
    parent: list[int] = field(default_factory=list)        # union-find over provisional ids
    # (state_dict key, kernel area, src nodes [groups, in/group], dst nodes [groups, out/group])
    # in trace order; the weight's rows, in (out, in) order, are the edges of this dense block
    weights: list[tuple[str, int, torch.Tensor, torch.Tensor]] = field(default_factory=list)
    # (state_dict key, node slot kind, field name, node per channel), in trace order
    channels: list[tuple[str, str, str, torch.Tensor]] = field(default_factory=list)
    # identity residual edges: (src nodes [C], dst nodes [C], kernel area)
    identities: list[tuple[torch.Tensor, torch.Tensor, int]] = field(default_factory=list)

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


def _shape(node) -> torch.Size | None:
    meta = node.meta.get("tensor_meta") if isinstance(node, fx.Node) else None
    return getattr(meta, "shape", None)


class _Walker:
    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.modules = dict(gm.named_modules())
        self.rec = TraceRecords()
        self.env: dict[fx.Node, Value | None] = {}
        self.used_keys: set[str] = set()

    # -- helpers -------------------------------------------------------------------------
    def fail(self, node: fx.Node, why: str) -> UnsupportedArchitectureError:
        return UnsupportedArchitectureError(
            f"fx node {node.name!r} (module path {_module_path(node)!r}, operation "
            f"{_op_name(node)}): {why}. The graph encoding supports convs, BatchNorm, Linear after "
            "global pooling, residual add, channel concat and channel-wise ops; see "
            "docs/graph.md for the list"
        )

    def use_key(self, node: fx.Node, key: str) -> None:
        if key in self.used_keys:
            raise self.fail(node, f"parameter {key!r} is used twice (weight sharing)")
        self.used_keys.add(key)

    def channel_args(self, node: fx.Node) -> list[tuple[fx.Node, Value]]:
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

    def channels_first(self, node: fx.Node, value: Value, what: str) -> None:
        """Refuse ``node`` unless ``value`` holds its channels in dim 1 (``what`` needs that)."""
        if value.axis != 1:
            raise self.fail(node, f"{what} on a tensor whose channels are in dim {value.axis}, "
                            "not dim 1")

    # -- layers ---------------------------------------------------------------------------
    def conv(self, node: fx.Node, m: nn.Module, arg: fx.Node, value: Value) -> Value:
        if m.transposed:
            raise self.fail(node, "transposed convolutions are not supported")
        self.channels_first(node, value, type(m).__name__)
        if len(value.nodes) != m.in_channels:
            raise self.fail(node, f"expects {m.in_channels} channels, input has {len(value.nodes)}")
        out_nodes = self.rec.new_nodes(m.out_channels)
        area = int(m.weight[0, 0].numel())
        self.add_weight(node, f"{node.target}.weight", area, value.nodes.view(m.groups, -1),
                        out_nodes.view(m.groups, -1))
        if m.bias is not None:
            self.add_channels(node, f"{node.target}.bias", BIAS.name, "bias", out_nodes)
        return Value(out_nodes, True, area)

    def linear(self, node: fx.Node, m: nn.Module, arg: fx.Node, value: Value) -> Value:
        shape = _shape(node.args[0])
        if shape is None or len(shape) != 2:
            raise self.fail(node, "Linear is supported only on [batch, channels] inputs "
                            "(after global pooling or flatten of a 1x1 map)")
        self.channels_first(node, value, "Linear")
        out_nodes = self.rec.new_nodes(m.out_features)
        self.add_weight(node, f"{node.target}.weight", 1, value.nodes.view(1, -1),
                        out_nodes.view(1, -1))
        if m.bias is not None:
            self.add_channels(node, f"{node.target}.bias", BIAS.name, "bias", out_nodes)
        return Value(out_nodes, True, 1)

    def batchnorm(self, node: fx.Node, m: nn.Module, arg: fx.Node, value: Value) -> Value:
        if len(value.nodes) != m.num_features:
            raise self.fail(node, f"expects {m.num_features} channels, input has {len(value.nodes)}")
        self.channels_first(node, value, type(m).__name__)
        for name in BATCHNORM.fields:
            if getattr(m, name, None) is not None:
                self.add_channels(node, f"{node.target}.{name}", BATCHNORM.name, name, value.nodes)
        return self.passthrough(arg, value)

    def new_nodes(self, count: int) -> torch.Tensor:
        """``count`` new graph nodes (the output channels of a layer)."""
        return self.rec.new_nodes(count)

    def add_weight(self, node: fx.Node, key: str, area: int, src: torch.Tensor,
                   dst: torch.Tensor) -> None:
        """State-dict tensor ``key`` of shape [out, in/groups, *kernel] as edges: ``src``
        [groups, in/groups] input nodes to ``dst`` [groups, out/groups] output nodes, each edge
        ``area`` features wide."""
        self.use_key(node, key)
        self.rec.weights.append((key, area, src, dst))

    def add_channels(self, node: fx.Node, key: str, kind: str, field: str,
                     nodes: torch.Tensor) -> None:
        """State-dict tensor ``key`` of shape [C] as field ``field`` of a node slot of kind
        ``kind`` (``graph.NODE_SLOTS``: "bn", "bias", or one registered with
        ``register_node_slot``) on ``nodes`` [C]. The fields one layer writes share one slot."""
        slot = NODE_SLOTS.get(kind)
        if slot is None:
            raise self.fail(node, f"{key!r} goes to node slot kind {kind!r}, which is not "
                            f"registered (kinds: {sorted(NODE_SLOTS)}; see register_node_slot)")
        if field not in slot.fields:
            raise self.fail(node, f"{key!r} goes to field {field!r} of node slot kind {kind!r}, "
                            f"which has fields {slot.fields}")
        self.use_key(node, key)
        self.rec.channels.append((key, kind, field, nodes))

    # -- functions ------------------------------------------------------------------------
    def add(self, node: fx.Node, args: list[tuple[fx.Node, Value]]) -> Value:
        if len(args) == 1:  # tensor + python scalar
            if any(isinstance(a, fx.Node) and self.env.get(a) is None for a in node.args):
                raise self.fail(node, "adding a tensor without channel structure")
            return self.passthrough(*args[0])
        (na, a), (nb, b) = args
        if len(a.nodes) != len(b.nodes) or _shape(na) != _shape(nb):
            raise self.fail(node, f"residual add of tensors with shapes {tuple(_shape(na) or ())} "
                            f"and {tuple(_shape(nb) or ())} (broadcasting over channels)")
        if a.axis != b.axis:
            raise self.fail(node, f"adding tensors with channels in dims {a.axis} and {b.axis}")
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

    def cat(self, node: fx.Node, args: list[tuple[fx.Node, Value]]) -> Value:
        dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
        ndim = len(_shape(node) or ())
        tensors = node.args[0]
        if any(self.env.get(t) is None for t in tensors):
            raise self.fail(node, "concatenating a tensor without channel structure")
        values = [self.env[t] for t in tensors]
        axis = values[0].axis
        if ndim < 2 or dim % ndim != axis or any(v.axis != axis for v in values):
            raise self.fail(node, f"concatenation along dim {dim}; the channels are in dim "
                            f"{axis} (only concatenation along the channels is supported)")
        return Value(torch.cat([v.nodes for v in values]), False, 1, axis)

    def reshape(self, node: fx.Node, arg: fx.Node, value: Value) -> Value:
        self.channels_first(node, value, "a reshape")
        src, dst = _shape(arg), _shape(node)
        if src is not None and dst is not None and dst[:2] == src[:2] \
                and all(s == 1 for s in src[2:]) and all(d == 1 for d in dst[2:]):
            return self.passthrough(arg, value)
        raise self.fail(node, f"reshape from {tuple(src or ())} to {tuple(dst or ())} mixes the "
                        "channel dimension with others (flatten of a spatial map, view of channels)")

    def reduce_spatial(self, node: fx.Node, arg: fx.Node, value: Value) -> Value:
        dims = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
        ndim = len(_shape(arg) or ())
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if not dims or any(d % ndim in (0, value.axis) for d in dims):
            raise self.fail(node, f"reduction over dims {dims} touches batch or channels")
        return self.passthrough(arg, value)

    def scale(self, node: fx.Node, arg: fx.Node, value: Value) -> Value:
        others = [a for a in node.args if a is not arg]
        if all(isinstance(a, (int, float)) for a in others):
            return self.passthrough(arg, value)
        raise self.fail(node, "multiplying or dividing by a tensor (multiplicative gating)")

    # -- walk -----------------------------------------------------------------------------
    def step(self, node: fx.Node) -> Value | None:
        if node.op == "placeholder":
            if self.rec.num_nodes:
                raise self.fail(node, "networks with more than one input tensor")
            shape = _shape(node)
            if shape is None or len(shape) < 2:
                raise self.fail(node, "the input must be a tensor [batch, channels, ...]")
            self.rec.input_channels = shape[1]
            return Value(self.rec.new_nodes(shape[1]), False, 1)
        if node.op in ("get_attr", "output"):
            return None
        args = self.channel_args(node)
        if not args or _shape(node) is None:
            return None  # shape arithmetic and the like: no channels involved
        arg, value = args[0]
        target = node.target
        if node.op == "call_module":
            m = self.modules[target]
            handler = module_handler(type(m))
            if handler is None:
                raise self.fail(node, f"module type {type(m).__name__} is not supported "
                                "(graph.register_module adds a type)")
            return handler(self, node, m, arg, value)
        if target in (operator.add, operator.iadd, torch.add):
            return self.add(node, args)
        if target is torch.cat:
            return self.cat(node, args)
        if target in (operator.mul, operator.imul, operator.truediv, torch.mul):
            return self.scale(node, arg, value)
        if target in _PASSTHROUGH_FUNCTIONS or (node.op == "call_method"
                                                and target in _PASSTHROUGH_METHODS):
            return self.passthrough(arg, value)
        if target in _RESHAPES:
            return self.reshape(node, arg, value)
        if target in _MEAN:
            return self.reduce_spatial(node, arg, value)
        raise self.fail(node, "this operation on channel tensors is not supported")

    def run(self) -> TraceRecords:
        for node in self.gm.graph.nodes:
            self.env[node] = self.step(node)
        return self.rec


# -- the module registry: how each module type maps channels --------------------------------
ModuleHandler = Callable[[_Walker, fx.Node, nn.Module, fx.Node, Value], Value]
_MODULE_HANDLERS: dict[type, ModuleHandler] = {}


def register_module(*types: type, shape: LayerShape | None = None
                    ) -> Callable[[ModuleHandler], ModuleHandler]:
    """Decorator: ``handler(walker, node, module, arg, value) -> Value`` encodes modules of
    ``types`` (and their subclasses, unless a subclass has its own handler).

    The handler gets the walker (``new_nodes``, ``add_weight``, ``add_channels``,
    ``passthrough``, ``channels_first``, ``fail``), the fx node of the call, the module, the
    input node and its channel ``Value``, and returns the output's ``Value``. Registered types
    are traced as leaves: torch.fx records one call instead of inlining their forward.
    ``shape``: how the type's constructor attributes follow its tensors
    (``networks.LayerShape``), for a type whose tensors channel pruning resizes, so that
    network files and zoo manifests record it too. docs/graph.md has an example."""
    def register(handler: ModuleHandler) -> ModuleHandler:
        for t in types:
            _MODULE_HANDLERS[t] = handler
        if shape is not None:
            register_layer_shape(shape, *types)
        return handler
    return register


def module_handler(module_type: type) -> ModuleHandler | None:
    """The handler of ``module_type``: its own, else that of its nearest registered base."""
    return next((_MODULE_HANDLERS[t] for t in module_type.__mro__ if t in _MODULE_HANDLERS), None)


register_module(nn.modules.conv._ConvNd)(_Walker.conv)
register_module(nn.Linear)(_Walker.linear)
register_module(nn.modules.batchnorm._BatchNorm)(_Walker.batchnorm)
register_module(nn.Flatten)(lambda walker, node, m, arg, value: walker.reshape(node, arg, value))
register_module(*_PASSTHROUGH_MODULES)(lambda walker, node, m, arg, value: walker.passthrough(arg, value))


class _Tracer(fx.Tracer):
    """torch.fx's tracer, with every registered module type as a leaf."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return module_handler(type(m)) is not None or super().is_leaf_module(m, module_qualified_name)


def symbolic_trace(module: nn.Module) -> fx.GraphModule:
    """``module``'s fx graph, every registered module type one call (a leaf)."""
    try:
        return fx.GraphModule(module, _Tracer().trace(module), type(module).__name__)
    except Exception as e:
        raise UnsupportedArchitectureError(
            f"{type(module).__name__} cannot be traced with torch.fx ({type(e).__name__}: {e}); "
            "data-dependent control flow in forward() is not supported"
        ) from e


def trace(module: nn.Module, example_inputs: tuple[torch.Tensor, ...]) -> tuple[TraceRecords, set]:
    """Trace ``module`` on ``example_inputs``; returns the records and the keys they cover."""
    gm = symbolic_trace(module)
    was_training = module.training
    module.eval()  # shape propagation must not touch BN running statistics
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    finally:
        module.train(was_training)
    walker = _Walker(gm)
    return walker.run(), walker.used_keys

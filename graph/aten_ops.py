"""How each ATen operation maps channels, for :mod:`graph.aten_walk`: one handler per
operation, registered with :func:`register_aten`.

A handler ``handler(walker, node, args) -> Env`` gets the :class:`graph.aten_walk.AtenWalker`
(the fx walker's bookkeeping: ``convolution``, ``dense``, ``batch_norm``, ``add``, ...), the
exported fx node of the call and its ``(fx node, Value)`` arguments that carry channels, in
argument order; :func:`op_args` reads the call's arguments by their schema names. Handlers are
registered per operation (all overloads: ``aten.add`` covers ``add.Tensor`` and
``add.Scalar``); in-place variants (``relu_``) are operations of their own.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Callable, cast

import torch
from torch import fx

from .node_slots import BATCHNORM, GROUPNORM
from .tensor_ops import reduced_dims
from .walker_core import Env, Value, node_shape

if TYPE_CHECKING:
    from .aten_walk import AtenWalker

aten = torch.ops.aten
Args = list[tuple[fx.Node, Value]]
AtenHandler = Callable[["AtenWalker", fx.Node, Args], Env]
# per operation: the handler of calls on channel tensors (Value) and the handler of calls on
# an attention's split channels or scores (Split, Scores; graph/aten_attention.py)
_HANDLERS: dict[Any, AtenHandler] = {}
_HEAD_HANDLERS: dict[Any, AtenHandler] = {}


def register_aten(*ops: Any, heads: bool = False) -> Callable[[AtenHandler], AtenHandler]:
    """Decorator: ``handler(walker, node, args) -> Env`` encodes calls of the ATen operations
    ``ops`` (``torch.ops.aten.<name>``, all overloads); with ``heads``, the calls where an
    argument is a :class:`graph.walker_core.Split` or :class:`graph.walker_core.Scores`."""
    def register(handler: AtenHandler) -> AtenHandler:
        for op in ops:
            (_HEAD_HANDLERS if heads else _HANDLERS)[op] = handler
        return handler
    return register


# per operation: handlers of special cases (a sum over some of the channel dims, a
# convolution along the channels), tried in registration order before the operation's handler;
# each returns NOT_MINE where its case does not apply (graph/aten_radix.py)
_PATTERNS: dict[Any, list[AtenHandler]] = {}
NOT_MINE: Any = object()


def register_aten_pattern(*ops: Any) -> Callable[[AtenHandler], AtenHandler]:
    """Decorator: ``handler(walker, node, args)`` encodes the calls of ``ops`` (on channel
    tensors, :class:`graph.walker_core.Value`) that it recognises and returns ``NOT_MINE`` for
    the others, which go on to the next pattern, then to the handler of ``register_aten``. A
    special case thus lives in a module of its own without replacing the general handler."""
    def register(handler: AtenHandler) -> AtenHandler:
        for op in ops:
            _PATTERNS.setdefault(op, []).append(handler)
        return handler
    return register


def aten_handler(target: Any, heads: bool = False) -> AtenHandler | None:
    """The handler of call target ``target`` (an ATen operation overload), if registered;
    ``heads``: of its calls on split channels or scores."""
    packet = getattr(target, "overloadpacket", None)
    handler = (_HEAD_HANDLERS if heads else _HANDLERS).get(packet) if packet is not None else None
    patterns = [] if heads else _PATTERNS.get(packet, [])
    if not patterns:
        return handler

    def first_match(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
        for pattern in patterns:
            out = pattern(walker, node, args)
            if out is not NOT_MINE:
                return out
        if handler is None:
            raise walker.fail(node, "this operation on channel tensors is not supported")
        return handler(walker, node, args)
    return first_match


def _schema(node: fx.Node) -> torch.FunctionSchema:
    """The schema of an ATen call (handlers are only found for ATen operation overloads)."""
    return cast(torch._ops.OpOverload, node.target)._schema


def op_args(node: fx.Node) -> dict[str, Any]:
    """The arguments of an ATen call by schema name, defaults filled in."""
    out = {}
    for i, argument in enumerate(_schema(node).arguments):
        if i < len(node.args) and not argument.kwarg_only:
            out[argument.name] = node.args[i]
        elif argument.name in node.kwargs:
            out[argument.name] = node.kwargs[argument.name]
        elif argument.has_default_value():
            out[argument.name] = argument.default_value
    return out


def _with_variants(*names: str) -> list:
    """The operations ``names`` and their in-place variants (``relu`` and ``relu_``)."""
    return [getattr(aten, n) for name in names for n in (name, f"{name}_") if hasattr(aten, n)]


def _input(walker: AtenWalker, node: fx.Node, args: Args) -> tuple[fx.Node, Value]:
    """The channel argument of an operation on one tensor; refused if it reads any other
    tensor (PReLU's per-channel slopes, a weight computed from activations): such a tensor
    acts on the channels in a way the handler does not model."""
    arg, value = args[0]
    others = [n.name for n in node.all_input_nodes if n is not arg]
    if others:
        raise walker.fail(node, f"further tensor inputs {others} besides the channels")
    if arg is not node.args[0]:
        raise walker.fail(node, "the channels are not the operation's first argument")
    return arg, value


def _key(walker: AtenWalker, node: fx.Node, tensor: fx.Node | None) -> str | None:
    return None if tensor is None else walker.state_key(node, tensor)


def _result(node: fx.Node, value: Value) -> Env:
    """``value`` as the result of ``node``: a tuple (value, indices) for operations that also
    return indices (max pooling with indices)."""
    returns = len(_schema(node).returns)
    return value if returns == 1 else (value, *(None,) * (returns - 1))


@register_aten(*_with_variants(
    "relu", "relu6", "leaky_relu", "silu", "gelu", "hardswish", "hardsigmoid", "hardtanh",
    "sigmoid", "tanh", "elu", "selu", "celu", "mish", "softplus",
    "clone", "detach", "alias", "contiguous", "to"))
def _elementwise(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """Each element (or each sample) alone: any channel layout; a dtype cast is one too."""
    return walker.passthrough(*_input(walker, node, args))


@register_aten(*_with_variants("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout"))
def _dropout(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """The identity in eval mode; in training mode (``F.dropout(x, training=True)`` in an
    eval-mode network) random, which no graph holds."""
    if op_args(node)["train"]:
        raise walker.fail(node, "dropout in training mode")
    return walker.passthrough(*_input(walker, node, args))


@register_aten(aten._assert_tensor_metadata)
def _assertion(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """A check the export inserts (before a dtype cast): no result."""
    return None


@register_aten(*(getattr(aten, f"{kind}_pool{d}d") for kind in ("max", "avg", "adaptive_avg",
                                                                 "adaptive_max") for d in (1, 2, 3)),
               aten.max_pool2d_with_indices, aten.max_pool3d_with_indices)
def _pooling(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    return _result(node, walker.pooling(node, *_input(walker, node, args)))


_UPSAMPLING = (*(f"{kind}{d}d" for kind in ("upsample_nearest", "_upsample_nearest_exact")
                 for d in (1, 2, 3)),
               "upsample_linear1d", "upsample_bilinear2d", "upsample_bicubic2d",
               "upsample_trilinear3d", "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa")


@register_aten(*(getattr(aten, name) for name in _UPSAMPLING))
def _upsampling(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """Interpolation (``F.interpolate``: HRNet's fusion, GhostNetV2's attention map) resizes
    the dims after dim 1, each channel alone: its sizes and scales cannot reach the batch or
    the channels, which must be in dim 1, as for pooling."""
    return walker.pooling(node, *_input(walker, node, args))


@register_aten(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.squeeze,
               aten.unsqueeze)
def _reshape(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    return walker.reshape(node, *_input(walker, node, args))


@register_aten(aten.reshape_as, aten.view_as)
def _reshape_as(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """``x.reshape_as(y)`` is a reshape of ``x`` to ``y``'s shape (levit's norm of the
    flattened tokens, ``bn(x.flatten(0, 1)).reshape_as(x)``); ``y``, even a channel tensor,
    gives only its shape."""
    arg, value = args[0]
    if arg is not node.args[0]:
        raise walker.fail(node, "a tensor without channels reshaped to a channel tensor's shape")
    return walker.reshape(node, arg, value)


_REDUCTIONS = (aten.mean, aten.amax, aten.amin, aten.sum)


@register_aten(*_REDUCTIONS, aten.linalg_vector_norm)
def _reduce(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """Over dims other than batch and channels (``mean.dim``; ``mean.default`` reduces all)
    each channel alone. Over every channel dim (ConvNeXt V2's global response norm: the mean
    of the channels' norms), a function of all channels that treats each alike, so no
    channel permutation changes it: a tensor that follows no channel (``walker.invariant``),
    which only a division accepts (``_div``)."""
    arg, value = _input(walker, node, args)
    a = op_args(node)
    dims = reduced_dims(node_shape(arg), a.get("dim"))
    if 0 not in dims and set(value.dims) <= set(dims):
        walker.invariant.add(node)
        return None
    if dims == [0] and _stacked_first(arg):  # over the operands of a stack: each channel alone
        return replace(walker.passthrough(arg, value), axis=value.axis - (not a.get("keepdim")))
    return walker.reduce_dims(node, arg, value, dims, a.get("keepdim", False))


def _stacked_first(tensor: fx.Node) -> bool:
    """Does ``tensor`` stack tensors along a new dim 0, before their batch?"""
    return (getattr(tensor.target, "overloadpacket", None) is aten.stack
            and op_args(tensor)["dim"] % len(node_shape(tensor) or (0,)) == 0)


@register_aten(aten.stack)
def _stack(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """``stack(xs, dim)`` is a concatenation of the ``xs`` along a new dim: channel i of every
    operand is channel i of the result, so they permute alike (``cat_along``). A new dim 0
    lies before the batch, which a channel tensor cannot hold; it is accepted where only
    reductions over it read the result (CrossViT averages its branches' logits,
    ``mean(stack(logits), 0)``): a function of channel i of each operand alone."""
    tensors = op_args(node)["tensors"]
    dim = op_args(node)["dim"] % len(node_shape(node) or (0,))
    values = [v for v in (walker.env.get(t) for t in tensors) if isinstance(v, Value)]
    if len(values) != len(tensors):
        raise walker.fail(node, "stacking tensors without channels with channel tensors")
    if dim == 0 and not all(getattr(user.target, "overloadpacket", None) in _REDUCTIONS
                            and reduced_dims(node_shape(node), op_args(user).get("dim")) == [0]
                            for user in node.users):
        raise walker.fail(node, "a stack along a new dim before the batch that is read other "
                          "than by a reduction over that dim")
    moved = [replace(v, axis=v.axis + (dim <= v.axis)) for v in values]
    return walker.cat_along(node, list(tensors), moved, moved[0])


@register_aten(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
def _softmax(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """Over a dim other than batch and channels (GCNet's attention map over the positions)
    each channel alone. Over the channels every output depends on every channel; it is no
    reduction the graph models, so it is refused."""
    arg, value = _input(walker, node, args)
    dim = op_args(node)["dim"] % len(node_shape(arg) or (0,))
    if dim == 0 or dim in value.dims:
        raise walker.fail(node, f"a softmax over dim {dim}, the batch or a channel dim "
                          f"(channels in dims {list(value.dims)})")
    return walker.passthrough(arg, value)


@register_aten(aten.matmul, aten.bmm)
def _matmul(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """``a @ b`` of a channel tensor and a map of one channel (GCNet's context: x [B, 1, C,
    HW] @ softmax(conv(x)) [B, 1, HW, 1]): every channel weighted by the same map, summed
    over what the product sums (not the channels), so each channel alone, and the map, of one
    channel, has nothing to permute: the result keeps the channels' nodes, the map's node is
    tied to none. Refused where the channels are summed, where the other operand is no
    one-channel tensor or where it has an entry per channel (it could single one out)."""
    if len(args) != 2 or [arg for arg, _ in args] != list(node.args[:2]):
        raise walker.fail(node, "a matrix product of a channel tensor and a tensor without "
                          "channels")
    shapes = [tuple(node_shape(n) or ()) for n in (args[0][0], args[1][0], node)]
    if len({len(shape) for shape in shapes}) != 1:
        raise walker.fail(node, f"a matrix product of shapes {shapes[0]} and {shapes[1]} that "
                          "adds dims (the batch would move)")
    summed = (len(shapes[0]) - 1, len(shapes[0]) - 2)  # a's last dim, b's second last
    for i in (0, 1):
        (arg, value), (_, other), shape = args[i], args[1 - i], shapes[1 - i]
        broadcast = all(shape[d] == 1 for d in value.dims if d < len(shape) - 2)
        if len(other.nodes) == 1 and summed[i] not in value.dims and broadcast:
            return walker.passthrough(arg, value)
    raise walker.fail(node, "a matrix product that sums over channels, or of two tensors "
                      "with several channels each")


@register_aten(aten.split, aten.split_with_sizes, aten.chunk)
def _split(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    arg, value = _input(walker, node, args)
    return walker.pieces(node, arg, value, op_args(node)["dim"],
                         [piece.shape for piece in node.meta["val"]])


@register_aten(aten.cat, aten.concat, aten.concatenate)
def _cat(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    return walker.cat(node, args)


@register_aten(*_with_variants("add"))
def _add(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """A residual add, or a parameter or number added (``x + alpha * y`` only with alpha 1:
    a scaled operand is no identity edge)."""
    if op_args(node).get("alpha", 1) != 1:
        raise walker.fail(node, "an addition with a scaled operand (alpha != 1)")
    return _with_scalar(walker, node, args) or walker.add(node, args)


@register_aten(*_with_variants("sub", "rsub"))
def _sub(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """A difference (poolformer's ``pool(x) - x``; ``rsub(a, b)`` is ``b - a``), alpha 1:
    ``TensorOps.subtract``."""
    if op_args(node).get("alpha", 1) != 1:
        raise walker.fail(node, "a difference with a scaled operand (alpha != 1)")
    rsub = getattr(node.target, "overloadpacket", None) is aten.rsub
    return _with_scalar(walker, node, args) or walker.subtract(node, args, 0 if rsub else 1)


@register_aten(*_with_variants("mul"))
def _mul(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    return _with_scalar(walker, node, args) or walker.multiply(node, args)


def _with_scalar(walker: AtenWalker, node: fx.Node, args: Args) -> Value | None:
    """``x * s`` or ``x + s`` with a one-element parameter ``s`` (timm's learnable affine
    block): every channel alike, so any channel permutation keeps it. ``s`` follows no
    channel: a passenger without nodes, which the metanetwork leaves as it was. None when
    ``node`` is not that (a tensor of one channel keeps the fx walk's per-channel reading)."""
    if len(args) != 1:
        return None
    arg, value = args[0]
    others = [a for a in (*node.args, *node.kwargs.values()) if a is not arg]
    if len(others) != 1 or len(value.nodes) == 1:
        return None
    key = walker.parameter_key(others[0])
    if key is None or math.prod(node_shape(others[0]) or ()) != 1:
        return None
    walker.carry(node, key)
    return walker.passthrough(arg, value)


@register_aten(*_with_variants("addcmul"))
def _addcmul(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """``addcmul(b, a, x) = b + a * x`` with parameters ``a`` and ``b`` of one entry per
    channel (resmlp's ``Affine``): the per-channel scale ``x * a`` (node features of kind
    ``scale``) then the parameter ``b`` added (a passenger), as the walker encodes those two
    operations written apart."""
    if len(args) != 1:
        raise walker.fail(node, "addcmul of several channel tensors")
    arg, value = args[0]
    a = op_args(node)
    factors = [t for t in (a["tensor1"], a["tensor2"]) if t is not arg]
    if a["value"] != 1 or a["self"] is arg or len(factors) != 1:
        raise walker.fail(node, "addcmul other than parameter + parameter * channels "
                          "(with value 1)")
    if walker.parameter_key(factors[0]) is None:
        raise walker.fail(node, f"addcmul multiplies the channels by {factors[0]}, which is "
                          "not a parameter of the network")
    scaled = walker.channel_scale(node, arg, value, factors[0])
    walker.add_passenger(node, a["self"], value)
    return scaled


@register_aten(*_with_variants("div"))
def _div(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """By a number, or by an invariant tensor (``_reduce``) with one entry for all channels
    (size 1 along the channel dims): every channel divided alike by what no channel
    permutation changes. A divisor computed from parameters is refused: it may single out
    channels (``x / w[0]``)."""
    arg, value = args[0]
    divisor = node.args[1] if len(args) == 1 and arg is node.args[0] else None
    if isinstance(divisor, fx.Node) and divisor in walker.invariant and _alike_for_all_channels(
            node, divisor, value):
        return walker.passthrough(arg, value)
    return walker.divide(node, args)


def _alike_for_all_channels(node: fx.Node, tensor: fx.Node, value: Value) -> bool:
    """Does ``tensor``, broadcast against ``node``'s output, give each of ``value``'s channel
    dims a single entry?"""
    shape = node_shape(tensor)
    if shape is None:
        return False
    offset = len(node_shape(node) or ()) - len(shape)
    return all(d - offset < 0 or shape[d - offset] == 1 for d in value.dims)


@register_aten(aten.linear)
def _linear(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    arg, value = args[0]
    a = op_args(node)
    if arg is not a["input"]:
        raise walker.fail(node, "a linear map whose weight carries channels")
    shape = node_shape(arg)
    if shape is not None and len(shape) - 1 not in value.dims:
        return _token_mixing(walker, node, arg, value, a)
    weight = walker.state_key(node, a["weight"])
    out_features = (node_shape(a["weight"]) or (0,))[0]
    return walker.dense(node, arg, value, out_features, weight, _key(walker, node, a["bias"]))


def _token_mixing(walker: AtenWalker, node: fx.Node, arg: fx.Node, value: Value,
                  a: dict[str, Any]) -> Env:
    """A linear map of the last dim when that holds no channels (MLP-Mixer's and ResMLP's
    token MLPs, on [B, C, N]): the same weight for every channel, so any channel permutation
    keeps it and it connects no channels. Its weight and bias follow no channel: passengers
    without nodes, decoded as they were (the metanetwork does not change them)."""
    for tensor in (a["weight"], a["bias"]):
        if tensor is not None:
            walker.carry(node, walker.state_key(node, tensor))
    return walker.passthrough(arg, value)


@register_aten(aten.batch_norm)
def _batch_norm(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """A BatchNorm module, ``F.batch_norm`` in a subclass's forward, any batch norm: its
    present tensors are node features."""
    arg, value = args[0]
    a = op_args(node)
    if arg is not a["input"]:
        raise walker.fail(node, "a batch norm whose parameters carry channels")
    present = [name for name in BATCHNORM.fields if a[name] is not None]
    keys = {name: walker.state_key(node, a[name]) for name in present}
    features = (node_shape(a[present[0]]) or (0,))[0] if present else len(value.nodes)
    return walker.batch_norm(node, arg, value, "a batch norm", features, keys)


@register_aten(aten.layer_norm)
def _layer_norm(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    arg, value = args[0]
    a = op_args(node)
    if arg is not a["input"]:
        raise walker.fail(node, "a layer norm whose parameters carry channels")
    return walker.layer_norm(node, arg, value, a["normalized_shape"],
                             _key(walker, node, a["weight"]), _key(walker, node, a["bias"]))


@register_aten(aten.select)
def _select(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """One index along a dim other than the batch and the channels (a ViT's class token,
    ``x[:, 0]``) keeps every channel; the dims after it move one down."""
    arg, value = _input(walker, node, args)
    dim = op_args(node)["dim"] % len(node_shape(arg) or (0,))
    if dim == 0 or dim in value.dims:
        raise walker.fail(node, f"selecting one index of dim {dim}, the batch or a channel dim "
                          f"(channels in dims {list(value.dims)})")
    return replace(walker.passthrough(arg, value), axis=value.axis - (dim < value.axis))


@register_aten(aten.slice)
def _slice(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """A slice along the channels selects channels: those channels' nodes, as a piece of a
    split (rexnet's ``x[:, :c] + shortcut``, ghostnet's ``out[:, :c]``); along another dim
    (not the batch) it keeps every channel."""
    arg, value = _input(walker, node, args)
    a = op_args(node)
    shape = node_shape(arg) or ()
    dim = a["dim"] % max(len(shape), 1)
    if dim not in value.dims:
        if dim == 0 and node_shape(node) != shape:
            raise walker.fail(node, "a slice of the batch")
        return walker.passthrough(arg, value)
    walker.one_axis(node, value, "a slice along the channels")
    nodes = value.nodes[slice(a["start"], a["end"], a["step"])]
    return Value(nodes, False, value.area, value.axis)


@register_aten(aten.pad, aten.constant_pad_nd)
def _pad(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """Padding (timm's "same" padding before a convolution) acts on each channel alone when it
    pads neither the batch nor the channel dims: ``pad`` lists (before, after) pairs from the
    last dim."""
    arg, value = _input(walker, node, args)
    ndim = len(node_shape(arg) or ())
    pad = op_args(node)["pad"]
    padded = {ndim - 1 - i // 2 for i, amount in enumerate(pad) if amount}
    if padded & {0, *value.dims}:
        raise walker.fail(node, f"padding {list(pad)} reaches the batch or the channel dims "
                          f"{list(value.dims)}")
    return walker.passthrough(arg, value)


@register_aten(aten.group_norm)
def _group_norm(walker: AtenWalker, node: fx.Node, args: Args) -> Env:
    """A group norm normalizes each run of C/G consecutive channels (dim 1) together: a
    channel may move within its group, or with its whole group, but not alone to another
    group. So, as an attention's heads, each group gets a node with a featureless membership
    edge to each of its channels; weight and bias are node features of kind ``groupnorm``."""
    arg, value = args[0]
    a = op_args(node)
    if arg is not a["input"]:
        raise walker.fail(node, "a group norm whose parameters carry channels")
    walker.channels_first(node, value, "a group norm")
    groups = a["num_groups"]
    for name in GROUPNORM.fields:
        if a[name] is not None:
            walker.add_channels(node, walker.state_key(node, a[name]), GROUPNORM.name, name,
                                value.nodes)
    walker.rec.memberships.append((walker.new_nodes(groups)[:, None], value.nodes.reshape(groups, -1)))
    return walker.passthrough(arg, value)

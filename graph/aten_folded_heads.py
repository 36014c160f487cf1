"""Heads cut from the channels of a [B, C, H, W] map and folded into the batch (timm's
``BottleneckAttn``), Swin's patch merging and shifted windows: reshapes, rolls and permutes of
channel tensors in the ATen walk (the overview: graph/aten_position.py)."""
from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from torch import fx

from . import aten_attention  # noqa: F401 - its handlers first: some of ours wrap them
from .aten_ops import op_args, register_aten
from .aten_position_sources import RESHAPES, aten, packet_of, registered, reshaped_dim, shape_of
from .errors import UnsupportedArchitectureError
from .walker_core import Env, Scores, Split, Value, swap_dims

if TYPE_CHECKING:
    from .aten_walk import AtenWalker


def reshape_folded(walker: AtenWalker, node: fx.Node, arg: fx.Node, env: Split,
                   src: tuple[int, ...], dst: tuple[int, ...]) -> Env:
    """Heads folded into the batch: a reshape that keeps that dim and the head's channel dim
    follows them; ``[B * heads, d, *map] -> [B, heads * d, *map]`` unfolds them."""
    heads, size = env.nodes.shape
    fresh = env.fresh and len(arg.users) == 1
    channel = env.dims[1]
    if dst[0] == src[0]:
        kept = reshaped_dim(dst, src, channel)
        if kept is not None and kept > 0:
            return Split(env.nodes, (0, kept), 0, fresh, env.area)
    if (channel == 1 and len(dst) >= 2 and dst[0] * heads == src[0] and dst[1] == heads * size
            and math.prod(dst[2:]) == math.prod(src[2:])):
        return Value(env.nodes.reshape(-1), fresh, env.area, 1)
    raise walker.fail(node, f"reshape from {src} to {dst} of channels whose heads are folded "
                      "into the batch mixes them with other dims")


# -- folding heads into the batch, patch merging: reshapes of channel tensors ---------------
_plain_reshape = registered(aten.reshape)


@register_aten(*RESHAPES)
def _reshape(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """What the walk's reshape accepts; where it refuses, heads folded into the batch or
    merged patches."""
    assert _plain_reshape is not None
    try:
        return _plain_reshape(walker, node, args)
    except UnsupportedArchitectureError:
        arg: fx.Node = args[0][0]
        value = args[0][1]
        if (len(args) != 1 or arg is not node.args[0] or not isinstance(value, Value)
                or value.nodes.dim() != 1 or value.spread != 1):
            raise
        src, dst = shape_of(arg), shape_of(node)
        fold = _folded_heads(src, dst, value)
        if fold:
            fresh = (value.fresh or _fresh_piece(walker, arg)) and len(arg.users) == 1
            return Split(value.nodes.view(fold, -1), (0, 1), 0, fresh, value.area)
        merged = _merged_patches(src, dst, value.axis)
        if merged:
            return replace(walker.passthrough(arg, value), axis=merged[0], spread=merged[1],
                           outer=True)
        raise


def _fresh_piece(walker: AtenWalker, piece: fx.Node) -> bool:
    """Is ``piece`` a piece of a split along the channels of a layer's output that nothing
    else reads (BotNet's ``q, k, v = torch.split(qkv(x), ...)``)? A piece is never fresh in
    the walk (its channels are only part of a layer's), but an attention may still take all
    the pieces back as its input projection: it checks that they are all the layer's rows."""
    split = piece.args[0] if piece.target is operator.getitem else None
    if not isinstance(split, fx.Node) or packet_of(split) not in (aten.split, aten.split_with_sizes,
                                                                  aten.chunk):
        return False
    source = split.args[0]
    env = walker.env.get(source) if isinstance(source, fx.Node) else None
    return (isinstance(source, fx.Node) and isinstance(env, Value) and env.fresh and len(source.users) == 1
            and op_args(split)["dim"] % len(shape_of(source)) in env.dims)


def _folded_heads(src: tuple[int, ...], dst: tuple[int, ...], value: Value) -> int:
    """``[B, C, *map] -> [B * heads, C / heads, *map']`` (channel h * d + i goes to sample
    b * heads + h, entry i of dim 1, in row-major order): the number of heads, else 0."""
    if value.axis != 1 or len(src) < 2 or len(dst) < 2 or dst[0] % src[0]:
        return 0
    heads = dst[0] // src[0]
    if heads < 2 or dst[1] * heads != len(value.nodes) or math.prod(dst[2:]) != math.prod(src[2:]):
        return 0
    return heads


def _merged_patches(src: tuple[int, ...], dst: tuple[int, ...], axis: int
                    ) -> tuple[int, int] | None:
    """Swin's patch merging, ``[B, H/2, W/2, 2, 2, C].flatten(3)``: dims just before the
    channels (not the batch) merged into them, the channels innermost, so channel c of
    neighbour j is entry j * C + c. Returns the channel dim and the neighbours per channel."""
    channels = src[axis]
    for start in range(1, axis):
        count = math.prod(src[start:axis])
        if (count > 1 and len(dst) > start and dst[start] == count * channels
                and dst[:start] == src[:start] and dst[start + 1:] == src[axis + 1:]):
            return start, count
    return None


@register_aten(aten.roll)
def _roll(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """A cyclic shift (Swin's shifted windows) of dims other than batch and channels moves
    positions, each channel alike."""
    (arg, value), = args
    dims = op_args(node)["dims"]
    ndim = len(shape_of(arg))
    if not dims or {d % ndim for d in dims} & {0, *value.dims}:
        raise walker.fail(node, f"a roll of dims {list(dims)} (the batch, a channel dim, or "
                          "the flattened tensor)")
    return walker.passthrough(arg, value)


def _folded_move(earlier: Any) -> Any:
    """Heads folded into the batch stay in dim 0: a permute that moves it would leave the
    batch among the channel dims, which no operation reads."""
    def handler(walker: AtenWalker, node: fx.Node, args: list) -> Env:
        env = args[0][1]
        if isinstance(env, (Split, Scores)) and env.batch in (getattr(env, "dims", ()) or (
                getattr(env, "head", None),)):
            shape, a = shape_of(args[0][0]), op_args(node)
            perm = ([d % len(shape) for d in a["dims"]] if "dims" in a
                    else swap_dims(len(shape), a["dim0"], a["dim1"]))
            if perm[0] != 0:
                raise walker.fail(node, f"permutation {perm} moves heads folded into the batch")
        return earlier(walker, node, args)
    return handler


for _op in (aten.permute, aten.transpose):
    register_aten(_op, heads=True)(_folded_move(registered(_op, heads=True)))

"""Attention with position terms added to its scores, and self-attention over conv feature
maps, in the ATen walk (docs/graph.md, "Position terms in attention").

Three patterns, each recorded so that the graph's symmetries stay the network's:

* **A per-head bias added to the scores** (timm's Swin: ``table[index].view(N, N, -1)
  .permute(2, 0, 1).unsqueeze(0)``; EfficientFormerV2: ``biases[:, index]``): a parameter read
  through gathers of other dims, reshapes and permutes that keep its head dim whole. Head h
  of the bias meets only head h of the scores, so the table permutes with the heads: a
  passenger of the head nodes (as the fx walk has torchvision's Swin), recorded once the
  attention makes them. A term that is the same for every head (Swin's shifted-window mask,
  a buffer) follows nothing. Scores reshaped over their batch and token dims (Swin's
  ``attn.view(-1, windows, heads, N, N)`` for the mask) keep their heads.
* **Heads cut from the channels of a [B, C, H, W] map and folded into the batch** (timm's
  ``BottleneckAttn``: ``q.reshape(B * heads, head size, H * W)``): the channels become a
  :class:`Split` whose head dim is the batch dim (batch outermost); reshapes that keep that
  dim and the head's channel dim follow it, ``reshape(B, C, H, W)`` unfolds it again.
* **Relative position logits** (BotNet's ``PosEmbedRel``): ``q @ rel.transpose(-1, -2)``
  with a table ``rel`` [positions, head size] shared by every head, then pads, slices,
  reshapes, expands and permutes over the tokens, added to the scores. Entry d of every
  position vector multiplies channel d of every head's queries, so a permutation of a head's
  query/key channels keeps the network only if it is the same in every head and moves the
  table's entries with it. Head nodes alone allow a different one per head, so each channel
  index d gets a node of its own with a featureless membership edge to channel d of every
  head: a graph automorphism must then permute the channels of all heads alike, and the
  tables are passengers of these index nodes. Whole heads still permute freely.

Anything else that meets scores or logits stays refused (graph/aten_attention.py).
"""
from __future__ import annotations

import math
import operator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import fx

from . import aten_attention  # noqa: F401 - its handlers first: some of ours wrap them
from .aten_ops import aten_handler, op_args, register_aten
from .errors import UnsupportedArchitectureError
from .walker_core import Env, Logits, Scores, Split, Value, node_shape, swap_dims

if TYPE_CHECKING:
    from .aten_walk import AtenWalker

aten = torch.ops.aten
_COPIES = (aten.clone, aten.contiguous, aten.alias, aten.detach, aten.to, aten._to_copy,
           aten.lift_fresh_copy)
_RESHAPES = (aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unsqueeze,
             aten.squeeze)


def _registered(op: Any, heads: bool = False):
    """The handler registered so far for ATen operation ``op`` (a packet: all overloads)."""
    return aten_handler(getattr(op, op.overloads()[0]), heads)


def _packet(node: Any) -> Any:
    return getattr(getattr(node, "target", None), "overloadpacket", None)


def _shape(node: Any) -> tuple[int, ...]:
    return tuple(node_shape(node) or ())


# -- terms computed from the weights alone ---------------------------------------------------
def _from_weights(walker: AtenWalker, tensor: fx.Node) -> bool:
    """Is ``tensor`` computed from parameters, buffers and constants alone (not from the
    network's input)?"""
    seen, stack = set(), [tensor]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        if walker.env.get(n) is not None or n in walker.invariant or n.name in walker.user_inputs:
            return False
        stack += n.all_input_nodes
    return True


def _reshaped_dim(src: tuple[int, ...], dst: tuple[int, ...], dim: int) -> int | None:
    """The dim of ``src`` that a reshape to ``dst`` keeps whole as ``dst[dim]`` (as many
    elements before it, the same size), if any."""
    before = math.prod(dst[:dim])
    for j, size in enumerate(src):
        if size == dst[dim] and math.prod(src[:j]) == before:
            return j
    return None


def _indexed_dim(node: fx.Node, dim: int) -> int | None:
    """For ``aten.index.Tensor(t, indices)``: the dim of ``t`` that output dim ``dim`` is, or
    None when ``dim`` is one of the gathered (index tensor) dims."""
    indices = op_args(node)["indices"]
    src, out = _shape(node.args[0]), _shape(node)
    where = [i for i, t in enumerate(indices) if t is not None]
    index_ndim = len(out) - (len(src) - len(where))
    rest = [d for d in range(len(src)) if d not in where]
    if where == list(range(where[0], where[-1] + 1)):  # adjacent: gathered dims in place
        first = where[0]
        if dim < first:
            return dim
        if dim < first + index_ndim:
            return None
        return rest[first + (dim - first - index_ndim)]
    return None if dim < index_ndim else rest[dim - index_ndim]


def _per_head_source(walker: AtenWalker, node: fx.Node, tensor: fx.Node, dim: int
                     ) -> tuple[str, int]:
    """Follow dim ``dim`` of ``tensor`` (a term added to the scores, computed from the
    weights) back to the parameter it is a dim of: through copies, reshapes and permutes
    that keep it whole, and through gathers (``table[index]``) of other dims by integer
    index tensors. Returns the parameter's state-dict key and dim; refused otherwise."""
    while True:
        if tensor.op == "placeholder":
            if tensor.name not in walker.parameters:
                raise walker.fail(node, f"a position term added to attention scores read from "
                                  f"{tensor.name!r}, which is not a parameter of the network")
            return walker.keys[tensor.name], dim
        packet = _packet(tensor)
        src = tensor.args[0] if tensor.args else None
        if tensor.op != "call_function" or not isinstance(src, fx.Node):
            raise walker.fail(node, f"a position term added to attention scores computed by "
                              f"{tensor.name!r} ({tensor.target})")
        nxt: int | None = dim
        if packet in _COPIES:
            pass
        elif packet is aten.permute:
            nxt = [d % len(_shape(tensor)) for d in op_args(tensor)["dims"]][dim]
        elif packet is aten.transpose:
            a = op_args(tensor)
            nxt = swap_dims(len(_shape(tensor)), a["dim0"], a["dim1"])[dim]
        elif packet in _RESHAPES:
            nxt = _reshaped_dim(_shape(src), _shape(tensor), dim)
        elif packet is aten.expand:
            nxt = dim - (len(_shape(tensor)) - len(_shape(src)))
            if nxt < 0 or _shape(src)[nxt] != _shape(tensor)[dim]:
                nxt = None
        elif packet is aten.index:
            indices = [t for t in op_args(tensor)["indices"] if t is not None]
            if not all(isinstance(t, fx.Node) and _from_weights(walker, t)
                       and getattr(t.meta.get("val"), "dtype", None) in (torch.long, torch.int)
                       for t in indices):
                raise walker.fail(node, f"a position term gathered by {tensor.name!r} with "
                                  "index tensors other than integer constants")
            nxt = _indexed_dim(tensor, dim)
        elif packet in (aten.mul, aten.div) and not isinstance(tensor.args[1], fx.Node):
            pass
        else:
            raise walker.fail(node, f"a position term added to attention scores computed by "
                              f"{tensor.name!r} ({tensor.target}), which the walk does not "
                              "follow back to a parameter")
        if nxt is None:
            raise walker.fail(node, f"{tensor.name!r} ({tensor.target}) mixes the head (or "
                              "channel) dim of a term added to attention scores with others")
        tensor, dim = src, nxt


# -- the scores: terms added, reshapes -------------------------------------------------------
def _slabs(shape: tuple[int, ...], head: int, batch: int) -> int | None:
    """The (sample, head) pairs outermost in a tensor with heads in dim ``head`` and the batch
    in dim ``batch``: heads folded into the batch, or the batch then the heads."""
    if batch != 0 or head not in (0, 1):
        return None
    return math.prod(shape[:head + 1])


_earlier_add = _registered(aten.add, heads=True)  # another module's, if any: the fallback


@register_aten(aten.add, aten.add_, heads=True)
def _add(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    if op_args(node).get("alpha", 1) != 1:
        raise walker.fail(node, "an addition with a scaled operand (alpha != 1) on attention "
                          "scores or position logits")
    envs = [env for _, env in args]
    if len(args) == 2 and all(isinstance(e, Logits) for e in envs):
        return _logits_sum(walker, node, args)
    if len(args) == 2 and {type(e) for e in envs} == {Scores, Logits}:
        return _scores_plus_logits(walker, node, args)
    if len(args) != 1 or not isinstance(envs[0], Scores):
        if _earlier_add is not None:
            return _earlier_add(walker, node, args)
        raise walker.fail(node, "an addition of attention scores, queries, keys or values to "
                          "other channel tensors")
    (arg, scores), = args
    others = [a for a in node.args[:2] if a is not arg]
    if len(others) != 1 or not isinstance(others[0], fx.Node):
        raise walker.fail(node, "an addition to attention scores of anything but one tensor")
    term = others[0]
    if not _from_weights(walker, term):
        raise walker.fail(node, f"{term.name!r}, added to attention scores, depends on the "
                          "network's input")
    shape, out = _shape(term), _shape(node)
    if out != _shape(arg):
        raise walker.fail(node, "a term that broadcasts the attention scores to a larger shape")
    dim = scores.head - (len(out) - len(shape))
    fresh = scores.fresh and len(arg.users) == 1
    if dim < 0 or shape[dim] == 1:
        # the same for every head (Swin's shifted-window mask): no head permutation or
        # channel permutation changes it; a parameter or persistent buffer it reads is left
        # unused and so refused by NetworkGraph (it would need a record of its own)
        return replace(scores, fresh=fresh)
    if scores.head == scores.batch:
        raise walker.fail(node, "a per-head term added to attention scores whose heads are "
                          "folded into the batch (its entries would be per sample and head)")
    if shape[dim] != out[scores.head]:
        raise walker.fail(node, f"a term of shape {shape} added to attention scores of shape "
                          f"{out} with heads in dim {scores.head}")
    key, table_dim = _per_head_source(walker, node, term, dim)
    return replace(scores, fresh=fresh, followers=(*scores.followers, (key, "heads", table_dim)))


def _scores_plus_logits(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """Scores plus relative position logits of the same queries, slab by slab."""
    (na, scores), (nb, logits) = args if isinstance(args[0][1], Scores) else args[::-1]
    shape = _shape(node)
    if not _shape(na) == _shape(nb) == shape:
        raise walker.fail(node, "position logits that broadcast against the attention scores")
    if _slabs(shape, scores.head, scores.batch) != logits.slabs or not torch.equal(
            scores.queries, logits.queries):
        raise walker.fail(node, "position logits of other queries, or laid out over (sample, "
                          "head) otherwise than the attention scores they are added to")
    followers = tuple((key, "channels", dim) for key, dim in logits.tables)
    return replace(scores, fresh=_queries_only_here(walker, node, na, nb),
                   followers=(*scores.followers, *followers))


def _queries_only_here(walker: AtenWalker, node: fx.Node, scores: fx.Node, logits: fx.Node
                       ) -> bool:
    """The queries feed both the scores and the position logits, so the scores' own
    freshness (every tensor on the way read once) is false. They are as fresh as an
    attention needs when the queries and keys were fresh and everything computed from them
    up to ``node`` flows into ``node`` alone: then no other layer reads them."""
    made = scores
    while _packet(made) is not aten.matmul:  # the scores scaled by numbers, or copied
        if len(made.users) != 1 or not made.all_input_nodes:
            return False
        made = made.all_input_nodes[0]
    q, k = made.args[:2]
    if not (isinstance(q, fx.Node) and isinstance(k, fx.Node)):
        return False
    env_q, env_k = walker.env.get(q), walker.env.get(k)
    if not (getattr(env_q, "fresh", False) and getattr(env_k, "fresh", False)
            and len(k.users) == 1):
        return False
    inside, stack = {q}, [q]
    while stack:
        for user in stack.pop().users:
            if user is node or user in inside:
                continue
            inside.add(user)
            stack.append(user)
    return all(isinstance(walker.env.get(n), (Scores, Logits, Split)) or n in (made, scores)
               for n in inside)


_earlier_head_reshape = _registered(aten.reshape, heads=True)


@register_aten(*_RESHAPES, heads=True)
def _reshape_heads(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    (arg, env), = args
    src, dst = _shape(arg), _shape(node)
    if isinstance(env, Logits):
        return replace(env, fresh=False)  # row-major order: every slab stays whole
    if isinstance(env, Scores):
        head = _reshaped_dim(dst, src, env.head)
        if env.batch != 0 or env.head == 0 or head in (None, 0):
            raise walker.fail(node, f"reshape from {src} to {dst} mixes the heads of attention "
                              "scores with other dims")
        # what lies before the heads (batch and windows) stays outside them: the batch
        return replace(env, head=head, batch=0, fresh=env.fresh and len(arg.users) == 1)
    if isinstance(env, Split) and env.batch == env.dims[0] == 0 and env.nodes.dim() == 2:
        return _reshape_folded(walker, node, arg, env, src, dst)
    if _earlier_head_reshape is not None:
        return _earlier_head_reshape(walker, node, args)
    raise walker.fail(node, f"reshape from {src} to {dst} of channels that an earlier permute "
                      "moved apart")


def _reshape_folded(walker: AtenWalker, node: fx.Node, arg: fx.Node, env: Split,
                    src: tuple[int, ...], dst: tuple[int, ...]) -> Env:
    """Heads folded into the batch: a reshape that keeps that dim and the head's channel dim
    follows them; ``[B * heads, d, *map] -> [B, heads * d, *map]`` unfolds them."""
    heads, size = env.nodes.shape
    fresh = env.fresh and len(arg.users) == 1
    channel = env.dims[1]
    if dst[0] == src[0]:
        kept = _reshaped_dim(dst, src, channel)
        if kept is not None and kept > 0:
            return Split(env.nodes, (0, kept), 0, fresh, env.area)
    if (channel == 1 and len(dst) >= 2 and dst[0] * heads == src[0] and dst[1] == heads * size
            and math.prod(dst[2:]) == math.prod(src[2:])):
        return Value(env.nodes.reshape(-1), fresh, env.area, 1)
    raise walker.fail(node, f"reshape from {src} to {dst} of channels whose heads are folded "
                      "into the batch mixes them with other dims")


# -- folding heads into the batch, patch merging: reshapes of channel tensors ---------------
_plain_reshape = _registered(aten.reshape)


@register_aten(*_RESHAPES)
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
        src, dst = _shape(arg), _shape(node)
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
    if not isinstance(split, fx.Node) or _packet(split) not in (aten.split, aten.split_with_sizes,
                                                               aten.chunk):
        return False
    source = split.args[0]
    env = walker.env.get(source) if isinstance(source, fx.Node) else None
    return (isinstance(source, fx.Node) and isinstance(env, Value) and env.fresh and len(source.users) == 1
            and op_args(split)["dim"] % len(_shape(source)) in env.dims)


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
    ndim = len(_shape(arg))
    if not dims or {d % ndim for d in dims} & {0, *value.dims}:
        raise walker.fail(node, f"a roll of dims {list(dims)} (the batch, a channel dim, or "
                          "the flattened tensor)")
    return walker.passthrough(arg, value)


# -- relative position logits ---------------------------------------------------------------
_head_matmul = _registered(aten.matmul, heads=True)


@register_aten(aten.matmul, heads=True)
def _matmul(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """``q @ table``: relative position logits; ``scores @ v`` whose scores carry position
    terms: the attention (graph/aten_attention.py), then the terms recorded on its nodes."""
    assert _head_matmul is not None
    if len(args) == 1 and isinstance(args[0][1], Split) and args[0][0] is node.args[0]:
        return _position_logits(walker, node, *args[0])
    scores = args[0][1]
    if not isinstance(scores, Scores) or not scores.followers:
        return _head_matmul(walker, node, args)
    before = len(walker.rec.memberships)
    out = _head_matmul(walker, node, args)
    made = walker.rec.memberships[before:]
    head_nodes = made[0][0].reshape(-1) if made else None  # none in the paper's layout
    index_nodes = None
    for key, follows, dim in scores.followers:
        if head_nodes is None:
            walker.carry(node, key)  # no heads to follow: the layout cannot tell them apart
            continue
        if follows == "heads":
            walker.carry(node, key, head_nodes, dim)
            continue
        if index_nodes is None:
            index_nodes = _index_nodes(walker, made[0][1])
        walker.carry(node, key, index_nodes, dim)
    return out


def _index_nodes(walker: AtenWalker, members: torch.Tensor) -> torch.Tensor:
    """One node per channel index of a head, with a featureless membership edge to that
    channel of every head (``members``: the query/key nodes [heads, head size]): only
    permutations that move the channels of all heads alike map the graph onto itself."""
    index = walker.new_nodes(members.shape[1])
    walker.rec.memberships.append((index[:, None], members.t().contiguous()))
    return index


def _position_logits(walker: AtenWalker, node: fx.Node, arg: fx.Node, split: Split) -> Env:
    """Queries [..., tokens, head size] (heads folded into the batch, or right after it)
    times a parameter [head size, positions]."""
    table = node.args[1]
    shape = _shape(arg)
    if (not isinstance(table, fx.Node) or len(_shape(table)) != 2 or split.nodes.dim() != 2
            or split.dims[1] != len(shape) - 1 or split.batch != 0
            or split.dims[0] not in (0, 1) or not _from_weights(walker, table)):
        raise walker.fail(node, "a matrix product of an attention's split channels with "
                          "anything but a parameter [head size, positions], summing each "
                          "head's channels (heads in or right after the batch dim)")
    key, dim = _per_head_source(walker, node, table, 0)
    slabs = math.prod(shape[:split.dims[0] + 1])
    return Logits(split.nodes, ((key, dim),), slabs, False)


def _within_slabs(walker: AtenWalker, node: fx.Node, shape: tuple[int, ...], logits: Logits,
                  first: int, what: str) -> None:
    """Refuse ``node`` unless the dims from ``first`` on lie inside single slabs: then it
    acts on every slab alike and never mixes two (sample, head) pairs."""
    if first < 1 or math.prod(shape[:first]) % logits.slabs:
        raise walker.fail(node, f"{what} of relative position logits reaches across (sample, "
                          "head) pairs")


def _logits_sum(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    (na, a), (nb, b) = args
    if not (_shape(na) == _shape(nb) == _shape(node) and a.slabs == b.slabs
            and torch.equal(a.queries, b.queries)):
        raise walker.fail(node, "a sum of position logits of other queries or shapes")
    return Logits(a.queries, (*a.tables, *b.tables), a.slabs, False)


def _logits_operand(walker: AtenWalker, node: fx.Node, args: list) -> tuple[fx.Node, Logits]:
    arg: fx.Node = args[0][0]
    env = args[0][1]
    if len(args) != 1:
        raise walker.fail(node, "an operation on relative position logits and other tensors")
    tensors = [a for a in node.all_input_nodes if a is not arg]
    if tensors or arg is not node.args[0]:
        raise walker.fail(node, f"further tensor inputs {[t.name for t in tensors]} besides "
                          "relative position logits")
    return arg, cast(Logits, env)


def _wrap(op: Any, logits_handler) -> None:
    """Register ``logits_handler`` for calls of ``op`` on logits, the earlier heads handler
    (or a refusal) for the others."""
    earlier = _registered(op, heads=True)

    def handler(walker: AtenWalker, node: fx.Node, args: list) -> Env:
        if any(isinstance(env, Logits) for _, env in args):
            return logits_handler(walker, node, args)
        if earlier is None:
            raise walker.fail(node, "this operation on an attention's split channels or "
                              "scores is not supported")
        return earlier(walker, node, args)
    register_aten(op, heads=True)(handler)


def _logits_pad(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    arg, env = _logits_operand(walker, node, args)
    shape, pad = _shape(arg), op_args(node)["pad"]
    padded = [len(shape) - 1 - i // 2 for i, amount in enumerate(pad) if amount]
    _within_slabs(walker, node, shape, env, min(padded, default=len(shape)), "padding")
    return env


def _logits_slice(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    arg, env = _logits_operand(walker, node, args)
    shape = _shape(arg)
    _within_slabs(walker, node, shape, env, op_args(node)["dim"] % len(shape), "a slice")
    return env


def _logits_expand(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    arg, env = _logits_operand(walker, node, args)
    src, dst = _shape(arg), _shape(node)
    grown = [d for d in range(len(dst)) if len(dst) != len(src) or dst[d] != src[d]]
    _within_slabs(walker, node, src, env, min(grown, default=len(src)), "an expand")
    return env


def _folded_move(earlier: Any) -> Any:
    """Heads folded into the batch stay in dim 0: a permute that moves it would leave the
    batch among the channel dims, which no operation reads."""
    def handler(walker: AtenWalker, node: fx.Node, args: list) -> Env:
        env = args[0][1]
        if isinstance(env, (Split, Scores)) and env.batch in (getattr(env, "dims", ()) or (
                getattr(env, "head", None),)):
            shape, a = _shape(args[0][0]), op_args(node)
            perm = ([d % len(shape) for d in a["dims"]] if "dims" in a
                    else swap_dims(len(shape), a["dim0"], a["dim1"]))
            if perm[0] != 0:
                raise walker.fail(node, f"permutation {perm} moves heads folded into the batch")
        return earlier(walker, node, args)
    return handler


def _logits_move(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    arg, env = _logits_operand(walker, node, args)
    shape, a = _shape(arg), op_args(node)
    perm = ([d % len(shape) for d in a["dims"]] if "dims" in a
            else swap_dims(len(shape), a["dim0"], a["dim1"]))
    moved = [d for d, p in enumerate(perm) if d != p]
    _within_slabs(walker, node, shape, env, min(moved, default=len(shape)), "a permute")
    return env


def _logits_scaled(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    return _logits_operand(walker, node, args)[1]


_wrap(aten.pad, _logits_pad)
_wrap(aten.constant_pad_nd, _logits_pad)
_wrap(aten.slice, _logits_slice)
_wrap(aten.expand, _logits_expand)
for _op in (aten.permute, aten.transpose):
    register_aten(_op, heads=True)(_folded_move(_registered(_op, heads=True)))
    _wrap(_op, _logits_move)
for _op in (aten.mul, aten.mul_, aten.div, aten.div_, *_COPIES):
    _wrap(_op, _logits_scaled)

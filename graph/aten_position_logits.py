"""Relative position logits (BotNet's ``PosEmbedRel``) in the ATen walk: ``q @ table`` with a
table shared by every head, the pads, slices, expands and permutes that lay the logits out
over the tokens, and their sum with the attention scores (the overview:
graph/aten_position.py)."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import fx

from . import aten_folded_heads  # noqa: F401 - the folded heads' permutes first: ours wrap them
from .aten_ops import op_args, register_aten
from .aten_position_sources import (
    COPIES,
    aten,
    from_weights,
    packet_of,
    per_head_source,
    registered,
    shape_of,
    slab_count,
)
from .walker_core import Env, Logits, Scores, Split, swap_dims

if TYPE_CHECKING:
    from .aten_walk import AtenWalker


def scores_plus_logits(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """Scores plus relative position logits of the same queries, slab by slab."""
    (na, scores), (nb, logits) = args if isinstance(args[0][1], Scores) else args[::-1]
    shape = shape_of(node)
    if not shape_of(na) == shape_of(nb) == shape:
        raise walker.fail(node, "position logits that broadcast against the attention scores")
    if slab_count(shape, scores.head, scores.batch) != logits.slabs or not torch.equal(
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
    while packet_of(made) is not aten.matmul:  # the scores scaled by numbers, or copied
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


def index_nodes(walker: AtenWalker, members: torch.Tensor) -> torch.Tensor:
    """One node per channel index of a head, with a featureless membership edge to that
    channel of every head (``members``: the query/key nodes [heads, head size]): only
    permutations that move the channels of all heads alike map the graph onto itself."""
    index = walker.new_nodes(members.shape[1])
    walker.rec.memberships.append((index[:, None], members.t().contiguous()))
    return index


def position_logits(walker: AtenWalker, node: fx.Node, arg: fx.Node, split: Split) -> Env:
    """Queries [..., tokens, head size] (heads folded into the batch, or right after it)
    times a parameter [head size, positions]."""
    table = node.args[1]
    shape = shape_of(arg)
    if (not isinstance(table, fx.Node) or len(shape_of(table)) != 2 or split.nodes.dim() != 2
            or split.dims[1] != len(shape) - 1 or split.batch != 0
            or split.dims[0] not in (0, 1) or not from_weights(walker, table)):
        raise walker.fail(node, "a matrix product of an attention's split channels with "
                          "anything but a parameter [head size, positions], summing each "
                          "head's channels (heads in or right after the batch dim)")
    key, dim = per_head_source(walker, node, table, 0)
    slabs = math.prod(shape[:split.dims[0] + 1])
    return Logits(split.nodes, ((key, dim),), slabs, False)


def _within_slabs(walker: AtenWalker, node: fx.Node, shape: tuple[int, ...], logits: Logits,
                  first: int, what: str) -> None:
    """Refuse ``node`` unless the dims from ``first`` on lie inside single slabs: then it
    acts on every slab alike and never mixes two (sample, head) pairs."""
    if first < 1 or math.prod(shape[:first]) % logits.slabs:
        raise walker.fail(node, f"{what} of relative position logits reaches across (sample, "
                          "head) pairs")


def logits_sum(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    """Two position logits of the same queries and layout added: one with both tables."""
    (na, a), (nb, b) = args
    if not (shape_of(na) == shape_of(nb) == shape_of(node) and a.slabs == b.slabs
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
    earlier = registered(op, heads=True)

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
    shape, pad = shape_of(arg), op_args(node)["pad"]
    padded = [len(shape) - 1 - i // 2 for i, amount in enumerate(pad) if amount]
    _within_slabs(walker, node, shape, env, min(padded, default=len(shape)), "padding")
    return env


def _logits_slice(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    arg, env = _logits_operand(walker, node, args)
    shape = shape_of(arg)
    _within_slabs(walker, node, shape, env, op_args(node)["dim"] % len(shape), "a slice")
    return env


def _logits_expand(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    arg, env = _logits_operand(walker, node, args)
    src, dst = shape_of(arg), shape_of(node)
    grown = [d for d in range(len(dst)) if len(dst) != len(src) or dst[d] != src[d]]
    _within_slabs(walker, node, src, env, min(grown, default=len(src)), "an expand")
    return env


def _logits_move(walker: AtenWalker, node: fx.Node, args: list) -> Env:
    arg, env = _logits_operand(walker, node, args)
    shape, a = shape_of(arg), op_args(node)
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
    _wrap(_op, _logits_move)
for _op in (aten.mul, aten.mul_, aten.div, aten.div_, *COPIES):
    _wrap(_op, _logits_scaled)

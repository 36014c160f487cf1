"""The message statistics of the metanetwork's layers, computed block by block: for each block
of edges between two layers, the per-receiver sums, squares, maxima and minima of the messages
(``BlockMoments``; ``PaperBlock`` also applies the paper's edge update), then gathered over all
blocks per receiving node (``Statistics``, ``ScatterExtreme``) and scaled by its degree
(``receiver_scaled``). Each block step is one autograd Function with a hand-written backward:
the same gradient autograd would compute, with fewer full-size temporaries (the layer's cost on
a CPU is memory traffic). Tested against a per-edge oracle in float64 (tests/test_paper_layer.py).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch_geometric.utils import scatter


def _max_and_where(messages: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Max over ``dim`` (1 or 2) of [g, o, i, H] and where it is, as an index into the
    flattened (o, i) axes. A max pool over the channels-last view (hidden features innermost)
    vectorizes over them: on CPU 5-8x faster than ``max(dim)`` with indices."""
    window = (messages.shape[1], 1) if dim == 1 else (1, messages.shape[2])
    hi, where = F.max_pool2d(messages.permute(0, 3, 1, 2), window, return_indices=True)
    return hi.flatten(2).transpose(1, 2), where.flatten(2).transpose(1, 2)


def _moments(edges: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor,
             track: bool) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Sum, sum of squares, max and min of one block's messages in both directions, and what
    their backward (``_moments_backward``) needs.

    ``edges`` [g, o, i, H], senders ``s_out`` [g, o, H] and ``s_in`` [g, i, H]: messages
    ``s_out[o] * e[o, i]`` reduced over o (to input channels), then ``s_in[i] * e[o, i]``
    reduced over i (to output channels); 8 results [g, i | o, H]. With ``track`` False (no
    autograd) max and min are ``amax``/``amin`` and nothing is kept."""
    results, saved = [], []
    for sender, dim in ((s_out.unsqueeze(2), 1), (s_in.unsqueeze(1), 2)):
        messages = sender * edges
        square = messages * messages
        results += [messages.sum(dim), square.sum(dim)]
        if not track:
            results += [messages.amax(dim), messages.amin(dim)]
            continue
        hi, at_hi = _max_and_where(messages, dim)
        # min = -max(-m), pooled in the squares' buffer once they are summed
        lo, at_lo = _max_and_where(torch.neg(messages, out=square), dim)
        results += [hi, lo.neg()]
        saved += [messages, torch.cat([at_hi, at_lo], 1)]  # autograd kept m for m * m too
    return results, saved


def _moments_backward(edges: torch.Tensor, s_out: torch.Tensor, s_in: torch.Tensor,
                      saved: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                      grad_edges: torch.Tensor | None) -> list[torch.Tensor]:
    """Gradients of ``_moments``' results: [grad_edges (added to ``grad_edges`` when given),
    grad_s_out, grad_s_in]. It is the gradient autograd takes of the same expressions, written
    with fewer full-size tensors (on CPU the layer's cost is memory traffic): per direction
    dL/dm = g_sum + 2 m g_square, plus g_max and g_min at the selected entries, in one tensor.
    A max or min tied within a block sends its gradient to one entry (as ``max(dim)`` does);
    across blocks ``ScatterExtreme`` shares it."""
    grad_senders = []
    for k, (sender, dim) in enumerate(((s_out, 1), (s_in, 2))):
        messages, where = saved[2 * k:2 * k + 2]
        g_sum, g_square, g_hi, g_lo = grads[4 * k:4 * k + 4]
        grad = torch.addcmul(g_sum.unsqueeze(dim), messages, 2.0 * g_square.unsqueeze(dim))
        # g_max and g_min at the (o, i) positions where they were taken
        grad.flatten(1, 2).scatter_add_(1, where, torch.cat([g_hi, g_lo], 1))
        if grad_edges is None:
            grad_edges = grad * sender.unsqueeze(3 - dim)
        else:
            grad_edges.addcmul_(grad, sender.unsqueeze(3 - dim))
        grad_senders.append(grad.mul_(edges).sum(3 - dim))  # sum over receivers of e dL/dm
    assert grad_edges is not None
    return [grad_edges, *grad_senders]


class BlockMoments(torch.autograd.Function):
    """``_moments`` of one block, for autograd (the joint layer)."""

    @staticmethod
    def forward(ctx, edges, s_out, s_in, track: bool):
        # ``track`` is torch.is_grad_enabled() of the caller: under no_grad needs_input_grad
        # still reports the inputs' requires_grad
        results, saved = _moments(edges, s_out, s_in, track and any(ctx.needs_input_grad))
        ctx.save_for_backward(edges, s_out, s_in, *saved)
        return tuple(results)

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        edges, s_out, s_in, *saved = ctx.saved_tensors
        return *_moments_backward(edges, s_out, s_in, saved, grads, None), None


class PaperBlock(torch.autograd.Function):
    """One block of the paper's layer: ``_moments`` and the updated edges
    e + (c[out] d[in] + c[in] d[out]) * e, from [c | d] at the block's out and in nodes
    ([g, o, 2H] and [g, i, 2H]). In one Function, e gets one gradient tensor that both parts
    add to; autograd's version of the edge update also allocated a full-size gradient per
    product and a zero-filled copy per slice of [c | d]. The four products of [c | d]'s
    gradient are reduced through one scratch tensor."""

    @staticmethod
    def forward(ctx, edges, s_out, s_in, cd_out, cd_in, track: bool):
        results, saved = _moments(edges, s_out, s_in, track and any(ctx.needs_input_grad))
        c_out, d_out, c_in, d_in = _halves(cd_out, cd_in)
        scale = c_out * d_in
        scale.addcmul_(c_in, d_out)
        ctx.save_for_backward(edges, s_out, s_in, cd_out, cd_in, scale, *saved)
        return (*results, torch.addcmul(edges, edges, scale))

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        edges, s_out, s_in, cd_out, cd_in, scale, *saved = ctx.saved_tensors
        grad, hid = grads[8], edges.shape[-1]
        c_out, d_out, c_in, d_in = _halves(cd_out, cd_in)
        grad_scale = grad * edges
        part = torch.empty_like(grad_scale)
        grad_out, grad_in = torch.empty_like(cd_out), torch.empty_like(cd_in)
        for target, factor, dim in ((grad_out[..., :hid], d_in, 2), (grad_out[..., hid:], c_in, 2),
                                    (grad_in[..., :hid], d_out, 1), (grad_in[..., hid:], c_out, 1)):
            torch.sum(torch.mul(grad_scale, factor, out=part), dim, out=target)
        grad_edges = torch.addcmul(grad, grad, scale, out=part)
        return (*_moments_backward(edges, s_out, s_in, saved, grads[:8], grad_edges), grad_out,
                grad_in, None)


def _halves(cd_out: torch.Tensor, cd_in: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """c and d at the out nodes ([g, o, 1, H]) and at the in nodes ([g, 1, i, H])."""
    hid = cd_out.shape[-1] // 2
    return (cd_out[:, :, None, :hid], cd_out[:, :, None, hid:], cd_in[:, None, :, :hid],
            cd_in[:, None, :, hid:])


class ScatterExtreme(torch.autograd.Function):
    """torch_geometric's scatter max or min over rows with the same receiver, with a backward
    of float masks and one index_add (scatter_reduce's own took 4x as long on CPU). Tied rows
    share the gradient evenly, as there; unlike there, the initial zero of a receiver is not
    counted as a tie when its extreme is exactly 0 (include_self=False)."""

    @staticmethod
    def forward(ctx, src, index, size: int, reduce: str):
        out = scatter(src, index, 0, size, reduce=reduce)
        ctx.save_for_backward(src, index, out)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        src, index, out = ctx.saved_tensors
        # 1.0 where a row is its receiver's extreme (written as floats: a bool mask and its
        # conversion took several times as long)
        hit = torch.eq(src, out[index], out=torch.empty_like(src))
        count = torch.zeros_like(out).index_add_(0, index, hit).clamp_min_(1.0)
        return hit.mul_((grad / count)[index]), None, None, None


class Statistics:
    """Per-receiver sums, sums of squares, maxima and minima of messages, gathered block by
    block (a dense reduction over one block axis) and scattered over receivers once."""

    def __init__(self) -> None:
        self.receivers: list[torch.Tensor] = []
        self.parts: list[list[torch.Tensor]] = [[], [], [], []]

    def add(self, moments: Sequence[torch.Tensor], receivers: torch.Tensor) -> None:
        """(sum, sum of squares, max, min) [..., H] of the messages to ``receivers`` [...]."""
        hid = moments[0].shape[-1]
        self.receivers.append(receivers.reshape(-1))
        for part, value in zip(self.parts, moments):
            part.append(value.reshape(-1, hid))

    def scatter(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(sum, sum of squares, max, min) per receiver; 0 where a receiver got no message."""
        recv = torch.cat(self.receivers)
        total, square = (scatter(torch.cat(part), recv, 0, size) for part in self.parts[:2])
        hi, lo = (ScatterExtreme.apply(torch.cat(part), recv, size, reduce)
                  for part, reduce in zip(self.parts[2:], ("max", "min")))
        return total, square, hi, lo


def receiver_scaled(factor: torch.Tensor, total, square, hi, lo, degree: torch.Tensor,
                     std_floor: str) -> torch.Tensor:
    """[mean, std, max, min] of the messages ``factor * m`` from the statistics of ``m``.

    The receiver's factor is common to all of its messages, so it is applied after the
    aggregation (max and min swap where it is negative). ``std_floor`` "paper": std = sqrt(var)
    where var > 1e-5, else 0 (torch_geometric's StdAggregation, which the paper's layer uses);
    "eps": sqrt(var + 1e-6) (ours)."""
    mean = factor * total / degree
    var = (factor * factor * square / degree - mean * mean).clamp_min(0.0)
    if std_floor == "paper":
        std = torch.where(var > 1e-5, var.clamp_min(1e-5).sqrt(), 0.0)
    else:
        std = var.add(1e-6).sqrt()
    positive = factor >= 0
    return torch.cat([mean, std, torch.where(positive, factor * hi, factor * lo),
                      torch.where(positive, factor * lo, factor * hi)], dim=1)

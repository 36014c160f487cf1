"""Can a network be encoded? One verdict per network, for users and for the census (issue 15).

``check_encoding(model, example)`` traces and encodes ``model``, decodes the graph and compares:
every floating state-dict tensor must come back bit for bit and the decoded weights must give
the network's outputs. A round trip cannot see a graph that joins or separates the wrong
channels, so the check also tries node swaps: swapping two hidden nodes (with whatever group
structure moves along, as the channels of a depthwise conv's input follow its output) so that
the graph maps onto itself must be a symmetry of the network, i.e. the decoded network must
compute the same function. A graph that leaves apart two channels the network ties together
(a gate and its gated channel, a channel shuffle read in the wrong order) fails it.

A refusal (:class:`UnsupportedArchitectureError`) is a verdict too, with its reason; anything
else that goes wrong is a crash, never hidden.
"""
from __future__ import annotations

import copy
import functools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch_geometric.data import Data

from .errors import UnsupportedArchitectureError
from .network_graph import EdgeBlock, NetworkGraph, edge_attr_key

EXACT, REFUSED, WRONG, CRASH = "exact", "refused", "wrong", "crash"


@dataclass(frozen=True)
class EncodingCheck:
    """The verdict on one network: ``status`` (exact, refused, wrong or crash) and why."""

    status: str
    reason: str = ""
    nodes: int = 0
    edges: int = 0
    swaps: int = 0               # node swaps found to be symmetries of graph and network

    @property
    def ok(self) -> bool:
        """Exact, or refused with a reason: the encoding never gives a wrong graph."""
        return self.status in (EXACT, REFUSED)


def check_encoding(model: nn.Module, example: torch.Tensor, swaps: int = 16, seed: int = 0,
                   atol: float = 1e-5) -> EncodingCheck:
    """Encode ``model`` (in eval mode) on ``example``, decode, compare tensors and outputs, and
    try ``swaps`` node swaps, each among the outputs of one weight tensor (the tensors in a
    random order, again from the first when there are fewer)."""
    model.eval()
    try:
        graph = NetworkGraph.from_module(model, example)
        with torch.no_grad():
            # the features alone: decoding needs no edge_index (ViT-H/14: 11 GB saved)
            state = model.state_dict()
            data = graph.encode(state, structure=False)
            outputs = _Outputs(model, example, atol)
            wrong = _round_trip(graph, data, state, outputs)
            tested, wrong = (0, wrong) if wrong else _try_swaps(graph, data, outputs, swaps, seed)
    except UnsupportedArchitectureError as e:
        return EncodingCheck(REFUSED, str(e))
    except Exception as e:  # noqa: BLE001 - a crash is a verdict of its own, reported in full
        return EncodingCheck(CRASH, f"{type(e).__name__}: {e}")
    if wrong:
        return EncodingCheck(WRONG, wrong)
    return EncodingCheck(EXACT, nodes=graph.num_nodes, edges=graph.num_edges, swaps=tested)


def _round_trip(graph: NetworkGraph, data: Data, state: dict[str, torch.Tensor],
                outputs: _Outputs) -> str:
    """Why the decoded state is not the network's (every floating tensor bit for bit, the
    same outputs), or "" when it is."""
    decoded = graph.decode(data)
    floating = {k for k, v in state.items() if v.is_floating_point()}
    if set(decoded) != floating:
        return f"decoded keys differ: {sorted(set(decoded) ^ floating)[:3]}"
    bad = [k for k in floating if not torch.equal(decoded[k], state[k])]
    if bad:
        return f"round trip changed {bad[:3]}"
    if not outputs.same(decoded):
        got = torch.func.functional_call(outputs.model, decoded, (outputs.example,))
        return (f"decoded network's outputs differ by "
                f"{float((got - outputs.expected).abs().max()):.3g}")
    return ""


def _try_swaps(graph: NetworkGraph, data: Data, outputs: _Outputs, swaps: int, seed: int
               ) -> tuple[int, str]:
    """How many node swaps that map the graph onto itself kept the network's function, and
    why one did not ("" when none failed)."""
    tested = 0
    generator = torch.Generator().manual_seed(seed)
    blocks = [b for b in graph.blocks if b.key is not None]
    order = torch.randperm(len(blocks), generator=generator).tolist()
    for t in range(swaps if blocks else 0):
        i = order[t % len(blocks)]
        pair = _random_pair(blocks[i], generator)
        permuted = None if pair is None else swapped(graph, data, *pair)
        if permuted is None:
            continue
        if not outputs.same(graph.decode(permuted)):
            return tested, (f"swapping nodes {pair} (outputs of {blocks[i].key!r}) maps the "
                            "graph onto itself but changes the network's function")
        tested += 1
    return tested, ""


class _Outputs:
    """Does a state give ``model``'s outputs on ``example``? Equal up to float32 rounding
    relative to the outputs' scale (reordered sums in an untrained 100-layer network with
    outputs near 3e4 differ by 1e-2 at outputs near 0); where float32 says no, float64
    decides, since rounding in a deep untrained network can grow past any float32 tolerance
    (EfficientNetV2-RW-T: 1.7e-3 of the outputs' scale in float32, 3e-11 in float64) while a
    changed function differs at the same scale in both."""

    def __init__(self, model: nn.Module, example: torch.Tensor, atol: float) -> None:
        self.model, self.example, self.atol = model, example, atol
        self.expected = model(example)

    def same(self, candidate: dict[str, torch.Tensor]) -> bool:
        got = torch.func.functional_call(self.model, candidate, (self.example,))
        return _close(got, self.expected, self.atol, 1e-5) or self._same_in_float64(candidate)

    def _same_in_float64(self, candidate: dict[str, torch.Tensor]) -> bool:
        skeleton, rest, example, expected = self._float64()
        got = torch.func.functional_call(skeleton, ({k: v for k, v in rest.items()
                                                     if k not in candidate}, _double(candidate)),
                                         (example,))
        return _close(got, expected, 1e-10, 1e-9)

    @functools.cache  # noqa: B019 - one check's lifetime; computed only when float32 disagrees
    def _float64(self) -> tuple[nn.Module, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """The model without storage (the meta device), its tensors a candidate may leave out
        in float64 (buffers outside the state dict, integer buffers), the example and the
        float64 outputs: one double copy of the weights at a time, the candidate's (ViT-H/14:
        5 GB), not the model's beside it."""
        model, example = copy.deepcopy(self.model).double(), self.example.double()
        expected = model(example)
        floating = {k for k, v in self.model.state_dict().items() if v.is_floating_point()}
        # copies: moving the model to the meta device below changes its parameters in place
        rest = {k: v.detach().clone() for k, v in _tensors(model).items() if k not in floating}
        return model.to("meta"), rest, example, expected


def _tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(model.named_parameters(remove_duplicate=False)),
            **dict(model.named_buffers(remove_duplicate=False))}


def _double(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.double() if v.is_floating_point() else v for k, v in state.items()}


def _close(got: torch.Tensor, expected: torch.Tensor, atol: float, rtol: float) -> bool:
    return bool((got - expected).abs().max() <= atol + rtol * expected.abs().max())


def _random_pair(block: EdgeBlock, generator: torch.Generator) -> tuple[int, int] | None:
    nodes = block.dst.reshape(-1)
    if len(nodes) < 2:
        return None
    i, j = torch.randperm(len(nodes), generator=generator)[:2].tolist()
    return int(nodes[i]), int(nodes[j])


def swapped(graph: NetworkGraph, data: Data, u: int, v: int) -> Data | None:
    """``data`` with nodes ``u`` and ``v`` swapped, together with every pair of nodes that
    must move with them (the groups of a grouped conv move whole), or None when that does not
    map the graph onto itself (input and output nodes stay, every tensor keeps its nodes,
    identity edges keep their features)."""
    pairs = _closure(graph, u, v)
    if pairs is None:
        return None
    perm = torch.arange(graph.num_nodes)
    perm[list(pairs)] = torch.tensor(list(pairs.values()))
    return permuted(graph, data, perm)


def permuted(graph: NetworkGraph, data: Data, perm: torch.Tensor) -> Data | None:
    """``data`` with node ``i`` moved to ``perm[i]``, or None when that does not map the graph
    onto itself (``swapped``'s conditions); for permutations that no single swap reaches (a
    channel moved in every radix slice at once, tests/test_aten_radix.py)."""
    fixed = torch.cat([graph.input_nodes, graph.output_nodes])
    if not torch.equal(perm[fixed], fixed):
        return None
    for _, nodes in graph.channel_nodes():
        if set(perm[nodes].tolist()) != set(nodes.tolist()):
            return None
    x = torch.empty_like(data.x)
    x[perm] = data.x
    features = {edge_attr_key(a): data[edge_attr_key(a)].clone() for a in graph.edge_types}
    if graph.passengers:
        features["passengers"] = _permuted_passengers(graph, data.passengers, perm)
    for block in graph.blocks:
        if torch.equal(perm[block.src], block.src) and torch.equal(perm[block.dst], block.dst):
            continue  # untouched by the swap
        moved = _permuted_block(block, data[edge_attr_key(block.area)], perm, graph.num_nodes)
        if moved is None:
            return None
        features[edge_attr_key(block.area)][block.start:block.start + block.rows] = moved
    return Data(x=x, **features)


def _permuted_passengers(graph: NetworkGraph, flat: torch.Tensor, perm: torch.Tensor
                         ) -> torch.Tensor:
    """The passenger tensors with their channel slices moved along with their nodes."""
    moved, offset = [], 0
    for key, nodes, dim in graph.passengers:
        shape = graph.shapes[key]
        tensor = flat[offset:offset + math.prod(shape)].view(shape)
        offset += math.prod(shape)
        if dim is None:  # follows no channel
            moved.append(tensor.reshape(-1))
            continue
        lookup = torch.full((graph.num_nodes,), -1, dtype=torch.long)
        lookup[nodes] = torch.arange(len(nodes))
        out = torch.empty_like(tensor)
        out.index_copy_(dim, lookup[perm[nodes]], tensor)  # channel i goes where its node goes
        moved.append(out.reshape(-1))
    return torch.cat(moved)


@functools.lru_cache(maxsize=8)
def _groups(graph: NetworkGraph) -> list[tuple[list[list[int]], dict[int, int]]]:
    """Per grouped block: each group's nodes (inputs, then outputs) and each node's group;
    computed once per graph (every swap of a check reads them)."""
    grouped = []
    for b in graph.blocks:
        if b.src.shape[0] > 1:
            group_of = {n: g for g, row in enumerate(b.src.tolist()) for n in row}
            group_of.update({n: g for g, row in enumerate(b.dst.tolist()) for n in row})
            grouped.append((torch.cat([b.src, b.dst], 1).tolist(), group_of))
    return grouped


def _closure(graph: NetworkGraph, u: int, v: int) -> dict[int, int] | None:
    """The involution swapping ``u`` and ``v`` and, wherever two swapped nodes lie in
    different groups of a grouped block, those groups' nodes pairwise; None on a conflict or
    when it moves an input or output node."""
    pairs = {u: v, v: u}
    queue = [u, v]
    while queue:
        n = queue.pop()
        for rows, group_of in _groups(graph):
            if n not in group_of:
                continue
            g1, g2 = group_of[n], group_of.get(pairs[n])
            if g2 is None:
                return None
            for a, c in zip(rows[g1], rows[g2]):
                if a == c or pairs.get(a) == c:
                    continue
                if a in pairs or c in pairs:
                    return None
                pairs[a], pairs[c] = c, a
                queue += [a, c]
    fixed = set(graph.input_nodes.tolist()) | set(graph.output_nodes.tolist())
    return None if fixed & pairs.keys() else pairs


def _permuted_block(block: EdgeBlock, features: torch.Tensor, perm: torch.Tensor,
                    num_nodes: int) -> torch.Tensor | None:
    """The block's edge features after relabelling its nodes by ``perm``, in the block's own
    row order; None when the relabelled edges are not the block's edges."""
    groups, outs, ins = block.shape
    rows = features[block.start:block.start + block.rows].view(groups, outs, ins, block.area)
    src, dst = perm[block.src], perm[block.dst]
    if torch.equal(src, block.src) and torch.equal(dst, block.dst):
        return rows.reshape(block.rows, block.area)
    places = []
    for old, new, width in ((block.src, src, ins), (block.dst, dst, outs)):
        if len(old.unique()) != old.numel():
            return None  # a node twice in one block (a tensor concatenated with itself)
        lookup = torch.full((num_nodes,), -1, dtype=torch.long)
        lookup[old.reshape(-1)] = torch.arange(old.numel())
        place = lookup[new]
        if (place < 0).any():
            return None
        places.append((place // width, place % width))
    (src_group, src_pos), (dst_group, dst_pos) = places
    group = src_group[:, :1]
    if not ((src_group == group).all() and (dst_group == group).all()):
        return None  # a group would be split across groups
    shape = (groups, outs, ins)
    moved = torch.empty_like(rows)
    moved[group[:, :, None].expand(shape), dst_pos[:, :, None].expand(shape),
          src_pos[:, None, :].expand(shape)] = rows
    if block.key is None and not torch.equal(moved, rows):
        return None  # an identity residual would change its structure
    return moved.reshape(block.rows, block.area)

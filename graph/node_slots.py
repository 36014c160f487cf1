"""Node slots: the per-channel tensors a graph node carries as its features (docs/graph.md).

A slot kind (:class:`NodeSlot`) declares the fields one layer writes per channel (a
BatchNorm's weight, bias, running mean and running variance; a conv's bias), the feature value
of an absent slot, and which fields are running statistics: decoded detached, left unchanged
by the metanetwork unless asked, never scaled by channel gates. A channel written by several
layers of one kind (a projection shortcut's BatchNorm merged into the main path's channel)
gets several slots of that kind. :class:`NodeColumns` places (kind, slot, field) in a node's
feature vector: kinds in registration order, then slots, then fields. A new kind is added with
:func:`register_node_slot`; module handlers (``graph.register_module``) then fill it with
``walker.add_channels(node, key, kind, field, nodes)``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import torch

SLOTS_SUFFIX = "_slots"  # a layout stores the slot count of kind K as "K_slots"


@dataclass(frozen=True)
class NodeSlot:
    """One kind of per-channel tensor group stored in node features.

    Args:
        name: the kind's name; the layout key is ``<name>_slots``.
        fields: the per-channel tensors one layer writes, in column order (attribute names).
        defaults: the feature of each field where a node has no such slot (the value under
            which the layer would be the identity).
        statistics: fields that are running statistics, not trained parameters.
    """

    name: str
    fields: tuple[str, ...]
    defaults: tuple[float, ...]
    statistics: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"node slot name {self.name!r} must be an identifier")
        if len(self.defaults) != len(self.fields) or not self.fields:
            raise ValueError(f"node slot {self.name!r}: one default per field, at least one "
                             f"field (fields {self.fields}, defaults {self.defaults})")
        if not set(self.statistics) <= set(self.fields):
            raise ValueError(f"node slot {self.name!r}: statistics {self.statistics} are not "
                             f"among its fields {self.fields}")


NODE_SLOTS: dict[str, NodeSlot] = {}


def register_node_slot(slot: NodeSlot) -> NodeSlot:
    """Make ``slot`` a kind of node feature; registering the same kind again is a no-op, a
    different kind under a taken name is an error."""
    existing = NODE_SLOTS.get(slot.name)
    if existing is not None and existing != slot:
        raise ValueError(f"node slot {slot.name!r} is registered already as {existing}")
    NODE_SLOTS[slot.name] = slot
    return slot


BATCHNORM = register_node_slot(NodeSlot(
    "bn", ("weight", "bias", "running_mean", "running_var"), (1.0, 0.0, 0.0, 1.0),
    statistics=("running_mean", "running_var")))
BIAS = register_node_slot(NodeSlot("bias", ("bias",), (0.0,)))
LAYERNORM = register_node_slot(NodeSlot("layernorm", ("weight", "bias"), (1.0, 0.0)))
# a per-channel factor applied to a layer's output (ConvNeXt's layer scale)
SCALE = register_node_slot(NodeSlot("scale", ("weight",), (1.0,)))
# the query and key biases of one attention channel (its value bias is a plain "bias")
ATTENTION = register_node_slot(NodeSlot("attention", ("q_bias", "k_bias"), (0.0, 0.0)))
# the paper's attention layout: query, key and value bias features of one tied channel
QKV_BIAS = register_node_slot(NodeSlot("qkv_bias", ("q_bias", "k_bias", "v_bias"), (0.0, 0.0, 0.0)))
# a group norm's per-channel weight and bias (its groups are membership edges, docs/graph.md)
GROUPNORM = register_node_slot(NodeSlot("groupnorm", ("weight", "bias"), (1.0, 0.0)))


@dataclass(frozen=True)
class NodeColumns:
    """Column of every (kind, slot, field) in a graph's node features.

    ``counts`` holds the number of slots of each kind with any, in registration order.
    """

    counts: tuple[tuple[str, int], ...]

    @classmethod
    def from_counts(cls, counts: Mapping[str, int]) -> "NodeColumns":
        unknown = sorted(set(counts) - set(NODE_SLOTS))
        if unknown:
            raise ValueError(f"node slot kinds {unknown} are not registered "
                             "(graph.register_node_slot); import the module that registers them")
        return cls(tuple((k, int(counts[k])) for k in NODE_SLOTS if counts.get(k, 0) > 0))

    @classmethod
    def from_layout(cls, layout: Mapping) -> "NodeColumns":
        """The columns of a ``NetworkGraph.layout`` (as stored in checkpoints)."""
        counts = {k[:-len(SLOTS_SUFFIX)]: int(v) for k, v in layout.items()
                  if k.endswith(SLOTS_SUFFIX)}
        columns = cls.from_counts(counts)
        if "node_dim" in layout and columns.node_dim != layout["node_dim"]:
            raise ValueError(f"layout {dict(layout)}: node_dim {layout['node_dim']} is not what "
                             f"its slots take ({columns.node_dim})")
        return columns

    def slots(self, kind: str) -> int:
        """How many slots of ``kind`` a node has."""
        return dict(self.counts).get(kind, 0)

    @property
    def node_dim(self) -> int:
        return sum(len(NODE_SLOTS[k].fields) * n for k, n in self.counts)

    def column(self, kind: str, slot: int, field: str) -> int:
        """The node-feature column of ``field`` in slot ``slot`` of ``kind``."""
        start = 0
        for k, n in self.counts:
            fields = NODE_SLOTS[k].fields
            if k == kind:
                if not 0 <= slot < n:
                    raise IndexError(f"slot {slot} of kind {kind!r}: this layout has {n}")
                return start + slot * len(fields) + fields.index(field)
            start += n * len(fields)
        raise KeyError(f"this layout has no {kind!r} slots")

    def _columns(self) -> list[tuple[NodeSlot, str, int]]:
        return [(NODE_SLOTS[k], f, self.column(k, s, f))
                for k, n in self.counts for s in range(n) for f in NODE_SLOTS[k].fields]

    def defaults(self) -> torch.Tensor:
        """[node_dim]: the features of a node with no slot filled."""
        out = torch.zeros(self.node_dim)
        for kind, field, col in self._columns():
            out[col] = kind.defaults[kind.fields.index(field)]
        return out

    def statistics(self) -> tuple[int, ...]:
        """Columns holding running statistics."""
        return tuple(col for kind, field, col in self._columns() if field in kind.statistics)

    def layout(self) -> dict[str, int]:
        """``{"<kind>_slots": count}`` of every kind with slots."""
        return {f"{k}{SLOTS_SUFFIX}": n for k, n in self.counts}


def canonical_layout(layout: Mapping) -> dict:
    """``layout`` without zero slot counts (older checkpoints list them), with the identity and
    attention layouts that layouts stored before those options meant ("diagonal", "heads")."""
    out = {k: v for k, v in layout.items() if not (k.endswith(SLOTS_SUFFIX) and v == 0)}
    out.setdefault("identity_edges", "diagonal")
    out.setdefault("attention", "heads")
    return out

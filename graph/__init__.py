"""Pure-torch network <-> graph encoding and the GNN metanetwork (no Lightning here)."""
from .apply import check_layout, feedforward, network_graph
from .aten_ops import register_aten
from .errors import MetanetworkError, UnsupportedArchitectureError
from .handlers import attention_module, module_handler, register_function, register_module
from .metanetwork import Metanetwork
from .network_graph import IDENTITY_EDGES, GraphOptions, NetworkGraph, edge_attr_key
from .node_slots import NODE_SLOTS, NodeColumns, NodeSlot, register_node_slot
from .paper_weights import PaperWeightsError
from .tracing import symbolic_trace
from .walker_core import Rows, Value

__all__ = ["IDENTITY_EDGES", "NODE_SLOTS", "GraphOptions", "Metanetwork", "MetanetworkError", "NetworkGraph",
           "NodeColumns", "NodeSlot", "PaperWeightsError", "Rows", "UnsupportedArchitectureError", "Value",
           "attention_module", "check_layout", "edge_attr_key", "feedforward", "module_handler",
           "network_graph", "register_aten", "register_function", "register_module", "register_node_slot",
           "symbolic_trace"]

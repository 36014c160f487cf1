"""Pure-torch network <-> graph encoding and the GNN metanetwork (no Lightning here)."""
from .errors import UnsupportedArchitectureError
from .metanetwork import Metanetwork
from .network_graph import IDENTITY_EDGES, NetworkGraph, edge_attr_key
from .paper_weights import PaperWeightsError
from .tracing import BN_FIELDS, Value, module_handler, register_module, symbolic_trace

__all__ = ["BN_FIELDS", "IDENTITY_EDGES", "Metanetwork", "NetworkGraph", "PaperWeightsError",
           "UnsupportedArchitectureError", "Value", "edge_attr_key", "module_handler",
           "register_module", "symbolic_trace"]

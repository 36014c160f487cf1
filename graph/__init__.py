"""Pure-torch network <-> graph encoding and the GNN metanetwork (no Lightning here)."""
from .errors import UnsupportedArchitectureError
from .metanetwork import Metanetwork
from .network_graph import NetworkGraph, edge_attr_key

__all__ = ["Metanetwork", "NetworkGraph", "UnsupportedArchitectureError", "edge_attr_key"]

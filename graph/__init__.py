"""Pure-torch network <-> graph encoding and the GNN metanetwork (no Lightning here)."""
from .errors import UnsupportedArchitectureError
from .metanetwork import Metanetwork
from .network_graph import IDENTITY_EDGES, NetworkGraph, edge_attr_key
from .paper_weights import PaperWeightsError

__all__ = ["IDENTITY_EDGES", "Metanetwork", "NetworkGraph", "PaperWeightsError",
           "UnsupportedArchitectureError", "edge_attr_key"]

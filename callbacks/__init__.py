"""Lightning callbacks: structured pruning and zoo export (metanetwork feedforward and
curves/selection come later)."""
from .pruning import PruneToSpeedUp
from .zoo import ExportToZoo, ZooError, add_member, find_member, read_manifest, write_manifest

__all__ = ["ExportToZoo", "PruneToSpeedUp", "ZooError", "add_member", "find_member",
           "read_manifest", "write_manifest"]

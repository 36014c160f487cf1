"""Lightning callbacks: metanetwork feedforward, sparse training, structured pruning and zoo
export (curves/selection live in their own modules)."""
from .curve import AccuracyCurve
from .feedforward import (MetanetworkError, MetanetworkFeedforward, SaveNetwork,
                          load_metanetwork)
from .pruning import PruneToSpeedUp
from .sparse import SparseTraining
from .structured import StructuredPruning
from .zoo import ExportToZoo, ZooError, add_member, find_member, read_manifest, write_manifest

__all__ = ["AccuracyCurve", "ExportToZoo", "MetanetworkError", "MetanetworkFeedforward", "PruneToSpeedUp",
           "SaveNetwork", "SparseTraining", "StructuredPruning", "ZooError", "add_member", "find_member",
           "load_metanetwork", "read_manifest", "write_manifest"]

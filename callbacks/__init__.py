"""Lightning callbacks: metanetwork feedforward, pruning to a speed-up, sparse training,
structured pruning and weight sparsity of any LightningModule, and export of a fit's network
(to a file or a zoo)."""
from .export import ExportNetwork
from .feedforward import MetanetworkFeedforward, SaveNetwork
from .pruning import PruneToSpeedUp
from .sparse import SparseTraining
from .sparsity import WeightSparsity
from .structured import StructuredPruning
from .zoo import ExportToZoo

__all__ = ["ExportNetwork", "ExportToZoo", "MetanetworkFeedforward", "PruneToSpeedUp", "SaveNetwork",
           "SparseTraining", "StructuredPruning",
           "WeightSparsity"]

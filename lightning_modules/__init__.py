"""Lightning modules: thin training glue over the pure networks/ and graph/ packages."""
from .checkpoints import load_metanetwork, trained_architectures, trained_criterion, trained_sparsity
from .classifier import ImageClassifier
from .meta_pruning import MetaPruningModule

__all__ = ["ImageClassifier", "MetaPruningModule", "load_metanetwork", "trained_architectures",
           "trained_criterion", "trained_sparsity"]

"""Lightning modules: thin training glue over the pure networks/ and graph/ packages."""
from .classifier import ImageClassifier
from .meta_pruning import MetaPruningModule

__all__ = ["ImageClassifier", "MetaPruningModule"]

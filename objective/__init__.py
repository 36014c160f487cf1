"""The meta-training objective, pure torch (no Lightning)."""
from .pruned_view import PrunedView
from .training import MemberState, load_weights, meta_loss, original_predictions, weight_gradients

__all__ = ["MemberState", "PrunedView", "load_weights", "meta_loss", "original_predictions",
           "weight_gradients"]

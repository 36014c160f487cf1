"""Target architectures (plain torch) and their pruning-aware checkpoint format."""
from .checkpoint import (
                         CheckpointError,
                         atomic_save,
                         atomic_write,
                         load_network,
                         network_from_record,
                         network_from_state_dict,
                         network_record,
                         safe_load,
                         save_network,
)
from .cifar_resnet import CifarResNet
from .common import evaluating, example_input
from .curve import (
                         accuracy,
                         accuracy_curve,
                         calibration_batches,
                         curve_area,
                         recalibrate_batchnorm,
                         sparsity_curve,
                         sparsity_levels,
)
from .latency import latency_probe
from .layers import LayerShape, layer_shape, register_layer_shape, sync_layer_shapes
from .pruning import (
                         IMPORTANCES,
                         NEAR_ZERO,
                         base_macs,
                         check_importance,
                         check_max_pruning_ratio,
                         classifier_layer,
                         count_macs,
                         count_macs_fast,
                         count_params,
                         criterion_pruner,
                         group_norms,
                         near_zero_fraction,
                         paired_latency,
                         prune_to_latency,
                         prune_to_speed_up,
)
from .registry import available, build, build_arch, describe_arch, distinct_architectures, plain_arch
from .round_to import ROUND_TO_CANDIDATES, RoundToTrial, choose_round_to
from .vgg import CifarVGG

__all__ = ["CheckpointError", "CifarResNet", "CifarVGG", "LayerShape", "accuracy", "accuracy_curve",
           "atomic_save", "atomic_write", "available", "base_macs", "build", "build_arch", "describe_arch",
           "distinct_architectures", "plain_arch",
           "calibration_batches",
           "classifier_layer", "count_macs",
           "count_macs_fast", "count_params", "curve_area", "evaluating", "example_input", "group_norms",
           "layer_shape", "load_network", "check_max_pruning_ratio",
           "criterion_pruner", "IMPORTANCES", "check_importance", "NEAR_ZERO", "near_zero_fraction",
           "network_from_record",
           "network_from_state_dict",
           "network_record", "latency_probe", "paired_latency", "prune_to_latency", "prune_to_speed_up",
           "recalibrate_batchnorm", "register_layer_shape",
           "safe_load",
           "save_network", "sparsity_curve", "sparsity_levels", "sync_layer_shapes",
           "ROUND_TO_CANDIDATES", "RoundToTrial", "choose_round_to"]

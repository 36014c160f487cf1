"""MetanetworkFeedforward: the metanetwork step of the pruning pipeline, as a Lightning callback.

In ``setup`` (stage ``"fit"``) the callback encodes ``pl_module.network`` as a graph, runs the
metanetwork of a ``MetaPruningModule`` checkpoint on it, decodes the result and loads it into the
network. ``setup`` runs before ``configure_optimizers`` and before a checkpoint is restored, so

* the finetune that follows in the same fit trains the modified weights, and
* resuming a killed finetune works: the feedforward is deterministic, then ``last.ckpt`` loads.

``SaveNetwork`` (listed after it, or after ``PruneToSpeedUp``) writes the network as it is after
the setup-time change, so the pipeline can report the accuracy right after that step.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from torch import nn

import networks
from graph import GraphOptions, Metanetwork, NetworkGraph, UnsupportedArchitectureError
from metaprune.errors import UserError

from .target import classifier


class MetanetworkError(UserError):
    """A metanetwork checkpoint is missing, of the wrong kind, or made for another layout."""


def load_metanetwork(path: str | os.PathLike) -> Metanetwork:
    """The metanetwork of a ``MetaPruningModule`` checkpoint (loaded with ``weights_only=True``).

    Errors name the file, what it actually is and what to pass instead."""
    from lightning_modules import MetaPruningModule

    where = f"metanetwork checkpoint {str(path)!r}"
    ckpt = networks.safe_load(path, "metanetwork checkpoint")  # missing / corrupt / pickled code
    if isinstance(ckpt, dict) and ckpt.get("format") == networks.checkpoint.FORMAT:
        raise MetanetworkError(
            f"{where} is a target-network file (format {ckpt['format']!r}), not a metanetwork. "
            "Pass it as --network; --metanetwork takes a meta-training checkpoint "
            "(runs/<task>/meta/version_N/checkpoints/epochNNN.ckpt, or best.ckpt from "
            "`prune.py select`)")
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    state = ckpt.get("state_dict") if isinstance(ckpt, dict) else None
    if not isinstance(hparams, dict) or not hparams.get("layout") or not isinstance(state, dict) \
            or not any(k.startswith("metanetwork.") for k in state):
        raise MetanetworkError(
            f"{where} is not a MetaPruningModule checkpoint (no metanetwork weights or graph "
            "layout in it). Pass a checkpoint written by meta-training "
            "(`python train.py fit --config configs/<task>/meta.yaml`)")
    return MetaPruningModule.restore(path, hparams).metanetwork.eval()


def trained_criterion(path: str | os.PathLike) -> str:
    """The pruning criterion a metanetwork checkpoint was meta-trained for (l2 for checkpoints
    written before the option existed)."""
    ckpt = networks.safe_load(path, "metanetwork checkpoint")
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    return str((hparams or {}).get("importance") or "l2")


def network_graph(network: nn.Module, example: torch.Tensor, source: str,
                  options: GraphOptions | None = None) -> NetworkGraph:
    """The graph of ``network`` built with ``options`` (default: ``GraphOptions()``); an
    unsupported architecture raises with the fix."""
    try:
        return (options or GraphOptions()).graph(network, example)
    except UnsupportedArchitectureError as e:
        raise UnsupportedArchitectureError(
            f"{source} cannot be encoded as a graph for the metanetwork: {e}. Prune it with "
            "--method none or --method sparse (they need no graph), or use an architecture "
            "the encoder supports (docs/graph.md)") from e


def check_layout(metanetwork: Metanetwork, graph: NetworkGraph, metanetwork_source: str,
                 network_source: str) -> None:
    """Raise ``MetanetworkError`` naming both layouts and both files when they differ."""
    try:
        metanetwork.check_layout(graph)
    except ValueError as e:
        raise MetanetworkError(
            f"{metanetwork_source} was meta-trained for graph layout {metanetwork.layout}, but "
            f"{network_source} has graph layout {graph.layout}. Use a metanetwork meta-trained "
            "on a zoo of this architecture (configs/<task>/meta.yaml), or a network of the "
            "architecture the metanetwork was trained for") from e


@torch.no_grad()
def feedforward(metanetwork: Metanetwork, network: nn.Module, example: torch.Tensor,
                metanetwork_source: str = "metanetwork", network_source: str = "network") -> None:
    """Replace ``network``'s weights in place by the metanetwork's output for them."""
    with networks.evaluating(network):
        device = next(network.parameters()).device
        graph = network_graph(network, example.to(device), network_source,
                              metanetwork.graph_options)
        check_layout(metanetwork, graph, metanetwork_source, network_source)
        weights = graph.decode(metanetwork.to(device).eval()(graph.encode(network)))
        # decode returns every floating tensor; integer buffers (num_batches_tracked) stay.
        state = network.state_dict()
        state.update({k: v.detach().to(state[k].dtype) for k, v in weights.items()})
        network.load_state_dict(state)


class MetanetworkFeedforward(Callback):
    """Modify ``pl_module.network`` with a trained metanetwork before the fit trains it.

    Args:
        checkpoint: a ``MetaPruningModule`` checkpoint (meta-training output).
        input_size: ``[C, H, W]`` of one input image, for tracing the network.
    """

    def __init__(self, checkpoint: str, input_size: Sequence[int] = (3, 32, 32)) -> None:
        self.checkpoint = str(checkpoint)
        self.input_size = [int(s) for s in input_size]
        networks.example_input(self.input_size)  # validate now, not after data loading
        self.done = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit" or self.done:  # once per module
            return
        model = classifier(pl_module, "MetanetworkFeedforward")
        metanetwork = load_metanetwork(self.checkpoint)
        feedforward(metanetwork, model.network, networks.example_input(self.input_size),
                    f"metanetwork checkpoint {self.checkpoint!r}", f"network {model.arch['name']!r}")
        self.done = True
        rank_zero_info(f"metanetwork feedforward applied ({self.checkpoint})")


class SaveNetwork(Callback):
    """Save ``pl_module.network`` in ``setup`` to ``<log_dir>/<filename>`` (network file format).

    List it after a callback that changes the network in ``setup`` (feedforward, pruning) to
    keep the network as it is right after that change. Written by rank 0, atomically; a file
    already there is kept (a resumed run recomputes the same deterministic change).
    """

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.path: Path | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.path = Path(trainer.log_dir or trainer.default_root_dir) / self.filename
        if trainer.is_global_zero and not self.path.is_file():
            model = classifier(pl_module, "SaveNetwork")
            networks.save_network(model.network, self.path, arch=model.arch, metadata=model.lineage())

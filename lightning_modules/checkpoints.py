"""Reading a meta-training checkpoint (a ``MetaPruningModule`` checkpoint) back as its
metanetwork, with errors that say what the file is instead and what to pass."""
from __future__ import annotations

import os

import networks
from graph import Metanetwork, MetanetworkError

from .meta_pruning import MetaPruningModule


def load_metanetwork(path: str | os.PathLike) -> Metanetwork:
    """The metanetwork of a ``MetaPruningModule`` checkpoint (loaded with ``weights_only=True``).

    Errors name the file, what it actually is and what to pass instead."""
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


def trained_architectures(path: str | os.PathLike) -> list[dict] | None:
    """The architecture records of the networks a metanetwork checkpoint was meta-trained on;
    None for checkpoints written before they were recorded."""
    ckpt = networks.safe_load(path, "metanetwork checkpoint")
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    archs = (hparams or {}).get("trained_on")
    return [networks.plain_arch(a) for a in archs] if archs else None


def trained_sparsity(path: str | os.PathLike) -> str:
    """What a metanetwork checkpoint was meta-trained to make prunable: "channels" (also for
    checkpoints written before the option existed) or "weights"."""
    ckpt = networks.safe_load(path, "metanetwork checkpoint")
    hparams = ckpt.get("hyper_parameters") if isinstance(ckpt, dict) else None
    return str((hparams or {}).get("sparsity") or "channels")

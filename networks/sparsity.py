"""Weight sparsity (unstructured and N:M): which individual weights to zero, and keeping them zero.

Structured pruning (networks/pruning.py) removes whole channels, so the network gets smaller and
faster anywhere. This module zeroes individual weights of convolutions and dense layers instead:

* magnitude: the smallest ``|w|`` over all chosen layers (``scope="global"``) or within each
  layer (``scope="layer"``), to a target fraction of zeros;
* N:M: in every run of ``m`` consecutive weights along a layer's input channels, only the ``n``
  largest ``|w|`` are kept (2:4 is what sparse tensor cores execute; the runs follow the input
  channels so that each output's dot product is N:M sparse).

Masks are chosen and kept through training by ``torch.nn.utils.prune`` (the weight is recomputed as
``weight_orig * weight_mask`` before every forward, so an optimizer step cannot revive a zero);
``make_permanent`` folds them into plain weights for saving and export. The network keeps its
shape: the speed-up needs a sparse kernel (a GPU's 2:4 tensor cores, a sparse CPU runtime), which
dense PyTorch on a CPU does not use (docs/structured_pruning.md, "Weight sparsity").
"""
from __future__ import annotations

import copy
from functools import partial
from typing import Callable, cast

import torch
from torch import nn
from torch.nn.utils import prune

SPARSE_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
SCOPES = ("global", "layer")


def sparse_layers(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, nn.Module]:
    """The layers whose weights are sparsified, by module name: every convolution and dense
    layer except those named in ``exclude`` (e.g. the classifier)."""
    unknown = sorted(set(exclude) - {name for name, _ in model.named_modules()})
    if unknown:
        raise ValueError(f"exclude names no module of the network: {unknown}")
    return {name: m for name, m in model.named_modules()
            if isinstance(m, SPARSE_LAYERS) and name not in exclude}


def _input_last(weight: torch.Tensor) -> torch.Tensor:
    """A layer's weight with its input channels as the last dim (``[out, *kernel, in]``)."""
    return weight.movedim(1, -1) if weight.dim() > 2 else weight


def _input_runs(weight: torch.Tensor, m: int) -> torch.Tensor:
    """The weight as rows of ``m`` consecutive weights along the input channels."""
    last = _input_last(weight)
    if last.shape[-1] % m:
        raise ValueError(f"{last.shape[-1]} input channels per output are not a multiple of {m}")
    return last.reshape(-1, m)


def check_nm(model: nn.Module, n: int, m: int, exclude: tuple[str, ...] = ()) -> None:
    """Refuse, naming the layer, N:M sparsity of a layer whose input channels per output are
    not a multiple of ``m``."""
    if not 0 < n < m:
        raise ValueError(f"{n}:{m} sparsity needs 0 < n < m (e.g. 2:4)")
    for name, layer in sparse_layers(model, exclude).items():
        try:
            _input_runs(cast(torch.Tensor, layer.weight).detach(), m)
        except ValueError as e:
            raise ValueError(f"{n}:{m} sparsity of layer {name!r}: {e}; pass it in exclude, or "
                             "choose another M") from None


def nm_dense_layers(model: nn.Module, m: int, exclude: tuple[str, ...] = ()) -> list[str]:
    """The layers of ``sparse_layers(model, exclude)`` whose input channels per output are not a
    multiple of ``m``: an N:M pattern cannot cover them (e.g. a stem convolution reading 3
    image channels), so they stay dense (as NVIDIA's ASP skips them)."""
    dense = []
    for name, layer in sparse_layers(model, exclude).items():
        try:
            _input_runs(cast(torch.Tensor, layer.weight).detach(), m)
        except ValueError:
            dense.append(name)
    return dense


def nm_violations(model: nn.Module, n: int, m: int, exclude: tuple[str, ...] = ()) -> dict[str, int]:
    """Per layer of ``sparse_layers(model, exclude)``: how many runs of ``m`` consecutive
    weights along the input channels hold more than ``n`` non-zero weights (0 everywhere: the
    N:M pattern holds)."""
    return {name: int(((_input_runs(cast(torch.Tensor, layer.weight).detach(), m) != 0).sum(1)
                       > n).sum())
            for name, layer in sparse_layers(model, exclude).items()}


class NMSparsity(prune.BasePruningMethod):
    """``torch.nn.utils.prune`` method keeping the ``n`` largest ``|w|`` of every ``m``
    consecutive weights along a layer's input channels (dim 1 of a convolution or dense
    weight); apply with ``NMSparsity.apply(layer, "weight", n, m)``."""

    PRUNING_TYPE = "unstructured"

    def __init__(self, n: int, m: int) -> None:
        if not 0 < n < m:
            raise ValueError(f"{n}:{m} sparsity needs 0 < n < m (e.g. 2:4)")
        self.n, self.m = n, m

    def compute_mask(self, t: torch.Tensor, default_mask: torch.Tensor) -> torch.Tensor:
        runs = _input_runs(t, self.m).abs()
        keep = torch.zeros_like(runs).scatter_(1, runs.topk(self.n, dim=1).indices, 1.0)
        keep = keep.reshape(_input_last(t).shape)
        return default_mask * (keep.movedim(-1, 1) if t.dim() > 2 else keep)

    @classmethod
    def apply(cls, module: nn.Module, name: str, n: int, m: int) -> "NMSparsity":  # type: ignore[override]
        return super().apply(module, name, n=n, m=m)


def _weight_position(layer: nn.Module) -> int:
    return list(layer._parameters).index("weight")


def _orig_in_place(layer: nn.Module, position: int) -> None:
    """Put ``weight_orig`` at ``weight``'s former ``position`` among the layer's parameters
    (torch's pruning appends it): the parameter order, which optimizers and their saved state
    follow, stays that of the unmasked network, so a checkpoint's optimizer state fits a
    resumed fit."""
    params = layer._parameters
    order = [k for k in params if k != "weight_orig"]
    order.insert(position, "weight_orig")
    reordered = {k: params[k] for k in order}
    params.clear()
    params.update(reordered)


def _mask(layer: nn.Module, apply: Callable[[], object]) -> None:
    """Run a torch pruning ``apply`` on ``layer.weight``, keeping the parameter order (a layer
    masked already keeps its ``weight_orig`` where it is)."""
    if "weight" not in layer._parameters:
        apply()
        return
    position = _weight_position(layer)
    apply()
    _orig_in_place(layer, position)


def sparsify(model: nn.Module, sparsity: float | None = None, nm: tuple[int, int] | None = None,
             scope: str = "global", exclude: tuple[str, ...] = ()) -> None:
    """Mask weights of ``sparse_layers(model, exclude)``, in place, and keep them masked: the
    ``sparsity`` fraction of smallest ``|w|`` over all of them (``scope="global"``) or within
    each (``"layer"``), torch's L1 unstructured pruning; or ``nm=(n, m)``. A layer masked already
    is masked further (torch multiplies the masks)."""
    if (sparsity is None) == (nm is None):
        raise ValueError("give exactly one of sparsity (a fraction of zero weights, e.g. 0.5) "
                         "or nm (e.g. (2, 4))")
    layers = sparse_layers(model, exclude)
    if nm is not None:
        check_nm(model, *nm, exclude=exclude)  # every layer before any is masked
        for layer in layers.values():
            _mask(layer, partial(NMSparsity.apply, layer, "weight", *nm))
        return
    assert sparsity is not None
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity {sparsity}: the fraction of zero weights must be in [0, 1)")
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r}: expected one of {SCOPES}")
    if scope == "global":
        positions = {layer: _weight_position(layer) for layer in layers.values()
                     if "weight" in layer._parameters}
        prune.global_unstructured([(m, "weight") for m in layers.values()],
                                  pruning_method=prune.L1Unstructured, amount=sparsity)
        for layer, position in positions.items():
            _orig_in_place(layer, position)
    else:
        for layer in layers.values():
            _mask(layer, partial(prune.l1_unstructured, layer, "weight", amount=sparsity))


class L1Regularizer:
    """The L1 penalty ``reg * sum |w|`` on the weights of ``sparse_layers(model, exclude)``, as
    a gradient: ``regularize(model)`` adds ``reg * sign(w)`` to their ``.grad`` (the weight-
    sparsity counterpart of torch_pruning's group regularizer in meta-training, with the same
    call). ``penalty_scale``: the penalty is ``penalty_scale * sum(added gradient * w)``."""

    penalty_scale = 1.0

    def __init__(self, model: nn.Module, reg: float, exclude: tuple[str, ...] = ()) -> None:
        self.reg, self.names = float(reg), tuple(sparse_layers(model, exclude))

    @torch.no_grad()
    def regularize(self, model: nn.Module, alpha: float | None = None, bias: bool = False) -> None:
        """``alpha`` and ``bias`` are accepted for the group regularizer's call and unused: the
        penalty has no adaptive strength, and biases stay unpenalized."""
        for name in self.names:
            weight = cast(torch.Tensor, model.get_submodule(name).weight)
            if weight.grad is None:
                weight.grad = torch.zeros_like(weight)
            weight.grad.add_(self.reg * torch.sign(weight))

    @torch.no_grad()
    def norms(self, model: nn.Module) -> torch.Tensor:
        """Every penalized weight's magnitude divided by the largest of its layer (the
        counterpart of ``networks.group_norms``: near 0, magnitude pruning removes it for free)."""
        return torch.cat([(w.abs() / w.abs().max().clamp_min(1e-30)).flatten() for w in (
            cast(torch.Tensor, model.get_submodule(name).weight) for name in self.names)])


def make_permanent(model: nn.Module) -> None:
    """Fold every mask into a plain ``weight`` (zeros where masked): the state_dict and the
    exported files are those of the unmasked architecture again."""
    for module in model.modules():
        if prune.is_pruned(module) and hasattr(module, "weight_mask"):
            prune.remove(module, "weight")


def unmasked_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every mask folded into a plain ``weight`` (zeros where masked);
    ``model`` keeps its masks. (A masked layer's ``weight`` is recomputed from ``weight_orig``
    before every forward, inside autograd, so it is detached first: such a tensor cannot be
    deep-copied.)"""
    for module in model.modules():
        weight = module.__dict__.get("weight")  # a plain attribute only while masked
        if isinstance(weight, torch.Tensor) and hasattr(module, "weight_mask"):
            module.weight = weight.detach()
    out = copy.deepcopy(model)
    make_permanent(out)
    return out


def fold_masked_state(state: dict) -> dict:
    """``state`` (a state_dict) with every masked weight (``<layer>.weight_orig`` and
    ``<layer>.weight_mask``, a checkpoint written while masks were on) as the plain
    ``<layer>.weight`` it computes, ``weight_orig * weight_mask``: a state that loads into the
    unmasked network."""
    out = {}
    for key, value in state.items():
        if key.endswith(".weight_mask") and key[:-len("_mask")] + "_orig" in state:
            continue
        if key.endswith(".weight_orig") and key[:-len("_orig")] + "_mask" in state:
            out[key[:-len("_orig")]] = value * state[key[:-len("_orig")] + "_mask"]
        else:
            out[key] = value
    return out


def masks_from_state(model: nn.Module, state: dict, prefix: str = "") -> None:
    """Mask, before ``state`` loads into ``model``, every layer that ``state`` holds masked
    (``<layer>.weight_mask``) and ``model`` does not yet (a checkpoint written mid-fit)."""
    for key in state:
        if not (key.startswith(prefix) and key.endswith(".weight_mask")):
            continue
        layer = model.get_submodule(key[len(prefix):-len(".weight_mask")])
        if not hasattr(layer, "weight_mask"):
            _mask(layer, partial(prune.custom_from_mask, layer, "weight", state[key]))


def zero_counts(model: nn.Module, exclude: tuple[str, ...] = ()) -> dict[str, tuple[int, int]]:
    """``{layer: (zero weights, weights)}`` over ``sparse_layers(model, exclude)``."""
    return {name: (int((cast(torch.Tensor, m.weight).detach() == 0).sum()),
                   cast(torch.Tensor, m.weight).numel())
            for name, m in sparse_layers(model, exclude).items()}


def weight_sparsity(model: nn.Module, exclude: tuple[str, ...] = ()) -> float:
    """The fraction of exactly-zero weights over the sparsified layers."""
    counts = zero_counts(model, exclude).values()
    total = sum(n for _, n in counts)
    return sum(z for z, _ in counts) / total if total else 0.0

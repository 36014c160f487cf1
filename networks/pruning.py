"""Pure-torch pruning helpers shared by the graph tests, callbacks and benchmarks."""
from __future__ import annotations

import contextlib
import math
import statistics
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch_pruning as tp
from torch import nn
from torch_pruning.dependency import index_mapping as tp_index_mapping
from torch_pruning.utils import op_counter

from .common import evaluating
from .layers import sync_layer_shapes
from .registry import build_arch

MacCounter = Callable[[nn.Module, torch.Tensor], int]


def classifier_layer(model: nn.Module, example_inputs: torch.Tensor) -> nn.Module:
    """The layer that produces the network's output, found by running it (by identity, never
    by matching its width to the class count)."""
    order: list[nn.Module] = []
    hooks = [m.register_forward_hook(lambda mod, i, o: order.append(mod))
             for m in model.modules() if isinstance(m, (nn.modules.conv._ConvNd, nn.Linear))]
    try:
        with evaluating(model), torch.no_grad():
            model(example_inputs)
    finally:
        for h in hooks:
            h.remove()
    if not order:
        raise ValueError(f"{type(model).__name__} has no Conv or Linear layer to prune")
    return order[-1]


def count_macs(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """MACs of one forward pass, as torch_pruning counts them (the number all reports use)."""
    macs, _ = tp.utils.count_ops_and_params(model, example_inputs)
    return int(macs)


def base_macs(arch: dict, example: torch.Tensor) -> int:
    """MACs of the unpruned architecture ``arch`` (``{"name", "num_classes", "kwargs"}``)."""
    return count_macs(build_arch(arch), example)


def count_macs_fast(model: nn.Module, example_inputs: torch.Tensor) -> int:
    """The same number as :func:`count_macs`, from a forward on an empty batch.

    torch_pruning's counter deep-copies the model and runs a real forward with its per-module
    hooks, and every hook reads only shapes and layer attributes. Here the model itself runs
    on a batch of zero images (no arithmetic, no copy), and each hook is handed stand-in meta
    tensors (shape only) with the batch dimension put back: the same per-module numbers at a
    fraction of the cost. A forward that cannot run on an empty batch raises; callers then
    fall back to :func:`count_macs` (see :func:`prune_to_speed_up`).
    """
    mapping = {**op_counter.MODULES_MAPPING, **op_counter.CUSTOM_MODULES_MAPPING}
    batch = len(example_inputs)
    counted: list[nn.Module] = []

    def visit(module: nn.Module) -> None:
        # torch_pruning sums a supported module's own count and does not descend into it.
        if type(module) in mapping:
            counted.append(module)
        else:
            for child in module.children():
                visit(child)

    def full(t):  # shape of t with the real batch size, as a data-free tensor
        if isinstance(t, torch.Tensor) and t.dim() > 0 and t.shape[0] == 0:
            return torch.empty((batch, *t.shape[1:]), device="meta", dtype=t.dtype)
        return t

    def hook(module: nn.Module, inputs: tuple, output) -> None:
        out = tuple(map(full, output)) if isinstance(output, tuple) else full(output)
        mapping[type(module)](module, tuple(map(full, inputs)), out)

    visit(model)
    unique = list(dict.fromkeys(counted))
    for m in unique:  # plain attributes, set past nn.Module's (slow) __setattr__
        vars(m)["__flops__"] = 0
    hooks = [m.register_forward_hook(hook) for m in unique]
    # eval mode, as torch_pruning's counter runs; only modules in training mode are switched
    # (and switched back), so an eval-mode model is not walked twice per count
    training = [m for m in model.modules() if m.training]
    for m in training:
        m.training = False
    try:
        with torch.no_grad():
            model(example_inputs[:0])
        total = sum(int(vars(m)["__flops__"]) for m in counted)
    finally:
        for m in training:
            m.training = True
        for h in hooks:
            h.remove()
        for m in unique:
            vars(m).pop("__flops__", None)
    return int(total / batch)  # torch_pruning reports MACs per image


def _checked_counter(model: nn.Module, example_inputs: torch.Tensor, macs: int) -> MacCounter:
    """:func:`count_macs_fast` when it agrees with torch_pruning's ``macs`` for ``model``
    now, else :func:`count_macs` (a forward the meta device cannot run or count faithfully)."""
    try:
        if count_macs_fast(model, example_inputs) == macs:
            return count_macs_fast
    except Exception:  # noqa: BLE001 - any failure only means the slow, exact path
        pass
    return count_macs


def count_params(model: nn.Module) -> int:
    """Number of parameters of ``model``."""
    return sum(p.numel() for p in model.parameters())


class _SyncedSteps:
    """A torch_pruning pruner mixin: after each step, the layers' shape attributes the library
    does not update (a VisionTransformer's ``hidden_dim``) are set from their tensors, so the
    model runs."""

    model: nn.Module

    def step(self, interactive: bool = False):
        """One pruning step, then the shape attributes."""
        result = super().step(interactive)  # type: ignore[misc]
        if not interactive:
            sync_layer_shapes(self.model)
        return result


class _GroupNormPruner(_SyncedSteps, tp.pruner.GroupNormPruner):
    """torch_pruning's GroupNormPruner whose steps keep shape attributes in sync and whose
    ``regularize`` leaves out groups whose channels all have the same importance (in
    practice a layer pruned down to one channel).

    DepGraph's adaptive strength ``alpha ** ((max - imp) / (max - min))`` is 0/0 there, and the
    library then adds NaN to the gradients of every layer of the group (seen on a zoo member
    whose initial prune left one channel). Such a group's channels cannot be ranked, and a last
    channel is never pruned, so it gets no pull. The library skips a group whose importance
    has a NaN, which is how the group is left out; pruning itself ranks as before."""

    _regularizing = False

    def regularize(self, model: nn.Module, alpha: float = 2 ** 4, bias: bool = False) -> None:
        self._regularizing = True
        try:
            super().regularize(model, alpha=alpha, bias=bias)
        finally:
            self._regularizing = False

    def estimate_importance(self, group) -> torch.Tensor | None:
        imp = super().estimate_importance(group)
        if self._regularizing and imp is not None and bool(imp.max() == imp.min()):
            return torch.full_like(imp, float("nan"))
        return imp


def check_max_pruning_ratio(value: float) -> float:
    """``value`` if it is a valid per-layer cap of :func:`criterion_pruner`, else ValueError."""
    if not 0.0 < value <= 1.0:
        raise ValueError(f"max_pruning_ratio={value} must be in (0, 1]: the largest fraction of a "
                         "layer's channels pruning may remove (1: no cap)")
    return float(value)


class _BNScalePruner(_SyncedSteps, tp.pruner.BNScalePruner):
    """torch_pruning's BNScalePruner (network slimming: L1 on BatchNorm scales), with synced
    steps and the ``regularize`` signature of :class:`_GroupNormPruner` (``alpha`` unused), so
    that sparse training and meta-training call either alike."""

    def regularize(self, model: nn.Module, alpha: float = 2 ** 4, bias: bool = False) -> None:
        super().regularize(model, reg=self.reg, bias=bias)


# Pruning criteria: torch_pruning importances, each ranking channel groups by a mean over the
# group normalised by its maximum (scale-free across layers, so one global ranking is fair;
# LAMP normalises by its own rule).
# l2 is the paper's criterion. Only deterministic criteria that need no data: every DDP rank
# must remove the same channels, and a curve must not depend on a batch.
IMPORTANCES: dict[str, Callable[[], tp.importance.Importance]] = {
    "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="max"),
    "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1, group_reduction="mean", normalizer="max"),
    "fpgm": lambda: tp.importance.FPGMImportance(p=2, group_reduction="mean", normalizer="max"),
    "lamp": lambda: tp.importance.LAMPImportance(p=2, group_reduction="mean", normalizer="lamp"),
    "bn_scale": lambda: tp.importance.BNScaleImportance(group_reduction="mean", normalizer="max"),
}
# The sparse-training regularizer torch_pruning pairs with a criterion: DepGraph's adaptive
# group norm (GroupNormPruner.regularize) with l2, network slimming's L1 on BN scales with
# bn_scale. The others have none, so sparse training and meta-training refuse them.
REGULARIZED = {"l2": _GroupNormPruner, "bn_scale": _BNScalePruner}


def check_importance(name: str, regularized: bool = False) -> str:
    """``name`` if it is a criterion of :data:`IMPORTANCES` (with a regularizer when
    ``regularized``), else ValueError naming the choices."""
    if name not in IMPORTANCES:
        raise ValueError(f"importance {name!r} is unknown; use one of {sorted(IMPORTANCES)}")
    if regularized and name not in REGULARIZED:
        raise ValueError(f"importance {name!r} has no sparse-training regularizer in "
                         f"torch_pruning; sparse training and meta-training take one of "
                         f"{sorted(REGULARIZED)}")
    return name


def criterion_pruner(model: nn.Module, example_inputs: torch.Tensor, iterative_steps: int = 200,
                     reg: float = 1e-4, alpha: float = 4.0, max_pruning_ratio: float = 1.0,
                     importance: str = "l2", round_to: int | None = None) -> tp.pruner.MetaPruner:
    """The pruning criterion (docs/method.md): ``importance`` (default l2, the paper's: global
    group-L2 magnitude, mean over a group, normalized by the max), global ranking, small
    iterative steps, the classifier excluded by identity.

    ``reg`` and ``alpha`` only matter for ``pruner.regularize`` (sparse training), which
    exists for the criteria of :data:`REGULARIZED`. ``max_pruning_ratio`` r below 1 stops
    ranking a group once one of its layers is narrower than 1 - r of its width when the pruner
    was built (torch_pruning's per-layer cap; the step that crosses that floor may remove a few
    channels more). 1, the paper's setting, lets global ranking narrow a layer to a single
    channel. ``round_to`` keeps every pruned width a multiple of it (torch_pruning's rule:
    widths a runtime's kernels favour, e.g. 8 or 16 for SIMD lanes and tensor cores).
    """
    check_max_pruning_ratio(max_pruning_ratio)
    check_importance(importance)
    if round_to is not None and round_to < 1:
        raise ValueError(f"round_to={round_to} must be a positive channel count, e.g. 8")
    # attention splits its width into heads: widths stay multiples of every head count
    heads = [m.num_heads for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    multiples = heads + ([round_to] if round_to else [])
    pruner = REGULARIZED.get(importance, _GroupNormPruner)
    extra = {"alpha": alpha} if pruner is _GroupNormPruner else {}
    return pruner(
        model, example_inputs, importance=IMPORTANCES[importance](), reg=reg, global_pruning=True,
        pruning_ratio=1.0, max_pruning_ratio=max_pruning_ratio, iterative_steps=iterative_steps,
        round_to=math.lcm(*multiples) if multiples else None,
        ignored_layers=[classifier_layer(model, example_inputs)], **extra)


@contextlib.contextmanager
def _index_mappings_per_shape(model: nn.Module) -> Iterator[None]:
    """Within the block, torch_pruning rebuilds its index mappings (concat/split/reshape...)
    only when a parameter shape of ``model`` changed since the last rebuild.

    The library rebuilds every mapping of the whole graph each time it forms a group: hundreds
    of times per pruning step, although nothing changes until channels are removed. The
    mappings depend only on the graph and the layers' channel counts, i.e. on the parameter
    shapes, so skipping a rebuild at unchanged shapes removes the same channels (tests compare
    against the unpatched loop). The patch is undone on exit.
    """
    original = tp_index_mapping.update_index_mapping
    built: dict[int, tuple] = {}
    # Pruning replaces parameters but not modules: read each module's own parameters directly
    # (model.parameters() walks the module tree on every call, which costs more than it saves).
    owners = [m for m in model.modules() if m._parameters]

    def update(graph) -> None:
        shapes = tuple(p.shape for m in owners for p in m._parameters.values() if p is not None)
        if built.get(id(graph)) != shapes:
            original(graph)
            built[id(graph)] = shapes

    tp_index_mapping.update_index_mapping = update
    try:
        yield
    finally:
        tp_index_mapping.update_index_mapping = original


def prune_to_speed_up(model: nn.Module, example_inputs: torch.Tensor, target: float,
                      base_macs: int, iterative_steps: int = 200,
                      mac_counter: MacCounter | None = None,
                      pruner: tp.pruner.MetaPruner | None = None,
                      max_pruning_ratio: float = 1.0, importance: str = "l2") -> float:
    """Prune ``model`` in place, step by step, until MACs(base) / MACs(now) >= ``target``.

    ``base_macs`` are the MACs of the original unpruned architecture, so earlier pruning (the
    zoo's initial prune) counts toward the target. Returns the speed-up reached.

    The MACs after every step come from ``mac_counter``; by default the shape-only
    :func:`count_macs_fast`, checked against torch_pruning's counter before the first step
    and after the last, so the stopping step (hence the channels removed) and the returned
    speed-up are those of the plain loop with :func:`count_macs` (``mac_counter=count_macs``,
    kept for tests and benchmarks).

    ``pruner`` (built on ``model`` with ``iterative_steps`` steps) replaces the criterion of
    :func:`criterion_pruner`, e.g. with more ignored layers; ``max_pruning_ratio`` and
    ``importance`` are that criterion's per-layer cap and importance.
    """
    macs = count_macs(model, example_inputs)
    current = base_macs / macs
    if target <= current:
        raise ValueError(f"speed-up target {target:.3f}x is not above the network's current "
                         f"speed-up {current:.3f}x; ask for a larger target")
    counter = mac_counter or _checked_counter(model, example_inputs, macs)
    pruner = pruner or criterion_pruner(model, example_inputs, iterative_steps,
                                        max_pruning_ratio=max_pruning_ratio, importance=importance)
    plain = mac_counter is not None  # the reference loop: torch_pruning exactly as shipped
    with contextlib.nullcontext() if plain else _index_mappings_per_shape(model):
        for _ in range(iterative_steps):
            params = count_params(model)
            pruner.step()
            if count_params(model) == params and not plain:
                continue  # nothing was removed: same MACs, still below the target
            macs = counter(model, example_inputs)
            current = base_macs / macs
            if current >= target:
                if counter is not count_macs and count_macs(model, example_inputs) != macs:
                    raise RuntimeError("shape-only MAC count disagrees with torch_pruning's "
                                       "after pruning; rerun with mac_counter=networks.count_macs")
                return current
    raise ValueError(f"speed-up target {target:.3f}x is unreachable: {iterative_steps} pruning "
                     f"steps reach {current:.3f}x; lower the target")


CONFIRM_PAIRS = 5  # readings of each network in a paired confirmation


@dataclass(frozen=True)
class PairedLatency:
    """Median readings (ms) of a network and its reference, timed alternately."""
    reference_ms: float
    model_ms: float

    @property
    def speed_up(self) -> float:
        return self.reference_ms / self.model_ms


def paired_latency(measure: Callable[[nn.Module], float], reference: nn.Module, model: nn.Module,
                   pairs: int = CONFIRM_PAIRS) -> PairedLatency:
    """``model`` and ``reference`` timed alternately, ``pairs`` readings each; the median reading
    of each. Alternating puts both under the same machine speed, so drift (other processes,
    clock frequency) cancels instead of passing for a speed-up; the medians discard a stray
    reading."""
    readings: tuple[list[float], list[float]] = ([], [])
    for _ in range(pairs):
        readings[0].append(measure(reference))
        readings[1].append(measure(model))
    return PairedLatency(statistics.median(readings[0]), statistics.median(readings[1]))


def prune_to_latency(model: nn.Module, example_inputs: torch.Tensor, target: float,
                     base_ms: float, measure: Callable[[nn.Module], float],
                     iterative_steps: int = 200, pruner: tp.pruner.MetaPruner | None = None,
                     max_pruning_ratio: float = 1.0, importance: str = "l2",
                     round_to: int | None = None, every: float = 0.02,
                     reference: nn.Module | None = None) -> float:
    """Prune ``model`` in place, step by step, until its *measured* latency speed-up
    ``base_ms / measure(model)`` reaches ``target``; returns the speed-up measured at the stop.

    MACs are not time (small layers, memory traffic and kernel choice decide much of it), so
    the stopping rule reads the clock, not a model of it: the network is timed whenever its
    MACs have fallen by the share ``every`` since it was last timed (0: after every step that
    removed channels), and a time that reaches the target is taken only if a second
    measurement confirms it (the slower of the two counts), so one lucky measurement on a noisy
    machine does not stop the loop early. ``base_ms`` is the latency of the unpruned
    architecture, measured the same way, so earlier pruning counts toward the target. Given
    that architecture as ``reference``, every reading is paired instead
    (:func:`paired_latency`): the reference is timed just before the network (one reading each
    to decide whether to confirm, five each to confirm), so a machine whose speed drifted since
    ``base_ms`` was taken neither stops the loop short of the target nor carries it past (0.2 s
    readings vary by ~10% on a shared 2-core VM, and the machine's speed by more between
    minutes); twice the timing, and ``base_ms`` is then only reported.
    ``measure(model) -> ms`` times the network as it will run (``networks.latency_probe``:
    device, batch size, threads). The criterion, ``pruner``, ``max_pruning_ratio``,
    ``importance`` and ``round_to`` are :func:`prune_to_speed_up`'s and
    :func:`criterion_pruner`'s.
    """
    def speed_up(pairs: int) -> float:
        return (base_ms / measure(model) if reference is None
                else paired_latency(measure, reference, model, pairs).speed_up)

    current = speed_up(1)
    if target <= current:
        raise ValueError(f"latency speed-up target {target:.3f}x is not above the network's "
                         f"measured {current:.3f}x; ask for a larger target")
    pruner = pruner or criterion_pruner(model, example_inputs, iterative_steps,
                                        max_pruning_ratio=max_pruning_ratio,
                                        importance=importance, round_to=round_to)
    timed_at = count_macs_fast(model, example_inputs)
    with _index_mappings_per_shape(model):
        for _ in range(iterative_steps):
            params = count_params(model)
            pruner.step()
            if count_params(model) == params:
                continue  # nothing was removed: the same network
            macs = count_macs_fast(model, example_inputs)
            if macs > timed_at * (1 - every):
                continue
            timed_at, current = macs, speed_up(1)
            if current >= target:  # confirmed, or not yet
                current = (speed_up(CONFIRM_PAIRS) if reference is not None
                           else min(current, speed_up(1)))
                if current >= target:
                    return current
    raise ValueError(f"latency speed-up target {target:.3f}x is unreachable: {iterative_steps} "
                     f"pruning steps reach {current:.3f}x measured; lower the target")


NEAR_ZERO = 0.01  # a normalized group norm below this counts as prunable for free


def near_zero_fraction(pruner: tp.pruner.GroupNormPruner) -> torch.Tensor:
    """Fraction of channel groups whose normalized norm is below ``NEAR_ZERO``."""
    return (group_norms(pruner) < NEAR_ZERO).float().mean()


@torch.no_grad()
def group_norms(pruner: tp.pruner.GroupNormPruner) -> torch.Tensor:
    """L2 norm of every prunable channel group, each divided by the largest in its group.

    Values near 0 mark channels that magnitude pruning removes at no cost; the fraction below
    0.01 is how meta-training and sparse training report progress."""
    norms = []
    for group in pruner._groups:
        imp = pruner.estimate_importance(group)  # mean squared group-L2, normalized by its max
        if imp is not None and torch.isfinite(imp).all():
            norms.append(imp.clamp_min(0).sqrt())
    return torch.cat(norms) if norms else torch.zeros(0)

"""StructuredPruning: dependency-aware channel pruning inside any Lightning fit.

Lightning's own ``ModelPruning`` masks weights (``torch.nn.utils.prune``): the network keeps
its shape and its cost. This callback removes whole channels with Torch-Pruning's dependency
graph (coupled layers, e.g. both sides of a residual sum, pruned together), so the network
gets smaller and faster, and keeps the fit consistent around the change:

* it prunes at the start of the chosen epochs (one shot, or progressively over a range),
  before that epoch's first step, to a MACs speed-up, a measured latency speed-up or a share
  of channels;
* it rebuilds the optimizers and schedulers through ``configure_optimizers`` for the new
  parameters, at the learning rate and schedule position they had (optimizer state such as
  momentum is started afresh: it belonged to the removed shapes);
* under DDP every rank prunes the same channels (the criteria are deterministic functions of
  the replicated weights) and the DDP wrapper is rebuilt around the pruned module;
* a pruned checkpoint's weights carry their shapes: a resumed fit resizes the module's layers
  to them before Lightning loads them, and :meth:`StructuredPruning.load` rebuilds a pruned
  module from a checkpoint.

docs/structured_pruning.md has a complete example on a plain LightningModule.
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch_pruning as tp
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn

import networks
from networks.checkpoint import reshape_to_state
from networks.latency import RUNTIMES, Runtime


class StructuredPruning(Callback):
    """Remove channels of ``pl_module`` (or of its attribute ``module``) during ``fit``.

    Args:
        speed_up: target MACs(before the first pruning) / MACs(after the last); or
        latency_speed_up: target latency(before the first pruning) / latency(after the
            last), measured on the network's device at ``latency_batch_size``
            (``networks.prune_to_latency``); or
        channel_ratio: share of the prunable channels to remove (exactly one of the three).
        epochs: the epoch to prune at, or ``[first, last]``: prune at the start of each of
            these epochs, the speed-up growing geometrically (the ratio linearly) to the target.
        input_size: ``[C, H, W]`` of one input, for tracing and MAC counting.
        importance: a criterion of ``networks.IMPORTANCES`` (l2, l1, fpgm, lamp, bn_scale;
            deterministic ones only, so every DDP rank removes the same channels).
        ignored_layers: module paths (as in ``named_modules``) never pruned; the layer that
            produces the output (the classifier) is always left out.
        module: attribute of the LightningModule holding the network; None prunes the
            LightningModule itself (its ``forward`` must take the input tensor).
        iterative_steps: small pruning steps per epoch for a speed-up target.
        latency_batch_size: the batch size a latency target is measured at.
        latency_runtime: what a latency target is timed in: ``torch`` (eager, on the network's
            device) or ``onnxruntime`` (the network exported to ONNX and run by ONNX Runtime
            on the CPU, as it would be served; ``networks.latency``).
        round_to: keep every pruned width a multiple of this (e.g. 8), as fast kernels like.
        strict: when the fit cannot reach (``max_epochs`` ends before the last pruning epoch)
            or did not reach the target (stopped early): raise an error instead of warning.
            The first check runs before any training, so nothing is lost.
    """

    def __init__(self, speed_up: float | None = None, channel_ratio: float | None = None,
                 epochs: int | Sequence[int] = 0, input_size: Sequence[int] = (3, 32, 32),
                 importance: str = "l2", ignored_layers: Sequence[str] = (),
                 module: str | None = None, iterative_steps: int = 100, strict: bool = False,
                 latency_speed_up: float | None = None, latency_batch_size: int = 1,
                 round_to: int | None = None, latency_runtime: Runtime = "torch") -> None:
        if sum(t is not None for t in (speed_up, latency_speed_up, channel_ratio)) != 1:
            raise ValueError("StructuredPruning: give exactly one of speed_up (e.g. 2.0), "
                             "latency_speed_up (e.g. 2.0) or channel_ratio (e.g. 0.3)")
        for name, value in (("speed_up", speed_up), ("latency_speed_up", latency_speed_up)):
            if value is not None and not value > 1.0:
                raise ValueError(f"StructuredPruning: {name}={value} must be above 1")
        if latency_batch_size < 1 or (round_to is not None and round_to < 1):
            raise ValueError(f"StructuredPruning: latency_batch_size={latency_batch_size} and "
                             f"round_to={round_to} must be positive")
        if latency_runtime not in RUNTIMES:
            raise ValueError(f"StructuredPruning: latency_runtime={latency_runtime!r} is not one "
                             f"of {', '.join(RUNTIMES)}")
        if channel_ratio is not None and not 0.0 < channel_ratio < 1.0:
            raise ValueError(f"StructuredPruning: channel_ratio={channel_ratio} must lie in (0, 1)")
        if importance not in networks.IMPORTANCES:
            raise ValueError(f"StructuredPruning: importance={importance!r} is unknown; use one "
                             f"of {sorted(networks.IMPORTANCES)}")
        first, last = _epoch_range(epochs)
        self.speed_up, self.channel_ratio = speed_up, channel_ratio
        self.latency_speed_up, self.latency_batch_size = latency_speed_up, int(latency_batch_size)
        self.round_to, self.latency_runtime = round_to, latency_runtime
        self.first, self.last = int(first), int(last)
        self.example = torch.zeros(1, *(int(s) for s in input_size))
        self.importance, self.ignored = importance, list(ignored_layers)
        self.module, self.iterative_steps = module, int(iterative_steps)
        self.strict = strict
        self.steps_done: int = 0
        self.base_macs: int | None = None
        self.base_ms: float | None = None  # latency before the first pruning (latency target)
        self._reference: nn.Module | None = None  # the network before it, for paired readings

    # ---- the network, and the callback's own state ------------------------------------
    def network(self, pl_module: LightningModule) -> nn.Module:
        return pl_module if self.module is None else getattr(pl_module, self.module)

    def state_dict(self) -> dict[str, Any]:
        return {"steps_done": self.steps_done, "base_macs": self.base_macs, "base_ms": self.base_ms}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.steps_done, self.base_macs = state_dict["steps_done"], state_dict["base_macs"]
        self.base_ms = state_dict.get("base_ms")

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        """A resumed fit loads a pruned state dict: resize the layers to it first."""
        if stage == "fit" and not getattr(pl_module, "_structured_pruning_hook", None):
            pl_module._structured_pruning_hook = pl_module.register_load_state_dict_pre_hook(
                lambda module, state, prefix, *args: reshape_to_state(module, state, prefix))

    @staticmethod
    def load(pl_module: LightningModule, path: str | Path) -> LightningModule:
        """``pl_module`` (freshly constructed, unpruned) with the pruned shapes and the
        weights of the Lightning checkpoint at ``path``."""
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        reshape_to_state(pl_module, state)
        pl_module.load_state_dict(state)
        return pl_module

    # ---- a fit that ends before the target ---------------------------------------------
    def _short(self, message: str) -> None:
        if self.strict:
            raise RuntimeError(f"StructuredPruning: {message}")
        rank_zero_warn(f"StructuredPruning: {message} (strict=True makes this an error)")

    def _target_text(self) -> str:
        if self.speed_up is not None:
            return f"speed-up {self.speed_up:g}x"
        if self.latency_speed_up is not None:
            return f"latency speed-up {self.latency_speed_up:g}x"
        return f"channel_ratio {self.channel_ratio:g}"

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Before any training: a ``max_epochs`` that ends before the last pruning epoch."""
        if trainer.max_epochs is not None and trainer.max_epochs >= 0 and trainer.max_epochs <= self.last:
            self._short(f"the fit runs epochs 0-{trainer.max_epochs - 1} (max_epochs="
                        f"{trainer.max_epochs}) but pruning is scheduled up to epoch {self.last}: "
                        f"the {self._target_text()} target would not be reached. Raise max_epochs "
                        f"above {self.last} or end the pruning epochs earlier")

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """After the fit: pruning steps that never ran (early stopping, a limit on steps)."""
        self._reference = None
        planned = self.last - self.first + 1
        if self.steps_done < planned:
            network = self.network(pl_module)
            example = self.example.to(next(network.parameters()).device)
            with networks.evaluating(network):
                macs = networks.count_macs(network, example)
            reached = f", speed-up {self.base_macs / macs:.3f}x" if self.base_macs else ""
            self._short(f"the fit ended after {self.steps_done} of {planned} pruning steps"
                        f"{reached}: the {self._target_text()} target was not reached")

    # ---- pruning ---------------------------------------------------------------------------
    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        epoch, steps = trainer.current_epoch, self.last - self.first + 1
        if not self.first <= epoch <= self.last or self.steps_done > epoch - self.first:
            return
        network = self.network(pl_module)
        example = self.example.to(next(network.parameters()).device)
        with networks.evaluating(network):  # tracing runs a forward: BN statistics must not move
            before = networks.count_macs(network, example)
            base = self.base_macs = before if self.base_macs is None else self.base_macs
            k = epoch - self.first + 1
            measured: dict[str, float] = {}  # what only a latency target knows
            if self.speed_up is not None:
                target = self.speed_up ** (k / steps)
                networks.prune_to_speed_up(network, example, target, base, self.iterative_steps,
                                           pruner=self._pruner(network, example, 1.0,
                                                               self.iterative_steps))
            elif self.latency_speed_up is not None:
                measured = self._prune_to_latency(trainer, network, example,
                                                  self.latency_speed_up ** (k / steps))
            else:  # the share of the channels left now that step k removes
                ratio = float(self.channel_ratio or 0.0)  # set whenever no speed-up is
                keep_now, keep_next = 1 - ratio * (k - 1) / steps, 1 - ratio * k / steps
                self._pruner(network, example, 1 - keep_next / keep_now, 1).step()
        self.steps_done = k
        _rebuild_optimizers(trainer)
        _rewrap_ddp(trainer)
        macs, params = networks.count_macs(network, example), networks.count_params(network)
        rank_zero_info(f"StructuredPruning epoch {epoch}: {before:,} -> {macs:,} MACs, "
                       f"{params:,} params, speed-up {base / macs:.3f}x")
        for logger in trainer.loggers:
            logger.log_metrics({"pruning/macs": float(macs), "pruning/params": float(params),
                                "pruning/speed_up": base / macs, **measured},
                                step=trainer.global_step)

    def _prune_to_latency(self, trainer: Trainer, network: nn.Module, example: torch.Tensor,
                          target: float) -> dict[str, float]:
        """Prune until the measured latency speed-up reaches ``target``. Every rank times its
        own copy, but rank 0's reading decides, so all ranks stop at the same step and remove
        the same channels. Every reading times the network right after a copy of it as it was
        before the first pruning (``networks.paired_latency``); a resumed fit has no such copy
        and reads against the stored base."""
        measure = rank_zero_clock(trainer, example.shape[1:], self.latency_batch_size,
                                  example.device, self.latency_runtime)
        if self.base_ms is None:
            self._reference = copy.deepcopy(network).eval()
            self.base_ms = measure(network)
        reached = networks.prune_to_latency(
            network, example, target, self.base_ms, measure, self.iterative_steps,
            pruner=self._pruner(network, example, 1.0, self.iterative_steps),
            reference=self._reference)
        rank_zero_info(f"StructuredPruning: latency {self.base_ms:.3f} -> "
                       f"{self.base_ms / reached:.3f} ms at batch {self.latency_batch_size} "
                       f"({example.device.type}), measured speed-up {reached:.3f}x")
        return {"pruning/latency_speed_up": reached}

    def _pruner(self, network: nn.Module, example: torch.Tensor, ratio: float,
                steps: int) -> tp.pruner.MetaPruner:
        modules = dict(network.named_modules())
        unknown = [n for n in self.ignored if n not in modules]
        if unknown:
            raise ValueError(f"StructuredPruning: ignored_layers {unknown} are not modules of "
                             f"{type(network).__name__}; use names from named_modules()")
        ignored = [networks.classifier_layer(network, example)] + [modules[n] for n in self.ignored]
        return tp.pruner.MetaPruner(network, example, importance=networks.IMPORTANCES[self.importance](),
                                    global_pruning=True, pruning_ratio=ratio,
                                    iterative_steps=steps, ignored_layers=ignored,
                                    round_to=self.round_to)


def rank_zero_clock(trainer: Trainer, input_size: Sequence[int], batch_size: int,
                    device: torch.device, runtime: Runtime = "torch") -> Callable[[nn.Module], float]:
    """``clock(model) -> ms`` (``networks.latency_probe``) whose reading is rank 0's on every
    rank: each rank times its own copy, but all stop a latency-target loop at the same step
    and so remove the same channels."""
    probe = networks.latency_probe(input_size, batch_size, device, runtime=runtime)
    return lambda model: float(trainer.strategy.broadcast(probe(model), src=0))


def _epoch_range(epochs: int | Sequence[int]) -> tuple[int, int]:
    """``epochs`` as ``(first, last)``: one epoch, or a ``[first, last]`` pair."""
    if isinstance(epochs, int) and not isinstance(epochs, bool):
        first = last = epochs
    elif (isinstance(epochs, Sequence) and len(epochs) == 2
          and all(isinstance(e, int) and not isinstance(e, bool) for e in epochs)):
        first, last = epochs
    else:
        raise ValueError(f"StructuredPruning: epochs={epochs!r} must be one epoch (e.g. 1) or a "
                         "pair [first, last] (e.g. [1, 3]: prune at the start of epochs 1, 2 "
                         "and 3)")
    if not 0 <= first <= last:
        raise ValueError(f"StructuredPruning: epochs={epochs!r} must be an epoch or "
                         "[first, last] with 0 <= first <= last")
    return first, last


def _rebuild_optimizers(trainer: Trainer) -> None:
    """New optimizers and schedulers over the pruned parameters (``configure_optimizers``),
    at the old learning rates and schedule positions."""
    old_optimizers, old_schedulers = trainer.optimizers, trainer.lr_scheduler_configs
    trainer.strategy.setup_optimizers(trainer)
    for old, new in zip(old_optimizers, trainer.optimizers):
        for old_group, new_group in zip(old.param_groups, new.param_groups):
            new_group["lr"] = old_group["lr"]
    for old_config, new_config in zip(old_schedulers, trainer.lr_scheduler_configs):
        new_config.scheduler.load_state_dict(old_config.scheduler.state_dict())


def _rewrap_ddp(trainer: Trainer) -> None:
    """DistributedDataParallel registers the parameters it reduces when it is built: build it
    again around the pruned module."""
    from lightning.pytorch.strategies import DDPStrategy

    strategy = trainer.strategy
    if isinstance(strategy, DDPStrategy) and isinstance(strategy.model, nn.parallel.DistributedDataParallel):
        assert strategy.lightning_module is not None  # pruning runs inside a fit
        strategy.model = strategy._setup_model(strategy.lightning_module)
        strategy._register_ddp_hooks()

"""MetaPruningModule: meta-train the GNN metanetwork on a zoo (DESIGN section 6).

One step = one zoo member: W' = decode(M(encode(W))); loss = CE of the target network with
weights W' over ``batches_per_step`` image batches + DepGraph's group-sparsity regularizer on W'.

Single backward: W' is copied into a working copy of the member network (detached leaves), the
cross-entropy gradients of all batches accumulate there, torch_pruning's
``GroupNormPruner.regularize`` adds its gradient, and then one backward pushes that gradient
through decode and the metanetwork. Same gradient as backpropagating each batch through the GNN,
at one GNN backward per step and memory independent of the number of batches.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch_geometric.data import Data

import networks
from graph import Metanetwork, NetworkGraph

from .distributed import destroy_process_group_at_exit



@dataclass
class MemberState:
    """What meta-training keeps per zoo member."""

    graph: NetworkGraph
    data: Data                     # the encoded original weights
    work: nn.Module                # receives the decoded weights; eval mode
    pruner: object                 # torch_pruning GroupNormPruner bound to ``work``

    @classmethod
    def build(cls, network: nn.Module, example: torch.Tensor, reg: float, alpha: float,
              device: torch.device | str = "cpu", identity_edges: str = "diagonal"
              ) -> "MemberState":
        graph = NetworkGraph.from_module(network, example, identity_edges)
        work = copy.deepcopy(network).to(device).eval()
        with torch.enable_grad():  # torch_pruning traces dependencies with autograd
            pruner = networks.magnitude_pruner(work, example.to(device), reg=reg, alpha=alpha)
        data = graph.encode({k: v.to(device) for k, v in network.state_dict().items()})
        return cls(graph, data, work, pruner)


def meta_loss(metanetwork: Metanetwork, member: MemberState, images: torch.Tensor,
              labels: torch.Tensor, alpha: float, distill: float = 0.0
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ce, regularizer value, surrogate): backpropagating the scalar ``surrogate`` gives the
    metanetwork the gradient of the objective (``weight_gradients``) + regularizer, through one
    GNN backward. ``distill`` > 0 mixes in the original network's predictions as soft targets.

    The metanetwork runs twice: without autograd for the image batches, then with it for the
    surrogate. Holding its activations (gigabytes for ResNet-56) through all the batches made
    each batch slower than the same batch alone; one extra forward costs less."""
    soft = original_predictions(member, images) if distill > 0 else None
    with torch.no_grad():
        weights = member.graph.decode(metanetwork(member.data))
    ce, sparsity, grads = weight_gradients(member.work, weights, images, labels, member.pruner,
                                           alpha, soft, distill)
    weights = member.graph.decode(metanetwork(member.data))
    # d(surrogate)/dW' equals the accumulated gradient.
    surrogate = sum((weights[name] * g).sum() for name, g in grads.items())
    return ce, sparsity, surrogate


@torch.no_grad()
def original_predictions(member: MemberState, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities [K, B, classes] of the member's original network on ``images``."""
    _load(member.work, member.graph.decode(member.data))
    return torch.stack([F.softmax(member.work(x), dim=1) for x in images])


def _load(work: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    """Copy ``weights`` (every floating tensor) into ``work``'s parameters and buffers."""
    with torch.no_grad():
        for name, t in [*work.named_parameters(), *work.named_buffers()]:
            if name in weights:
                t.copy_(weights[name])


def weight_gradients(work: nn.Module, weights: dict[str, torch.Tensor], images: torch.Tensor,
                     labels: torch.Tensor, pruner, alpha: float,
                     soft: torch.Tensor | None = None, distill: float = 0.0
                     ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """dL/dW' for the decoded weights ``weights``: the cross-entropy summed over the batches in
    ``images`` [K, B, ...] (DESIGN section 6) plus the group-sparsity gradient. With ``soft``
    (the original network's probabilities, [K, B, classes]) each batch's loss is
    ``(1 - distill) * CE(labels) + distill * CE(soft)`` (ours, not the paper's: distillation
    gives a denser signal per image). Returns (label cross-entropy summed over the batches,
    regularizer value, gradients by parameter name). ``work`` is overwritten with ``weights``."""
    params = dict(work.named_parameters())
    _load(work, weights)
    for p in params.values():
        p.grad = torch.zeros_like(p)
    ce = torch.zeros((), device=images.device)
    for k, (x, y) in enumerate(zip(images, labels)):
        logits = work(x)
        loss = F.cross_entropy(logits, y)
        ce += loss.detach()
        if soft is not None:
            loss = (1.0 - distill) * loss + distill * F.cross_entropy(logits, soft[k])
        loss.backward()
    before = {name: p.grad.clone() for name, p in params.items()}
    pruner.regularize(work, alpha=alpha, bias=False)
    # The regularizer adds reg * gamma * w, the gradient of reg/2 * gamma * |w|^2.
    sparsity = sum(((p.grad - before[n]) * p.detach()).sum() for n, p in params.items()) / 2
    return ce, sparsity, {name: p.grad for name, p in params.items()}


class MetaPruningModule(LightningModule):
    """Meta-training of ``graph.Metanetwork`` (needs ``datamodules.ModelZooDataModule``).

    Args:
        num_layers, hidden, node_res_ratio, edge_res_ratio, update_running_stats: metanetwork
            size and residual ratios (reference ResNet-56: 8 x 64, 0.01, 0.01).
        reg, alpha: strength and adaptivity of the group-sparsity regularizer (reference 10, 16).
        lr, weight_decay: AdamW. milestones, gamma: per-epoch MultiStepLR.
        zero_init_decoders: start the decoders' last layers at zero, so the untrained
            metanetwork is exactly the identity (the reference starts them random: False).
        channel_gates, gate_floor: add one learned scale per channel, closed (exactly 0) once
            it falls below ``gate_floor`` (not in the reference; what lets the metanetwork zero
            channel groups at CPU scale, docs/meta_training.md).
        message_passing: "paper" (the paper's layer exactly) or "joint" (ours: one aggregation
            over both directions, docs/decisions.md).
        identity_edges: how residual identities enter the graph: "diagonal" (one edge per
            channel; the paper's ResNet-50) or "dense" (C x C edges; the paper's CIFAR ResNets).
        distill: weight of the original network's predictions as soft targets in each batch's
            loss, ``(1 - distill) * CE(labels) + distill * CE(original)`` (ours; 0: the paper's
            label cross-entropy).
        layout: the graph layout the metanetwork reads; filled in from the zoo and stored in
            checkpoints, so ``load_from_checkpoint`` needs no zoo.
    """

    def __init__(self, num_layers: int = 8, hidden: int = 64, node_res_ratio: float = 0.01,
                 edge_res_ratio: float = 0.01, update_running_stats: bool = False,
                 reg: float = 10.0, alpha: float = 16.0, lr: float = 1e-3,
                 weight_decay: float = 5e-4, milestones: list[int] | None = None,
                 gamma: float = 0.1, zero_init_decoders: bool = True,
                 channel_gates: bool = False, gate_floor: float = 0.5,
                 message_passing: str = "paper", identity_edges: str = "diagonal",
                 distill: float = 0.0, layout: dict | None = None) -> None:
        super().__init__()
        if not 0.0 <= distill <= 1.0:
            raise ValueError(f"model.init_args.distill={distill} must lie in [0, 1]")
        self.save_hyperparameters()
        self.automatic_optimization = False
        self.metanetwork: Metanetwork | None = None
        self._members: dict[int, MemberState] = {}
        self._original_val: dict[tuple[int, int], tuple] = {}
        if layout is not None:
            self._build(layout)

    @classmethod
    def restore(cls, path, hparams: dict | None = None) -> "MetaPruningModule":
        """``load_from_checkpoint`` (weights only, on the CPU) that also reads checkpoints
        written before the ``message_passing`` option existed: those ran our joint layer.
        ``hparams``: the checkpoint's hyper-parameters when the caller has read them already."""
        saved = hparams if hparams is not None else torch.load(
            path, map_location="cpu", weights_only=True).get("hyper_parameters", {})
        legacy = {} if "message_passing" in saved else {"message_passing": "joint"}
        return cls.load_from_checkpoint(path, map_location="cpu", weights_only=True, **legacy)

    def _build(self, layout: dict) -> None:
        hp = self.hparams
        self.metanetwork = Metanetwork.for_layout(
            layout, hp.num_layers, hp.hidden, hp.node_res_ratio, hp.edge_res_ratio,
            hp.update_running_stats, hp.zero_init_decoders, hp.channel_gates, hp.gate_floor,
            hp.message_passing)

    def configure_model(self) -> None:
        if self.metanetwork is not None:
            return
        zoo = self.trainer.datamodule
        first = zoo.members[zoo.train_ids[0]]
        layout = NetworkGraph.from_module(first.network, zoo.example_input(),
                                          self.hparams.identity_edges).layout
        self.hparams.layout = layout  # saved with every checkpoint
        self._build(layout)

    # -- per-member state ------------------------------------------------------------------
    def _member(self, index: int) -> MemberState:
        if index not in self._members:
            zoo = self.trainer.datamodule
            state = MemberState.build(zoo.members[index].network, zoo.example_input(),
                                      self.hparams.reg, self.hparams.alpha, self.device,
                                      self.metanetwork.identity_edges)
            self.metanetwork.check_layout(state.graph)
            self._members[index] = state
        return self._members[index]

    def modified_weights(self, index: int) -> dict[str, torch.Tensor]:
        """The metanetwork's output for zoo member ``index`` (differentiable)."""
        member = self._member(index)
        return member.graph.decode(self.metanetwork(member.data))

    # -- training ----------------------------------------------------------------------------
    def on_train_epoch_start(self) -> None:
        steps = getattr(self.trainer.datamodule, "train_steps", None)
        if steps is not None:
            steps.set_epoch(self.current_epoch)

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        start = time.perf_counter()
        index, images, labels = batch
        index = int(index)
        member = self._member(index)
        ce, sparsity, surrogate = meta_loss(self.metanetwork, member, images, labels,
                                            self.hparams.alpha, self.hparams.distill)
        if not (math.isfinite(ce.item()) and math.isfinite(float(sparsity))):
            raise FloatingPointError(
                f"meta-training loss is not finite at epoch {self.current_epoch}, step "
                f"{self.global_step} (zoo member {index}: ce={ce.item()}, "
                f"sparsity={float(sparsity)}); the last good checkpoint is kept. Lower "
                "model.init_args.lr or reg, or resume from that checkpoint")
        optimizer = self.optimizers()
        optimizer.zero_grad()
        self.manual_backward(surrogate)
        optimizer.step()
        fraction = networks.near_zero_fraction(member.pruner)
        self.log_dict({"train/ce": ce / len(images), "train/sparsity": sparsity,
                       "train/near_zero_groups": fraction,
                       "train/lr": optimizer.param_groups[0]["lr"],
                       "train/sec_per_step": time.perf_counter() - start},
                      on_step=True, on_epoch=False, prog_bar=True, batch_size=1)
        return ce

    def on_train_epoch_end(self) -> None:
        self.lr_schedulers().step()

    # -- validation: meta-val members, never trained on --------------------------------------
    @torch.no_grad()
    def _evaluate(self, member: MemberState, weights: dict, images, labels) -> tuple:
        """(cross-entropy, normalized group norms) of ``member`` with ``weights`` (parameters
        and BN statistics, as training uses them)."""
        _load(member.work, weights)
        ce = sum(F.cross_entropy(member.work(x), y) for x, y in zip(images, labels)) / len(images)
        return ce, networks.group_norms(member.pruner)

    @torch.no_grad()
    def validation_step(self, batch, batch_idx: int) -> None:
        index, images, labels = batch
        member = self._member(int(index))
        # The unmodified member on the same (fixed) val images: the same every epoch, so once.
        key = (int(index), batch_idx)
        if key not in self._original_val:
            self._original_val[key] = self._evaluate(member, member.graph.decode(member.data),
                                                     images, labels)
        ce0, norms0 = self._original_val[key]
        ce, norms = self._evaluate(member, self.modified_weights(int(index)), images, labels)
        # The near-zero fraction moves only late; the 10% quantile of the normalized group
        # norms shows the spread growing long before.
        self.log_dict({"val/ce": ce, "val/near_zero_groups": (norms < networks.NEAR_ZERO).float().mean(),
                       "val/group_norm_q10": norms.quantile(0.1),
                       "val/ce_original": ce0,
                       "val/near_zero_groups_original": (norms0 < networks.NEAR_ZERO).float().mean(),
                       "val/group_norm_q10_original": norms0.quantile(0.1)},
                      on_epoch=True, prog_bar=True, batch_size=1, sync_dist=True)
        if isinstance(self.logger, TensorBoardLogger) and batch_idx == 0:
            self.logger.experiment.add_histogram("val/group_norms", norms, self.global_step)

    def setup(self, stage: str) -> None:
        destroy_process_group_at_exit()

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.AdamW(self.metanetwork.parameters(), lr=hp.lr,
                                      weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(hp.milestones or []),
                                                         hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

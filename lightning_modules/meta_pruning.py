"""MetaPruningModule: meta-train the GNN metanetwork on a zoo (docs/method.md); the objective
itself is ``objective.training``."""
from __future__ import annotations

import math
import time
from typing import Any

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger

import networks
from graph import GraphOptions, Metanetwork
from metaprune.errors import UserError
from objective import MemberState, PrunedView, load_weights, meta_loss

from .distributed import destroy_process_group_at_exit

SPARSITY_MODES = ("channels", "weights")


class MetaPruningModule(LightningModule):
    """Meta-training of ``graph.Metanetwork`` (needs ``datamodules.ModelZooDataModule``).

    Args:
        num_layers, hidden, node_res_ratio, edge_res_ratio, update_running_stats: metanetwork
            size and residual ratios (reference ResNet-56: 8 x 64, 0.01, 0.01).
        reg, alpha: strength and adaptivity of the group-sparsity regularizer (reference 10, 16).
        importance: the pruning criterion the metanetwork is trained for (``networks.IMPORTANCES``
            with a regularizer: l2, the paper's DepGraph group norm, or bn_scale, L1 on BN
            scales); stored in checkpoints, and ``prune.py run`` refuses a metanetwork trained
            for another criterion than the run's unless told otherwise.
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
        attention: how self-attention enters the graph: "heads" (ours: head nodes, exactly the
            network's symmetries) or "paper" (the paper's ViT encoding; docs/graph.md).
        distill: weight of the original network's predictions as soft targets in each batch's
            loss, ``(1 - distill) * CE(labels) + distill * CE(original)`` (ours; 0: the paper's
            label cross-entropy).
        augment: weight-space augmentation (ours): each step, the member's BN-normalized
            channels are rescaled by random factors in [1/augment, augment] with the BN
            statistics compensating, so the function is the same and the norms differ
            (``objective.augment``); 1: off (the paper).
        pruned_view, pruned_fraction: weight of a second loss per batch, on the network with
            its lowest-ranked channels removed (a share drawn per step from
            ``pruned_fraction``), BatchNorm on batch statistics (ours, ``objective.pruned_view``;
            0: off, the paper).
        sparsity: what the metanetwork is trained to make prunable: "channels" (the group
            regularizer of ``importance``, the paper's) or "weights" (ours: L1 ``reg * |w|`` on
            every conv/linear weight, for unstructured and N:M sparsity, ``networks.sparsity``;
            ``alpha`` and ``pruned_view`` do not apply). Stored in checkpoints; ``prune.py
            run`` takes a "weights" metanetwork for a weight-sparsity or N:M target only, and a
            "channels" one for a speed-up only.
        layout: the graph layout the metanetwork reads; filled in from the zoo and stored in
            checkpoints, so ``load_from_checkpoint`` needs no zoo.
        trained_on: the architecture records (name, num_classes, kwargs) of the meta-training
            members; filled in from the zoo and stored in checkpoints, so that applying the
            metanetwork to another architecture is said and recorded (``prune.py run``).
    """

    def __init__(self, num_layers: int = 8, hidden: int = 64, node_res_ratio: float = 0.01,
                 edge_res_ratio: float = 0.01, update_running_stats: bool = False,
                 reg: float = 10.0, alpha: float = 16.0, importance: str = "l2", lr: float = 1e-3,
                 weight_decay: float = 5e-4, milestones: list[int] | None = None,
                 gamma: float = 0.1, zero_init_decoders: bool = True,
                 channel_gates: bool = False, gate_floor: float = 0.5,
                 message_passing: str = "paper", identity_edges: str = "diagonal",
                 attention: str = "heads", distill: float = 0.0, augment: float = 1.0,
                 pruned_view: float = 0.0, pruned_fraction: tuple[float, float] = (0.1, 0.4),
                 sparsity: str = "channels", layout: dict | None = None,
                 trained_on: list[dict] | None = None) -> None:
        super().__init__()
        try:
            networks.check_importance(importance, regularized=True)
        except ValueError as e:
            raise UserError(f"model.init_args.importance: {e}") from None
        if sparsity not in SPARSITY_MODES:
            raise UserError(f"model.init_args.sparsity={sparsity!r}: expected one of "
                            f"{SPARSITY_MODES}")
        if sparsity == "weights" and pruned_view:
            raise UserError("model.init_args.pruned_view removes channels; it does not apply to "
                            "sparsity: weights (set pruned_view: 0)")
        if not 0.0 <= distill <= 1.0:
            raise UserError(f"model.init_args.distill={distill} must lie in [0, 1]")
        if augment < 1.0:
            raise UserError(f"model.init_args.augment={augment}: channels are rescaled by "
                            "factors in [1/augment, augment], so it must be at least 1 (1: off)")
        try:
            self.view = PrunedView(pruned_view, tuple(pruned_fraction))  # type: ignore[arg-type]
        except ValueError as e:
            raise UserError(f"model.init_args.pruned_view / pruned_fraction: {e}") from None
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
        legacy: dict[str, Any] = {} if "message_passing" in saved else {"message_passing": "joint"}
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
        options = GraphOptions(self.hparams.identity_edges, self.hparams.attention)
        layout = options.graph(first.network, zoo.example_input()).layout
        self.hparams.layout = layout  # saved with every checkpoint
        self.hparams.trained_on = networks.distinct_architectures(
            zoo.members[i].record["arch"] for i in zoo.train_ids)
        self._build(layout)

    # -- per-member state ------------------------------------------------------------------
    def _member(self, index: int) -> MemberState:
        if index not in self._members:
            zoo = self.trainer.datamodule
            state = MemberState.build(zoo.members[index].network, zoo.example_input(),
                                      self.hparams.reg, self.hparams.alpha, self.device,
                                      self.gnn.graph_options, self.hparams.importance,
                                      self.hparams.sparsity)
            self.gnn.check_layout(state.graph)
            self._members[index] = state
        return self._members[index]

    @property
    def gnn(self) -> Metanetwork:
        """The metanetwork; built from the zoo's layout by ``configure_model`` (or at once when
        a ``layout`` was given)."""
        if self.metanetwork is None:
            raise RuntimeError("the metanetwork is built in configure_model, from the data's zoo "
                               "layout: attach a ModelZooDataModule (trainer.fit) or pass layout=")
        return self.metanetwork

    def modified_weights(self, index: int) -> dict[str, torch.Tensor]:
        """The metanetwork's output for zoo member ``index`` (differentiable)."""
        member = self._member(index)
        return member.graph.decode(self.gnn(member.data))

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
        ce, sparsity, surrogate = meta_loss(self.gnn, member, images, labels, self.hparams.alpha,
                                            self.hparams.distill, self.hparams.augment, self.view)
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
        fraction = (member.prunable_norms() < networks.NEAR_ZERO).float().mean()
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
        """(cross-entropy, normalized norms of what pruning removes) of ``member`` with
        ``weights`` (parameters and BN statistics, as training uses them)."""
        load_weights(member.work, weights)
        ce = sum(F.cross_entropy(member.work(x), y) for x, y in zip(images, labels)) / len(images)
        return ce, member.prunable_norms()

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
        optimizer = torch.optim.AdamW(self.gnn.parameters(), lr=hp.lr,
                                      weight_decay=hp.weight_decay)
        scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, list(hp.milestones or []),
                                                         hp.gamma)
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

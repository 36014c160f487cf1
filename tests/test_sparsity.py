"""Weight sparsity (issue 31): magnitude (global and per layer) and N:M masks against orders and
loops written out by hand, masks that survive training, plain weights after the fit, and a
checkpoint written with masks on that loads back into a fresh module."""
from __future__ import annotations

import itertools

import pytest
import torch
from lightning.pytorch import LightningModule, Trainer
from pruning_helpers import TinyNet
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from callbacks import WeightSparsity
from networks.sparsity import make_permanent, sparse_layers, sparsify, weight_sparsity

LAYERS = ("features.0", "features.3", "head")


def tiny(seed: int = 0, width: int = 8) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(num_classes=4, width=width)


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: model.get_submodule(name).weight.detach().clone() for name in LAYERS}


def test_global_magnitude_zeroes_the_smallest_weights_of_all_layers_together() -> None:
    model = tiny()
    before = weights(model)
    sparsify(model, sparsity=0.6, scope="global")
    make_permanent(model)
    # oracle: rank every weight of every layer by |w| in one list
    ranked = sorted((abs(float(w)), name, i) for name, t in before.items()
                    for i, w in enumerate(t.flatten()))
    count = round(0.6 * len(ranked))
    zeroed = {(name, i) for _, name, i in ranked[:count]}
    after = weights(model)
    for name, t in after.items():
        for i, w in enumerate(t.flatten().tolist()):
            assert (w == 0.0) == ((name, i) in zeroed)
            if w != 0.0:
                assert w == float(before[name].flatten()[i])  # kept weights untouched
    # global: the layers end up at different sparsities
    shares = {name: float((t == 0).float().mean()) for name, t in after.items()}
    assert len({round(v, 3) for v in shares.values()}) > 1
    assert weight_sparsity(model) == pytest.approx(count / len(ranked))


def test_per_layer_magnitude_gives_every_layer_the_same_share() -> None:
    model = tiny(1)
    before = weights(model)
    sparsify(model, sparsity=0.5, scope="layer", exclude=("head",))
    make_permanent(model)
    after = weights(model)
    assert torch.equal(after["head"], before["head"])  # excluded: dense
    for name in ("features.0", "features.3"):
        flat, orig = after[name].flatten(), before[name].flatten().abs()
        assert int((flat == 0).sum()) == round(0.5 * flat.numel())
        assert orig[flat == 0].max() <= orig[flat != 0].min()  # the smallest went


def test_two_four_keeps_the_two_largest_of_every_four_input_channels() -> None:
    model = tiny(2)
    before = weights(model)
    sparsify(model, nm=(2, 4), exclude=("features.0",))  # 3 input channels: not a multiple
    make_permanent(model)
    after = weights(model)
    for name in ("features.3", "head"):
        w, orig = after[name], before[name]
        kernel = [range(k) for k in w.shape[2:]]
        for out, *pos in itertools.product(range(w.shape[0]), *kernel):
            for start in range(0, w.shape[1], 4):
                run = [(out, c, *pos) for c in range(start, start + 4)]
                order = sorted(run, key=lambda idx: -abs(float(orig[idx])))
                for idx in order[:2]:
                    assert float(w[idx]) == float(orig[idx])
                for idx in order[2:]:
                    assert float(w[idx]) == 0.0
    assert weight_sparsity(model, exclude=("features.0",)) == 0.5


def test_bad_settings_are_refused_by_name() -> None:
    model = tiny()
    with pytest.raises(ValueError, match="2:4 sparsity of layer 'features.0': 3 input channels"):
        sparsify(model, nm=(2, 4))
    assert not any(hasattr(m, "weight_mask") for m in model.modules())  # nothing half masked
    with pytest.raises(ValueError, match=r"exclude names no module.*\['classifier'\]"):
        sparsify(model, sparsity=0.5, exclude=("classifier",))
    with pytest.raises(ValueError, match="exactly one of sparsity"):
        sparsify(model)
    with pytest.raises(ValueError, match="must lie in"):
        WeightSparsity(sparsity=1.0)
    with pytest.raises(ValueError, match=r"nm=\[4, 2\]"):
        WeightSparsity(nm=[4, 2])


class Lit(LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.network = tiny(3)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return nn.functional.cross_entropy(self.network(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.5, momentum=0.9)


def _fit(model: Lit, callback: WeightSparsity, epochs: int, tmp_path, ckpt: str | None = None,
         **kwargs) -> Trainer:
    torch.manual_seed(0)
    data = DataLoader(TensorDataset(torch.randn(16, 3, 16, 16), torch.randint(0, 4, (16,))),
                      batch_size=8)
    trainer = Trainer(max_epochs=epochs, callbacks=[callback], accelerator="cpu", logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path, **kwargs)
    trainer.fit(model, data, ckpt_path=ckpt)
    return trainer


def test_masks_hold_through_training_and_the_fit_ends_with_plain_weights(tmp_path) -> None:
    model = Lit()
    start = weights(model.network)
    _fit(model, WeightSparsity(nm=[2, 4], exclude=["features.0"], module="network", epoch=1), 3,
         tmp_path, enable_checkpointing=False)
    net = model.network
    assert not any(hasattr(m, "weight_orig") for m in net.modules())  # plain parameters again
    assert set(dict(net.named_parameters())) == set(dict(tiny().named_parameters()))
    for name in ("features.3", "head"):
        w = net.get_submodule(name).weight.detach()
        runs = w.movedim(1, -1).reshape(-1, 4) if w.dim() > 2 else w.reshape(-1, 4)
        assert ((runs != 0).sum(1) == 2).all()  # zeros stayed zero through two more epochs
    assert not torch.equal(net.get_submodule("features.3").weight, start["features.3"])  # trained


def test_a_checkpoint_written_with_masks_on_resumes_in_a_fresh_module(tmp_path) -> None:
    first = Lit()
    trainer = _fit(first, WeightSparsity(sparsity=0.7, module="network"), 1, tmp_path)
    ckpt = trainer.checkpoint_callback.best_model_path
    state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
    assert "network.features.3.weight_mask" in state  # saved while the masks were on
    resumed = Lit()
    _fit(resumed, WeightSparsity(sparsity=0.7, module="network"), 2, tmp_path / "again",
         enable_checkpointing=False, ckpt=ckpt)
    zero = state["network.features.3.weight_mask"] == 0
    assert (resumed.network.get_submodule("features.3").weight.detach()[zero] == 0).all()
    assert weight_sparsity(resumed.network) == pytest.approx(0.7, abs=1 / 600)
    assert sparse_layers(resumed.network).keys() == set(LAYERS)


def test_the_l1_regularizer_adds_reg_times_sign_to_conv_and_linear_weights_only() -> None:
    from networks.sparsity import L1Regularizer

    model = tiny(4)
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    L1Regularizer(model, reg=0.01, exclude=("head",)).regularize(model, alpha=4.0, bias=False)
    for name, p in model.named_parameters():
        if name in ("features.0.weight", "features.3.weight"):
            assert torch.equal(p.grad, 0.01 * torch.sign(p.detach()))  # d/dw of 0.01 |w|
        else:
            assert not p.grad.any(), name  # biases, BatchNorm, the excluded head


def test_weight_sparsity_meta_training_penalizes_l1_and_records_its_mode(
        tmp_path) -> None:
    from lightning_modules import MetaPruningModule, trained_sparsity
    from metaprune.errors import UserError
    from networks.sparsity import L1Regularizer
    from objective.training import weight_gradients

    # the penalty weight_gradients reports is reg * sum |w| over the sparsified layers
    model = tiny(5)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    images, labels = torch.randn(1, 4, 3, 16, 16), torch.randint(0, 4, (1, 4))
    _, penalty, grads = weight_gradients(model, weights, images, labels,
                                         L1Regularizer(model, 0.01), alpha=16.0)
    expected = 0.01 * sum(float(weights[f"{n}.weight"].abs().sum()) for n in LAYERS)
    assert float(penalty) == pytest.approx(expected, rel=1e-6)
    # the mode is validated and recorded in checkpoints (prune.py run takes it for weight targets only:
    # tests/test_prune_weights.py, tests/test_prune_run_errors.py)
    with pytest.raises(UserError, match="pruned_view removes channels"):
        MetaPruningModule(num_layers=1, hidden=4, sparsity="weights", pruned_view=1.0)
    with pytest.raises(UserError, match=r"sparsity='rows'"):
        MetaPruningModule(num_layers=1, hidden=4, sparsity="rows")
    module = MetaPruningModule(num_layers=1, hidden=4, sparsity="weights")
    path = tmp_path / "meta.ckpt"
    torch.save({"hyper_parameters": dict(module.hparams), "state_dict": {}}, path)
    assert trained_sparsity(path) == "weights"
    torch.save({"hyper_parameters": {"reg": 10.0}, "state_dict": {}}, path)  # before the option
    assert trained_sparsity(path) == "channels"


def test_a_weight_sparsity_meta_training_step_runs_and_logs_its_penalty(tiny_cifar, tmp_path,
                                                                      make_zoo) -> None:
    from lightning.pytorch import seed_everything

    from datamodules import ImageDataModule, ModelZooDataModule
    from lightning_modules import MetaPruningModule

    seed_everything(0)
    zoo = make_zoo(tmp_path / "zoo")
    images = ImageDataModule(str(tiny_cifar), dataset="cifar10", num_classes=3, batch_size=8,
                             num_workers=0, val_fraction=0.25)
    data = ModelZooDataModule(str(zoo), images, meta_val_members=1, batches_per_step=1, batch_size=4)
    module = MetaPruningModule(num_layers=1, hidden=8, reg=1e-3, sparsity="weights")
    trainer = Trainer(max_steps=2, accelerator="cpu", logger=False, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False,
                      limit_val_batches=1, default_root_dir=tmp_path)
    trainer.fit(module, data)
    metrics = trainer.callback_metrics
    for key in ("train/ce", "train/sparsity", "train/near_zero_groups", "val/near_zero_groups"):
        assert torch.isfinite(metrics[key]), key
    assert float(metrics["train/sparsity"]) > 0  # reg * sum |w| of the decoded weights


def test_a_masked_network_copies_and_its_checkpoint_state_loads_as_plain_weights() -> None:
    """What the pipeline's stage 2 saves: a copy with the masks folded in (the masked network,
    its weight recomputed inside autograd, cannot be deep-copied as it is), and a state_dict
    written with masks on loaded into the plain network (the best checkpoint's export)."""
    from networks.sparsity import fold_masked_state, unmasked_copy

    model = tiny(6)
    sparsify(model, sparsity=0.5)
    model(torch.randn(2, 3, 16, 16)).sum().backward()  # weight = weight_orig * mask, in the graph
    copy = unmasked_copy(model)
    assert hasattr(model.get_submodule("head"), "weight_mask")  # the original keeps its masks
    assert not any(hasattr(m, "weight_mask") for m in copy.modules())
    plain = tiny(7)
    plain.load_state_dict(fold_masked_state(model.state_dict()))
    x = torch.randn(2, 3, 16, 16)
    for name in LAYERS:
        expected = (model.get_submodule(name).weight_orig * model.get_submodule(name).weight_mask).detach()
        assert torch.equal(copy.get_submodule(name).weight, expected)
        assert torch.equal(plain.get_submodule(name).weight, expected)
    with torch.no_grad():
        assert torch.equal(plain.eval()(x), model.eval()(x))
    assert weight_sparsity(copy) == pytest.approx(0.5, abs=1 / 600)

"""Meta-training (issue 4): single-backward gradient, a fit on a tiny zoo, checkpoints."""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from benchmark_helpers import benchmark_module
from lightning.pytorch import Callback, Trainer, seed_everything
from pruning_helpers import random_prune

import networks
from datamodules import ImageDataModule, ModelZooDataModule
from datamodules.zoo_manifest import ZooError, add_member, member_file, read_manifest
from graph import Metanetwork, NetworkGraph
from lightning_modules import MetaPruningModule
from objective import MemberState, meta_loss, weight_gradients
from pipeline.select import zoo_datamodule

X32 = torch.randn(1, 3, 32, 32)


@pytest.mark.parametrize("gates", [False, True], ids=["additive", "channel_gates"])
def test_single_backward_gradient_equals_per_batch_backward(gates):
    torch.manual_seed(0)
    model = random_prune(networks.build("resnet8_cifar", 3, width=0.5), X32, 0.3, 0)
    model = model.double().eval()
    graph = NetworkGraph.from_module(model, X32.double())
    meta = Metanetwork.for_graph(graph, num_layers=2, hidden=8, node_res_ratio=0.1,
                                 edge_res_ratio=0.1, channel_gates=gates).double()
    if gates:  # gates spread around 1 (some closed), so the gate path carries gradient
        torch.nn.init.normal_(meta.gate_decoder[-1].weight, std=0.5)
    data = graph.encode(model)
    images, labels = torch.randn(4, 6, 3, 32, 32, dtype=torch.double), torch.randint(0, 3, (4, 6))
    work = networks.build("resnet8_cifar", 3, width=0.5)
    work = networks.network_from_record(networks.network_record(
        model, {"name": "resnet8_cifar", "num_classes": 3, "kwargs": {"width": 0.5}})).double()
    pruner = networks.criterion_pruner(work.eval(), X32.double(), reg=10.0, alpha=16.0)

    # ours: accumulate dL/dW' on detached leaves, one backward through the metanetwork
    weights = graph.decode(meta(data))
    _, _, grads = weight_gradients(work, weights, images, labels, pruner, alpha=16.0)
    sum((weights[k] * g).sum() for k, g in grads.items()).backward()
    ours = [p.grad.clone() for p in meta.parameters()]
    meta.zero_grad()

    # naive: one backward through the metanetwork per image batch, plus the regularizer's
    reg_grads = {k: g.clone() for k, g in grads.items()}
    _, _, ce_only = weight_gradients(work, {k: v.detach() for k, v in weights.items()}, images,
                                     labels, _NoRegularizer(), alpha=16.0)
    for k in reg_grads:
        reg_grads[k] -= ce_only[k]
    for x, y in zip(images, labels):
        w = graph.decode(meta(data))
        out = torch.func.functional_call(work, w, (x,))
        F.cross_entropy(out, y).backward()
    w = graph.decode(meta(data))
    sum((w[k] * g).sum() for k, g in reg_grads.items()).backward()
    naive = [p.grad for p in meta.parameters()]
    assert any(g.abs().sum() > 0 for g in naive)
    for a, b in zip(ours, naive):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-12)


class _NoRegularizer:
    def regularize(self, model, alpha, bias):
        pass


def _datamodule(zoo: Path, images_root: Path, **kwargs) -> ModelZooDataModule:
    images = ImageDataModule(str(images_root), dataset="cifar10", num_classes=3, batch_size=8,
                             num_workers=0, val_fraction=0.25)
    return ModelZooDataModule(str(zoo), images, meta_val_members=1, batches_per_step=2,
                              batch_size=4, **kwargs)


def test_meta_training_fit_logs_checkpoints_every_epoch_and_reloads(tiny_cifar, tmp_path, make_zoo):
    seed_everything(0)
    zoo = make_zoo(tmp_path / "zoo")
    dm = _datamodule(zoo, tiny_cifar)
    module = MetaPruningModule(num_layers=2, hidden=8, reg=10.0, milestones=[1],
                               channel_gates=True)
    from lightning.pytorch.callbacks import ModelCheckpoint
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                           filename="epoch{epoch:03d}", auto_insert_metric_name=False)
    trainer = Trainer(max_epochs=2, accelerator="cpu", callbacks=[ckpt], logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    assert module.metanetwork is None  # built in configure_model, from the zoo's layout
    trainer.fit(module, dm)
    assert module.metanetwork is not None
    assert dm.val_ids and set(dm.val_ids).isdisjoint(dm.train_ids)
    metrics = trainer.callback_metrics
    for key in ("train/ce", "train/sparsity", "train/near_zero_groups", "val/ce",
                "val/near_zero_groups", "train/sec_per_step"):
        assert key in metrics and torch.isfinite(metrics[key]), key
    assert metrics["train/lr"] == pytest.approx(1e-4)  # decayed at the epoch-1 milestone
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["epoch000.ckpt", "epoch001.ckpt"]
    loaded = MetaPruningModule.load_from_checkpoint(tmp_path / "ckpt" / "epoch001.ckpt",
                                                    weights_only=True)
    assert loaded.metanetwork.gate_decoder is not None  # the architecture comes back whole
    for a, b in zip(loaded.metanetwork.parameters(), module.metanetwork.parameters()):
        assert torch.equal(a, b)
    assert loaded.hparams.layout == module.hparams.layout


def test_zoo_errors_name_the_manifest(tiny_cifar, tmp_path, make_zoo):
    with pytest.raises(ZooError, match="manifest.json.*does not exist.*prune.py zoo"):
        _datamodule(tmp_path, tiny_cifar).setup("fit")
    zoo = make_zoo(tmp_path / "zoo", count=1)
    with pytest.raises(ZooError, match="members of 1 trained networks.*meta_val_members=1"):
        _datamodule(zoo, tiny_cifar).setup("fit")
    (zoo / "manifest.json").write_text("{broken")
    with pytest.raises(ZooError, match="manifest.json.*cannot be read as JSON"):
        _datamodule(zoo, tiny_cifar).setup("fit")


def test_meta_val_split_holds_out_every_variant_of_a_seed(tiny_cifar, tmp_path, make_zoo):
    zoo = make_zoo(tmp_path / "zoo", count=3)
    rows = read_manifest(zoo)["members"]
    for row in rows:  # a second member of each trained network
        shutil.copy(zoo / row["file"], zoo / member_file(row["seed"], "v"))
        add_member(zoo, dict(row, variant="v", file=member_file(row["seed"], "v")))
    for seed in range(3):
        dm = _datamodule(zoo, tiny_cifar, seed=seed)
        dm.setup("fit")
        rows = [m.row for m in dm.members]
        held_out = int(torch.randperm(3, generator=torch.Generator().manual_seed(seed))[-1])
        assert [(rows[i]["seed"], rows[i]["variant"]) for i in dm.val_ids] == \
            [(held_out, ""), (held_out, "v")]
        assert sorted(dm.train_ids + dm.val_ids) == list(range(6))


META_CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*/meta.yaml"))


def test_every_task_has_a_meta_config():
    assert {p.parent.name for p in META_CONFIGS} == {"demo", "resnet56_cifar10",
                                                     "vgg19_cifar100", "resnet50_imagenet",
                                                     "vit_b16_imagenet", "vit_cifar10"}


@pytest.mark.parametrize("config", META_CONFIGS, ids=lambda p: p.parent.name)
def test_meta_config_runs_through_train_py(config, tiny_cifar, tmp_path, monkeypatch, make_zoo):
    """Each shipped meta config parses and meta-trains one step (fast_dev_run) on a tiny zoo
    through the same CLI users run; the config's own metanetwork size is kept."""
    from pipeline.train import main
    monkeypatch.setattr("sys.argv", ["train.py"])
    zoo = make_zoo(tmp_path / "zoo")
    cli = main(["fit", "--config", str(config), f"--data.init_args.zoo={zoo}",
                f"--data.init_args.images.init_args.root={tiny_cifar}",
                "--data.init_args.images.init_args.dataset=cifar10",
                "--data.init_args.images.init_args.num_classes=3",
                "--data.init_args.images.init_args.num_workers=0",
                "--data.init_args.images.init_args.download=false",
                "--data.init_args.batch_size=2", "--data.init_args.batches_per_step=2",
                "--trainer.accelerator=cpu", "--trainer.devices=1", "--trainer.fast_dev_run=true",
                f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--trainer.enable_progress_bar=false"])
    assert cli.trainer.state.finished
    hidden = cli.model.metanetwork.node_encoder.out_features
    assert hidden == cli.model.hparams.hidden and len(cli.model.metanetwork.layers) == \
        cli.model.hparams.num_layers


class _RecordStep(Callback):
    """Saves, per rank, the initial metanetwork, the step's batch and the synced gradients."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        state = {k: v.clone() for k, v in pl_module.metanetwork.state_dict().items()}
        torch.save(state, self.out / f"init{trainer.global_rank}.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        index, images, labels = batch
        torch.save({"index": int(index), "images": images, "labels": labels},
                   self.out / f"batch{trainer.global_rank}.pt")

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [p.grad.clone() for p in pl_module.metanetwork.parameters()]
        torch.save(grads, self.out / f"grads{trainer.global_rank}.pt")


@pytest.mark.slow  # one step of what the next test checks over three (the default suite runs that)
def test_ddp_meta_training_averages_the_per_rank_gradients(tiny_cifar, tmp_path, make_zoo):
    """2-process CPU DDP (gloo): each rank takes a different member and images; the synced
    metanetwork gradient equals the mean of the two single-process gradients."""
    zoo = make_zoo(tmp_path / "zoo", count=3)
    dm = _datamodule(zoo, tiny_cifar)
    module = MetaPruningModule(num_layers=2, hidden=8, reg=10.0)
    trainer = Trainer(max_steps=1, accelerator="cpu", devices=2, strategy="ddp_spawn",
                      callbacks=[_RecordStep(tmp_path)], logger=False, num_sanity_val_steps=0,
                      limit_val_batches=0, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path)
    trainer.fit(module, dm)
    init = torch.load(tmp_path / "init0.pt", weights_only=True)
    assert all(torch.equal(init[k], v)
               for k, v in torch.load(tmp_path / "init1.pt", weights_only=True).items())
    dm.setup("fit")
    example = dm.example_input()
    layout = NetworkGraph.from_module(dm.members[dm.train_ids[0]].network, example).layout
    single = []
    batches = [torch.load(tmp_path / f"batch{r}.pt", weights_only=True) for r in range(2)]
    assert batches[0]["index"] != batches[1]["index"] or \
        not torch.equal(batches[0]["images"], batches[1]["images"])
    for batch in batches:
        meta = Metanetwork.for_layout(layout, num_layers=2, hidden=8)
        meta.load_state_dict(init)
        state = MemberState.build(dm.members[batch["index"]].network, example, 10.0, 16.0)
        _, _, surrogate = meta_loss(meta, state, batch["images"], batch["labels"], alpha=16.0)
        surrogate.backward()
        single.append([p.grad for p in meta.parameters()])
    for r in range(2):
        synced = torch.load(tmp_path / f"grads{r}.pt", weights_only=True)
        for got, a, b in zip(synced, *single):
            torch.testing.assert_close(got, (a + b) / 2, rtol=1e-4, atol=1e-7)


class _RecordRun(Callback):
    """Saves, per rank, the initial metanetwork, every step's batch and cross-entropy, and
    the final metanetwork."""

    def __init__(self, out: Path) -> None:
        self.out, self.batches, self.ce = out, [], []

    def on_train_start(self, trainer, pl_module) -> None:
        state = {k: v.clone() for k, v in pl_module.metanetwork.state_dict().items()}
        torch.save(state, self.out / f"init{trainer.global_rank}.pt")

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        index, images, labels = batch
        self.batches.append({"index": int(index), "images": images.clone(), "labels": labels.clone()})

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.ce.append(float(outputs["loss"] if isinstance(outputs, dict) else outputs))

    def on_train_end(self, trainer, pl_module) -> None:
        torch.save({"batches": self.batches, "ce": self.ce,
                    "final": pl_module.metanetwork.state_dict()}, self.out / f"run{trainer.global_rank}.pt")


@pytest.mark.slow  # DDP equivalence of plain training stays in the default suite
def test_ddp_meta_training_run_equals_one_process_over_the_same_items(tiny_cifar, tmp_path,
                                                                     make_zoo):
    """A whole 2-rank meta-training run (3 AdamW steps) against one process that, at each step,
    averages the gradients of the two ranks' items (member + images) and steps the same
    optimizer: every step's cross-entropy and the final metanetwork agree to 1e-4 relative."""
    zoo = make_zoo(tmp_path / "zoo", count=3)
    dm = _datamodule(zoo, tiny_cifar)
    module = MetaPruningModule(num_layers=2, hidden=8, reg=10.0)
    trainer = Trainer(max_steps=3, accelerator="cpu", devices=2, strategy="ddp_spawn",
                      callbacks=[_RecordRun(tmp_path)], logger=False, num_sanity_val_steps=0,
                      limit_val_batches=0, enable_progress_bar=False,
                      enable_model_summary=False, enable_checkpointing=False,
                      default_root_dir=tmp_path)
    trainer.fit(module, dm)
    runs = [torch.load(tmp_path / f"run{r}.pt", weights_only=True) for r in range(2)]
    assert [len(r["ce"]) for r in runs] == [3, 3]
    dm.setup("fit")
    example = dm.example_input()
    layout = NetworkGraph.from_module(dm.members[dm.train_ids[0]].network, example).layout
    single = MetaPruningModule(num_layers=2, hidden=8, reg=10.0, layout=layout)
    single.metanetwork.load_state_dict(torch.load(tmp_path / "init0.pt", weights_only=True))
    optimizer = single.configure_optimizers()["optimizer"]
    states: dict[int, MemberState] = {}
    for step in range(3):
        optimizer.zero_grad()
        for r, run in enumerate(runs):
            batch = run["batches"][step]
            index = batch["index"]
            states.setdefault(index, MemberState.build(dm.members[index].network, example,
                                                       10.0, 16.0))
            ce, _, surrogate = meta_loss(single.metanetwork, states[index], batch["images"],
                                         batch["labels"], alpha=16.0)
            (surrogate / len(runs)).backward()
            assert abs(ce.item() - run["ce"][step]) <= 1e-4 * abs(ce.item()), (step, r)
        optimizer.step()
    final = single.metanetwork.state_dict()
    for run in runs:
        for name, value in run["final"].items():
            torch.testing.assert_close(value, final[name], rtol=1e-4, atol=1e-6, msg=name)


def test_meta_effect_reports_every_checkpoint_on_the_meta_val_members(tiny_cifar, tmp_path,
                                                                       monkeypatch, make_zoo):
    """benchmarks/meta_effect.py reads a train.py run back: one row for the original meta-val
    member and one per checkpoint; the original's numbers equal a direct evaluation."""
    from pipeline.train import main
    monkeypatch.setattr("sys.argv", ["train.py"])
    zoo = make_zoo(tmp_path / "zoo")
    main(["fit", "--config", "configs/demo/meta.yaml", f"--data.init_args.zoo={zoo}",
          f"--data.init_args.images.init_args.root={tiny_cifar}",
          "--data.init_args.images.init_args.num_classes=3",
          "--data.init_args.batch_size=2", "--data.init_args.batches_per_step=2",
          "--data.init_args.steps_per_member=1", "--trainer.max_epochs=2",
          f"--trainer.logger.init_args.save_dir={tmp_path}",
          "--trainer.logger.init_args.name=meta", "--trainer.enable_progress_bar=false"])
    run = tmp_path / "meta" / "version_0"
    monkeypatch.setattr("sys.argv", ["meta_effect.py", str(run)])
    assert benchmark_module("meta_effect").main() == 0
    rows = [line.split(" | ") for line in (run / "meta_effect.md").read_text().splitlines()
            if line.startswith("| ") and "---" not in line][1:]
    assert [r[0] for r in rows] == ["| original", "| epoch000", "| epoch001"]
    zoo_dm = zoo_datamodule(run / "config.yaml")
    member = zoo_dm.members[zoo_dm.val_ids[0]].network
    images = torch.stack([x for x, _ in zoo_dm.images.val_set])
    labels = torch.tensor([y for _, y in zoo_dm.images.val_set])
    with torch.no_grad():
        out = member(images)
    assert float(rows[0][2]) == pytest.approx(F.cross_entropy(out, labels).item(), abs=1e-3)
    assert rows[0][3] == f"{100 * (out.argmax(1) == labels).float().mean().item():.1f}%"


def test_distillation_gradient_equals_autograd_of_the_mixed_loss():
    torch.manual_seed(0)
    model = networks.build("resnet8_cifar", 3, width=0.5).double().eval()
    weights = {k: v.detach().clone().requires_grad_(v.is_floating_point() and "running" not in k)
               for k, v in model.state_dict().items() if v.is_floating_point()}
    images, labels = torch.randn(2, 5, 3, 32, 32, dtype=torch.double), torch.randint(0, 3, (2, 5))
    soft = torch.softmax(torch.randn(2, 5, 3, dtype=torch.double), dim=2)
    work = copy.deepcopy(model)
    ce, _, grads = weight_gradients(work, {k: v.detach() for k, v in weights.items()}, images,
                                    labels, _NoRegularizer(), 16.0, soft, distill=0.3)
    total, label_ce = 0.0, 0.0
    for k, (x, y) in enumerate(zip(images, labels)):
        log_p = torch.log_softmax(torch.func.functional_call(model, weights, (x,)), dim=1)
        hard = -log_p[torch.arange(len(y)), y].mean()
        total = total + 0.7 * hard - 0.3 * (soft[k] * log_p).sum(1).mean()
        label_ce += float(hard)
    total.backward()
    assert float(ce) == pytest.approx(label_ce)  # the logged value stays the label CE
    for name, w in weights.items():
        if w.requires_grad:
            torch.testing.assert_close(grads[name], w.grad, rtol=1e-9, atol=1e-12)


def test_validation_evaluates_the_decoded_bn_statistics_too():
    torch.manual_seed(0)
    model = networks.build("resnet8_cifar", 3, width=0.5).eval()
    state = MemberState.build(model, X32, reg=1e-3, alpha=16.0)
    weights = {k: v.clone() for k, v in state.graph.decode(state.data).items()}
    weights["layer1.0.bn1.running_mean"] += 3.0  # as update_running_stats=True may write
    x, y = torch.randn(1, 8, 3, 32, 32), torch.randint(0, 3, (1, 8))
    ce, _ = MetaPruningModule._evaluate(None, state, weights, x, y)
    expected = copy.deepcopy(model)
    expected.load_state_dict(weights, strict=False)
    assert float(ce) == pytest.approx(float(F.cross_entropy(expected(x[0]), y[0])), rel=1e-6)
    assert float(ce) != pytest.approx(float(F.cross_entropy(model(x[0]), y[0])), rel=1e-3)

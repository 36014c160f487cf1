"""Reliability (issue 7): meta-training resume after SIGKILL, a non-finite loss stops the run and
keeps the last good checkpoint, malicious metanetwork checkpoints, config typos, the ImageNet
configs on a tiny 224x224 tree."""
from __future__ import annotations

import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning.pytorch import Callback

ROOT = Path(__file__).parents[1]
DEMO_META = ROOT / "configs" / "demo" / "meta.yaml"


def _meta_args(zoo: Path, images: Path, out: Path, *extra: str) -> list[str]:
    """``train.py fit`` with the demo meta config on a tiny zoo and tiny data."""
    return ["fit", "--config", str(DEMO_META), f"--data.init_args.zoo={zoo}",
            f"--data.init_args.images.init_args.root={images}",
            "--data.init_args.images.init_args.dataset=cifar10",
            "--data.init_args.images.init_args.num_classes=3",
            "--data.init_args.images.init_args.num_workers=0",
            "--data.init_args.images.init_args.download=false",
            "--data.init_args.batch_size=2", "--data.init_args.batches_per_step=1",
            "--model.init_args.num_layers=2", "--model.init_args.hidden=8",
            "--trainer.accelerator=cpu", "--trainer.devices=1",
            f"--trainer.default_root_dir={out}",
            f"--trainer.logger.init_args.save_dir={out}",
            "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
            *extra]


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1",
            "PYTHONWARNINGS": "ignore"}


def _load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


# -- 1. resume ----------------------------------------------------------------------------------

@pytest.mark.slow  # two train.py processes (~30 s alone); a killed prune run's resume is in the default suite
def test_meta_training_resumes_after_sigkill_with_ckpt_path_last(tiny_cifar, tmp_path, make_zoo):
    """SIGKILL a meta-training run once its first epoch checkpoint exists (it is then inside
    epoch 1); ``--ckpt_path last`` continues from that checkpoint: step and epoch counters,
    AdamW's per-parameter step count and the MultiStepLR's last_epoch carry on, and the run
    finishes max_epochs. The resumed run writes to the same logger version."""
    zoo = make_zoo(tmp_path / "zoo")
    out = tmp_path / "runs"
    # 3 members, 1 meta-val: 2 train members x 2 visits = 4 steps per epoch; lr decays after 2.
    args = _meta_args(zoo, tiny_cifar, out, "--trainer.max_epochs=4",
                      "--data.init_args.steps_per_member=2", "--model.init_args.milestones=[2]")
    ckpts = out / "demo" / "meta" / "version_0" / "checkpoints"
    first = ckpts / "epoch000.ckpt"
    proc = subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 120
        while not (first.is_file() and (ckpts / "last.ckpt").is_file()):
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.monotonic() < deadline, "no epoch checkpoint after 120 s"
            time.sleep(0.05)
        time.sleep(0.3)  # the checkpoint files are written atomically; let epoch 1 start
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    killed = {p.name for p in ckpts.iterdir()}
    assert "epoch003.ckpt" not in killed  # it really was killed before finishing
    saved = _load(ckpts / "last.ckpt")
    start_epoch, start_step = saved["epoch"], saved["global_step"]
    assert start_step == 4 * (start_epoch + 1)  # an epoch-end checkpoint

    done = subprocess.run([sys.executable, "train.py", *args, "--ckpt_path=last"], cwd=ROOT,
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Restoring states from the checkpoint path" in done.stderr + done.stdout, \
        (done.stderr + done.stdout)[-3000:]
    assert not (out / "demo" / "meta" / "version_1" / "checkpoints").exists()
    final = _load(ckpts / "last.ckpt")
    assert final["epoch"] == 3 and final["global_step"] == 16
    assert [f"epoch{e:03d}.ckpt" in {p.name for p in ckpts.iterdir()} for e in range(4)] == \
        [True] * 4
    # optimizer: AdamW's per-parameter step counter counts every step, before and after the kill
    opt = final["optimizer_states"][0]
    steps = {float(s["step"]) for s in opt["state"].values()}
    assert steps == {16.0}
    assert {float(s["step"]) for s in saved["optimizer_states"][0]["state"].values()} == \
        {float(start_step)}
    # the scheduler stepped once per epoch across the restart; lr decayed once at milestone 2
    sched = final["lr_schedulers"][0]
    assert sched["last_epoch"] == 4
    assert opt["param_groups"][0]["lr"] == pytest.approx(1e-4)
    # the resumed run continued from the saved weights: the epochs written before the kill are
    # unchanged and the later ones differ from them
    assert _load(first)["global_step"] == 4
    w0 = _load(first)["state_dict"]
    w3 = final["state_dict"]
    assert any(not torch.equal(w0[k], w3[k]) for k in w0)


# -- 2. a non-finite loss stops meta-training, the last good checkpoint stays ---------------------

def test_nan_loss_stops_meta_training_and_keeps_the_last_good_checkpoint(tiny_cifar, tmp_path,
                                                                          monkeypatch, make_zoo):
    from lightning.pytorch import Callback, Trainer, seed_everything
    from lightning.pytorch.callbacks import ModelCheckpoint

    import objective.training as mp
    from datamodules import ImageDataModule, ModelZooDataModule
    from lightning_modules import MetaPruningModule

    real = mp.weight_gradients

    def nan_gradients(*args, **kwargs):
        ce, sparsity, grads = real(*args, **kwargs)
        return ce * float("nan"), sparsity, grads

    class PoisonAfterFirstEpoch(Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 1:
                monkeypatch.setattr(mp, "weight_gradients", nan_gradients)

    seed_everything(0)
    zoo = make_zoo(tmp_path / "zoo")
    images = ImageDataModule(str(tiny_cifar), dataset="cifar10", num_classes=3, batch_size=8,
                             num_workers=0, val_fraction=0.25)
    dm = ModelZooDataModule(str(zoo), images, meta_val_members=1, batches_per_step=1,
                            batch_size=2)
    module = MetaPruningModule(num_layers=2, hidden=8)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1,
                           save_last=True, filename="epoch{epoch:03d}",
                           auto_insert_metric_name=False)
    trainer = Trainer(max_epochs=3, accelerator="cpu", callbacks=[ckpt, PoisonAfterFirstEpoch()],
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=tmp_path)
    with pytest.raises(FloatingPointError,
                       match=r"not finite at epoch 1, step 2 \(zoo member \d: ce=nan.*last good "
                             r"checkpoint is kept.*lr"):
        trainer.fit(module, dm)
    files = sorted(p.name for p in (tmp_path / "ckpt").iterdir())
    assert files == ["epoch000.ckpt", "last.ckpt"]
    good = MetaPruningModule.load_from_checkpoint(tmp_path / "ckpt" / "epoch000.ckpt",
                                                  weights_only=True)
    assert all(torch.isfinite(p).all() for p in good.metanetwork.parameters())
    last = _load(tmp_path / "ckpt" / "last.ckpt")
    assert last["epoch"] == 0 and last["global_step"] == 2


# -- 3. malicious metanetwork checkpoint, config typo ---------------------------------------------

class _Payload:
    """Unpickling it would create ``marker``: proof that code ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_metanetwork_checkpoint_with_pickled_code_is_refused_unexecuted(tmp_path):
    from lightning_modules import load_metanetwork
    from networks import CheckpointError

    marker = tmp_path / "pwned"
    path = tmp_path / "meta.ckpt"
    torch.save({"state_dict": {"metanetwork.w": torch.zeros(1)},
                "hyper_parameters": {"layout": {"node_dim": 1}, "hook": _Payload(marker)}}, path)
    with pytest.raises(CheckpointError, match=r"metanetwork checkpoint '.*meta\.ckpt' cannot be "
                                              r"read safely.*pickled code"):
        load_metanetwork(path)
    assert not marker.exists()
    # a plain pickle (not a torch zip) with the same payload is refused the same way
    path.write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(CheckpointError, match="cannot be read safely"):
        load_metanetwork(path)
    assert not marker.exists()


def test_config_with_unknown_key_stops_with_lightningcli_message(tmp_path, capsys, cli_argv):
    from pipeline.train import main

    bad = tmp_path / "typo.yaml"
    text = DEMO_META.read_text().replace("    batches_per_step: 4", "    batches_per_stepp: 4")
    text = text.replace("_base_: ../", f"_base_: {DEMO_META.parent}/../")  # its components
    assert "batches_per_stepp" in text
    bad.write_text(text)
    safe = [f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.fast_dev_run=true",
            f"--data.init_args.zoo={tmp_path / 'no_zoo'}"]  # should parsing ever pass: no run
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", str(bad), *safe])
    assert exit_info.value.code != 0
    err = capsys.readouterr().err
    assert "batches_per_stepp" in err
    # a typo in a trainer key on the command line names it as well (note: argparse accepts
    # unambiguous prefixes, so `--trainer.max_epoch` would silently mean max_epochs)
    with pytest.raises(SystemExit):
        main(["fit", "--config", str(DEMO_META), "--trainer.max_epochz=3", *safe])
    assert "max_epochz" in capsys.readouterr().err


# -- 4. the ImageNet path on a tiny 224x224 tree ---------------------------------------------------

IMAGENET = ROOT / "configs" / "resnet50_imagenet"
X224 = torch.randn(1, 3, 224, 224)


def _register(root: Path, seed: int, arch: dict, model: torch.nn.Module) -> None:
    """Save ``model`` as zoo member ``seed`` of ``root`` with a manifest row (sizes only)."""
    import networks
    from datamodules.zoo_manifest import add_member, member_file, widths

    networks.save_network(model, root / member_file(seed), arch)
    add_member(root, {"seed": seed, "architecture": arch, "widths": widths(model),
                      "macs": 1, "params": networks.count_params(model), "base_macs": 2,
                      "speed_up": 2.0, "val_acc": None, "test_acc": None,
                      "file": member_file(seed)})


def _meta_step_at_224(config: Path, zoo: Path, images: Path, tmp_path: Path):
    """``train.py fit`` of a meta config for one step (fast_dev_run) on ``zoo`` and a tiny
    224x224 ImageNet tree with 2 classes; returns the CLI."""
    from pipeline.train import main

    return main(["fit", "--config", str(config), f"--data.init_args.zoo={zoo}",
                 f"--data.init_args.images.init_args.root={images}",
                 "--data.init_args.images.init_args.num_classes=2",
                 "--data.init_args.images.init_args.num_workers=0",
                 "--data.init_args.images.init_args.val_fraction=0.25",
                 "--data.init_args.batch_size=2", "--data.init_args.batches_per_step=1",
                 "--trainer.accelerator=cpu", "--trainer.fast_dev_run=true",
                 f"--trainer.default_root_dir={tmp_path}",
                 f"--trainer.logger.init_args.save_dir={tmp_path}",
                 "--trainer.enable_progress_bar=false"])


def make_resnet50_zoo(root: Path, count: int = 2, ratio: float = 0.9) -> Path:
    """ResNet-50 members (torchvision layout, 2 classes), 90% of channels randomly pruned so
    meta-training one step at 224x224 takes seconds on a CPU."""
    from pruning_helpers import random_prune

    import networks

    arch = {"name": "resnet50", "num_classes": 2, "kwargs": {}}
    for seed in range(count):
        torch.manual_seed(seed)
        model = random_prune(networks.build("resnet50", 2), X224, ratio, seed)
        _register(root, seed, arch, model)
    return root


def make_vit_b16_zoo(root: Path, count: int = 2) -> Path:
    """ViT-B/16 members (torchvision layout, 2 classes) at width 24 (2 per head) and MLP width
    24, random weights: a ViT-B/16 as channel pruning could leave it, cheap at 224x224."""
    import networks
    from networks.checkpoint import reshape_to_state

    narrow = {768: 24, 3072: 24, 2304: 72}  # width, MLP width, query+key+value
    arch = {"name": "vit_b_16", "num_classes": 2, "kwargs": {}}
    for seed in range(count):
        model = networks.build("vit_b_16", 2)
        g = torch.Generator().manual_seed(seed)
        state = {k: 0.05 * torch.randn([narrow.get(n, n) for n in v.shape], generator=g)
                 for k, v in model.state_dict().items()}
        reshape_to_state(model, state)
        model.load_state_dict(state)
        _register(root, seed, arch, model)
    return root


def test_vit_b16_meta_config_meta_trains_a_step_at_224_in_the_papers_layout(
        tiny_imagenet, tmp_path, cli_argv):
    cli = _meta_step_at_224(ROOT / "configs" / "vit_b16_imagenet" / "meta.yaml",
                            make_vit_b16_zoo(tmp_path / "zoo"), tiny_imagenet, tmp_path)
    assert cli.trainer.state.finished
    assert cli.datamodule.example_input().shape[-2:] == (224, 224)
    gnn = cli.model.metanetwork
    assert (len(gnn.layers), gnn.hidden) == (2, 4)  # the paper's code's ViT metanetwork
    assert gnn.graph_options.attention == "paper" and 3 in gnn.edge_types  # tied q/k/v edges
    metrics = cli.trainer.callback_metrics  # the step's loss and the validation of its result
    assert torch.isfinite(metrics["train/ce"]) and torch.isfinite(metrics["val/ce"])


def test_imagenet_meta_config_meta_trains_a_step_at_224(tiny_imagenet, tmp_path, cli_argv):
    cli = _meta_step_at_224(IMAGENET / "meta.yaml", make_resnet50_zoo(tmp_path / "zoo"),
                            tiny_imagenet, tmp_path)
    assert cli.trainer.state.finished
    assert cli.datamodule.images.dataset == "imagenet"
    assert cli.datamodule.example_input().shape[-2:] == (224, 224)
    assert cli.model.hparams.num_layers == 6 and cli.model.hparams.hidden == 16  # the config's


def test_imagenet_zoo_config_prunes_and_finetunes_at_224(tiny_imagenet, tmp_path, cli_argv):
    """The zoo config's stage 2 (prune to 1.32x, finetune, register) on a narrow start."""
    import yaml

    import networks
    from pipeline import zoo as pipeline_zoo
    from pipeline.train import main

    cfg = pipeline_zoo.load_zoo_config(IMAGENET / "zoo.yaml", seed=0, zoo_dir=str(tmp_path / "zoo"),
                                       data_root=str(tiny_imagenet))
    assert cfg.zoo.speed_up == 1.32 and cfg.zoo.input_size == [3, 224, 224]
    # the narrow start (90% of channels gone) is at ~78x of ResNet-50's MACs already
    cfg.zoo.iterative_steps, cfg.zoo.speed_up = 4, 100.0
    make_resnet50_zoo(tmp_path / "start", count=1)
    start = next((tmp_path / "start").rglob("seed0*.pt"))
    stage = pipeline_zoo.finetune_config(cfg, start)
    stage["trainer"].update(precision=32, accelerator="cpu", fast_dev_run=True,
                            enable_progress_bar=False)
    stage["data"]["init_args"].update(num_classes=2, batch_size=2, num_workers=0,
                                      val_fraction=0.25)
    stage["model"]["init_args"]["num_classes"] = 2
    export = next(c for c in stage["trainer"]["callbacks"] if "ExportToZoo" in c["class_path"])
    export["init_args"]["wait_for_test"] = False  # register at fit end (no test run here)
    cli = main(["fit", "--config", yaml.safe_dump(stage)])
    assert cli.trainer.state.finished
    (member,) = json.loads((tmp_path / "zoo" / "manifest.json").read_text())["members"]
    assert member["speed_up"] >= 100.0
    net, _ = networks.load_network(tmp_path / "zoo" / member["file"])
    assert net.eval()(X224).shape == (1, 2)


def test_imagenet_prune_config_prunes_and_finetunes_at_224(tiny_imagenet, tmp_path, cli_argv):
    """The prune config's stage 2 (PruneToSpeedUp + finetune + SaveNetwork), fast_dev_run."""
    import yaml

    import networks
    from pipeline import run as pipeline_run
    from pipeline import run_stages
    from pipeline.train import main

    cfg = pipeline_run.load_prune_config(IMAGENET / "prune.yaml", speed_up=100.0,
                                         data_root=str(tiny_imagenet))
    assert cfg.prune.input_size == [3, 224, 224]
    assert cfg.base["data"]["init_args"]["dataset"] == "imagenet"
    make_resnet50_zoo(tmp_path / "start", count=1)  # ~78x already: 100x takes a few steps
    start = next((tmp_path / "start").rglob("seed0*.pt"))
    arch = {"name": "resnet50", "num_classes": 2, "kwargs": {}}
    callbacks = [{"class_path": "callbacks.PruneToSpeedUp",
                  "init_args": {"speed_up": 100.0, "iterative_steps": 8, "input_size": [3, 224, 224]}},
                 {"class_path": "callbacks.SaveNetwork", "init_args": {"filename": "pruned.pt"}}]
    stage = run_stages.run_stage_config(cfg, "final", tmp_path / "run",
                                          pipeline_run.SECOND_STAGE, start, arch, callbacks)
    assert stage["trainer"]["max_epochs"] == 10 and stage["model"]["init_args"]["lr"] == 0.01
    stage["trainer"].update(precision=32, accelerator="cpu", fast_dev_run=True,
                            enable_progress_bar=False)
    stage["data"]["init_args"].update(num_classes=2, batch_size=2, num_workers=0,
                                      val_fraction=0.25)
    cli = main(["fit", "--config", yaml.safe_dump(stage)])
    assert cli.trainer.state.finished
    pruned, _ = networks.load_network(tmp_path / "run" / pipeline_run.SECOND_STAGE / "pruned.pt")
    base = networks.count_macs(networks.build("resnet50", 2), X224)
    assert base / networks.count_macs(pruned, X224) >= 100.0
    assert pruned.eval()(X224).shape == (1, 2)


class _RecordSampler(Callback):
    """Writes, per rank, the train sampler's class, replica count and its indices."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_start(self, trainer, pl_module) -> None:
        sampler = trainer.train_dataloader.sampler
        (self.out / f"sampler{trainer.global_rank}.json").write_text(json.dumps(
            {"type": type(sampler).__name__, "replicas": getattr(sampler, "num_replicas", None),
             "indices": list(iter(sampler))}))


@pytest.mark.slow
def test_imagenet_pretrain_config_under_ddp_spawn_uses_a_distributed_sampler(tiny_imagenet,
                                                                              tmp_path, cli_argv):
    """The resnet50_imagenet pretrain config, 2-process CPU ddp_spawn, one batch: each rank's
    train DataLoader has a DistributedSampler and the ranks see disjoint images."""
    from pipeline.train import main

    cli = main(["--config", str(IMAGENET / "pretrain.yaml"),
                f"--data.init_args.root={tiny_imagenet}", "--data.init_args.num_classes=2",
                "--model.init_args.num_classes=2", "--data.init_args.batch_size=2",
                "--data.init_args.num_workers=0", "--data.init_args.val_fraction=0.25",
                "--trainer.accelerator=cpu", "--trainer.devices=2",
                "--trainer.strategy=ddp_spawn", "--trainer.precision=32",
                "--trainer.fast_dev_run=true", f"--trainer.default_root_dir={tmp_path}",
                f"--trainer.logger.init_args.save_dir={tmp_path}",
                "--trainer.enable_progress_bar=false"], run=False)
    cli.trainer.callbacks.append(_RecordSampler(tmp_path))
    cli.trainer.fit(cli.model, cli.datamodule)
    seen = [json.loads((tmp_path / f"sampler{r}.json").read_text()) for r in range(2)]
    assert [s["type"] for s in seen] == ["DistributedSampler"] * 2
    assert [s["replicas"] for s in seen] == [2, 2]
    assert set(seen[0]["indices"]).isdisjoint(seen[1]["indices"])

"""Zoo generation: the PruneToSpeedUp and ExportToZoo callbacks and `prune.py zoo`."""
from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer

import networks
import prune
from callbacks import ExportToZoo, PruneToSpeedUp
from callbacks import zoo as zoo_module
from datamodules import ImageDataModule, zoo_manifest
from datamodules.zoo_manifest import ZooError, read_manifest
from lightning_modules import ImageClassifier
from pipeline import train
from pipeline import zoo as pipeline_zoo
from pipeline.config_files import load_config_file

pytestmark = pytest.mark.usefixtures("cli_argv")
CONFIGS = sorted((Path(__file__).parents[1] / "configs").glob("*/zoo.yaml"))
DEMO = Path(__file__).parents[1] / "configs" / "demo" / "zoo.yaml"


def tiny_zoo_config(root: Path, out: Path, source: Path = DEMO) -> Path:
    """A shipped zoo.yaml shrunk to seconds: 3 classes, quarter-width ResNet-8, 2 batches."""
    cfg = load_config_file(source)
    cfg["zoo"].update(dir=str(out / "zoo"), iterative_steps=50, input_size=[3, 32, 32])
    pre = cfg["pretrain"]
    pre["trainer"].update(max_epochs=1, limit_train_batches=2, accelerator="cpu", precision=32,
                          enable_progress_bar=False, enable_model_summary=False)
    pre["data"]["init_args"].update(root=str(root), dataset="cifar10", num_classes=3, batch_size=8,
                                    eval_batch_size=8, subset=None, test_subset=None, num_workers=0)
    pre["model"]["init_args"].update(network="resnet8_cifar", network_kwargs={"width": 0.25},
                                     weights=None)
    cfg["finetune"]["trainer"] = {"max_epochs": 1, "limit_train_batches": 2}
    path = out / "zoo.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def run_zoo(config: Path, seed: int, *extra: str) -> int:
    return prune.main(["zoo", "--config", str(config), "--seed", str(seed), *extra])


def check_member(zoo_dir: Path, row: dict) -> None:
    net, record = networks.load_network(zoo_dir / row["file"])  # weights_only=True inside
    assert torch.load(zoo_dir / row["file"], weights_only=True)["format"] == networks.checkpoint.FORMAT
    example = torch.zeros(1, 3, 32, 32)
    assert row["macs"] == networks.count_macs(net, example)
    base = networks.build(row["architecture"]["name"], row["architecture"]["num_classes"],
                          **row["architecture"]["kwargs"])
    assert row["base_macs"] == networks.count_macs(base, example)
    assert row["speed_up"] == pytest.approx(row["base_macs"] / row["macs"], rel=1e-12)
    assert row["speed_up"] >= 1.32
    assert row["params"] == networks.count_params(net)
    assert row["widths"] == zoo_manifest.widths(net)
    assert row["widths"] != zoo_manifest.widths(base)  # actually pruned
    assert 0.0 <= row["val_acc"] <= 1.0 and 0.0 <= row["test_acc"] <= 1.0
    assert record["arch"] == row["architecture"]


@pytest.fixture(scope="module")
def zoo_seed0(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A zoo with one member (seed 0) made by `prune.py zoo` from the tiny demo config."""
    import sys
    out = tmp_path_factory.mktemp("zoo_seed0")
    config = tiny_zoo_config(tiny_cifar, out)
    argv, sys.argv = sys.argv, ["prune.py"]
    try:
        assert run_zoo(config, 0) == 0
    finally:
        sys.argv = argv
    return out


# ---- (a) PruneToSpeedUp ---------------------------------------------------------------------
class Snapshot(Callback):
    def on_train_start(self, trainer: Trainer, pl_module) -> None:
        opt_params = {id(p) for g in trainer.optimizers[0].param_groups for p in g["params"]}
        self.optimizer_has_network = opt_params == {id(p) for p in pl_module.network.parameters()}
        self.before = {k: v.detach().clone() for k, v in pl_module.network.named_parameters()}


def test_prune_callback_reaches_target_and_trains_pruned_params(tiny_cifar: Path, tmp_path: Path) -> None:
    model = ImageClassifier("resnet8_cifar", num_classes=3, network_kwargs={"width": 0.5}, lr=0.1)
    prune_cb, snap = PruneToSpeedUp(1.32, iterative_steps=50, input_size=[3, 32, 32]), Snapshot()
    data = ImageDataModule(str(tiny_cifar), num_classes=3, batch_size=8, num_workers=0)
    trainer = Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      callbacks=[prune_cb, snap], default_root_dir=tmp_path)
    trainer.fit(model, datamodule=data)

    net, example = model.network, torch.zeros(1, 3, 32, 32)
    full = networks.build("resnet8_cifar", 3, width=0.5)
    assert prune_cb.base_macs == networks.count_macs(full, example)
    assert prune_cb.macs == networks.count_macs(net, example)
    assert prune_cb.speed_up_reached == prune_cb.base_macs / prune_cb.macs >= 1.32
    assert prune_cb.params == networks.count_params(net) < networks.count_params(full)
    assert snap.optimizer_has_network  # the optimizer was built over the pruned parameters
    changed = [k for k, v in net.named_parameters() if not torch.equal(v, snap.before[k])]
    assert "conv1.weight" in changed or len(changed) > len(snap.before) // 2


def test_prune_callback_counts_earlier_pruning(tmp_path: Path) -> None:
    """A network pruned before (saved, reloaded) starts above 1x: base MACs are the unpruned arch."""
    model = ImageClassifier("resnet8_cifar", num_classes=3, network_kwargs={"width": 0.5})
    example = torch.zeros(1, 3, 32, 32)
    base = networks.count_macs(model.network, example)
    reached = networks.prune_to_speed_up(model.network, example, 1.2, base, 50)
    path = networks.save_network(model.network, tmp_path / "p.pt", arch=model.arch)
    again = ImageClassifier("resnet8_cifar", num_classes=3, weights=str(path))
    again.network.bn1.running_mean.fill_(0.5)  # tracing in train mode would move these
    expected = copy.deepcopy(again.network).eval()
    networks.prune_to_speed_up(expected, example, 1.5, base, 50)
    cb = PruneToSpeedUp(1.5, iterative_steps=50)
    cb.setup(Trainer(logger=False, enable_progress_bar=False), again, "fit")
    assert cb.base_macs == base and cb.speed_up_reached >= 1.5 > reached
    assert again.network.training  # mode restored
    got = again.network.state_dict()
    assert got.keys() == expected.state_dict().keys()
    for k, v in expected.state_dict().items():  # same widths, same values, BN statistics untouched
        torch.testing.assert_close(got[k], v, rtol=0, atol=0)
    cb.setup(None, again, "fit")  # once per module: a second setup does not prune again
    assert networks.count_macs(again.network, example) == cb.macs
    with pytest.raises(ValueError, match="input_size"):
        PruneToSpeedUp(1.5, input_size=[32, 32])


# ---- (b) one member --------------------------------------------------------------------------
def test_zoo_command_adds_a_consistent_member(zoo_seed0: Path) -> None:
    zoo_dir = zoo_seed0 / "zoo"
    manifest = read_manifest(zoo_dir)
    assert [r["seed"] for r in manifest["members"]] == [0]
    row = manifest["members"][0]
    assert row["file"] == "members/seed0.pt"
    check_member(zoo_dir, row)
    for stage in ("pretrain", "finetune"):  # ordinary Lightning runs: TB logs and checkpoints
        run = zoo_dir / "runs" / "seed0" / stage
        assert list(run.glob("events.out.tfevents.*")) and (run / "checkpoints" / "last.ckpt").is_file()
    assert (zoo_dir / "runs" / "seed0" / "pretrain" / "network.pt").is_file()
    assert not list(zoo_dir.rglob("*.tmp"))


# ---- (c) rerun: nothing twice, new seed adds ---------------------------------------------------
def test_rerun_same_seed_is_a_no_op_and_new_seed_adds(zoo_seed0: Path, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(zoo_seed0, tmp_path, dirs_exist_ok=True)
    config = tmp_path / "zoo.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["zoo"]["dir"] = str(tmp_path / "zoo")
    config.write_text(yaml.safe_dump(cfg))
    zoo_dir = tmp_path / "zoo"
    before = (zoo_dir / "manifest.json").read_text()
    mtime = (zoo_dir / "members" / "seed0.pt").stat().st_mtime_ns

    def no_training(*a, **k):
        raise AssertionError("a stage trained again")
    monkeypatch.setattr(pipeline_zoo, "fit_stage", no_training)
    assert run_zoo(config, 0) == 0
    assert (zoo_dir / "manifest.json").read_text() == before
    assert (zoo_dir / "members" / "seed0.pt").stat().st_mtime_ns == mtime

    monkeypatch.undo()
    assert run_zoo(config, 1) == 0
    rows = read_manifest(zoo_dir)["members"]
    assert [r["seed"] for r in rows] == [0, 1]
    assert rows[0] == json.loads(before)["members"][0]
    check_member(zoo_dir, rows[1])
    assert (zoo_dir / "members" / "seed0.pt").stat().st_mtime_ns == mtime


def test_variant_member_shares_stage_one_and_keeps_the_first_row(
        zoo_seed0: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    shutil.copytree(zoo_seed0, tmp_path, dirs_exist_ok=True)
    config = tmp_path / "zoo.yaml"
    cfg = yaml.safe_load(config.read_text())
    cfg["zoo"]["dir"] = str(tmp_path / "zoo")
    config.write_text(yaml.safe_dump(cfg))
    zoo_dir = tmp_path / "zoo"
    first = read_manifest(zoo_dir)["members"][0]
    pretrained = zoo_dir / "runs" / "seed0" / "pretrain" / "network.pt"
    mtime = pretrained.stat().st_mtime_ns
    stages = []
    fit_stage = pipeline_zoo.fit_stage
    monkeypatch.setattr(pipeline_zoo, "fit_stage",
                        lambda config, **k: stages.append(config) or fit_stage(config, **k))
    assert run_zoo(config, 0, "--variant", "s2", "--speed_up", "2.0") == 0
    assert len(stages) == 1  # stage 2 only: the trained network of seed 0 is reused
    assert stages[0]["model"]["init_args"]["weights"] == str(pretrained)
    assert pretrained.stat().st_mtime_ns == mtime
    rows = read_manifest(zoo_dir)["members"]
    assert [(r["seed"], r["variant"]) for r in rows] == [(0, ""), (0, "s2")]
    assert rows[0] == first
    assert rows[1]["file"] == "members/seed0-s2.pt"
    check_member(zoo_dir, rows[1])
    assert rows[1]["speed_up"] >= 2.0 > first["speed_up"]
    assert (zoo_dir / "runs" / "seed0-s2" / "finetune" / "checkpoints" / "last.ckpt").is_file()
    stages.clear()
    assert run_zoo(config, 0, "--variant", "s2", "--speed_up", "2.0") == 0  # done already
    assert stages == []
    with pytest.raises(pipeline_zoo.ZooConfigError, match="zoo.yaml.*variant 'a/b'.*letters"):
        run_zoo(config, 0, "--variant", "a/b")


# ---- (d) crash between member file and manifest ------------------------------------------------
def test_crash_before_manifest_row_leaves_consistent_zoo_and_rerun_completes(
        tiny_cifar: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_zoo_config(tiny_cifar, tmp_path)
    zoo_dir = tmp_path / "zoo"
    zoo_manifest.write_manifest(zoo_dir, {"format": zoo_manifest.FORMAT, "members": []})

    def crash(*a, **k):
        raise KeyboardInterrupt("killed between member file and manifest")
    monkeypatch.setattr(zoo_module, "add_member", crash)
    with pytest.raises((KeyboardInterrupt, SystemExit, RuntimeError)):
        run_zoo(config, 3)
    assert (zoo_dir / "members" / "seed3.pt").is_file()  # the member file was complete ...
    assert read_manifest(zoo_dir)["members"] == []       # ... but is not registered
    assert not list(zoo_dir.rglob("*.tmp"))
    pretrained = zoo_dir / "runs" / "seed3" / "pretrain" / "network.pt"
    mtime = pretrained.stat().st_mtime_ns

    monkeypatch.undo()
    assert run_zoo(config, 3) == 0
    rows = read_manifest(zoo_dir)["members"]
    assert [r["seed"] for r in rows] == [3]
    check_member(zoo_dir, rows[0])
    assert pretrained.stat().st_mtime_ns == mtime  # stage 1 was not redone
    assert not list(zoo_dir.rglob("checkpoints.superseded-*"))  # same inputs: stage 2 resumed


def test_a_stage_rebuilt_from_another_input_network_does_not_resume_old_checkpoints(
        tiny_cifar: Path, tmp_path: Path) -> None:
    """A member discarded and built again after its stage-1 network changed under the same
    path: the finetune's old checkpoints (trained from the old network) are moved aside, not
    resumed, even though the shapes match and resuming would load without an error."""
    import hashlib

    config, zoo_dir = tiny_zoo_config(tiny_cifar, tmp_path), tmp_path / "zoo"
    assert run_zoo(config, 5) == 0
    finetune = zoo_dir / "runs" / "seed5" / "finetune"
    old_member = (zoo_dir / "members" / "seed5.pt").read_bytes()
    pretrained = zoo_dir / "runs" / "seed5" / "pretrain" / "network.pt"
    network, record = networks.load_network(pretrained)
    with torch.no_grad():
        for p in network.parameters():
            p.mul_(1.5)
    networks.save_network(network, pretrained, record["arch"])
    zoo_manifest.write_manifest(zoo_dir, {"format": zoo_manifest.FORMAT, "members": []})
    (zoo_dir / "members" / "seed5.pt").unlink()
    assert run_zoo(config, 5) == 0
    assert (finetune / "checkpoints.superseded-1" / "last.ckpt").is_file()
    stage = json.loads((finetune / "stage.json").read_text())
    assert stage["weights_sha256"] == hashlib.sha256(pretrained.read_bytes()).hexdigest()
    rows = read_manifest(zoo_dir)["members"]
    check_member(zoo_dir, rows[0])
    assert (zoo_dir / "members" / "seed5.pt").read_bytes() != old_member


def test_broken_manifest_errors_name_the_file(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text('{"members": [')
    with pytest.raises(ZooError, match="manifest.json.*JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"members": [{"seed": 0}]}))
    with pytest.raises(ZooError, match=r"manifest.json.*members\[0\] lacks"):
        read_manifest(tmp_path)
    with pytest.raises(ZooError, match="does not exist"):
        read_manifest(tmp_path / "nowhere")
    row = {"seed": 0, "architecture": {"name": "resnet8_cifar", "num_classes": 3, "kwargs": {}},
           "widths": {}, "macs": 10, "params": 5, "base_macs": 20, "speed_up": 2.0,
           "val_acc": 0.5, "test_acc": None, "file": "members/seed0.pt"}
    (tmp_path / "manifest.json").write_text(json.dumps({"members": [row]}))
    with pytest.raises(ZooError, match="members/seed0.pt"):
        read_manifest(tmp_path)
    assert read_manifest(tmp_path, check_files=False)["members"] == [dict(row, variant="")]
    variant = dict(row, variant="s2", file="members/seed0-s2.pt")
    (tmp_path / "manifest.json").write_text(json.dumps({"members": [row, variant, variant]}))
    with pytest.raises(ZooError, match=r"member seed0-s2 appears twice"):
        read_manifest(tmp_path, check_files=False)
    (tmp_path / "manifest.json").write_text(json.dumps({"members": [dict(variant, variant="x-y")]}))
    with pytest.raises(ZooError, match=r"members\[0\].variant='x-y' is not a variant name"):
        read_manifest(tmp_path, check_files=False)


# ---- (e) shipped configs ---------------------------------------------------------------------
def test_every_task_has_a_zoo_config() -> None:
    assert {p.parent.name for p in CONFIGS} == {"demo", "resnet56_cifar10", "vgg19_cifar100",
                                                "resnet50_imagenet", "vit_b16_imagenet",
                                                "vit_cifar10"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.parent.name)
def test_zoo_config_parses(config: Path, tiny_cifar: Path, tiny_imagenet: Path, tmp_path: Path) -> None:
    large = "imagenet" in config.parent.name
    root = tiny_imagenet if large else tiny_cifar
    cfg = pipeline_zoo.load_zoo_config(config, seed=5, zoo_dir=str(tmp_path), data_root=str(root))
    raw = load_config_file(config)
    assert cfg.zoo.speed_up == raw["zoo"]["speed_up"] and cfg.zoo.seed == 5
    assert cfg.zoo.dir == str(tmp_path)
    assert cfg.zoo.input_size == ([3, 224, 224] if large else [3, 32, 32])
    stages = {"pretrain": pipeline_zoo.pretrain_config(cfg),
              "finetune": pipeline_zoo.finetune_config(cfg, tmp_path / "weights.pt")}
    for name, stage in stages.items():
        stage["trainer"].update(precision=32, accelerator="cpu")  # 16-mixed is for GPUs
        stage["model"]["init_args"]["weights"] = None  # parse only: no weights file here
        cli = train.main(["--config", yaml.safe_dump(stage)], run=False)
        assert cli.config.seed_everything == 5
        assert cli.datamodule.root == root
        assert Path(cli.trainer.log_dir) == pipeline_zoo.stage_dir(tmp_path, 5, name)
        if name == "finetune":
            prune_cb = next(c for c in cli.trainer.callbacks if isinstance(c, PruneToSpeedUp))
            export = next(c for c in cli.trainer.callbacks if isinstance(c, ExportToZoo))
            assert prune_cb.speed_up == cfg.zoo.speed_up and export.seed == 5
            # the finetune section's learning rate where it sets one, else the pretrain one
            own = ((raw["finetune"].get("model") or {}).get("init_args") or {}).get("lr")
            assert cli.model.hparams.lr == (own if own is not None
                                            else raw["pretrain"]["model"]["init_args"]["lr"])


def test_pretrained_skips_stage_one(tiny_cifar: Path, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_zoo_config(tiny_cifar, tmp_path)
    cfg = pipeline_zoo.load_zoo_config(config, seed=0)
    start = networks.save_network(networks.build("resnet8_cifar", 3, width=0.25), tmp_path / "start.pt",
                                  arch={"name": "resnet8_cifar", "num_classes": 3, "kwargs": {"width": 0.25}})
    calls = []
    monkeypatch.setattr(pipeline_zoo, "fit_stage", lambda c, test=False: calls.append(c))
    cfg.zoo.pretrained = str(start)
    assert pipeline_zoo.run_pretrain(cfg) == start and calls == []
    cfg.zoo.pretrained = str(tmp_path / "missing.pt")
    with pytest.raises(pipeline_zoo.ZooConfigError, match="missing.pt"):
        pipeline_zoo.run_pretrain(cfg)


def test_bad_zoo_config_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "zoo.yaml"
    bad.write_text("zoo: {dir: x}\npretrain: {}\n")
    with pytest.raises(pipeline_zoo.ZooConfigError, match="zoo.yaml.*speed_up"):
        pipeline_zoo.load_zoo_config(bad)
    bad.write_text("zoo: {speed_up: 2, sede: 3}\npretrain: {}\n")
    with pytest.raises(pipeline_zoo.ZooConfigError, match="zoo.yaml.*sede"):
        pipeline_zoo.load_zoo_config(bad)
    bad.write_text("zoo: {speed_up: fast}\npretrain: {}\n")
    with pytest.raises(pipeline_zoo.ZooConfigError, match="zoo.yaml.*zoo.speed_up.*fast"):
        pipeline_zoo.load_zoo_config(bad)
    bad.write_text("zoo: {speed_up: 2}\npretrain: [1]\n")
    with pytest.raises(pipeline_zoo.ZooConfigError, match="zoo.yaml.*pretrain"):
        pipeline_zoo.load_zoo_config(bad)
    with pytest.raises(pipeline_zoo.ZooConfigError, match="missing.yaml.*does not exist"):
        pipeline_zoo.load_zoo_config(tmp_path / "missing.yaml")
    bad.write_text("zoo: {speed_up: 2}\npretrain: {seed_everything: 1}\n")
    with pytest.raises(pipeline_zoo.ZooConfigError, match="seed_everything"):
        pipeline_zoo.load_zoo_config(bad)


# ---- held-out evaluation: network files record their training split ---------------------------

def _image_keys(dataset) -> set[bytes]:
    """The raw bytes of every image of an in-memory split (content, not position)."""
    return {bytes(img.numpy()) for img in dataset.images}


def test_curve_without_split_flags_scores_no_training_image(tiny_cifar: Path, tmp_path: Path,
                                                            monkeypatch: pytest.MonkeyPatch,
                                                            capsys: pytest.CaptureFixture) -> None:
    """A zoo member trained on a non-default split (8 of 12 images per class, val_fraction
    0.25, seed 5): `prune.py curve` without split flags evaluates it on images none of which
    were ever served to its training (recorded from the training loaders themselves), and the
    default split (all 12 images, seed 0), which would score training images, is refused."""
    import sys

    from datamodules import DatasetError
    from pipeline import curve as curve_module

    trained, evaluated = set(), set()
    train_loader, make_evaluator = ImageDataModule.train_dataloader, curve_module.evaluator

    def spy_train(self):
        trained.update(_image_keys(self.train_set))
        return train_loader(self)

    def spy_evaluator(loader, device):
        evaluated.update(_image_keys(loader.dataset))
        return make_evaluator(loader, device)

    monkeypatch.setattr(ImageDataModule, "train_dataloader", spy_train)
    monkeypatch.setattr(curve_module, "evaluator", spy_evaluator)
    config = tiny_zoo_config(tiny_cifar, tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["pretrain"]["data"]["init_args"].update(subset=8, val_fraction=0.25, seed=5)
    config.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(sys, "argv", ["prune.py"])
    assert run_zoo(config, 0) == 0
    member = tmp_path / "zoo" / "members" / "seed0.pt"
    split = {"dataset": "cifar10", "subset": 8, "val_fraction": 0.25, "seed": 5}
    assert networks.load_network(member)[1]["metadata"]["trained_on"] == [split]
    assert len(trained) == 3 * 6  # 8 per class, 2 of them val

    curve = ["curve", "--network", str(member), "--data_root", str(tiny_cifar), "--max_speed_up",
             "1.5", "--iterative_steps", "10", "--every", "5", "--bn_batches", "1", "--out",
             str(tmp_path / "curve")]
    assert prune.main(curve) == 0
    assert len(evaluated) == 3 * 2 and not evaluated & trained
    assert "WARNING" not in capsys.readouterr().err
    with pytest.raises(DatasetError, match=r"\d+ of the 18 val images \(subset=12.* are training "
                                           r"images of network file .*seed0\.pt.* trained with subset=8"):
        prune.main(curve + ["--subset", "12", "--seed", "0", "--val_fraction", "0.5"])


def test_finetune_typo_fails_before_pretraining(tiny_cifar: Path, tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    config = tiny_zoo_config(tiny_cifar, tmp_path)
    cfg = yaml.safe_load(config.read_text())
    cfg["finetune"]["trainer"]["max_epoch"] = 1  # typo of max_epochs
    config.write_text(yaml.safe_dump(cfg))
    monkeypatch.setattr(pipeline_zoo, "fit_stage", lambda *a, **k: pytest.fail("a stage trained"))
    with pytest.raises(pipeline_zoo.ZooConfigError,
                       match=rf"zoo config '{config}', section 'finetune'.*'max_epoch'"):
        run_zoo(config, 0)
    assert not (tmp_path / "zoo").exists()


def test_zoo_config_keys_are_overridden_from_the_command_line(tmp_path: Path) -> None:
    """`prune.py zoo ... --SECTION.KEY VALUE`: merged over the file and checked as the file is."""
    from pipeline.cli import parse

    config = tmp_path / "zoo.yaml"
    config.write_text("zoo: {speed_up: 2, iterative_steps: 50}\npretrain: {trainer: {max_epochs: 3}}\n")
    _, options = parse(["zoo", "--config", str(config), "--zoo.iterative_steps", "7",
                        "--pretrain.trainer.max_epochs=1"])
    cfg = pipeline_zoo.load_zoo_config(options.config, overrides=options.overrides)
    assert cfg.zoo.iterative_steps == 7 and cfg.pretrain["trainer"]["max_epochs"] == 1
    assert cfg.zoo.speed_up == 2
    with pytest.raises(pipeline_zoo.ZooConfigError, match="zoo.iterative_steps: Not of type PositiveInt"):
        pipeline_zoo.load_zoo_config(config, overrides={"zoo": {"iterative_steps": 0}})
    with pytest.raises(pipeline_zoo.ZooConfigError, match="'base' is not a section of a zoo config"):
        pipeline_zoo.load_zoo_config(config, overrides={"base": {"x": 1}})

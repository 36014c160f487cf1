"""Shared fixtures: tiny generated ImageFolder trees (no real data set is ever needed), a tiny
zoo, and the finished `prune.py run` runs that the test_prune_*.py modules share (built once a
session: tests copy a run before changing it)."""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
from PIL import Image

# the prune-run helpers (_expect) assert: report their failures as test modules' are
pytest.register_assert_rewrite("pruning_helpers")

CLASSES = ("ant", "bee", "cat")


def make_tree(root: Path, size: int, per_split: dict[str, int], classes: tuple[str, ...] = CLASSES,
              seed: int = 0) -> Path:
    """``root/<split>/<class>/<i>.{png,jpg}``; class c is tinted in channel c, so it is learnable."""
    rng = np.random.default_rng(seed)
    for split, count in per_split.items():
        for c, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                img = rng.integers(0, 100, (size, size, 3))
                img[..., c % 3] += 150
                ext = "png" if i % 2 else "jpg"  # both decoders are exercised
                Image.fromarray(img.astype(np.uint8)).save(folder / f"{i:04d}.{ext}")
    return root


# generic and cheap: every worker may build its own
_CHEAP_SHARED = {"tiny_cifar", "tiny_imagenet", "make_zoo"}


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist each worker computes with one thread, and so do the processes its tests
    start: with torch's default (a thread per core) in every worker, ``-n 2`` on two cores took
    longer than one process (886 s against 454 s, measured)."""
    if os.environ.get("PYTEST_XDIST_WORKER"):
        import torch

        os.environ["OMP_NUM_THREADS"] = "1"
        torch.set_num_threads(1)


def _shared(name: str, defs: dict) -> bool:
    """Whether fixture ``name`` is an expensive one of ours that tests share (module or session
    scope; pytest's own, such as ``tmp_path_factory``, have no base id)."""
    return name not in _CHEAP_SHARED and bool(defs.get(name)) and bool(defs[name][-1].baseid) \
        and defs[name][-1].scope in ("module", "session")


def _root(name: str, defs: dict) -> str:
    """The shared fixture that ``name`` is built from (``weight_runs`` -> ``runs`` -> ``setup``):
    tests of one chain share one worker, independent chains may run on different ones."""
    for arg in defs[name][-1].argnames:
        if _shared(arg, defs) and defs[arg][-1].scope == "session":
            return _root(arg, defs)
    return name


@pytest.hookimpl(tryfirst=True)  # before xdist's worker reads the marks into the test ids
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Under pytest-xdist (setup.cfg runs `-n 2 --dist loadgroup` by default), tests that share
    an expensive session- or module-scoped fixture (the finished prune runs, the demo) run on
    one worker, so that the fixture is built once; the other tests spread over both. A session
    fixture's group is named by the fixture it is built from, a module fixture's by its module."""
    for item in items:
        info = getattr(item, "_fixtureinfo", None)
        defs = info.name2fixturedefs if info else {}
        for name in getattr(item, "fixturenames", ()):
            if not _shared(name, defs):
                continue
            group = _root(name, defs) if defs[name][-1].scope == "session" else item.module.__name__
            item.add_marker(pytest.mark.xdist_group(group))
            break


@pytest.fixture
def cli_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    """LightningCLI warns when sys.argv (pytest's own arguments) and ``args`` both exist."""
    monkeypatch.setattr("sys.argv", ["train.py"])


@pytest.fixture(scope="session")
def tiny_cifar(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """32x32, 3 classes, 12 train and 4 test images per class."""
    return make_tree(tmp_path_factory.mktemp("tiny_cifar"), 32, {"train": 12, "test": 4})


@pytest.fixture(scope="session")
def tiny_imagenet(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """224x224, 2 classes, 4 train and 2 val images per class (ImageNet's train/ + val/ layout)."""
    return make_tree(tmp_path_factory.mktemp("tiny_imagenet"), 224, {"train": 4, "val": 2},
                     classes=CLASSES[:2])


@pytest.fixture(autouse=True)
def _fresh_ddp_rendezvous(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test starts without DDP rendezvous variables, and loses what it set: Lightning
    leaves MASTER_PORT set after a ddp_spawn run, so the next ddp_spawn test in the same
    pytest process reused that port (one gloo abort seen in a full run)."""
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "LOCAL_RANK", "NODE_RANK", "RANK"):
        monkeypatch.delenv(key, raising=False)


RESNET8 = {"name": "resnet8_cifar", "kwargs": {"width": 0.25}}


def _make_zoo(root: Path, count: int = 3, num_classes: int = 3, arch: dict | None = None) -> Path:
    """Tiny zoo: networks of ``arch`` (``{"name", "kwargs"}``; default quarter-width
    ResNet-8s) pruned differently, registered in a manifest."""
    import torch
    from pruning_helpers import random_prune

    import networks
    from datamodules.zoo_manifest import add_member, member_file, widths

    example = torch.zeros(1, 3, 32, 32)
    arch = {**(arch or RESNET8), "num_classes": num_classes}
    base = networks.count_macs(networks.build(arch["name"], num_classes, **arch["kwargs"]), example)
    for seed in range(count):
        torch.manual_seed(seed)
        model = networks.build(arch["name"], num_classes, **arch["kwargs"])
        random_prune(model, example, ratio=0.2, seed=seed)
        file = member_file(seed)
        networks.save_network(model, root / file, arch)
        macs = networks.count_macs(model, example)
        add_member(root, {"seed": seed, "architecture": arch, "widths": widths(model),
                          "macs": macs, "params": networks.count_params(model),
                          "base_macs": base, "speed_up": base / macs, "val_acc": None,
                          "test_acc": None, "file": file})
    return root


@pytest.fixture(scope="session")
def make_zoo() -> Callable[..., Path]:
    """``make_zoo(root, count=3, num_classes=3, arch=None)`` builds a tiny zoo of pruned
    networks (ResNet-8s unless ``arch`` says otherwise)."""
    return _make_zoo


# ---- `prune.py run`: tests/test_prune_run*.py, test_prune_weights.py, test_prune_latency.py --------
@pytest.fixture(scope="session")
def setup(tiny_cifar: Path, tmp_path_factory: pytest.TempPathFactory, make_zoo) -> dict:
    from pruning_helpers import meta_checkpoint, tiny_config, zoo_like_network

    out = tmp_path_factory.mktemp("prune_run")
    return {"config": tiny_config(tiny_cifar, out), "network": zoo_like_network(out / "net.pt"),
            "meta": meta_checkpoint(tiny_cifar, out, make_zoo), "out": out}


@pytest.fixture(scope="session")
def runs(setup: dict) -> dict[str, Path]:
    """One finished run per method; only ``none``'s exports ONNX and measures latency, and the
    metanetwork's writes no torch.export program either (each costs seconds, and their tests
    read neither)."""
    from pruning_helpers import QUICK, QUICK_WITH_PROGRAM, run

    from pipeline import run as pipeline_run

    argv, sys.argv = sys.argv, ["prune.py"]
    try:
        dirs = {}
        for method in pipeline_run.METHODS:
            dirs[method] = setup["out"] / method
            quick = {"metanetwork": QUICK, "sparse": QUICK_WITH_PROGRAM}.get(method, ())
            assert run(setup["config"], setup["network"], method, dirs[method], setup["meta"],
                       *quick) == 0
        return dirs
    finally:
        sys.argv = argv


@pytest.fixture(scope="session")
def weight_runs(setup: dict, runs: dict[str, Path], tiny_cifar: Path, make_zoo) -> dict[str, Path]:
    """One finished weight run per method, and an N:M run: ``none`` to 0.6 (global) taking stage
    1 from the channel run (a target of the other kind), ``nm`` (none, 2:4) taking it from
    that one, ``sparse`` to 0.5 per layer, ``metanetwork`` to 0.5 with a metanetwork meta-trained
    for weight sparsity; the last three in their default folders."""
    import yaml
    from pruning_helpers import QUICK_WITH_PROGRAM, meta_checkpoint

    import prune

    meta = meta_checkpoint(tiny_cifar, setup["out"], make_zoo, "weights_meta", sparsity="weights",
                           reg=1e-3)
    base = ["run", "--config", str(setup["config"]), "--network", str(setup["network"])]
    folder = Path(yaml.safe_load(setup["config"].read_text())["prune"]["dir"])
    dirs = {"none": setup["out"] / "w_none", "nm": folder / "net_none_2of4_seed0",
            "sparse": folder / "net_sparse_w0.5-layer_seed0",
            "metanetwork": folder / "net_metanetwork_w0.5_seed0"}
    argv, sys.argv = sys.argv, ["prune.py"]
    try:
        # the config of the channel run (ONNX, latency), whose stage 1 they take
        assert prune.main([*base, "--method", "none", "--weight_sparsity", "0.6", "--out",
                           str(dirs["none"]), "--reuse_first_stage", str(runs["none"])]) == 0
        assert prune.main([*base, "--method", "none", "--nm", "[2,4]", "--reuse_first_stage",
                           str(dirs["none"])]) == 0
        assert prune.main([*base, "--method", "sparse", "--weight_sparsity", "0.5",
                           "--prune.sparsity_scope", "layer", *QUICK_WITH_PROGRAM]) == 0
        assert prune.main([*base, "--method", "metanetwork", "--metanetwork", str(meta),
                           "--weight_sparsity", "0.5", *QUICK_WITH_PROGRAM]) == 0
    finally:
        sys.argv = argv
    return {**dirs, "meta": meta}

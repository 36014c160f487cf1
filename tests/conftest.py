"""Shared fixtures: tiny generated ImageFolder trees (no real data set is ever needed)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

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

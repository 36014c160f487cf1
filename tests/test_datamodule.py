from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from datamodules import DatasetError, ImageDataModule
from datamodules.sources import decode
from datamodules.transforms import MEAN_STD, BatchCropFlip


def _dm(root: Path, **kw) -> ImageDataModule:
    kw.setdefault("num_classes", 3)
    dm = ImageDataModule(str(root), num_workers=0, **kw)
    dm.setup()
    return dm


def _ids(ds) -> set[bytes]:
    return {img.numpy().tobytes() for img in ds.images}


def test_splits_are_disjoint_seeded_and_per_class(tiny_cifar: Path) -> None:
    dm = _dm(tiny_cifar, val_fraction=0.25)
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (27, 9, 12)
    assert torch.bincount(dm.val_set.targets).tolist() == [3, 3, 3]
    assert not _ids(dm.train_set) & _ids(dm.val_set)
    assert _ids(dm.train_set) | _ids(dm.val_set) == _ids(_dm(tiny_cifar, val_fraction=0.5).train_set) \
        | _ids(_dm(tiny_cifar, val_fraction=0.5).val_set)
    assert _ids(_dm(tiny_cifar, val_fraction=0.25).val_set) == _ids(dm.val_set)
    assert _ids(_dm(tiny_cifar, val_fraction=0.25, seed=1).val_set) != _ids(dm.val_set)


def test_subset_keeps_images_per_class(tiny_cifar: Path) -> None:
    dm = _dm(tiny_cifar, subset=8, test_subset=2, val_fraction=0.25)
    assert torch.bincount(dm.train_set.targets).tolist() == [6, 6, 6]
    assert torch.bincount(dm.val_set.targets).tolist() == [2, 2, 2]
    assert torch.bincount(dm.test_set.targets).tolist() == [2, 2, 2]


def test_eval_batches_are_normalized_images(tiny_cifar: Path) -> None:
    dm = _dm(tiny_cifar)
    x, y = next(iter(dm.test_dataloader()))
    assert x.shape == (12, 3, 32, 32) and x.dtype == torch.float32
    first = decode(str(sorted((tiny_cifar / "test" / "ant").iterdir())[0])).float() / 255
    mean, std = (torch.tensor(v).view(3, 1, 1) for v in MEAN_STD["cifar10"])
    torch.testing.assert_close(x[0], (first - mean) / std)
    assert y.tolist() == [0] * 4 + [1] * 4 + [2] * 4


def test_batch_crop_flip_is_a_padded_crop_or_its_mirror() -> None:
    torch.manual_seed(0)
    x = torch.randint(0, 256, (16, 3, 8, 8), dtype=torch.uint8)
    out = BatchCropFlip((0.0,) * 3, (1 / 255,) * 3, padding=2)(x)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2)).float()
    flips = 0
    for img, src in zip(out, padded):
        crops = [src[:, i:i + 8, j:j + 8] for i in range(5) for j in range(5)]
        if any(torch.equal(img, c) for c in crops):
            continue
        assert any(torch.equal(img, c.flip(-1)) for c in crops)
        flips += 1
    assert 0 < flips < 16


def test_imagefolder_224(tiny_imagenet: Path) -> None:
    dm = _dm(tiny_imagenet, dataset="imagefolder", num_classes=None, val_fraction=0.5)
    assert dm.num_classes == 2
    for loader in (dm.train_dataloader(), dm.val_dataloader(), dm.test_dataloader()):
        x, _ = next(iter(loader))
        assert x.shape[1:] == (3, 224, 224)


def test_missing_root_names_path_and_download(tmp_path: Path) -> None:
    root = tmp_path / "nowhere"
    with pytest.raises(DatasetError, match=r"download option \(data.init_args.download: true\)") as err:
        _dm(root)
    assert str(root) in str(err.value) and "does not exist" in str(err.value)


def test_wrong_layout_names_what_was_looked_for(tmp_path: Path) -> None:
    (tmp_path / "images").mkdir()
    with pytest.raises(DatasetError) as err:
        _dm(tmp_path, dataset="imagenet")
    msg = str(err.value)
    assert str(tmp_path) in msg and "train/" in msg and "images" in msg and "data.root" in msg


def test_class_count_mismatch_names_both_numbers(tiny_cifar: Path) -> None:
    with pytest.raises(DatasetError, match=r"holds 3 classes but data.num_classes=5 expects 5"):
        _dm(tiny_cifar, num_classes=5)
    with pytest.raises(DatasetError, match=r"holds 3 classes but data.dataset='cifar100'.*100"):
        _dm(tiny_cifar, dataset="cifar100", num_classes=None)


def test_train_and_test_classes_must_match(tiny_cifar: Path, tmp_path: Path) -> None:
    root = tmp_path / "data"
    shutil.copytree(tiny_cifar, root)
    shutil.rmtree(root / "test" / "cat")
    with pytest.raises(DatasetError, match="holds 2 classes but the train folder holds 3"):
        _dm(root)


def test_cifar_rejects_large_images(tiny_imagenet: Path) -> None:
    with pytest.raises(DatasetError, match="224x224.*dataset=imagefolder"):
        _dm(tiny_imagenet, num_classes=2)


def test_bad_arguments() -> None:
    with pytest.raises(DatasetError, match="cifar10, cifar100, imagenet, imagefolder"):
        ImageDataModule("x", dataset="mnist")
    with pytest.raises(DatasetError, match="val_fraction"):
        ImageDataModule("x", val_fraction=0.0)

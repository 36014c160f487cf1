"""ImageDataModule: CIFAR-10, CIFAR-100, ImageNet or any ImageFolder tree, one class.

Splits: ``train`` minus a seeded, per-class ``val_fraction`` for model selection; ``test``
(the ``test/`` or ``val/`` folder, or the CIFAR test batch) only for reporting.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Sized, cast

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch.utils.data import DataLoader, Dataset

from .sources import (
    CIFAR_FOLDERS,
    DatasetError,
    DataSplit,
    Split,
    decode,
    decode_all,
    folder_layout,
    per_class,
    read_cifar,
    scan_folder,
    split_indices,
)
from .transforms import MEAN_STD, BatchCropFlip, BatchNormalize, large_image_transforms

DATASETS = ("cifar10", "cifar100", "imagenet", "imagefolder")
DEFAULT_CLASSES = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}
CIFAR_SIZE = 32

__all__ = ["DATASETS", "DataSplit", "DatasetError", "ImageDataModule"]


class TensorImages(Dataset):
    """Decoded images in memory; ``__getitems__`` lets the DataLoader transform a whole batch."""

    def __init__(self, images: torch.Tensor, targets: torch.Tensor,
                 transform: Callable[[torch.Tensor], torch.Tensor]) -> None:
        self.images, self.targets, self.transform = images, targets, transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitems__(self, indices: list[int]) -> list[tuple[torch.Tensor, int]]:
        x = self.transform(self.images[indices])
        return list(zip(x.unbind(0), self.targets[indices].tolist()))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.__getitems__([index])[0]


class FileImages(Dataset):
    """Image files decoded on access (data sets too large for memory)."""

    def __init__(self, files: list[str], targets: torch.Tensor, transform: Callable) -> None:
        self.files, self.targets, self.transform = files, targets, transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(decode(self.files[index])), int(self.targets[index])


class ImageDataModule(LightningDataModule):
    """Image classification data.

    Args:
        root: a torchvision CIFAR folder (holding ``cifar-10-batches-py/`` or
            ``cifar-100-python/``) or an ImageFolder tree with ``train/`` and ``test/`` (or
            ``val/``) subfolders of one folder per class.
        dataset: cifar10 | cifar100 | imagenet | imagefolder; picks augmentation,
            normalization and the expected class count. CIFAR images (32x32) are decoded once
            into memory; the others are read per sample at 224x224.
        batch_size: training batch size (per process under DDP).
        eval_batch_size: validation/test batch size; defaults to ``batch_size``.
        num_workers: DataLoader worker processes.
        val_fraction: share of each class's training images held out for validation.
        subset: training images kept per class (seeded), for CPU-scale runs.
        test_subset: test images kept per class (seeded).
        seed: seed of the subset and validation selection (independent of the global seed).
        download: fetch CIFAR with torchvision into ``root`` when it is missing.
        num_classes: expected class count, checked against the data; defaults to the
            data set's (10, 100, 1000, or whatever the ImageFolder holds).
    """

    def __init__(self, root: str, dataset: str = "cifar10", batch_size: int = 128,
                 eval_batch_size: int | None = None, num_workers: int = 2,
                 val_fraction: float = 0.1, subset: int | None = None,
                 test_subset: int | None = None, seed: int = 0, download: bool = False,
                 num_classes: int | None = None) -> None:
        super().__init__()
        if dataset not in DATASETS:
            raise DatasetError(f"data.dataset={dataset!r} is unknown; use one of {', '.join(DATASETS)}")
        if not 0.0 < val_fraction < 1.0:
            raise DatasetError(f"data.val_fraction={val_fraction} must lie strictly between 0 and 1")
        for key, value in (("subset", subset), ("test_subset", test_subset)):
            if value is not None and value < 1:
                raise DatasetError(f"data.{key}={value} must be a positive number of images per class")
        self.save_hyperparameters()
        self.root = Path(root).expanduser()
        self.dataset = dataset
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.num_workers = num_workers
        self.val_fraction, self.subset, self.test_subset = val_fraction, subset, test_subset
        self.seed, self.download = seed, download
        self._expected_classes = num_classes
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    # ---- where the data is -------------------------------------------------------------
    def _is_cifar(self) -> bool:
        return self.dataset in CIFAR_FOLDERS

    def _folders(self) -> tuple[Path, Path]:
        """(train, test) folders of an ImageFolder tree; only called once ``_layout`` said so."""
        folders = folder_layout(self.root)
        if folders is None:
            raise DatasetError(f"data.root={str(self.root)!r} has no train/ and test/ (or val/) "
                               "class folders")
        return folders

    def _layout(self) -> str:
        """'cifar' (torchvision files) or 'folder' (ImageFolder tree); raise when neither."""
        if self._is_cifar() and (self.root / CIFAR_FOLDERS[self.dataset]).is_dir():
            return "cifar"
        if folder_layout(self.root) is not None:
            return "folder"
        looked_for = "train/ and test/ (or val/) class folders"
        if self._is_cifar():
            looked_for = f"{CIFAR_FOLDERS[self.dataset]}/ (torchvision) or {looked_for}"
            fix = ("point the data root at a folder that has it (prune.py: --data_root), or set "
                   "the data's download option (data.init_args.download: true) to fetch it there")
        else:
            fix = "set data.root to an ImageFolder tree such as /data/imagenet with train/ and val/"
        if not self.root.is_dir():
            state = "is not a folder" if self.root.exists() else "does not exist"
        else:
            state = "holds " + (", ".join(sorted(p.name for p in self.root.iterdir())[:8]) or "nothing")
        raise DatasetError(
            f"{self.dataset} data not found: looked for {looked_for} in data.root="
            f"{str(self.root)!r}, which {state}. To fix: {fix}"
        )

    def prepare_data(self) -> None:
        """Download CIFAR when asked to and missing (Lightning runs this on one process)."""
        if not (self._is_cifar() and self.download):
            return
        if not (self.root / CIFAR_FOLDERS[self.dataset]).is_dir() and folder_layout(self.root) is None:
            from torchvision import datasets

            cls = datasets.CIFAR10 if self.dataset == "cifar10" else datasets.CIFAR100
            try:
                for train in (True, False):
                    cls(str(self.root), train=train, download=True)
            except OSError as e:  # no network, no write permission, disk full
                raise DatasetError(
                    f"downloading {self.dataset} into data.root={str(self.root)!r} failed ({e}). "
                    "Check network access and write permission, or fetch it elsewhere and copy it there"
                ) from e

    @property
    def num_classes(self) -> int:
        """Class count of the data, checked against ``num_classes`` and the data set kind."""
        if self._layout() == "cifar":
            found, where = DEFAULT_CLASSES[self.dataset], str(self.root / CIFAR_FOLDERS[self.dataset])
        else:
            train_dir = self._folders()[0]
            found, where = sum(p.is_dir() for p in train_dir.iterdir()), str(train_dir)
            if not found:  # no classes at all: scan_folder says what an ImageFolder split holds
                scan_folder(train_dir)
        expected = self._expected_classes or DEFAULT_CLASSES.get(self.dataset)
        if expected is not None and expected != found:
            source = (f"data.num_classes={expected}" if self._expected_classes
                      else f"data.dataset={self.dataset!r} (default {expected} classes)")
            raise DatasetError(
                f"{where!r} holds {found} classes but {source} expects {expected}. Point "
                f"data.root at the right data, or set data.num_classes (and the model's "
                f"num_classes) to {found}"
            )
        return found

    # ---- splits ------------------------------------------------------------------------
    def _read(self, train: bool) -> Split:
        if self._layout() == "cifar":
            return read_cifar(self.root, self.dataset, train)
        split = scan_folder(self._folders()[0 if train else 1])
        if len(split.classes) != self.num_classes:
            raise DatasetError(f"{str(self._folders()[1])!r} holds {len(split.classes)} "
                               f"classes but the train folder holds {self.num_classes}; they must match")
        return split

    def _dataset(self, split: Split, indices: torch.Tensor, train: bool) -> Dataset:
        targets = split.targets[indices]
        mean, std = MEAN_STD[self.dataset]
        files = split.files or []  # None when the split holds decoded images
        if self._is_cifar():
            t0 = time.perf_counter()
            images = (split.images[indices] if split.images is not None
                      else decode_all([files[i] for i in indices.tolist()], CIFAR_SIZE))
            if split.files is not None:
                rank_zero_info(f"decoded {len(indices)} images in {time.perf_counter() - t0:.1f} s")
            transform = BatchCropFlip(mean, std) if train else BatchNormalize(mean, std)
            return TensorImages(images, targets, transform)
        train_tf, eval_tf = large_image_transforms(self.dataset)
        return FileImages([files[i] for i in indices.tolist()], targets,
                          train_tf if train else eval_tf)

    @property
    def split(self) -> DataSplit:
        """The train/val split this module serves (recorded in the network files it trains)."""
        return DataSplit(self.dataset, self.subset, self.val_fraction, self.seed)

    def check_held_out(self, lineages: dict[str, list[dict]]) -> None:
        """Raise when this module's val split holds an image that one of the networks (keys:
        what to call it, e.g. a network file) was trained on under any split of its lineage
        (``DataSplit`` records of the same data set); checked by image index, without decoding
        any image, the data set's targets read once."""
        targets = self._read(train=True).targets
        val = split_indices(targets, self.split)[1]
        for what, trained_on in lineages.items():
            for record in trained_on:
                self._check_disjoint(targets, val, DataSplit.from_dict(record), what)

    def _check_disjoint(self, targets: torch.Tensor, val: torch.Tensor, other: DataSplit,
                        what: str) -> None:
        if other.dataset == self.dataset:  # another data set holds other images
            overlap = int(torch.isin(val, split_indices(targets, other)[0]).sum())
            if overlap:
                raise DatasetError(
                    f"{overlap} of the {len(val)} val images (subset={self.subset}, val_fraction="
                    f"{self.val_fraction}, seed={self.seed}) are training images of {what} (it was "
                    f"trained with subset={other.subset}, val_fraction={other.val_fraction}, "
                    f"seed={other.seed}); evaluate it on its own split: subset={other.subset}, "
                    f"val_fraction={other.val_fraction}, seed={other.seed}")

    def setup(self, stage: str | None = None) -> None:
        _ = self.num_classes  # fail early, with the clear message, before reading any image
        if stage in ("fit", "validate", None) and self.train_set is None:
            split = self._read(train=True)
            train_idx, val_idx = split_indices(split.targets, self.split)
            self.train_set = self._dataset(split, train_idx, train=True)
            self.val_set = self._dataset(split, val_idx, train=False)
        if stage in ("test", None) and self.test_set is None:
            split = self._read(train=False)
            gen = torch.Generator().manual_seed(self.seed)
            idx = torch.cat(per_class(split.targets, self.test_subset, gen)).sort().values
            self.test_set = self._dataset(split, idx, train=False)
        sizes = {"train": self.train_set, "val": self.val_set, "test": self.test_set}
        rank_zero_info(f"{self.dataset} at {self.root}: " + ", ".join(
            f"{name} {len(cast(Sized, ds))}" for name, ds in sizes.items() if ds is not None))

    # ---- loaders -----------------------------------------------------------------------
    def split_set(self, name: str) -> Dataset:
        """The ``"train"``, ``"val"`` or ``"test"`` dataset, once ``setup`` has built it."""
        ds = {"train": self.train_set, "val": self.val_set, "test": self.test_set}[name]
        if ds is None:
            raise RuntimeError(f"the {name} split is built by setup(); call it first")
        return ds

    def _loader(self, name: str, train: bool) -> DataLoader:
        return DataLoader(self.split_set(name), batch_size=self.batch_size if train else self.eval_batch_size,
                          shuffle=train, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0,
                          pin_memory=torch.cuda.is_available())

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

"""Find and read an image data set on disk: torchvision CIFAR files or an ImageFolder tree.

Everything here returns plain tensors/paths and raises :class:`DatasetError` with a message
that says what was looked for, where, and how to fix it.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.io import ImageReadMode, decode_image

from metaprune.errors import UserError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
# torchvision's folder name for each CIFAR release inside ``root``.
CIFAR_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}


class DatasetError(UserError):
    """The data set is missing, laid out wrongly or does not match the configuration."""


@dataclass
class Split:
    """One split on disk: either decoded images (``images``) or file paths (``files``)."""
    classes: list[str]
    targets: torch.Tensor  # (N,) int64
    files: list[str] | None = None
    images: torch.Tensor | None = None  # (N, 3, H, W) uint8


@dataclass(frozen=True)
class DataSplit:
    """Which of a data set's training images a network trains on and which it validates on.

    Enough to rebuild both index sets (:func:`split_indices`) from the data set's training
    split; stored in network files (``metadata["trained_on"]``) so that a later evaluation
    can prove it never scores a network on an image the network trained on.
    """
    dataset: str
    subset: int | None
    val_fraction: float
    seed: int

    def as_dict(self) -> dict:
        return {"dataset": self.dataset, "subset": self.subset,
                "val_fraction": float(self.val_fraction), "seed": int(self.seed)}

    @classmethod
    def from_dict(cls, record: dict) -> "DataSplit":
        return cls(str(record["dataset"]), None if record.get("subset") is None
                   else int(record["subset"]), float(record["val_fraction"]), int(record["seed"]))


def split_indices(targets: torch.Tensor, split: DataSplit) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train, val)`` indices into the training split (sorted): per class, ``split.subset``
    images in a ``split.seed``-seeded order, the first ``val_fraction`` of them for val."""
    train_idx, val_idx = [], []
    for idx in per_class(targets, split.subset, torch.Generator().manual_seed(split.seed)):
        n_val = max(1, round(len(idx) * split.val_fraction)) if len(idx) > 1 else 0
        val_idx.append(idx[:n_val])
        train_idx.append(idx[n_val:])
    return torch.cat(train_idx).sort().values, torch.cat(val_idx).sort().values


def folder_layout(root: Path) -> tuple[Path, Path] | None:
    """``(train_dir, test_dir)`` of an ImageFolder tree, or None; test/ wins over val/."""
    train = root / "train"
    for name in ("test", "val"):
        if train.is_dir() and (root / name).is_dir():
            return train, root / name
    return None


def scan_folder(split_dir: Path) -> Split:
    """List ``split_dir/<class>/<image>`` like torchvision's ImageFolder (sorted classes/files)."""
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise DatasetError(
            f"no class folders in {str(split_dir)!r}: an ImageFolder split holds one subfolder "
            "per class (e.g. train/cat/0001.jpg)"
        )
    files, targets = [], []
    for label, name in enumerate(classes):
        names = sorted(e.name for e in os.scandir(split_dir / name)
                       if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
        if not names:
            raise DatasetError(
                f"class folder {str(split_dir / name)!r} holds no images "
                f"({', '.join(IMAGE_EXTENSIONS)}); remove it or add its images"
            )
        files += [str(split_dir / name / n) for n in names]
        targets += [label] * len(names)
    return Split(classes, torch.tensor(targets, dtype=torch.long), files=files)


def read_cifar(root: Path, dataset: str, train: bool) -> Split:
    """A torchvision CIFAR-10/100 split as an in-memory uint8 tensor."""
    from torchvision import datasets  # only needed for the binary release

    cls = datasets.CIFAR10 if dataset == "cifar10" else datasets.CIFAR100
    try:
        ds = cls(str(root), train=train, download=False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise DatasetError(
            f"torchvision {dataset} files in {str(root / CIFAR_FOLDERS[dataset])!r} are "
            f"incomplete or corrupt ({e}); delete that folder and rerun with download=true"
        ) from e
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    return Split(list(ds.classes), torch.tensor(ds.targets, dtype=torch.long), images=images)


def decode(path: str) -> torch.Tensor:
    """One image file as a (3, H, W) uint8 tensor."""
    try:
        return decode_image(path, mode=ImageReadMode.RGB)
    except RuntimeError as e:
        raise DatasetError(f"cannot decode image {path!r} ({e}); delete or replace it") from e


def decode_all(files: list[str], size: int) -> torch.Tensor:
    """Decode small images once into one (N, 3, size, size) uint8 tensor."""
    out = torch.empty(len(files), 3, size, size, dtype=torch.uint8)
    for i, path in enumerate(files):
        img = decode(path)
        if img.shape[1:] != (size, size):
            raise DatasetError(
                f"image {path!r} is {img.shape[2]}x{img.shape[1]}, but CIFAR data sets are "
                f"{size}x{size}; use dataset=imagefolder (or imagenet) for other sizes"
            )
        out[i] = img
    return out


def per_class(targets: torch.Tensor, limit: int | None,
              generator: torch.Generator) -> list[torch.Tensor]:
    """For every class, its indices in a seeded random order, cut to ``limit`` if given."""
    order = torch.randperm(len(targets), generator=generator)
    groups = []
    for c in range(int(targets.max()) + 1):
        idx = order[targets[order] == c]
        groups.append(idx if limit is None else idx[:limit])
    return groups

"""ModelZooDataModule: zoo members plus the image batches the meta-training loss needs.

One training item is one meta-training step: a zoo member index and ``batches_per_step`` image
batches. Lightning shards the items across ranks under DDP (its DistributedSampler), so each
rank trains on different members with different images, and the metanetwork gradients are
averaged as usual.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sized, cast

import torch
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from torch.utils.data import DataLoader, Dataset

import networks

from .images import ImageDataModule
from .zoo_manifest import ZooError, read_manifest


@dataclass
class ZooMember:
    """One zoo member: its network, its network file's record and its manifest row."""

    index: int
    network: nn.Module
    record: dict      # the network file's record: arch, layers, metadata
    row: dict         # the manifest row


class StepDataset(Dataset):
    """Item ``i``: (member index, images [K, B, ...], labels [K, B]) for one step."""

    def __init__(self, members: list[int], images: Dataset, batches_per_step: int,
                 batch_size: int, seed: int) -> None:
        self.members, self.images = members, images
        self.batches_per_step, self.batch_size, self.seed = batches_per_step, batch_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """New images every epoch (same for every rank and every rerun)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.members)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor, torch.Tensor]:
        gen = torch.Generator().manual_seed(hash((self.seed, self.epoch, i)) % (2 ** 62))
        count = self.batches_per_step * self.batch_size
        idx = torch.randint(len(cast(Sized, self.images)), (count,), generator=gen).tolist()
        fetch = getattr(self.images, "__getitems__", None)
        items = fetch(idx) if fetch else [self.images[j] for j in idx]
        x = torch.stack([im for im, _ in items])
        y = torch.tensor([label for _, label in items])
        return self.members[i], x.view(self.batches_per_step, self.batch_size, *x.shape[1:]), \
            y.view(self.batches_per_step, self.batch_size)


class ModelZooDataModule(LightningDataModule):
    """Zoo members split into meta-train and meta-val, with image batches per step.

    Args:
        zoo: the zoo directory (``manifest.json`` and member files).
        images: the image data; its train split feeds meta-training, its val split meta-val.
        meta_val_members: trained networks held out (seeded) for checkpoint selection, never
            trained on; every member of a held-out network (all variants of its seed) is held
            out with it, so no meta-val member shares a trained network with a training one.
        batches_per_step: image batches per meta-training step (the reference uses 8).
        batch_size: images per batch (the reference uses 500).
        steps_per_member: how often each meta-train member is visited per epoch.
        seed: seeds the member split and the image draws.
    """

    def __init__(self, zoo: str, images: ImageDataModule, meta_val_members: int = 1,
                 batches_per_step: int = 8, batch_size: int = 500, steps_per_member: int = 1,
                 seed: int = 0) -> None:
        super().__init__()
        self.zoo, self.images = Path(zoo), images
        self.meta_val_members, self.batches_per_step = meta_val_members, batches_per_step
        self.batch_size, self.steps_per_member, self.seed = batch_size, steps_per_member, seed
        self.members: list[ZooMember] = []
        self.train_ids: list[int] = []
        self.val_ids: list[int] = []

    @property
    def num_classes(self) -> int:
        return self.images.num_classes

    def setup(self, stage: str | None = None) -> None:
        if self.members:
            return
        rows = read_manifest(self.zoo)["members"]
        seeds = sorted({row["seed"] for row in rows})
        if len(seeds) <= self.meta_val_members:
            raise ZooError(f"zoo {str(self.zoo)!r} has members of {len(seeds)} trained networks "
                           f"(seeds), but meta_val_members={self.meta_val_members} are held out; "
                           "add members (rerun the zoo command with new seeds) or hold out fewer")
        for i, row in enumerate(rows):
            network, record = networks.load_network(self.zoo / row["file"])
            self.members.append(ZooMember(i, network.eval(), record, row))
        order = torch.randperm(len(seeds), generator=torch.Generator().manual_seed(self.seed))
        held_out = {seeds[j] for j in order[len(seeds) - self.meta_val_members:].tolist()}
        self.train_ids = [i for i, row in enumerate(rows) if row["seed"] not in held_out]
        self.val_ids = [i for i, row in enumerate(rows) if row["seed"] in held_out]
        self.images.setup("fit")
        rank_zero_info(f"zoo {self.zoo}: meta-train members {self.train_ids}, "
                       f"meta-val members {self.val_ids}")

    def example_input(self) -> torch.Tensor:
        """One image, for tracing member networks."""
        return self.images.split_set("val")[0][0].unsqueeze(0)

    def _steps(self, ids: list[int], images: Dataset, repeats: int, seed: int) -> StepDataset:
        return StepDataset([i for i in ids for _ in range(repeats)], images,
                           self.batches_per_step, self.batch_size, seed)

    def train_dataloader(self) -> DataLoader:
        self.train_steps = self._steps(self.train_ids, self.images.split_set("train"),
                                       self.steps_per_member, self.seed)
        return DataLoader(self.train_steps, batch_size=None, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self._steps(self.val_ids, self.images.split_set("val"), 1, self.seed + 1),
                          batch_size=None)

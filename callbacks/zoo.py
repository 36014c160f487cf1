"""ExportToZoo: the best network of a fit becomes a zoo member (datamodules/zoo_manifest.py has
the zoo's format)."""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info

import networks
from datamodules.zoo_manifest import MANIFEST, add_member, member_file, member_name, widths

from .target import best_network, classifier


def _metric(trainer: Trainer, key: str) -> float | None:
    value = trainer.callback_metrics.get(key)
    return None if value is None else float(value)


class ExportToZoo(Callback):
    """Save the best-val network of a fit as zoo member ``(seed, variant)`` and register it.

    On fit end (rank 0) the best checkpoint's network (by the checkpoint callback's monitor,
    ``val/acc`` in the configs; the final weights when there is no checkpoint) is written to
    ``<zoo_dir>/members/seed<N>[-<variant>].pt`` (temporary name, then rename). Its manifest
    row follows:

    * ``wait_for_test=True`` (default; what ``prune.py zoo`` uses): at the end of the
      ``trainer.test(ckpt_path="best")`` that follows the fit, with ``test_acc`` from
      ``test/acc``. Test accuracy is only reported, never used for selection.
    * ``wait_for_test=False``: right after the file, with ``test_acc: null``.

    Args:
        zoo_dir: the zoo directory.
        seed: the seed of the trained network the member comes from.
        input_size: ``[C, H, W]`` of one input image, for MAC counting.
        variant: "" for the config's member of that network, else a name for another one
            (e.g. another initial speed-up); ``(seed, variant)`` is the manifest key.
    """

    def __init__(self, zoo_dir: str, seed: int, input_size: Sequence[int] = (3, 32, 32),
                 wait_for_test: bool = True, variant: str = "") -> None:
        self.zoo_dir = Path(zoo_dir)
        self.seed, self.variant = int(seed), variant
        self.name = member_name(self.seed, variant)
        self.input_size = [int(s) for s in input_size]
        networks.example_input(self.input_size)
        self.wait_for_test = wait_for_test
        self.row: dict | None = None  # the row of this run once built (rank 0)
        self.registered = False

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        model = classifier(pl_module, "ExportToZoo")
        network, val_acc, best = best_network(trainer, model)
        if best is None:
            val_acc = _metric(trainer, "val/acc")
        example = networks.example_input(self.input_size)
        arch = dict(model.arch)
        macs, base = networks.count_macs(network, example), networks.base_macs(arch, example)
        self.row = {
            "seed": self.seed, "variant": self.variant, "architecture": arch,
            "widths": widths(network), "macs": macs,
            "params": networks.count_params(network), "base_macs": base, "speed_up": base / macs,
            "val_acc": val_acc, "test_acc": None, "file": member_file(self.seed, self.variant),
        }
        metadata = {k: v for k, v in self.row.items() if k not in ("file", "widths", "architecture")}
        metadata["checkpoint"] = best
        metadata.update(model.lineage(trainer.datamodule))
        networks.save_network(network, self.zoo_dir / self.row["file"], arch=arch, metadata=metadata)
        acc = "-" if val_acc is None else f"{val_acc:.4f}"
        rank_zero_info(f"zoo member {self.name}: {self.zoo_dir / self.row['file']} "
                       f"({self.row['speed_up']:.3f}x, val/acc {acc})")
        if not self.wait_for_test:
            self._register()

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.is_global_zero or self.row is None or self.registered:
            return
        self.row["test_acc"] = _metric(trainer, "test/acc")
        self._register()

    def _register(self) -> None:
        assert self.row is not None  # built by on_fit_end
        add_member(self.zoo_dir, self.row)
        self.registered = True
        rank_zero_info(f"zoo {self.zoo_dir}: registered {self.name} in {MANIFEST}")

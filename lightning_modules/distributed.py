"""Process-group cleanup for DDP worker processes."""
from __future__ import annotations

import atexit
import functools

import torch.distributed as dist


def destroy_process_group_at_exit() -> None:
    """In a process that has joined a process group, destroy it when the interpreter exits.

    Lightning creates the process group and never destroys it. A gloo worker that exits with the
    group alive can abort during interpreter finalization ("terminate called without an active
    exception", SIGABRT; pytorch/pytorch#190489): gloo's threads still hold tensors then. CI saw
    it in a 2-process ddp_spawn test after a successful fit. An exit handler runs while the
    interpreter is still whole. Safe to call any number of times."""
    if dist.is_available() and dist.is_initialized():
        _register_once()


@functools.cache
def _register_once() -> None:
    atexit.register(_destroy)


def _destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()

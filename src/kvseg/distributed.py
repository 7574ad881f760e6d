"""torch.distributed helpers for ``torchrun``: set-up from environment variables, reductions.

``torchrun --nproc_per_node N -m kvseg train ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; with ``WORLD_SIZE > 1`` :func:`setup` initialises a process group (NCCL when the
device is CUDA, gloo on CPU). Without those variables everything runs in one process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvseg.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """This process: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (torchrun); defaults describe one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError as e:
        raise ConfigError(f"bad torchrun environment variable: {e}") from None
    return DistInfo(rank=rank, world_size=world, local_rank=local)


def setup(device_type: str) -> DistInfo:
    """Initialise the default process group when launched by torchrun with more than one process.

    ``device_type`` is ``"cuda"`` (NCCL backend) or ``"cpu"`` (gloo). Idempotent.
    """
    info = env_info()
    if info.enabled and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        if device_type == "cuda":
            torch.cuda.set_device(info.local_rank)
        dist.init_process_group(backend=backend)
    return info


def cleanup() -> None:
    """Destroy the process group if one was initialised."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum ``t`` over all ranks (returns a new tensor on ``t``'s device; identity in one process).

    With NCCL the reduction runs on the current CUDA device.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return t.clone()
    out = t.clone()
    if dist.get_backend() == "nccl":
        out = out.cuda()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def broadcast_flag(flag: bool) -> bool:
    """Rank 0's ``flag`` on every rank (the flag itself in one process).

    Used for decisions only rank 0 can make (it owns the output folder), so that the other ranks
    follow it instead of checking files they may not see (node-local storage).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.broadcast(t, src=0)
    return bool(t.item() > 0)


def barrier() -> None:
    """Synchronise all ranks (no-op in one process)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()

"""torch.distributed helpers for ``torchrun``: set-up from environment variables, reductions.

``torchrun --nproc_per_node N -m kvseg train ...`` sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK`` and ``LOCAL_WORLD_SIZE``; with ``WORLD_SIZE > 1`` :func:`setup` initialises a
process group (NCCL when the device is CUDA, gloo on CPU). Without those variables everything
runs in one process. :func:`check_device_option` refuses a device choice that would put every
rank on one GPU; :func:`loader_workers` is the DataLoader worker count a process gets by default.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from kvseg.errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    """This process: ``rank`` of ``world_size`` processes, ``local_rank`` of
    ``local_world_size`` on its node."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_info() -> DistInfo:
    """Read ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` / ``LOCAL_WORLD_SIZE`` (torchrun);
    defaults describe one process."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    except ValueError as e:
        raise ConfigError(f"bad torchrun environment variable: {e}") from None
    return DistInfo(rank=rank, world_size=world, local_rank=local,
                    local_world_size=max(1, local_world))


def check_device_option(device: str, info: DistInfo) -> None:
    """Refuse ``--device cuda:N`` when several processes run (``WORLD_SIZE > 1``).

    Under torchrun each rank takes the GPU of its ``LOCAL_RANK``; an explicit index would put
    every rank on the same GPU. Checked from the environment alone, before any process group
    or CUDA context exists. Raises :class:`ConfigError` naming the option.
    """
    if info.enabled and re.fullmatch(r"cuda:\d+", device.strip()):
        raise ConfigError(f"device={device}: an explicit GPU index under torchrun (WORLD_SIZE="
                          f"{info.world_size}) would put every rank on the same GPU; use "
                          "--device cuda (each rank takes the GPU of its LOCAL_RANK) and choose "
                          "GPUs with CUDA_VISIBLE_DEVICES")


def cpus_per_process(info: DistInfo | None = None) -> int:
    """The CPU cores this process may use, shared among the processes on its node."""
    info = env_info() if info is None else info
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // info.local_world_size)


#: Most DataLoader workers ``workers: auto`` starts per process.
MAX_AUTO_WORKERS = 8


def loader_workers(workers: int | None, device_type: str, info: DistInfo | None = None) -> int:
    """DataLoader worker processes: ``workers`` as given, or the default for ``None`` (auto).

    Auto is 0 on the CPU (the model's own threads use every core there; measured in
    docs/training.md) and, on CUDA, the cores this process gets minus one for itself, at most
    :data:`MAX_AUTO_WORKERS`.
    """
    if workers is not None:
        return int(workers)
    if device_type != "cuda":
        return 0
    return max(1, min(MAX_AUTO_WORKERS, cpus_per_process(info) - 1))


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


def all_reduce_min(t: torch.Tensor) -> torch.Tensor:
    """Element-wise minimum of ``t`` over all ranks (a copy of ``t`` in one process)."""
    if not (dist.is_available() and dist.is_initialized()):
        return t.clone()
    out = t.clone()
    if dist.get_backend() == "nccl":
        out = out.cuda()
    dist.all_reduce(out, op=dist.ReduceOp.MIN)
    return out.to(t.device)


def broadcast_object(obj):
    """Rank 0's ``obj`` (any picklable value) on every rank; ``obj`` itself in one process.

    The other ranks' ``obj`` is ignored. Used for what only rank 0 reads (``last.ckpt`` on
    node-local storage). With NCCL the bytes travel through the current CUDA device.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


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

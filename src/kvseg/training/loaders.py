"""The training and validation DataLoaders of a run: deterministic whatever the workers.

- :func:`train_loader`: every item is made with the global RNGs seeded from (epoch seed,
  index) (:class:`SeededItems`, :class:`EpochSampler`), so augmentation does not depend on which
  worker made an item, on the number of workers or on whether they persist across epochs, and a
  resumed epoch draws exactly what the original did (the sampler's generator is checkpointed).
  Under torchrun each rank reads its share (``DistributedSampler``).
- :func:`val_loader`: a disjoint, unpadded shard of the validation set per rank.

Both use persistent workers when there are any and pinned memory on CUDA.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset


def _worker_init(worker_id: int) -> None:
    # torch seeds each worker with base_seed + worker_id (base_seed from the loader's
    # generator); derive NumPy's and Python's seeds from it so augmentations are reproducible
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def _seed_globals(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.default_generator.manual_seed(seed)  # the CPU generator only, never CUDA's


class SeededItems(torch.utils.data.Dataset):
    """``dataset[(index, seed)]``: item ``index`` made with the global RNGs seeded from ``seed``.

    The augmentation of a slice then depends only on its (epoch seed, index), not on which
    worker made it, how many workers there are, or whether they persist across epochs (a
    persistent worker is seeded once, which would otherwise make a resumed run differ). In the
    main process (``workers: 0``) the RNG states are restored afterwards, so dropout's stream is
    untouched.
    """

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> dict:
        index, seed = key
        if torch.utils.data.get_worker_info() is not None:
            _seed_globals(seed)
            return self.dataset[index]
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        try:
            _seed_globals(seed)
            return self.dataset[index]
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])


class EpochSampler(torch.utils.data.Sampler):
    """Yields ``(index, seed)`` for :class:`SeededItems`, from exactly one draw of ``gen`` per
    epoch (``gen`` is checkpointed, so a resumed epoch draws the same).

    The order is a permutation of ``range(n)`` seeded by that draw, or ``inner``'s order (a
    ``DistributedSampler``, which shuffles from ``seed + epoch``). One draw, however far the
    epoch is read: ``RandomSampler`` draws again when exhausted, which DataLoader workers'
    prefetching does and a ``max_steps_per_epoch`` cut without workers does not.
    """

    def __init__(self, n: int, gen: torch.Generator, inner=None) -> None:
        self.n, self.gen, self.inner = n, gen, inner

    def __len__(self) -> int:
        return self.n if self.inner is None else len(self.inner)

    def __iter__(self):
        base = int(torch.randint(0, 2**62, (1,), generator=self.gen))
        if self.inner is None:
            order = torch.randperm(self.n, generator=torch.Generator().manual_seed(base)).tolist()
        else:
            order = [int(i) for i in self.inner]
        for i in order:
            yield i, (base + 0x9E3779B97F4A7C15 * (i + 1)) % 2**63


def _options(workers: int, device: torch.device) -> dict:
    """Workers (persistent across epochs), pinned memory on CUDA."""
    return dict(num_workers=workers, persistent_workers=workers > 0,
                worker_init_fn=_worker_init, pin_memory=device.type == "cuda")


def train_loader(dataset, batch_size: int, gen: torch.Generator, info, *, seed: int,
                 workers: int, device: torch.device) -> tuple[DataLoader, object]:
    """``(loader, DistributedSampler or None)`` over ``dataset`` (see the module docstring).

    ``gen`` draws one seed per epoch; ``info`` is the run's :class:`kvseg.distributed.DistInfo`.
    """
    sampler = None
    if info.enabled:
        sampler = DistributedSampler(dataset, num_replicas=info.world_size, rank=info.rank,
                                     shuffle=True, seed=seed)
    # the loader's own generator only seeds the workers, whose items are seeded anyway
    loader = DataLoader(SeededItems(dataset), batch_size=batch_size,
                        sampler=EpochSampler(len(dataset), gen, sampler), drop_last=False,
                        generator=torch.Generator().manual_seed(seed),
                        **_options(workers, device))
    return loader, sampler


def val_loader(dataset, batch_size: int, info, *, workers: int,
               device: torch.device) -> DataLoader:
    """This rank's disjoint, unpadded shard of ``dataset`` (DistributedSampler would pad with
    duplicates and bias the metric counts), in order."""
    shard = Subset(dataset, range(info.rank, len(dataset), info.world_size))
    return DataLoader(shard, batch_size=batch_size, shuffle=False,
                      generator=torch.Generator().manual_seed(0), **_options(workers, device))


__all__ = ["EpochSampler", "SeededItems", "train_loader", "val_loader"]

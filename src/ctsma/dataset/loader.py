"""Fast torch loading of a :class:`~ctsma.dataset.store.PatchStore`.

Per-item ``__getitem__`` calls cost far more than the 16³/32³ patches themselves, so the dataset is indexed by a
whole BATCH: :class:`EpochBatchSampler` yields ``(indices, augmentation_seed)`` and :class:`PatchDataset` returns
ready batched tensors (one vectorised read from RAM, or one sorted HDF5 read when the store exceeds the RAM budget).
Shuffling and augmentation depend only on ``(seed, epoch, batch number)``, never on global RNG state, so a run
resumed from an end-of-epoch checkpoint replays exactly the batches an uninterrupted run would see.
With several processes (DDP) each rank takes every ``world_size``-th batch of the same permutation.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .store import PatchStore

CT_OFFSET_HU, CT_SCALE_HU = 300.0, 600.0
"""CT patches are fed to networks as (HU - 300) / 600 (stored in the model file)."""


def _draw_flips(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-sample flips (n, 3) of the three spatial axes and one axis permutation for the batch."""
    flips = rng.random((n, 3)) < 0.5
    perm = rng.permutation(3) if rng.random() < 0.5 else np.arange(3)
    return flips, perm


def _assemble(parts: list[tuple[np.ndarray, float, float]], flips=None, perm=None) -> np.ndarray:
    """One float32 batch (n, C, D, H, W) from ``(array, offset, scale)`` parts stacked on the channel axis, each
    written as ``(array - offset) / scale``; with ``flips`` every sample is flipped on its axes ``flips[i]`` and
    then the batch is permuted by ``perm``. Each part is gathered once per flip pattern and written once: batch
    assembly is memory-bound on a CPU, and the earlier chain of copies cost 13 ms a batch with a mask channel,
    more than half of a demo training step."""
    n = parts[0][0].shape[0]
    spatial = parts[0][0].shape[2:]
    order = (0, 1, 2) if perm is None else tuple(int(i) for i in perm)
    out = np.empty((n, sum(a.shape[1] for a, _, _ in parts), *(spatial[i] for i in order)), np.float32)
    if flips is None:
        groups = [(slice(None), (False, False, False))]
    else:
        codes = flips @ np.array([4, 2, 1])
        groups = [(np.flatnonzero(codes == c), (bool(c & 4), bool(c & 2), bool(c & 1))) for c in np.unique(codes)]
    c0 = 0
    for a, offset, scale in parts:
        c1 = c0 + a.shape[1]
        for sel, code in groups:  # a flipped, permuted view of the group, converted as it is written
            view = a[sel][(slice(None), slice(None)) + tuple(slice(None, None, -1) if f else slice(None)
                                                              for f in code)]
            out[sel, c0:c1] = view.transpose(0, 1, *(2 + i for i in order))
        if offset or scale != 1.0:  # in place, in float32 as before
            dst = out[:, c0:c1]
            dst -= np.float32(offset)
            dst /= np.float32(scale)
        c0 = c1
    return out


class PatchDataset(Dataset):
    """Batches of CT/MR patches with targets; index it with ``(indices, seed)`` from :class:`EpochBatchSampler`.

    Returns a dict of tensors: ``ct`` (n,C,Dc³) normalised, ``mr`` (n,C,Dm³), ``y`` (n,4) normalised targets,
    ``index`` (n,). With ``masks`` the ROI mask is a second input channel.
    """

    def __init__(self, store: PatchStore, indices: Sequence[int], *, modalities: Sequence[str] = ("ct", "mr"),
                 target: str = "mr", target_mean=None, target_sd=None, masks: bool = False, augment: bool = False,
                 ram_budget_bytes: float = 4e9):
        self.store = store
        self.indices = np.asarray(indices, dtype=np.int64)
        self.modalities = tuple(modalities)
        self.masks = masks
        self.augment = augment
        y = store.targets(target)[self.indices]
        self.y_all = np.zeros((len(store), 4), np.float32)
        mean = np.zeros(4) if target_mean is None else np.asarray(target_mean, float)
        sd = np.ones(4) if target_sd is None else np.asarray(target_sd, float)
        self.y_all[self.indices] = ((y - mean) / sd).astype(np.float32)
        names = list(self.modalities) + ([f"{m}_mask" for m in self.modalities] if masks else [])
        self.names = names
        store.arrays(names, budget_bytes=ram_budget_bytes)  # cache in RAM when it fits

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item) -> dict:
        idx, seed = item if isinstance(item, tuple) else (item, None)
        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        flips, perm = _draw_flips(len(idx), np.random.default_rng(seed)) if self.augment and seed is not None \
            else (None, None)
        out = {}
        for m in self.modalities:
            parts = [(self.store.read(m, idx), *((CT_OFFSET_HU, CT_SCALE_HU) if m == "ct" else (0.0, 1.0)))]
            if self.masks:
                parts.append((self.store.read(f"{m}_mask", idx), 0.0, 1.0))
            out[m] = torch.from_numpy(_assemble(parts, flips, perm))
        out["y"] = torch.from_numpy(self.y_all[idx])
        out["index"] = torch.from_numpy(idx)
        return out


class EpochBatchSampler(Sampler):
    """Yields ``(indices, seed)`` batches; order depends only on (seed, epoch); sharded by rank for DDP.

    Under DDP (``world_size`` > 1) rank r takes batches r, r + world_size, ... With ``drop_last`` (training) the
    batches past the last multiple of ``world_size`` are dropped too, so that every rank makes the same number of
    steps (their gradients are synchronised each step); the permutation changes every epoch, and with it the
    patches left out. Without it (validation) every index is yielded exactly once over all ranks, which may then
    differ by one batch.
    """

    def __init__(self, n: int, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world_size: int = 1):
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world_size = drop_last, rank, world_size
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _batches(self) -> list[np.ndarray]:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(self.n) if self.shuffle
                 else np.arange(self.n))
        bs = [order[i:i + self.batch_size] for i in range(0, self.n, self.batch_size)]
        if self.drop_last and bs and len(bs[-1]) < self.batch_size and len(bs) > 1:
            bs = bs[:-1]
        if self.world_size > 1:
            if self.drop_last and len(bs) >= self.world_size:  # training: the same number of steps on every rank
                bs = bs[: len(bs) - len(bs) % self.world_size]
            bs = bs[self.rank::self.world_size]
        return bs

    def __len__(self) -> int:
        return len(self._batches())

    def __iter__(self) -> Iterator:
        for b, pos in enumerate(self._batches()):
            yield pos, (self.seed, self.epoch, b, self.rank)


class _Positions(Dataset):
    """Maps sampler positions (0..len-1) to store indices of the wrapped dataset."""

    def __init__(self, ds: PatchDataset):
        self.ds = ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, item):
        pos, seed = item
        return self.ds[(self.ds.indices[np.asarray(pos)], seed)]


def make_loader(ds: PatchDataset, batch_size: int, *, shuffle: bool, seed: int = 0, drop_last: bool = False,
                rank: int = 0, world_size: int = 1, num_workers: int = 0) -> DataLoader:
    """A DataLoader delivering whole batches (no per-item collation)."""
    sampler = EpochBatchSampler(len(ds), batch_size, shuffle=shuffle, seed=seed, drop_last=drop_last,
                                rank=rank, world_size=world_size)
    return DataLoader(_Positions(ds), sampler=sampler, batch_size=None, num_workers=num_workers,
                      persistent_workers=num_workers > 0)

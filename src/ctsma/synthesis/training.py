"""Training the MR→pseudo-CT model by weak pairing: no ground-truth transform is ever used.

Round 1 aligns each MR to its CT with an intensity-agnostic registration (body centroids, then
Mattes mutual information, global rigid and per-bone rigid: the ``pairing`` registration preset)
and trains the 2.5D U-Net on the roughly aligned pairs with a loss that tolerates the residual
misalignment: the L1 error of a patch is the minimum over small in-plane shifts of the target
(``shift_tolerance_vox``). Round 2 (optional) re-registers every pair with the round-1 pseudo-CT
(near mono-modal, much more accurate) and fine-tunes on the better-aligned pairs.
"""

from __future__ import annotations

import dataclasses
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import SimpleITK as sitk
import torch

from .. import __version__, progress
from ..config import load_config, setting
from ..errors import ConfigError, UserError
from .model import DEFAULT_NORMALISATION, PLANES, SynthesisModel, ct_to_target, mr_scale, resample_isotropic
from .network import UNet25D


@dataclass
class TrainConfig:
    working_spacing_mm: float = setting(1.0, lo=0.1, hi=5.0, help="isotropic grid the model works on")
    in_slices: int = setting(5, lo=1, hi=15, help="neighbouring slices given to the 2.5D network (odd)")
    base: int = setting(16, lo=4, hi=128, help="channels of the first U-Net level")
    depth: int = setting(3, lo=2, hi=5)
    patch: int = setting(48, lo=16, hi=512, help="training patch size (voxels)")
    batch: int = setting(16, lo=1, hi=512)
    iterations: int = setting(1500, lo=1, hi=200_000, help="round-1 optimiser steps")
    refine_iterations: int = setting(600, lo=0, hi=200_000, help="round-2 steps (0: no second round)")
    learning_rate: float = setting(2e-3, lo=1e-6, hi=1.0)
    shift_tolerance_vox: int = setting(1, lo=0, hi=4, help="in-plane shift the loss forgives")
    bone_weight: float = setting(3.0, lo=1.0, hi=100.0, help="loss weight of voxels above 150 HU")
    bone_fraction: float = setting(0.7, lo=0.0, hi=1.0, help="share of patches centred on bone")
    min_valid: float = setting(0.9, lo=0.0, hi=1.0, help="least share of a patch inside the MR field of view")
    planes: list[str] = setting(["axial", "coronal", "sagittal"], choices=tuple(PLANES))
    pairing_preset: str = setting("pairing", help="registration preset for round 1 (no synthesis)")
    refine_preset: str = setting("pairing_pct", help="registration preset for round 2 (pseudo-CT)")
    max_minutes: float = setting(10.0, lo=0.1, hi=10_000, help="time limit; training stops early at it")
    threads: int = setting(0, lo=0, hi=256, help="torch threads, and pairing registrations run side by side "
                                                 "(each on one ITK thread); 0: the cores, at most 4")
    seed: int = setting(0, lo=0, hi=2**31 - 1)


PRESETS = {
    "default": {},
    "demo": {"iterations": 600, "refine_iterations": 200, "batch": 12, "base": 12, "patch": 32,
             "learning_rate": 3e-3, "max_minutes": 10.0},
}


def load_train_config(preset_or_path: str | None = "default", overrides: dict | None = None) -> TrainConfig:
    """A named training preset (``default``, ``demo``) or a YAML/JSON file, plus overrides."""
    if preset_or_path in PRESETS or preset_or_path is None:
        return load_config(PRESETS[preset_or_path or "default"], TrainConfig, overrides=overrides)
    if not Path(preset_or_path).suffix and not Path(preset_or_path).exists():  # a name, not a file
        raise ConfigError(f"unknown synthesis training preset {preset_or_path!r} (shipped: "
                          f"{', '.join(sorted(PRESETS))}; or give a YAML/JSON file)")
    return load_config(preset_or_path, TrainConfig, overrides=overrides)


@dataclass
class Pair:
    """One training pair on the CT's isotropic grid: normalised MR, CT target, masks (z, y, x)."""
    mr: np.ndarray
    ct: np.ndarray
    valid: np.ndarray
    bone_idx: np.ndarray
    valid_idx: np.ndarray


def _pad(arr: np.ndarray, m: int, value: float) -> np.ndarray:
    return np.pad(arr, m, mode="constant", constant_values=value)


def make_pair(mr: sitk.Image, ct: sitk.Image, transform: sitk.Transform, cfg: TrainConfig, margin: int) -> Pair:
    """Resample the MR through ``transform`` onto the CT's isotropic working grid."""
    ref = resample_isotropic(ct, cfg.working_spacing_mm, default=-1000.0)
    # a copy, not a view: a view of the temporary image would read freed memory (a random scale)
    scale = mr_scale(sitk.GetArrayFromImage(resample_isotropic(mr, cfg.working_spacing_mm)))
    mr_w = sitk.GetArrayFromImage(sitk.Resample(mr, ref, transform, sitk.sitkLinear, -1.0, sitk.sitkFloat32))
    valid = mr_w >= 0
    mr_n = np.where(valid, np.clip(mr_w / max(scale, 1e-6), 0, DEFAULT_NORMALISATION["mr_clip"]), 0).astype(np.float32)
    hu = sitk.GetArrayFromImage(ref)
    ct_t = ct_to_target(hu, DEFAULT_NORMALISATION)
    mr_p, ct_p, v_p = _pad(mr_n, margin, 0.0), _pad(ct_t, margin, -1.0), _pad(valid, margin, False)
    bone = v_p & (ct_p > 0.15)
    body = v_p & (ct_p > -0.5)
    # Patch centres stay `margin` away from the padded border.
    inner = np.zeros_like(v_p)
    inner[margin:-margin, margin:-margin, margin:-margin] = True
    return Pair(mr_p, ct_p, v_p, np.argwhere(bone & inner), np.argwhere(body & inner))


class PatchSampler:
    """Random 2.5D patches (slices of one plane as channels) from a list of :class:`Pair`."""

    def __init__(self, pairs: Sequence[Pair], cfg: TrainConfig, rng: np.random.Generator):
        self.pairs, self.cfg, self.rng = pairs, cfg, rng

    def batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        c, k, h = self.cfg, self.cfg.in_slices // 2, self.cfg.patch // 2
        xs, ys, vs = [], [], []
        tries = 0
        while len(xs) < c.batch:
            p = self.pairs[self.rng.integers(len(self.pairs))]
            pool = p.bone_idx if (len(p.bone_idx) and self.rng.random() < c.bone_fraction) else p.valid_idx
            if not len(pool):
                continue
            z, y, x = pool[self.rng.integers(len(pool))]
            ax = PLANES[c.planes[self.rng.integers(len(c.planes))]]
            sl = [slice(z - h, z + h), slice(y - h, y + h), slice(x - h, x + h)]
            sl[ax] = slice((z, y, x)[ax], (z, y, x)[ax] + 1)
            v = np.moveaxis(p.valid[tuple(sl)], ax, 0)
            if v.mean() < c.min_valid and tries < 50:  # mostly outside the MR's field of view
                tries += 1
                continue
            ct = np.moveaxis(p.ct[tuple(sl)], ax, 0)
            sl[ax] = slice((z, y, x)[ax] - k, (z, y, x)[ax] + k + 1)
            mr = np.moveaxis(p.mr[tuple(sl)], ax, 0)
            if self.rng.random() < 0.5:  # flips keep the model free of a left/right bias
                mr, ct, v = mr[:, :, ::-1], ct[:, :, ::-1], v[:, :, ::-1]
            xs.append(mr.copy()), ys.append(ct.copy()), vs.append(v.copy())
        return (torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)),
                torch.from_numpy(np.stack(vs).astype(np.float32)))


def shift_tolerant_l1(pred: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, tol: int,
                      bone_weight: float) -> torch.Tensor:
    """Per patch, the smallest weighted L1 over target shifts of up to ``tol`` voxels in-plane; batch mean.

    Residual misalignment of weakly paired data would otherwise teach the network to blur edges.
    """
    w = valid * (1.0 + (bone_weight - 1.0) * (target > 0.15).float())
    if tol == 0:
        return ((pred - target).abs() * w).sum((1, 2, 3)).div(w.sum((1, 2, 3)).clamp_min(1)).mean()
    t = tol
    p = pred[..., t:-t, t:-t]
    losses = []
    for dy in range(-t, t + 1):
        for dx in range(-t, t + 1):
            ys = slice(t + dy, target.shape[-2] - t + dy)
            xs = slice(t + dx, target.shape[-1] - t + dx)
            ww = w[..., ys, xs]
            err = ((p - target[..., ys, xs]).abs() * ww).sum((1, 2, 3)) / ww.sum((1, 2, 3)).clamp_min(1)
            losses.append(err)
    return torch.stack(losses, 1).min(1).values.mean()


def _train_steps(net, sampler, cfg, steps, lr, device, deadline, stage, min_steps: int = 0) -> list[float]:
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=1e-5)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=max(steps, 2), pct_start=0.15)
    net.train()
    losses = []
    for _ in progress.track(range(steps), stage, total=steps, unit="step"):
        x, y, v = (t.to(device) for t in sampler.batch())
        loss = shift_tolerant_l1(net(x), y, v, cfg.shift_tolerance_vox, cfg.bone_weight)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if time.monotonic() > deadline and len(losses) >= min_steps:
            break
    net.eval()
    return losses


def _flat_output_hu(model: SynthesisModel, mr: sitk.Image, min_sd_hu: float = 25.0) -> float | None:
    """The pseudo-CT's SD inside the MR body when it is below ``min_sd_hu`` (a collapsed model), else None."""
    arr = sitk.GetArrayFromImage(resample_isotropic(mr, float(model.meta["working_spacing_mm"])))
    body = arr > 0.05 * float(arr.max())
    sd = float(np.std(sitk.GetArrayFromImage(model.apply(mr))[body])) if body.any() else 0.0
    return sd if sd < min_sd_hu else None


def pair_transforms(pairs, preset: str, workers: int, stage: str, pseudo_cts=None) -> list[sitk.Transform]:
    """The CT→MR transform of every (MR, CT, CT bones or None) pair: each registration on one ITK thread,
    ``workers`` of them at a time in spawned processes.

    One thread per registration makes the transforms, and so the trained model, the same from run to run. With
    several, ITK's Mattes mutual information sums its joint histogram in an order that varies between runs: the
    pairing transforms moved by about 1e-6 mm, and the model trained on the resampled pairs differed by up to 1.7
    in a weight (measured on the demo's six pairs).
    """
    from ..processes import run_jobs
    from ..registration.pipeline import register_transform
    from ..registration.presets import load_preset

    one = load_preset(preset, {"threads": 1})
    jobs = [(mr, ct, one, bones, None if pseudo_cts is None else pseudo_cts[i])
            for i, (mr, ct, bones) in enumerate(pairs)]
    done = []

    def report(i: int, _tf) -> None:
        done.append(i)
        progress.step(stage, len(done), len(jobs), f"  {stage}: pair {len(done)} of {len(jobs)} registered")

    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    try:
        return run_jobs(register_transform, jobs, max(1, workers), on_done=report)
    finally:  # in this process (one worker), register() set ITK's global thread count
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def train(pairs: Sequence[tuple[sitk.Image, sitk.Image, sitk.Image | None]], cfg: TrainConfig | None = None,
          *, names: Sequence[str] | None = None) -> SynthesisModel:
    """Train a synthesis model on (MR, CT, CT bone labels or None) pairs; no true transform is used.

    With more than one thread (``cfg.threads``; 0: the cores, at most 4) the pairing registrations run in spawned
    worker processes (:func:`pair_transforms`): a Python script that calls this must do so under
    ``if __name__ == "__main__":``, because each worker imports the script.
    """
    cfg = cfg or TrainConfig()
    if cfg.in_slices % 2 == 0:
        raise UserError("in_slices must be odd (a centre slice and its neighbours)")
    if cfg.patch % 2 ** (cfg.depth - 1):
        raise UserError(f"patch ({cfg.patch}) must be a multiple of 2**(depth-1) = {2 ** (cfg.depth - 1)}")
    if not pairs:
        raise UserError("no training pairs given")
    from ..io.images import check_ct_intensities
    from ..registration.pipeline import check_mr_intensities

    for i, (mr, ct, _) in enumerate(pairs):  # before the pairing, which named neither the pair nor the manifest
        who = names[i] if names is not None and i < len(names) else f"pair {i + 1}"
        check_ct_intensities(ct, what=f"CT of {who}")
        check_mr_intensities(mr, f"the mr column of {who} (a pair's first image) must name the MR", f"MR of {who}")
    t0 = time.monotonic()
    cpu0 = time.process_time()
    deadline = t0 + 60 * cfg.max_minutes
    threads = cfg.threads or min(os.cpu_count() or 1, 4)
    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    margin = cfg.patch // 2 + cfg.in_slices // 2 + 1

    timings = {}
    transforms = pair_transforms(pairs, cfg.pairing_preset, threads, "synthesis: weak pairing (MI)")
    prepared = [make_pair(mr, ct, tf, cfg, margin) for (mr, ct, _), tf in zip(pairs, transforms)]
    timings["pairing_s"] = time.monotonic() - t0

    arch = {"type": "unet25d", "in_slices": cfg.in_slices, "base": cfg.base, "depth": cfg.depth}
    net = UNet25D(cfg.in_slices, cfg.base, cfg.depth).to(device)
    t1 = time.monotonic()
    losses1 = _train_steps(net, PatchSampler(prepared, cfg, rng), cfg, cfg.iterations, cfg.learning_rate, device,
                           deadline, "synthesis: training round 1", min_steps=cfg.iterations // 3)
    timings["round1_s"] = time.monotonic() - t1
    meta = {"architecture": arch, "normalisation": DEFAULT_NORMALISATION,
            "working_spacing_mm": cfg.working_spacing_mm, "planes": list(cfg.planes),
            "training": {"config": dataclasses.asdict(cfg), "n_pairs": len(pairs), "subjects": list(names or []),
                         "ground_truth_transforms_used": False, "device": str(device), "threads": threads,
                         "ctsma_version": __version__}}
    model = SynthesisModel(net.cpu(), meta)
    losses2: list[float] = []
    if cfg.refine_iterations and time.monotonic() < deadline:
        t2 = time.monotonic()
        transforms = pair_transforms(pairs, cfg.refine_preset, threads, "synthesis: re-pairing with pseudo-CT",
                                     [model.apply(mr) for mr, _, _ in pairs])
        prepared = [make_pair(mr, ct, tf, cfg, margin) for (mr, ct, _), tf in zip(pairs, transforms)]
        timings["repairing_s"] = time.monotonic() - t2
        t3 = time.monotonic()
        net.to(device)
        losses2 = _train_steps(net, PatchSampler(prepared, cfg, rng), cfg, cfg.refine_iterations,
                               cfg.learning_rate * 0.5, device, deadline, "synthesis: training round 2")
        timings["round2_s"] = time.monotonic() - t3
        model = SynthesisModel(net.cpu(), meta)
    flat = _flat_output_hu(model, pairs[0][0])
    if flat is not None:
        raise UserError(f"synthesis training failed: the trained model's pseudo-CT is flat (SD {flat:.0f} HU inside "
                        "the MR's body), so it cannot guide registration; check that the MR and CT pairs show the "
                        "same knee, or train longer (iterations)")
    timings["total_s"] = time.monotonic() - t0
    timings["total_cpu_s"] = time.process_time() - cpu0  # CPU time of this process (all its threads)
    meta["training"].update({"timings": timings, "steps_round1": len(losses1), "steps_round2": len(losses2),
                             "initial_loss_round1": float(np.mean(losses1[:10])) if losses1 else None,
                             "final_loss_round1": float(np.mean(losses1[-20:])) if losses1 else None,
                             "final_loss_round2": float(np.mean(losses2[-20:])) if losses2 else None,
                             "stopped_by_time_limit": time.monotonic() > deadline})
    short = len(losses1) < cfg.iterations or len(losses2) < cfg.refine_iterations
    if short:
        warnings.warn(f"synthesis training reached its {cfg.max_minutes:g}-minute limit after {len(losses1)}/"
                      f"{cfg.iterations} + {len(losses2)}/{cfg.refine_iterations} steps (a busy machine?): the model "
                      "may be undertrained; raise max_minutes or train on a quieter machine", stacklevel=2)
    return model

"""A small synthetic patch store with known microstructure: a toy version of the CT-from-MR problem.

For each patch a trabecular-like binary structure is drawn on a fine grid (0.125 mm, 64³ over 8 mm): a Gaussian
random field smoothed at a subject-specific scale and thresholded at a subject-specific bone fraction. Then:

* the **truth** is morphometry of the fine binary by the plate model (Parfitt): BV/TV by voxel count, BS from the
  count of bone/marrow voxel faces, Tb.Th = 2·BV/BS, Tb.N = (BV/TV)/Tb.Th, Tb.Sp = 1/Tb.N − Tb.Th;
* the **MR** patch (32³ at 0.25 mm) is the block-averaged fine structure with inverted contrast (bone dark),
  mild noise and normalised intensities; the **MR reference** is the same plate-model morphometry of the MR patch
  binarised at 0.5 (so it carries partial-volume error, like a real reference);
* the **CT** patch (16³ at 0.5 mm) is the structure blurred by a clinical-CT PSF, block-averaged, in HU with noise,
  so thin trabeculae are only partly resolved.

Used by the tests and benchmarks; it is not a model of real bone, only of the resolution gap.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from .. import PARAMETERS, ROIS
from .store import PatchStore

FINE = 64


def plate_model(binary: np.ndarray, spacing_mm: float) -> tuple[float, float, float, float]:
    """(BV/TV, Tb.Th, Tb.Sp, Tb.N) of a binary cube by the plate model; faces counted inside the cube only."""
    b = binary.astype(bool)
    bvtv = float(b.mean())
    faces = sum(int(np.count_nonzero(np.diff(b, axis=ax))) for ax in range(3))
    if faces == 0 or bvtv in (0.0, 1.0):
        return bvtv, float("nan"), float("nan"), float("nan")
    bs_tv = faces * spacing_mm ** 2 / (b.size * spacing_mm ** 3)
    tbth = 2.0 * bvtv / bs_tv
    tbn = bvtv / tbth
    return bvtv, tbth, 1.0 / tbn - tbth, tbn


def _field(rng: np.random.Generator, scale_vox: float) -> np.ndarray:
    f = ndimage.gaussian_filter(rng.standard_normal((FINE, FINE, FINE)), scale_vox, mode="wrap")
    return (f - f.mean()) / (f.std() + 1e-12)


def make_patch(rng: np.random.Generator, scale_vox: float, bvtv: float, ct_noise_hu: float = 60.0,
               psf_mm: float = 0.45):
    """One (ct 16³ HU, mr 32³, truth, mr_reference) sample."""
    field = _field(rng, scale_vox)
    # thin-walled structure: bone where |field| is small gives plate/rod-like trabeculae
    thr = np.quantile(np.abs(field), bvtv)
    fine = (np.abs(field) < thr).astype(np.float32)
    truth = plate_model(fine > 0.5, 8.0 / FINE)
    mr_frac = fine.reshape(32, 2, 32, 2, 32, 2).mean(axis=(1, 3, 5))
    mr = 1.0 - mr_frac + rng.normal(0, 0.05, mr_frac.shape)
    mr_ref = plate_model(mr_frac >= 0.5, 0.25)
    ct_fine = ndimage.gaussian_filter(fine, psf_mm / (8.0 / FINE), mode="wrap")  # Gaussian PSF, sd in mm
    ct = ct_fine.reshape(16, 4, 16, 4, 16, 4).mean(axis=(1, 3, 5)) * 1400.0 + 20.0
    ct = ct + rng.normal(0, ct_noise_hu, ct.shape)
    return ct.astype(np.float32), mr.astype(np.float32), truth, mr_ref


def make_synthetic_store(directory: str | Path, n_subjects: int = 12, patches_per_subject: int = 24,
                         seed: int = 0, ct_noise_hu: float = 60.0, psf_mm: float = 0.45) -> PatchStore:
    """Write a synthetic store (splits left to :meth:`PatchStore.patient_split`) and return it opened."""
    rng = np.random.default_rng(seed)
    writer = PatchStore.create(directory, 16, 32, {"mr_normalisation": "synthetic: marrow=1, bone=0",
                                                   "source": "ctsma.dataset.synthetic", "seed": seed,
                                                   "ct_noise_hu": ct_noise_hu, "psf_mm": psf_mm})
    rois = list(ROIS)
    for s in range(n_subjects):
        subj_scale = rng.uniform(1.6, 3.2)
        subj_bvtv = rng.uniform(0.18, 0.38)
        cts, mrs, rows = [], [], []
        for i in range(patches_per_subject):
            scale = subj_scale * rng.uniform(0.85, 1.15)
            bvtv = float(np.clip(subj_bvtv + rng.normal(0, 0.04), 0.08, 0.5))
            ct, mr, truth, mref = make_patch(rng, scale, bvtv, ct_noise_hu, psf_mm)
            cts.append(ct)
            mrs.append(mr)
            c = rng.uniform(-20, 20, 3)
            row = {"subject": f"syn{s:03d}", "roi": rois[i % 4], "centre_x": c[0], "centre_y": c[1],
                   "centre_z": c[2], "rel_x": c[0], "rel_y": c[1], "rel_z": c[2]}
            row.update({f"mr_{p}": v for p, v in zip(PARAMETERS, mref)})
            row.update({f"true_{p}": v for p, v in zip(PARAMETERS, truth)})
            rows.append(row)
        n = len(rows)
        writer.append(np.stack(cts), np.stack(mrs), np.ones((n, 16, 16, 16), np.uint8),
                      np.ones((n, 32, 32, 32), np.uint8), rows)
    return writer.finalize()

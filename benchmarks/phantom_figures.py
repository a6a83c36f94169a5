"""Figures of the digital knee phantom for docs/phantom.md.

Usage: .venv/bin/python benchmarks/phantom_figures.py [KNEE_DIR] [--out docs/figures]
Without KNEE_DIR, one demo knee (seed 0, index 0) is generated in a temporary folder.
Writes phantom_overview.png (MR, CT, labels, ROIs) and phantom_truth.png (truth microstructure).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from ctsma.phantom import generate_knee, make_settings, truth_binary  # noqa: E402


def _arr(d: Path, name: str):
    img = sitk.ReadImage(str(d / name))
    return sitk.GetArrayFromImage(img), img


def _overlay(ax, base, lab, title, vmin=None, vmax=None, aspect=1.0):
    ax.imshow(base, cmap="gray", vmin=vmin, vmax=vmax, origin="lower", aspect=aspect)
    m = np.ma.masked_where(lab == 0, lab)
    ax.imshow(m, cmap="tab10", alpha=0.45, vmin=0, vmax=10, origin="lower", interpolation="nearest", aspect=aspect)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def overview(knee: Path, out: Path) -> None:
    meta = json.loads((knee / "metadata.json").read_text())
    mr, mri = _arr(knee, "mr.nii.gz")
    ct, cti = _arr(knee, "ct.nii.gz")
    mrr, _ = _arr(knee, "mr_rois.nii.gz")
    mrb, _ = _arr(knee, "mr_bones.nii.gz")
    ctr, _ = _arr(knee, "ct_rois.nii.gz")
    ctb, _ = _arr(knee, "ct_bones.nii.gz")
    sx, sy, sz = mri.GetSpacing()
    # MR: coronal through the condyles (y index of the ROI centroid), sagittal through the medial ROI
    zyx = np.argwhere(mrr == 3).mean(0).astype(int)
    fig, axs = plt.subplots(2, 4, figsize=(16, 8))
    vmax = np.percentile(mr, 99.5)
    axs[0, 0].imshow(mr[:, zyx[1], :], cmap="gray", origin="lower", vmax=vmax, aspect=sz / sx)
    axs[0, 0].set_title(f"MR BFFE coronal ({sx:.2f}x{sy:.2f}x{sz:.2f} mm)", fontsize=9)
    axs[0, 0].axis("off")
    _overlay(axs[0, 1], mr[:, zyx[1], :], mrr[:, zyx[1], :], "MR + ROIs (MFC 1, LFC 2, MTP 3, LTP 4)", 0, vmax,
             sz / sx)
    axs[0, 2].imshow(mr[:, :, zyx[2]], cmap="gray", origin="lower", vmax=vmax, aspect=sz / sy)
    axs[0, 2].set_title("MR sagittal (medial compartment)", fontsize=9)
    axs[0, 2].axis("off")
    _overlay(axs[0, 3], mr[:, :, zyx[2]], mrb[:, :, zyx[2]] % 10 + (mrb[:, :, zyx[2]] >= 10) * 5,
             "MR + bones/cartilage", 0, vmax, sz / sy)
    csx, csy, csz = cti.GetSpacing()
    czyx = np.argwhere(ctr == 3).mean(0).astype(int)
    zax = max(0, czyx[0] - int(round(8 / csz)))  # 8 mm below the tibial ROI: through the proximal tibia
    axs[1, 0].imshow(ct[zax], cmap="gray", origin="lower", vmin=-300, vmax=1500)
    axs[1, 0].set_title(f"CT axial ({csx:.2f}x{csy:.2f}x{csz:.2f} mm), W 1800 L 600", fontsize=9)
    axs[1, 0].axis("off")
    axs[1, 1].imshow(ct[:, czyx[1], :], cmap="gray", origin="lower", vmin=-300, vmax=1500, aspect=csz / csx)
    axs[1, 1].set_title("CT coronal (scanner frame)", fontsize=9)
    axs[1, 1].axis("off")
    _overlay(axs[1, 2], ct[:, czyx[1], :], ctr[:, czyx[1], :], "CT + ROIs", -300, 1500, csz / csx)
    _overlay(axs[1, 3], ct[:, czyx[1], :], ctb[:, czyx[1], :] % 10 + (ctb[:, czyx[1], :] >= 10) * 5,
             "CT + bones/cartilage", -300, 1500, csz / csx)
    s = meta["subject"]
    fig.suptitle(f"{meta['subject_id']}  side {s['side']}  KL {s['kl_grade']}  severity {s['severity']:.2f}")
    fig.tight_layout()
    fig.savefig(out / "phantom_overview.png", dpi=80)
    plt.close(fig)


def truth_figure(knee: Path, out: Path) -> None:
    meta = json.loads((knee / "metadata.json").read_text())
    mr, mri = _arr(knee, "mr.nii.gz")
    c = np.array(meta["truth"]["patches"]["MTP"]["centres_mm"][0])
    fig, axs = plt.subplots(1, 3, figsize=(13, 4.5))
    h, n = 0.04, 200
    b = truth_binary(meta, c - (n - 1) / 2 * h * np.array([1, 1, 0]), (n, n, 1), h)
    axs[0].imshow(b[0], cmap="gray", origin="lower", extent=[0, n * h, 0, n * h])
    axs[0].set_title("truth microstructure, 8 x 8 mm axial, 0.04 mm", fontsize=9)
    idx = np.round(mri.TransformPhysicalPointToContinuousIndex(tuple(c))).astype(int)
    w = int(4 / mri.GetSpacing()[1]), int(4 / mri.GetSpacing()[2])
    crop = mr[idx[2] - w[1]:idx[2] + w[1], idx[1] - w[0]:idx[1] + w[0], idx[0]]
    axs[2].imshow(crop, cmap="gray", origin="lower", extent=[0, 8, 0, 8])
    axs[2].set_title("MR, sagittal 8 x 8 mm at the same centre (0.3 x 0.3 mm in-plane)", fontsize=9)
    b3 = truth_binary(meta, c + np.array([0, -4, -4]), (1, n, n), h)
    axs[1].imshow(b3[:, :, 0], cmap="gray", origin="lower", extent=[0, n * h, 0, n * h])
    axs[1].set_title("truth, sagittal 8 x 8 mm (plate: top rows)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "phantom_truth.png", dpi=80)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("knee", nargs="?", help="a generated knee folder")
    ap.add_argument("--out", default=str(ROOT / "docs" / "figures"))
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    if a.knee:
        knee = Path(a.knee)
    else:
        tmp = Path(tempfile.mkdtemp())
        generate_knee(make_settings("demo"), 0, 0, tmp)
        knee = tmp / "P0000"
    overview(knee, out)
    truth_figure(knee, out)
    print(f"wrote {out / 'phantom_overview.png'} and {out / 'phantom_truth.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

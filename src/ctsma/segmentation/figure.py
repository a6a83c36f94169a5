"""A picture of the bones and subchondral ROIs: coronal and sagittal slices through the ROIs (QA and docs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import ROIS
from ..io.atomic import atomic_path
from .labelio import COLOURS


def render_rois(ct: sitk.Image, bones: sitk.Image, rois: sitk.Image, path: str | Path, *, info: dict | None = None,
                title: str = "") -> Path:
    """Coronal slice through the four ROIs and sagittal slices through the medial and lateral compartments.

    Bone outlines in white, ROIs filled in their segment colours; the depth band and the notch plane are
    annotated when ``info`` (from ``subchondral_rois(..., return_info=True)``) is given. Slices are drawn in
    physical proportions with superior up.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Patch

    a = sitk.GetArrayFromImage(ct)
    b = sitk.GetArrayFromImage(bones)
    r = sitk.GetArrayFromImage(rois)
    sz, sy, sx = ct.GetSpacing()[::-1]
    if not r.any():
        raise ValueError("the ROI image is empty")
    cmap = ListedColormap([(0, 0, 0, 0)] + [COLOURS[k] + (0.85,) for k in ROIS])
    pts = np.argwhere(r > 0)
    yc = int(np.median(pts[:, 1]))
    views = [("coronal (through the ROIs)", a[:, yc, :], b[:, yc, :], r[:, yc, :], sx, sz)]
    for name in ("MFC", "LFC"):
        p = np.argwhere(r == ROIS[name])
        if len(p):
            x = int(np.median(p[:, 2]))
            side = "medial" if name == "MFC" else "lateral"
            views.append((f"sagittal, {side} compartment", a[:, :, x], b[:, :, x], r[:, :, x], sy, sz))
    fig, axes = plt.subplots(1, len(views), figsize=(5.2 * len(views), 4.6), squeeze=False)
    for ax, (name, img, bone, roi, sp_h, sp_v) in zip(axes[0], views):
        # crop to the joint, superior up (LPS z grows with the array's first axis for identity directions)
        zz = np.flatnonzero(roi.any(1))
        hh = np.flatnonzero(bone.any(0))
        z0, z1 = max(0, zz.min() - int(25 / sp_v)), min(img.shape[0], zz.max() + int(25 / sp_v))
        h0, h1 = max(0, hh.min() - 5), min(img.shape[1], hh.max() + 5)
        ext = (0, (h1 - h0) * sp_h, 0, (z1 - z0) * sp_v)
        ax.imshow(img[z0:z1, h0:h1], cmap="gray", vmin=-200, vmax=1400, origin="lower", extent=ext)
        ax.contour(np.isin(bone[z0:z1, h0:h1], (1, 2, 3, 4)).astype(float), levels=[0.5], colors="w",
                   linewidths=0.7, origin="lower", extent=ext)
        ax.imshow(roi[z0:z1, h0:h1], cmap=cmap, vmin=0, vmax=4, origin="lower", extent=ext, interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("mm")
    if info:
        axes[0, 0].text(0.02, 0.02, f"band {info.get('start_mm')}-{info.get('end_mm')} mm below the surface\n"
                        f"femoral footprint: joint gap <= narrowest + {info.get('contact_margin_mm')} mm\n"
                        f"knee {info.get('side')} ({info.get('side_from')})", transform=axes[0, 0].transAxes,
                        color="w", fontsize=7, va="bottom")
    fig.legend(handles=[Patch(color=COLOURS[k], label=f"{k}={v}") for k, v in ROIS.items()], loc="lower center",
               ncol=4, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 0.95 if title else 1))
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return path

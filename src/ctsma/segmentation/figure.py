"""A picture of the bones and subchondral ROIs: coronal and sagittal slices through the ROIs (QA and docs)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import ROIS
from ..io.atomic import atomic_path
from .labelio import COLOURS


def _top_view(ax, r: np.ndarray, ct: sitk.Image, info: dict | None) -> None:
    """Footprints seen from above (projection along the image's z axis): tibial ROIs filled, femoral outlined,
    with the plateau's medio-lateral axis and equivalent ellipse when ``info`` carries the plateau frame."""
    from matplotlib.colors import ListedColormap
    from matplotlib.patches import Ellipse

    from .geometry import index_to_lps, lps_to_index

    sz, sy, sx = ct.GetSpacing()[::-1]
    tib = np.where(np.isin(r, (ROIS["MTP"], ROIS["LTP"])), r, 0).max(0)
    ext = (0, r.shape[2] * sx, 0, r.shape[1] * sy)
    cmap = ListedColormap([(0, 0, 0, 0)] + [COLOURS[k] + (0.85,) for k in ROIS])
    ax.set_facecolor("black")
    ax.imshow(tib, cmap=cmap, vmin=0, vmax=4, origin="lower", extent=ext, interpolation="nearest")
    for name in ("MFC", "LFC"):
        fem = (r == ROIS[name]).any(0)
        if fem.any():
            ax.contour(fem.astype(float), levels=[0.5], colors=[COLOURS[name]], linewidths=1.2, origin="lower",
                       extent=ext)
    pl = (info or {}).get("plateau")
    if pl:
        c = np.asarray(pl["centre_lps_mm"], float)
        u = np.asarray(pl["ml_axis"], float)
        z_lps = float(index_to_lps(ct, np.argwhere(r > 0).mean(0)[None])[0, 2])   # the ROIs' mean level
        ends = np.array([[*(c + s * pl["half_width_mm"] * u), z_lps] for s in (-1.0, 1.0)])
        centre = np.array([[*c, z_lps]])
        iy, ix = (lps_to_index(ct, np.vstack([ends, centre]))[:, k] for k in (1, 2))
        ax.plot(ix[:2] * sx, iy[:2] * sy, "w--", lw=0.8)
        ang = float(np.degrees(np.arctan2((iy[1] - iy[0]) * sy, (ix[1] - ix[0]) * sx)))
        ax.add_patch(Ellipse((ix[2] * sx, iy[2] * sy), 2 * pl["half_width_mm"], 2 * pl["half_depth_mm"], angle=ang,
                             fill=False, ec="w", lw=0.8, ls=":"))
    pts = np.argwhere(r.any(0))
    if len(pts):
        (y0, x0), (y1, x1) = pts.min(0), pts.max(0)
        pad = 30.0
        ax.set_xlim(max(0, x0 * sx - pad), min(ext[1], x1 * sx + pad))
        ax.set_ylim(max(0, y0 * sy - pad), min(ext[3], y1 * sy + pad))
    ax.set_title("top view: tibial ROIs, femoral outlines, plateau axis", fontsize=9)
    ax.set_xlabel("mm (image x)")
    ax.set_ylabel("mm (image y, posterior up)")


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
    fig, axes = plt.subplots(1, len(views) + 1, figsize=(5.2 * (len(views) + 1), 4.6), squeeze=False)
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
    _top_view(axes[0, -1], r, ct, info)
    if info:
        axes[0, 0].text(0.02, 0.02, f"band {info.get('start_mm')}-{info.get('end_mm')} mm below the surface\n"
                        f"femoral footprint: joint gap <= narrowest + {info.get('contact_margin_mm')} mm,\n"
                        f"up to {info.get('condyle_height_mm', float('nan')):.1f} mm above the condyle\n"
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

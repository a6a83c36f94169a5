"""Patient report figures: ROI overview and parameter maps over coronal CT slices (matplotlib, Agg)."""

from __future__ import annotations

from typing import Mapping

import matplotlib as mpl
import numpy as np
import SimpleITK as sitk
from matplotlib import patheffects
from matplotlib.colors import ListedColormap

from .. import PARAMETERS, ROIS
from ..io.images import same_grid
from .figures import ROI_COLOURS, _RC, new_figure, to_png
from .format import unit_label
from .slices import best_coronal_index, coronal, coronal_spacing, display_axes

PARAMETER_CMAPS = {"BV/TV": "viridis", "Tb.Th": "magma", "Tb.Sp": "cividis", "Tb.N": "plasma"}
"""Perceptually uniform colour maps, one per parameter."""


def _window(ct2d: np.ndarray) -> tuple[float, float]:
    v = ct2d[np.isfinite(ct2d)]
    if v.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(v, [1, 99.5])
    return float(lo), float(hi if hi > lo else lo + 1)


def _scale_bar(ax, extent_w: float, extent_h: float, origin_xy=(0.0, 0.0)) -> None:
    length = 10.0 if extent_w > 25 else 5.0
    x0 = origin_xy[0] + 0.06 * extent_w
    y0 = origin_xy[1] + 0.92 * extent_h
    outline = [patheffects.withStroke(linewidth=2.0, foreground="black")]
    ax.plot([x0, x0 + length], [y0, y0], color="white", lw=2.2, solid_capstyle="butt",
            path_effects=[patheffects.Stroke(linewidth=3.6, foreground="black"), patheffects.Normal()])
    ax.text(x0 + length / 2, y0 - 0.03 * extent_h, f"{length:g} mm", color="white", ha="center", va="bottom",
            fontsize=6, path_effects=outline)


def overview_figure(ct: sitk.Image, rois: sitk.Image) -> bytes | None:
    """Coronal CT slice through the ROIs with each ROI outlined and named."""
    axes = display_axes(ct)
    lab = sitk.GetArrayViewFromImage(rois)
    idx = best_coronal_index(lab, axes)
    if idx is None:
        return None
    rs, cs = coronal_spacing(ct, axes)
    lab2 = coronal(lab, axes, idx)
    r, c = np.nonzero(lab2)
    mr, mc = int(round(8 / rs)), int(round(8 / cs))
    r0, r1 = max(0, r.min() - mr), min(lab2.shape[0], r.max() + mr + 1)
    c0, c1 = max(0, c.min() - mc), min(lab2.shape[1], c.max() + mc + 1)
    lab2 = lab2[r0:r1, c0:c1]
    ct2 = coronal(sitk.GetArrayViewFromImage(ct), axes, idx)[r0:r1, c0:c1].astype(float)
    h, w = ct2.shape[0] * rs, ct2.shape[1] * cs
    with mpl.rc_context(_RC):
        fig = new_figure(2.9, 2.9 * min(1.3, max(0.45, h / w)) + 0.1)
        ax = fig.add_subplot()
        lo, hi = _window(ct2)
        ax.imshow(ct2, cmap="gray", vmin=lo, vmax=hi, extent=(0, w, h, 0), interpolation="bilinear")
        yy, xx = (np.arange(ct2.shape[0]) + 0.5) * rs, (np.arange(ct2.shape[1]) + 0.5) * cs
        for name, v in ROIS.items():
            m = lab2 == v
            if not m.any():
                continue
            ax.contour(xx, yy, m.astype(float), levels=[0.5], colors=[ROI_COLOURS[name]], linewidths=1.1)
            r, c = np.nonzero(m)
            ax.text(c.mean() * cs, r.mean() * rs, name, color="white", ha="center", va="center",
                    fontsize=9, fontweight="bold",
                    path_effects=[patheffects.withStroke(linewidth=2.2, foreground=ROI_COLOURS[name])])
        ax.text(0.02, 0.97, "R", transform=ax.transAxes, color="white", fontsize=8, va="top")
        ax.text(0.98, 0.97, "L", transform=ax.transAxes, color="white", fontsize=8, va="top", ha="right")
        _scale_bar(ax, w, h)
        ax.set_axis_off()
        return to_png(fig, dpi=170)


def _resampled(img: sitk.Image, ref: sitk.Image, default: float) -> sitk.Image:
    if same_grid(ref, img):
        return img
    return sitk.Resample(img, ref, sitk.Transform(), sitk.sitkNearestNeighbor, default, img.GetPixelID())


def maps_figure(ct: sitk.Image, rois: sitk.Image, maps: Mapping[str, sitk.Image]) -> bytes | None:
    """A grid: one row per ROI (coronal slice through its largest cross-section, cropped around it), one
    column per parameter map over the CT, with a colour bar per column in the parameter's unit."""
    params = [p for p in PARAMETERS if p in maps] + [p for p in maps if p not in PARAMETERS]
    if not params:
        return None
    axes_info = display_axes(ct)
    lab = sitk.GetArrayViewFromImage(rois)
    ct_arr = sitk.GetArrayViewFromImage(ct)
    present = [(n, v) for n, v in ROIS.items() if (lab == v).any()]
    if not present:
        return None
    map_arrs = {p: sitk.GetArrayFromImage(_resampled(maps[p], ct, float("nan"))) for p in params}  # copies: views of temporaries dangle
    in_roi = lab > 0
    limits = {}
    for p in params:
        vals = np.asarray(map_arrs[p][in_roi], float)
        vals = vals[np.isfinite(vals)]
        limits[p] = tuple(np.percentile(vals, [2, 98])) if vals.size else (0.0, 1.0)
        if limits[p][1] <= limits[p][0]:
            limits[p] = (limits[p][0], limits[p][0] + 1e-6)
    rs, cs = coronal_spacing(ct, axes_info)
    with mpl.rc_context(_RC):
        ncol, nrow = len(params), len(present)
        fig = new_figure(1.28 * ncol + 0.35, 1.28 * nrow + 0.85)
        grid = fig.subplots(nrow, ncol, squeeze=False)
        images = {}
        for i, (name, v) in enumerate(present):
            idx = best_coronal_index(lab, axes_info, v)
            m2 = coronal(lab, axes_info, idx) == v
            r, c = np.nonzero(m2)
            mr = max(int(round(8 / rs)), int(0.35 * (r.max() - r.min() + 1)))
            mc = max(int(round(8 / cs)), int(0.35 * (c.max() - c.min() + 1)))
            r0, r1 = max(0, r.min() - mr), min(m2.shape[0], r.max() + mr + 1)
            c0, c1 = max(0, c.min() - mc), min(m2.shape[1], c.max() + mc + 1)
            ct2 = coronal(ct_arr, axes_info, idx)[r0:r1, c0:c1].astype(float)
            h, w = ct2.shape[0] * rs, ct2.shape[1] * cs
            lo, hi = _window(ct2)
            for j, p in enumerate(params):
                ax = grid[i, j]
                ax.imshow(ct2, cmap="gray", vmin=lo, vmax=hi, extent=(0, w, h, 0), interpolation="bilinear")
                mp = coronal(map_arrs[p], axes_info, idx)[r0:r1, c0:c1].astype(float)
                mp = np.where(m2[r0:r1, c0:c1] & np.isfinite(mp), mp, np.nan)
                images[p] = ax.imshow(np.ma.masked_invalid(mp), cmap=PARAMETER_CMAPS.get(p, "viridis"),
                                      vmin=limits[p][0], vmax=limits[p][1], extent=(0, w, h, 0),
                                      interpolation="nearest", alpha=0.9)
                ax.set_xticks([])
                ax.set_yticks([])
                for s in ax.spines.values():
                    s.set_visible(False)
                if i == 0:
                    ax.set_title(p, fontsize=8.5, fontweight="bold")
                if j == 0:
                    ax.set_ylabel(name, fontsize=8.5, fontweight="bold", color=ROI_COLOURS.get(name, "black"))
                    _scale_bar(ax, w, h)
        for j, p in enumerate(params):
            cb = fig.colorbar(images[p], ax=grid[:, j], location="bottom", shrink=0.92, aspect=14, pad=0.02)
            cb.set_label(unit_label(p), fontsize=7.5)
            cb.ax.tick_params(labelsize=6.5)
            cb.ax.xaxis.set_major_locator(mpl.ticker.MaxNLocator(4))
        return to_png(fig, dpi=170)


def probability_gauge(p: float) -> bytes:
    """A horizontal 0–100 % bar with the OA probability marked."""
    with mpl.rc_context(_RC):
        fig = new_figure(3.6, 0.7)
        ax = fig.add_subplot()
        grad = np.linspace(0, 1, 256)[None, :]
        cmap = ListedColormap(mpl.colormaps["RdYlGn_r"](np.linspace(0.1, 0.9, 256)))
        ax.imshow(grad, cmap=cmap, extent=(0, 100, 0, 1), aspect="auto", alpha=0.85)
        ax.plot([100 * p, 100 * p], [-0.15, 1.15], color="black", lw=2.2, clip_on=False)
        ax.text(100 * p, 1.3, f"{100 * p:.0f} %", ha="center", va="bottom", fontsize=8, fontweight="bold")
        ax.set_xlim(0, 100)
        ax.set_ylim(0, 1)
        ax.set_yticks([])
        ax.set_xticks([0, 25, 50, 75, 100], ["0 %", "25 %", "50 %", "75 %", "100 %"])
        for s in ax.spines.values():
            s.set_visible(False)
        return to_png(fig, dpi=170)

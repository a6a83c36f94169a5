"""Study report figures (matplotlib, object-oriented API with the Agg canvas; pyplot is never used,
so importing this module does not change the user's matplotlib backend).

Each function returns PNG bytes, or ``None`` when its input is missing or empty.
"""

from __future__ import annotations

import io
from typing import Any, Mapping

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .. import PARAMETERS
from .format import AGGREGATOR_LABELS, as_float, get, source_label, unit_label
from .published import PUBLISHED_ICC, PUBLISHED_LABEL, PUBLISHED_MEAN_ICC

SOURCE_COLOURS = {"teacher": "#7b3294", "student_distilled": "#12355b", "student_baseline": "#e08214",
                  "ct_direct": "#8c8c8c", "mr_reference": "#1b7837", "truth": "#111111", "radiomics": "#8c510a"}
ROI_COLOURS = {"MFC": "#1f77b4", "LFC": "#ff7f0e", "MTP": "#2ca02c", "LTP": "#d62728"}
PREDICTION_COLUMNS = ("subject", "roi", "param", "reference", "predicted")
MAX_POINTS = 4000
"""Scatter plots draw at most this many patches per panel (a fixed random subset)."""

_RC = {"font.size": 8, "axes.titlesize": 9, "axes.labelsize": 8, "legend.fontsize": 7,
       "xtick.labelsize": 7, "ytick.labelsize": 7, "font.family": "DejaVu Sans"}


def new_figure(width_in: float, height_in: float) -> Figure:
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def to_png(fig: Figure, dpi: int = 150) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, facecolor="white")
    return buf.getvalue()


def _colour(source: str, i: int) -> str:
    fallback = ["#5e3c99", "#b2182b", "#4d9221", "#2166ac", "#c51b7d"]
    return SOURCE_COLOURS.get(source, fallback[i % len(fallback)])


def _style(fig: Figure) -> None:
    for ax in fig.axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(True, color="#e6e9ed", lw=0.6)
        ax.set_axisbelow(True)


def icc_bar_chart(metrics: Mapping[str, Any], *, block: str = "regression") -> bytes | None:
    """ICC(2,1) per parameter and source with 95 % CIs; published ICCs as diamonds."""
    reg = get(metrics, block)
    if not isinstance(reg, Mapping) or not reg:
        return None
    sources = [s for s in reg if isinstance(reg[s], Mapping)]
    if not sources:
        return None
    import matplotlib as mpl
    with mpl.rc_context(_RC):
        fig = new_figure(7.2, 3.0)
        ax = fig.add_subplot()
        x = np.arange(len(PARAMETERS) + 1)
        w = 0.8 / len(sources)
        for i, s in enumerate(sources):
            vals, lo, hi = [], [], []
            for p in PARAMETERS:
                v = as_float(get(reg, s, p, "icc21"))
                ci = get(reg, s, p, "icc21_ci") or [None, None]
                ci = ci if isinstance(ci, (list, tuple)) and len(ci) == 2 else [None, None]
                vals.append(np.nan if v is None else v)
                lo.append(np.nan if v is None or as_float(ci[0]) is None else v - as_float(ci[0]))
                hi.append(np.nan if v is None or as_float(ci[1]) is None else as_float(ci[1]) - v)
            m = as_float(get(reg, s, "mean_icc21"))
            vals.append(np.nan if m is None else m)
            lo.append(np.nan)
            hi.append(np.nan)
            err = np.array([lo, hi])
            ax.bar(x - 0.4 + w * (i + 0.5), vals, w * 0.92, color=_colour(s, i), label=source_label(s),
                   yerr=np.where(np.isfinite(err), err, 0), error_kw={"lw": 0.8, "capsize": 2, "ecolor": "#333"})
        pub = [PUBLISHED_ICC[p] for p in PARAMETERS] + [PUBLISHED_MEAN_ICC]
        ax.scatter(x, pub, marker="D", s=28, color="#c0392b", zorder=5, edgecolor="white", lw=0.6,
                   label=f"{PUBLISHED_LABEL} (CT-SMA)")
        ax.set_xticks(x, [*PARAMETERS, "mean"])
        ax.set_ylim(0, 1.05)
        ax.set_ylabel("ICC(2,1) vs MR reference" if block == "regression" else "ICC(2,1) vs phantom truth")
        ax.legend(ncols=3, loc="upper center", bbox_to_anchor=(0.5, -0.12), frameon=False)
        _style(fig)
        return to_png(fig)


def check_predictions(df: Any, source: str) -> pd.DataFrame:
    """Validate a predictions table: a DataFrame with columns subject, roi, param, reference, predicted."""
    if not isinstance(df, pd.DataFrame):
        raise TypeError(f"predictions[{source!r}] must be a pandas DataFrame, got {type(df).__name__}")
    missing = [c for c in PREDICTION_COLUMNS if c not in df.columns]
    if missing:
        raise ValueError(f"predictions[{source!r}] lacks columns {missing}; expected {list(PREDICTION_COLUMNS)}")
    return df


def scatter_ba_figure(df: pd.DataFrame, source: str) -> bytes | None:
    """Scatter (predicted vs reference, identity line) above Bland–Altman (difference vs mean) per parameter."""
    df = check_predictions(df, source)
    params = [p for p in PARAMETERS if (df["param"] == p).any()] or sorted(df["param"].unique())[:4]
    if not params:
        return None
    import matplotlib as mpl
    with mpl.rc_context(_RC):
        fig = new_figure(2.05 * len(params) + 0.6, 4.6)
        axes = fig.subplots(2, len(params), squeeze=False)
        for j, p in enumerate(params):
            d = df[df["param"] == p][["roi", "reference", "predicted"]].copy()
            d["reference"] = pd.to_numeric(d["reference"], errors="coerce")
            d["predicted"] = pd.to_numeric(d["predicted"], errors="coerce")
            d = d[np.isfinite(d["reference"]) & np.isfinite(d["predicted"])]
            ax, bx = axes[0, j], axes[1, j]
            ax.set_title(unit_label(p))
            if d.empty:
                for a in (ax, bx):
                    a.text(0.5, 0.5, "no data", ha="center", va="center", transform=a.transAxes, color="#888")
                continue
            if len(d) > MAX_POINTS:
                d = d.sample(MAX_POINTS, random_state=0)
            colours = [ROI_COLOURS.get(str(r), "#555555") for r in d["roi"]]
            ref, pred = d["reference"].to_numpy(float), d["predicted"].to_numpy(float)
            ax.scatter(ref, pred, s=4, c=colours, alpha=0.55, lw=0, rasterized=True)
            lo, hi = float(min(ref.min(), pred.min())), float(max(ref.max(), pred.max()))
            pad = 0.04 * (hi - lo or 1)
            ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="#333", lw=0.8, ls="--")
            ax.set_xlim(lo - pad, hi + pad)
            ax.set_ylim(lo - pad, hi + pad)
            ax.set_aspect("equal", adjustable="box")
            ax.set_xlabel("reference")
            if j == 0:
                ax.set_ylabel("predicted")
            mean, diff = (ref + pred) / 2, pred - ref
            bias, sd = float(diff.mean()), float(diff.std(ddof=1)) if len(diff) > 1 else 0.0
            bx.scatter(mean, diff, s=4, c=colours, alpha=0.55, lw=0, rasterized=True)
            bx.axhline(bias, color="#12355b", lw=1)
            for k in (-1.96, 1.96):
                bx.axhline(bias + k * sd, color="#c0392b", lw=0.8, ls="--")
            bx.set_xlabel("mean of both")
            if j == 0:
                bx.set_ylabel("predicted \u2212 reference")
        handles = [axes[0, 0].scatter([], [], s=10, c=c, label=r) for r, c in ROI_COLOURS.items()
                   if (df["roi"].astype(str) == r).any()]
        if handles:
            fig.legend(handles=handles, loc="outside upper right", ncols=len(handles), frameon=False)
        fig.suptitle(source_label(source), fontsize=9, fontweight="bold", x=0.02, ha="left")
        _style(fig)
        return to_png(fig)


def _roc_points(v: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """(fpr, tpr) from {"fpr", "tpr"} or {"y_true", "y_score"} (a mapping or a DataFrame)."""
    if isinstance(v, pd.DataFrame):
        v = {c: v[c].to_numpy() for c in v.columns}
    if not isinstance(v, Mapping):
        return None
    if v.get("fpr") is not None and v.get("tpr") is not None:
        fpr, tpr = np.asarray(v["fpr"], float), np.asarray(v["tpr"], float)
        return (fpr, tpr) if fpr.size and fpr.size == tpr.size else None
    y = v.get("y_true")
    s = v.get("y_score", v.get("score"))
    if y is None or s is None:
        return None
    from sklearn.metrics import roc_curve
    y, s = np.asarray(y, float), np.asarray(s, float)
    ok = np.isfinite(y) & np.isfinite(s)
    if ok.sum() < 2 or len(np.unique(y[ok])) < 2:
        return None
    fpr, tpr, _ = roc_curve(y[ok].astype(int), s[ok])
    return fpr, tpr


def roc_figure(roc: Mapping[str, Any] | None, metrics: Mapping[str, Any]) -> bytes | None:
    """ROC curves, one panel per aggregator, one curve per source; AUC from metrics in the legend."""
    if not isinstance(roc, Mapping):
        return None
    curves: dict[str, list[tuple[str, str, np.ndarray, np.ndarray]]] = {}
    for key, v in roc.items():
        pts = _roc_points(v)
        if pts is None:
            continue
        src, _, agg = str(key).partition("/")
        curves.setdefault(agg or "", []).append((str(key), src, *pts))
    if not curves:
        return None
    import matplotlib as mpl
    with mpl.rc_context(_RC):
        n = len(curves)
        ncols = min(3, n)
        nrows = -(-n // ncols)
        fig = new_figure(2.9 * ncols + 0.3, 2.9 * nrows + 0.2)
        axes = np.atleast_1d(fig.subplots(nrows, ncols, squeeze=False)).ravel()
        for ax, (agg, items) in zip(axes, curves.items()):
            for i, (key, src, fpr, tpr) in enumerate(items):
                auc = as_float(get(metrics, "diagnosis", key, "auc"))
                lab = source_label(src) + (f" (AUC {auc:.3f})" if auc is not None else "")
                ax.plot(fpr, tpr, color=_colour(src, i), lw=1.3, label=lab, drawstyle="steps-post")
            ax.plot([0, 1], [0, 1], color="#999", lw=0.7, ls=":")
            ax.set_xlim(0, 1)
            ax.set_ylim(0, 1.01)
            ax.set_aspect("equal")
            ax.set_title(f"{AGGREGATOR_LABELS.get(agg, agg)} aggregation" if agg else "ROC")
            ax.set_xlabel("1 \u2212 specificity")
            ax.set_ylabel("sensitivity")
            ax.legend(loc="lower right", frameon=False, fontsize=6.3)
        for ax in axes[n:]:
            ax.set_visible(False)
        _style(fig)
        return to_png(fig)

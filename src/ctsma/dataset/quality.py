"""Quality views of a patch store: CT/MR patch pairs side by side, and parameter distributions."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import PARAMETERS, PARAMETER_UNITS
from ..io.atomic import atomic_path


FIGURES = ("patch_pairs.png", "parameters.png")


def remove_quality(out_dir: str | Path) -> None:
    """Remove the figures :func:`render_quality` wrote in ``out_dir`` (and the folder, if nothing else is in it)."""
    out_dir = Path(out_dir)
    for name in FIGURES:
        (out_dir / name).unlink(missing_ok=True)
    if out_dir.is_dir() and not any(out_dir.iterdir()):
        out_dir.rmdir()


def render_quality(store, out_dir: str | Path, n_pairs: int = 8, seed: int = 0) -> list[Path]:
    """Write ``patch_pairs.png`` (central slices of CT and MR patches, ROI outline) and ``parameters.png``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import remove_stale_partials

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in FIGURES:  # what an interrupted earlier run left
        remove_stale_partials(out_dir / name)
    t = store.table
    rng = np.random.default_rng(seed)
    # one pair per ROI first, then random ones
    idx = [int(g.index[rng.integers(len(g))]) for _, g in t.groupby("roi")]
    rest = np.setdiff1d(np.arange(len(t)), idx)
    idx += [int(i) for i in rng.choice(rest, min(len(rest), max(0, n_pairs - len(idx))), replace=False)]
    idx = sorted(idx[:n_pairs])
    ct, mr = store.read("ct", idx)[:, 0], store.read("mr", idx)[:, 0]
    ctm, mrm = store.read("ct_mask", idx)[:, 0], store.read("mr_mask", idx)[:, 0]
    fig, axes = plt.subplots(len(idx), 4, figsize=(8, 2 * len(idx)), squeeze=False)
    for r, i in enumerate(idx):
        row = t.iloc[i]
        for c, (vol, m, title) in enumerate(((ct[r], ctm[r], "CT"), (mr[r], mrm[r], "MR"))):
            for k, axis in enumerate((0, 1)):   # axial (z) and coronal (y) central slices
                ax = axes[r, 2 * c + k]
                sl = np.take(vol, vol.shape[axis] // 2, axis=axis)
                ms = np.take(m, m.shape[axis] // 2, axis=axis)
                ax.imshow(sl, cmap="gray", origin="lower" if axis == 1 else "upper",
                          vmin=-200 if title == "CT" else None, vmax=1200 if title == "CT" else None)
                if ms.any() and not ms.all():
                    ax.contour(ms, levels=[0.5], colors="y", linewidths=0.6,
                               origin="lower" if axis == 1 else "upper")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(f"{title} {'axial' if axis == 0 else 'coronal'}", fontsize=8)
        mr_bv = row.get("mr_BV/TV", np.nan)
        axes[r, 0].set_ylabel(f"{row['subject']}\n{row['roi']} #{i}\nBV/TV {float(mr_bv):.2f}", fontsize=7)
    fig.tight_layout()
    pairs = out_dir / "patch_pairs.png"
    with atomic_path(pairs) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    fig, axes = plt.subplots(1, 4, figsize=(12, 3))
    for ax, p in zip(axes, PARAMETERS):
        for prefix, colour in (("mr", "C0"), ("true", "C1")):
            v = t[f"{prefix}_{p}"].to_numpy(float)
            v = v[np.isfinite(v)]
            if v.size:
                ax.hist(v, bins=30, alpha=0.6, color=colour, label=f"{prefix} (n={v.size})")
        unit = PARAMETER_UNITS.get(p, "")
        ax.set_xlabel(f"{p} ({unit})" if unit else p)
        ax.legend(fontsize=7)
    fig.tight_layout()
    dist = out_dir / "parameters.png"
    with atomic_path(dist) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
    return [pairs, dist]

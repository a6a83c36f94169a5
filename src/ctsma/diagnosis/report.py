"""Files for people: a paper-style results table (Markdown + CSV) and ROC plots (PNG)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Mapping

import pandas as pd

from ..io import atomic_path, write_text
from ..report.format import fmt

TABLE_COLUMNS = [("precision", "Precision"), ("recall", "Recall"), ("f1", "F1"), ("auc", "AUC"),
                 ("accuracy", "Accuracy"), ("specificity", "Specificity"), ("brier", "Brier"),
                 ("severity_mae", "Severity MAE"), ("severity_r2", "Severity R²")]


def results_table(block: Mapping[str, dict]) -> pd.DataFrame:
    """One row per ``source/aggregator`` with the metrics, AUC CI and any paired-AUC p-values."""
    rows = []
    for key, m in block.items():
        src, _, agg = key.partition("/")
        row = {"source": src, "aggregator": agg, "n": m.get("n")}
        row.update({k: m.get(k) for k, _ in TABLE_COLUMNS})
        lo, hi = (m.get("auc_ci") or [None, None])
        row["auc_ci_low"], row["auc_ci_high"] = lo, hi
        for k, v in m.items():
            if k.startswith("p_auc_vs_"):
                row[k] = v
        rows.append(row)
    return pd.DataFrame(rows)


def table_markdown(block: Mapping[str, dict], *, title: str = "Patient-level OA diagnosis") -> str:
    """The table in the layout of the published Table 6, with 95 % CIs and DeLong p-values."""
    df = results_table(block)
    pcols = [c for c in df.columns if c.startswith("p_auc_vs_")]
    head = ["Parameters from", "Aggregator", "n"] + [h for _, h in TABLE_COLUMNS] + \
           [f"p (AUC vs {c[len('p_auc_vs_'):]})" for c in pcols]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in df.iterrows():
        cells = [str(r["source"]), str(r["aggregator"]), str(r["n"])]
        for k, _ in TABLE_COLUMNS:
            v = r[k]
            cells.append(f"{fmt(v)} [{fmt(r['auc_ci_low'])}, {fmt(r['auc_ci_high'])}]" if k == "auc" else fmt(v))
        for c in pcols:
            v = r[c]
            cells.append("" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.3g}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "AUC with 95 % DeLong CI on pooled out-of-fold predictions of patient-level stratified "
                  "k-fold cross-validation; threshold 0.5 for the other classification metrics; p: two-sided "
                  "DeLong test of the paired AUCs (same patients, same folds)."]
    return "\n".join(lines) + "\n"


def write_table(block: Mapping[str, dict], out_dir, stem: str = "diagnosis_table") -> list[Path]:
    out_dir = Path(out_dir)
    md = write_text(out_dir / f"{stem}.md", table_markdown(block))
    csv = out_dir / f"{stem}.csv"
    with atomic_path(csv) as tmp:
        results_table(block).to_csv(tmp, index=False)
    return [md, csv]


def write_roc_plots(results: Mapping[str, object], out_dir, stem: str = "roc") -> list[Path]:
    """One PNG per aggregator, a ROC curve per source (out-of-fold predictions), AUCs in the legend."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    by_agg: dict[str, list] = {}
    for key, r in results.items():
        by_agg.setdefault(key.partition("/")[2], []).append((key.partition("/")[0], r))
    paths = []
    for agg, items in by_agg.items():
        fig, ax = plt.subplots(figsize=(4.6, 4.4), dpi=120)
        for src, r in items:
            fpr, tpr, _ = roc_curve(r.oof["oa"], r.oof["oa_probability"])
            lo, hi = r.metrics["auc_ci"]
            ax.plot(fpr, tpr, lw=1.6, label=f"{src}: {r.metrics['auc']:.3f} [{lo:.2f}, {hi:.2f}]")
        ax.plot([0, 1], [0, 1], color="0.6", lw=0.8, ls="--")
        ax.set(xlabel="1 − specificity", ylabel="sensitivity", xlim=(0, 1), ylim=(0, 1.01),
               title=f"OA diagnosis, {agg} aggregator")
        ax.legend(loc="lower right", fontsize=7, title="AUC [95 % CI]", title_fontsize=7)
        fig.tight_layout()
        path = Path(out_dir) / f"{stem}_{agg}.png"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png")
        plt.close(fig)
        paths.append(path)
    return paths


def write_oof(results: Mapping[str, object], path) -> Path:
    """All out-of-fold predictions in one long CSV (source, aggregator, subject, fold, oa, ...)."""
    frames = []
    for key, r in results.items():
        src, _, agg = key.partition("/")
        frames.append(r.oof.assign(source=src, aggregator=agg))
    df = pd.concat(frames, ignore_index=True)
    cols = ["source", "aggregator"] + [c for c in df.columns if c not in ("source", "aggregator")]
    with atomic_path(path) as tmp:
        df[cols].to_csv(tmp, index=False, na_rep="")
    return Path(path)


OOF_COLUMNS = ("source", "aggregator", "oa", "oa_probability")
"""The columns of :func:`write_oof`'s table that :func:`roc_inputs` reads."""


def roc_inputs(oof: pd.DataFrame) -> dict[str, dict]:
    """``{"source/aggregator": {"y_true", "y_score"}}`` from :func:`write_oof`'s table (``oof_predictions.csv``), for
    the study report's ROC curves."""
    return {f"{s}/{a}": {"y_true": g["oa"].to_numpy(), "y_score": g["oa_probability"].to_numpy()}
            for (s, a), g in oof.groupby(["source", "aggregator"])}

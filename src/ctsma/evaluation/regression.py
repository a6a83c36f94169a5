"""Evaluation of the regression sources on patients held out from training.

Sources: ``teacher`` (MR patches), ``student_distilled`` and ``student_baseline`` (CT patches), and ``ct_direct``
(standard morphometry run directly on the CT patch: one global threshold, Otsu over the test patches unless set,
then :func:`ctsma.morphometry.measure_batch` at the CT spacing). Each is scored per parameter against the MR
reference (``regression``) and, where the store has phantom truth, against the true microstructure
(``regression_vs_truth``), with :mod:`ctsma.stats`: ICC(2,1) absolute agreement and ICC(3,1) consistency with
F-based 95 % CIs, Pearson r, MAE, Bland–Altman bias and limits of agreement.

**Level:** agreement is computed at the PATCH level over every patch of the held-out patients (``n_patches``);
``n_patients`` is reported beside it. The distillation gain is the difference of the mean ICC(2,1) over the four
parameters, distilled − baseline, with a paired bootstrap CI that resamples PATIENTS (all of a patient's patches
together).
"""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

import numpy as np

from .. import PARAMETERS, PARAMETER_UNITS, progress, stats
from ..dataset.store import PatchStore
from ..errors import ConfigError, ModelFileError, UserError
from ..io.atomic import atomic_path, check_no_obstacle, merge_json, write_text
from ..report.format import fmt

SOURCES = ("teacher", "student_distilled", "student_baseline", "ct_direct")
LEVEL_NOTE = ("patch-level agreement over all patches of patients held out from training "
              "(n_patches); n_patients = number of those patients")


def agreement_block(ref: np.ndarray, pred: np.ndarray, subjects: np.ndarray) -> dict:
    """Contract block for one source: per-parameter agreement + ``mean_icc21``."""
    out = {}
    for j, p in enumerate(PARAMETERS):
        r, m = ref[:, j], pred[:, j]
        ok = np.isfinite(r) & np.isfinite(m)
        if ok.sum() < 3:
            out[p] = {"icc21": None, "n_patients": int(len(set(subjects[ok]))), "n_patches": int(ok.sum()),
                      "note": "fewer than 3 finite pairs"}
            continue
        block = stats.agreement_summary(r[ok], m[ok])
        block.update({"n_patients": int(len(set(subjects[ok]))), "n_patches": int(ok.sum())})
        out[p] = block
    iccs = [out[p]["icc21"] for p in PARAMETERS]
    out["mean_icc21"] = float(np.mean(iccs)) if all(v is not None and np.isfinite(v) for v in iccs) else None
    return out


def mean_icc21(ref: np.ndarray, pred: np.ndarray) -> float:
    vals = []
    for j in range(len(PARAMETERS)):
        ok = np.isfinite(ref[:, j]) & np.isfinite(pred[:, j])
        vals.append(stats.icc_value(ref[ok, j], pred[ok, j], kind="2,1"))
    return float(np.mean(vals))


FEW_PATIENTS = 10
"""Below this many held-out patients, ``evaluate`` warns that its confidence intervals are rough."""


def distillation_gain(ref, distilled, baseline, subjects, *, n_boot: int = 1000, seed: int = 0) -> dict:
    """Paired patient-bootstrap CI of mean ICC(2,1) (distilled) − mean ICC(2,1) (baseline)."""
    res = stats.cluster_bootstrap_diff(lambda r, a, b: mean_icc21(r, a), lambda r, a, b: mean_icc21(r, b),
                                       (ref, distilled, baseline), subjects, n_boot=n_boot, seed=seed)
    per = {p: float(stats.icc21(ref[:, j], distilled[:, j]).value - stats.icc21(ref[:, j], baseline[:, j]).value)
           for j, p in enumerate(PARAMETERS)}
    return {"mean_icc21_diff": float(res.estimate), "ci": [float(res.ci[0]), float(res.ci[1])],
            "p": res.p, "n_boot": int(n_boot), "resampled": "patients", "per_parameter_icc21_diff": per}


def ct_direct(store: PatchStore, idx: np.ndarray, threshold_hu: float = 0.0) -> tuple[np.ndarray, dict]:
    """Morphometry directly on the CT patches (one global threshold) → (n,4) and a record of the threshold."""
    from skimage.filters import threshold_otsu

    from ..morphometry import measure_batch

    ct = store.read("ct", idx)[:, 0]
    mask = store.read("ct_mask", idx)[:, 0] != 0
    if not mask.any():
        mask = np.ones_like(mask)
    thr = float(threshold_hu) if threshold_hu else float(threshold_otsu(ct[mask]))
    sp = float(store.attrs.get("ct_spacing_mm", 0.5))
    import warnings
    bone = ct > thr
    out = np.full((len(idx), 4), np.nan)
    failed = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            res = measure_batch(bone, (sp, sp, sp), masks=mask, workers=1)
            out = np.column_stack([res[p] for p in PARAMETERS])
        except Exception:  # noqa: BLE001 - a patch the morphometry cannot measure counts as missing, not fatal
            for i in range(len(idx)):
                try:
                    r = measure_batch(bone[i:i + 1], (sp, sp, sp), masks=mask[i:i + 1], workers=1)
                    out[i] = [r[p][0] for p in PARAMETERS]
                except Exception:  # noqa: BLE001
                    failed += 1
    return out, {"threshold_hu": thr, "method": "given" if threshold_hu else "otsu", "spacing_mm": sp,
                 "failed_patches": failed, "tb_n": "1/(Tb.Th+Tb.Sp)"}


def check_held_out(path: Path, meta: dict, subjects) -> None:
    """Refuse a model (file ``path``, metadata ``meta``) that was trained or validated on any of ``subjects``."""
    from ..models.train import learnt_from

    learnt = learnt_from(meta)
    if not learnt:
        import warnings

        warnings.warn(f"{Path(path).name} records no training patients (a model file of another tool or version): "
                      "nothing shows that it was not trained on the test patients", stacklevel=2)
    test = {str(s) for s in subjects}
    leak = test & set(learnt)
    if leak:
        raise UserError(f"{Path(path).name} was trained on {len(leak)} of the test patients "
                        f"(e.g. {sorted(leak)[0]}): evaluate with the split used for training")
    teacher = (meta.get("training") or {}).get("teacher") or {}
    leak = test & set(teacher.get("learnt_from") or [])
    if leak:  # a distilled student learns from its teacher's patients too
        raise UserError(f"{Path(path).name} was distilled from a teacher trained on {len(leak)} of the test patients "
                        f"(e.g. {sorted(leak)[0]}): evaluate with the split used for training")


def predict_sources(cfg, store: PatchStore, idx: np.ndarray, *, names: dict | None = None) -> tuple[dict, dict]:
    """Predictions (n,4, physical units) of every available source on store rows ``idx``; and provenance.
    Each prediction is the mean over ``cfg.evaluate.flips`` flipped copies of the patch, as ``ctsma infer``
    predicts, so the evaluation scores the values that inference reports."""
    from ..models.config import ROLES
    from ..models.export import FLIPS_BY_COUNT, load_parameter_model
    from ..models.train import run_paths

    preds, prov = {}, {}
    names = names or {"teacher": "teacher", "student_distilled": "student_distilled",
                      "student_baseline": "student_baseline"}
    test_subjects = set(store.table["subject"].astype(str).to_numpy()[idx])
    for source, role in names.items():
        path = run_paths(cfg, role)[1] if not str(role).endswith(".safetensors") else Path(role)
        if not path.is_file():
            continue
        model, meta = load_parameter_model(path)
        if source in ROLES and meta.get("role") != source:  # e.g. a teacher file copied over a student's name
            raise ModelFileError(f"{path.name} holds a '{meta.get('role')}' model, not the {source} its name says; "
                                 "evaluation would report it under the wrong name")
        check_held_out(path, meta, test_subjects)
        mod = meta["input"]["modality"]
        masks = store.read(f"{mod}_mask", idx) if "mask" in meta["input"]["channels"] else None
        preds[source] = model.predict_flips(store.read(mod, idx), masks, FLIPS_BY_COUNT[cfg.evaluate.flips])[0]
        prov[source] = {"file": str(path), "role": meta.get("role"), "sha256": meta.get("_sha256"),
                        "target": meta.get("target"), "val_metrics": meta.get("metrics")}
    return preds, prov


@contextlib.contextmanager
def _stage(timing: dict, name: str):
    """Add the wall-clock seconds of the block to ``timing[name]``."""
    t = time.perf_counter()
    try:
        yield
    finally:
        timing[name] = timing.get(name, 0.0) + time.perf_counter() - t


def evaluate(cfg, out_dir: str | Path, *, store: PatchStore | None = None, ablations: bool = True) -> dict:
    """Evaluate every source on the held-out patients; write metrics.json, tables and plots into ``out_dir``.

    ``metrics.json`` also gets ``timing`` (contracts.md): the wall-clock seconds of each stage that ran,
    ``prediction`` (the models on the test patches), ``ct_direct`` (morphometry on them), ``agreement`` (the ICC
    blocks), ``bootstrap`` (the distillation gains), ``ablations`` (training and scoring the variants),
    ``writing`` (tables, predictions and plots), and ``total`` (the whole call)."""
    from ..models.config import variant
    from ..models.train import open_store, train

    start, timing = time.perf_counter(), {}
    for a in cfg.evaluate.ablations if ablations else ():
        if f"_{a['name']}" == cfg.output.name:  # variant() names its files _<name>: this run's own would be replaced
            raise ConfigError(f"evaluate.ablations: the name '{a['name']}' is this run's output.name "
                              f"'{cfg.output.name}': its distilled student would overwrite the run's own; rename it")
    out_dir = Path(out_dir)
    check_outputs(out_dir)
    store = open_store(cfg, store)
    c = cfg.data
    split = store.patient_split(c.test_fraction, c.val_fraction, k=c.k_folds or None,
                                fold=c.fold if c.k_folds else None, seed=c.split_seed, use_stored=c.use_stored_split)
    idx = split.test
    if len(split.subjects["test"]) < 2:
        raise UserError(f"the split in use holds {len(split.subjects['test'])} test patient(s) of the patch store "
                        f"{store.dir}; evaluation needs at least 2: train and evaluate with data.k_folds and "
                        "data.fold (patient folds), or data.use_stored_split: false and a larger data.test_fraction")
    subjects = store.table["subject"].astype(str).to_numpy()[idx]
    n_test = len(split.subjects["test"])
    if n_test < FEW_PATIENTS:
        import warnings

        warnings.warn(f"only {n_test} held-out patients: the confidence intervals (ICC, distillation gain) from so "
                      "few are rough, as a patient bootstrap has few distinct resamples; take them as indicative",
                      stacklevel=2)
    progress.info(f"evaluating on {len(idx)} patches of {n_test} held-out patients")
    with _stage(timing, "prediction"):
        preds, prov = predict_sources(cfg, store, idx)
    if not preds:
        raise UserError(f"no trained models found in {cfg.output.dir}: run 'ctsma train teacher|student|baseline'")
    with _stage(timing, "ct_direct"):
        preds["ct_direct"], prov["ct_direct"] = ct_direct(store, idx, cfg.evaluate.ct_threshold_hu)
    ref = store.targets("mr")[idx]
    truth = store.targets("true")[idx]
    has_truth = bool(np.isfinite(truth).all(axis=1).sum() >= 3)

    with _stage(timing, "agreement"):
        result = {"regression": {s: agreement_block(ref, preds[s], subjects) for s in SOURCES if s in preds}}
        if has_truth:
            result["regression_vs_truth"] = {s: agreement_block(truth, preds[s], subjects)
                                             for s in SOURCES if s in preds}
            result["regression_vs_truth"]["mr_reference"] = agreement_block(truth, ref, subjects)
    if "student_distilled" in preds and "student_baseline" in preds:
        with _stage(timing, "bootstrap"):
            result["distillation_gain"] = distillation_gain(ref, preds["student_distilled"],
                                                            preds["student_baseline"], subjects,
                                                            n_boot=cfg.evaluate.n_boot, seed=cfg.trainer.seed)
            if has_truth:
                result["distillation_gain_vs_truth"] = distillation_gain(
                    truth, preds["student_distilled"], preds["student_baseline"], subjects,
                    n_boot=cfg.evaluate.n_boot, seed=cfg.trainer.seed)
    if ablations and cfg.evaluate.ablations:
        result["ablations"] = {}
        for a in progress.track(cfg.evaluate.ablations, "ablations"):
            with _stage(timing, "ablations"):
                vcfg, trained = variant(cfg, a), []
                # one trained before for this run is kept (reused), one killed mid-training resumes
                path = train("student", vcfg, store=store, reuse=True, started=lambda: trained.append(True))
                p, _ = predict_sources(vcfg, store, idx, names={"v": str(path)})
                block = agreement_block(ref, p["v"], subjects)
                result["ablations"][a["name"]] = {"overrides": {k: v for k, v in a.items() if k != "name"},
                                                  "model": str(path), "reused": not trained,
                                                  "mean_icc21": block["mean_icc21"],
                                                  "icc21": {q: block[q]["icc21"] for q in PARAMETERS}}
    result["regression_info"] = {"level": "patch", "note": LEVEL_NOTE, "n_patients": len(split.subjects["test"]),
                                 "n_patches": int(len(idx)), "flips": cfg.evaluate.flips,
                                 "test_subjects": split.subjects["test"],
                                 "reference": "MR morphometry (store columns mr_<param>)", "models": prov,
                                 "store": str(store.dir), "units": {p: PARAMETER_UNITS[p] for p in PARAMETERS}}
    with _stage(timing, "writing"):
        write_outputs(out_dir, result, ref, truth if has_truth else None, preds, patch_ids(store, idx),
                      plots=cfg.evaluate.plots)
    timing["total"] = time.perf_counter() - start
    result["timing"] = timing
    merge_json(out_dir / "metrics.json", {"timing": timing})  # after the files it times; write_outputs dropped the last
    return result


def patch_ids(store: PatchStore, idx: np.ndarray) -> dict:
    """What identifies each evaluated patch in ``regression_predictions.csv``: ``subject``, its store row
    ``index``, ``roi`` and ``rel_x/y/z`` (its position relative to the bone). With them the file is also a patch
    table that ``ctsma diagnose`` reads, one source at a time (``--prefix student_distilled_``)."""
    t = store.table.iloc[np.asarray(idx)]
    return {"subject": t["subject"].astype(str).to_numpy(), "index": np.asarray(idx, dtype=np.int64),
            "roi": t["roi"].astype(str).to_numpy(), **{c: t[c].to_numpy(float) for c in ("rel_x", "rel_y", "rel_z")}}


REGRESSION_KEYS = ("regression", "regression_vs_truth", "distillation_gain", "distillation_gain_vs_truth",
                   "ablations", "regression_info", "timing")
"""The blocks of ``metrics.json`` that ``evaluate`` writes: a rerun replaces all of them (one it does not write again,
e.g. the gain when a student is missing now, would describe other models), and keeps other commands' blocks."""
PLOT_FILES = tuple(f"{kind}{suffix}.png" for kind in ("scatter", "bland_altman") for suffix in ("", "_vs_truth"))
OUTPUT_FILES = ("metrics.json", "regression_table.csv", "regression_table.md", "regression_predictions.csv",
                *(f"plots/{name}" for name in PLOT_FILES))
"""What :func:`write_outputs` writes, relative to its folder."""


def check_outputs(out_dir: Path, under: str = "") -> None:
    """Refuse, in one line and before any work, a folder in ``out_dir`` (in its subfolder ``under``) named as one of
    :data:`OUTPUT_FILES`, or a file named as a folder of theirs: :func:`write_outputs` failed on it only after the
    predictions (and the ablations' or, in ``ctsma crossfit``, every fold's training), with ``metrics.json`` already
    replaced beside the older files."""
    check_no_obstacle(Path(out_dir), *(f"{under}/{name}" if under else name for name in OUTPUT_FILES))


def write_outputs(out_dir: Path, result: dict, ref, truth, preds: dict, ids: dict, *, plots: bool = True) -> None:
    """metrics.json (merged into an existing one: other keys kept), tables, predictions (one row per patch, first
    the columns of :func:`patch_ids`), plots."""
    import pandas as pd

    out_dir.mkdir(parents=True, exist_ok=True)
    merge_json(out_dir / "metrics.json", result,  # a rerun's optional blocks go, other commands' blocks stay
               drop=REGRESSION_KEYS)
    rows = []
    for block_name in ("regression", "regression_vs_truth"):
        for source, block in result.get(block_name, {}).items():
            for p in PARAMETERS:
                b = block[p]
                rows.append({"against": "mr_reference" if block_name == "regression" else "truth", "source": source,
                             "parameter": p, "icc21": b.get("icc21"), "icc21_lo": (b.get("icc21_ci") or [None])[0],
                             "icc21_hi": (b.get("icc21_ci") or [None, None])[1], "icc31": b.get("icc31"),
                             "pearson_r": b.get("pearson_r"), "mae": b.get("mae"), "ba_bias": b.get("ba_bias"),
                             "ba_loa_lo": (b.get("ba_loa") or [None])[0], "ba_loa_hi": (b.get("ba_loa") or [None, None])[1],
                             "n_patients": b.get("n_patients"), "n_patches": b.get("n_patches")})
    table = pd.DataFrame(rows)
    with atomic_path(out_dir / "regression_table.csv") as tmp:
        table.to_csv(tmp, index=False)
    write_text(out_dir / "regression_table.md", markdown_table(result))
    pred = dict(ids)
    for j, p in enumerate(PARAMETERS):
        pred[f"mr_{p}"] = ref[:, j]
        if truth is not None:
            pred[f"true_{p}"] = truth[:, j]
        for s, v in preds.items():
            pred[f"{s}_{p}"] = v[:, j]
    with atomic_path(out_dir / "regression_predictions.csv") as tmp:
        pd.DataFrame(pred).to_csv(tmp, index=False)
    written = []
    if plots:
        written += plot_agreement(out_dir / "plots", ref, preds, "MR reference")
        if truth is not None:
            written += plot_agreement(out_dir / "plots", truth, preds, "truth", suffix="_vs_truth")
    for name in PLOT_FILES:  # an earlier run's plots that this run does not draw would show other models or data
        old = out_dir / "plots" / name
        if old not in written and old.is_file():
            old.unlink()


def predictions_by_source(pred) -> dict:
    """The study report's held-out patches (``{source: DataFrame}`` of ``subject, roi, param, reference,
    predicted``, the reference being the MR reference) from ``regression_predictions.csv`` as :func:`write_outputs`
    writes it: one row per patch with ``subject``, ``roi``, ``mr_<param>`` and ``<source>_<param>``. Every prefix of
    a ``<param>`` column but ``mr_`` and ``true_`` (the phantom's truth) is a source, in the file's order. Empty when
    the table holds no source beside its reference."""
    import pandas as pd

    sources = dict.fromkeys(c[: -len(p) - 1] for c in pred.columns for p in PARAMETERS if c.endswith(f"_{p}"))
    out = {}
    for src in (s for s in sources if s not in ("mr", "true")):
        frames = [pd.DataFrame({"subject": pred["subject"].astype(str), "roi": pred["roi"], "param": p,
                                "reference": pred[f"mr_{p}"], "predicted": pred[f"{src}_{p}"]})
                  for p in PARAMETERS if f"{src}_{p}" in pred and f"mr_{p}" in pred]
        if frames:
            out[src] = pd.concat(frames, ignore_index=True)
    return out


def markdown_table(result: dict) -> str:
    lines = [f"Regression agreement ({LEVEL_NOTE}).", ""]
    for block_name, title in (("regression", "against the MR reference"), ("regression_vs_truth", "against the truth")):
        if block_name not in result:
            continue
        lines += [f"### {title}", "", "| source | parameter | ICC(2,1) [95% CI] | ICC(3,1) | r | MAE | BA bias [LoA] | patients/patches |",
                  "|---|---|---|---|---|---|---|---|"]
        for s, block in result[block_name].items():
            for p in PARAMETERS:
                b = block[p]
                ci = b.get("icc21_ci") or [None, None]
                loa = b.get("ba_loa") or [None, None]
                lines.append(f"| {s} | {p} | {fmt(b.get('icc21'))} [{fmt(ci[0])}, {fmt(ci[1])}] | "
                             f"{fmt(b.get('icc31'))} | "
                             f"{fmt(b.get('pearson_r'))} | {fmt(b.get('mae'), 4)} | {fmt(b.get('ba_bias'), 4)} "
                             f"[{fmt(loa[0], 4)}, {fmt(loa[1], 4)}] | {b.get('n_patients')}/{b.get('n_patches')} |")
            lines.append(f"| {s} | **mean ICC(2,1)** | {fmt(block.get('mean_icc21'))} | | | | | |")
        lines.append("")
    g = result.get("distillation_gain")
    if g:
        lines.append(f"Distillation gain (mean ICC(2,1), distilled − baseline): {fmt(g['mean_icc21_diff'])} "
                     f"[{fmt(g['ci'][0])}, {fmt(g['ci'][1])}], paired bootstrap over patients (n={g['n_boot']}).")
    for name, a in (result.get("ablations") or {}).items():
        lines.append(f"- ablation {name}: mean ICC(2,1) {fmt(a['mean_icc21'])} ({a['overrides']})")
    return "\n".join(lines) + "\n"


def plot_agreement(folder: Path, ref: np.ndarray, preds: dict, ref_name: str, suffix: str = "") -> list[Path]:
    """``scatter{suffix}.png`` (prediction vs reference, identity line) and ``bland_altman{suffix}.png``
    (difference vs mean, bias and 95 % limits): one row per source, one column per parameter. Returns the files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    sources = list(preds)
    files = []
    for kind in ("scatter", "bland_altman"):
        fig, axes = plt.subplots(len(sources), 4, figsize=(13, 2.7 * len(sources)), squeeze=False)
        for i, s in enumerate(sources):
            for j, p in enumerate(PARAMETERS):
                ax = axes[i, j]
                r, m = ref[:, j], preds[s][:, j]
                ok = np.isfinite(r) & np.isfinite(m)
                r, m = r[ok], m[ok]
                unit = f" ({PARAMETER_UNITS[p]})" if PARAMETER_UNITS[p] else ""
                if kind == "scatter":
                    ax.scatter(r, m, s=3, alpha=0.5, rasterized=True)
                    if r.size:
                        lo, hi = float(min(r.min(), m.min())), float(max(r.max(), m.max()))
                        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8)
                    ax.set_xlabel(f"{ref_name}{unit}", fontsize=8)
                else:
                    d, a = m - r, (m + r) / 2
                    ax.scatter(a, d, s=3, alpha=0.5, rasterized=True)
                    if d.size > 1:
                        bias, sd = d.mean(), d.std(ddof=1)
                        for y, st in ((bias, "-"), (bias - 1.96 * sd, "--"), (bias + 1.96 * sd, "--")):
                            ax.axhline(y, color="k", ls=st, lw=0.8)
                    ax.set_xlabel(f"mean{unit}", fontsize=8)
                ax.set_title(f"{s}: {p}" + (f" − {ref_name}" if kind != "scatter" else ""), fontsize=8)
                ax.tick_params(labelsize=7)
        fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.95, wspace=0.3, hspace=0.55)
        with atomic_path(folder / f"{kind}{suffix}.png") as tmp:
            fig.savefig(tmp, dpi=80)
        plt.close(fig)
        files.append(folder / f"{kind}{suffix}.png")
    return files


__all__ = ["evaluate", "agreement_block", "distillation_gain", "ct_direct", "SOURCES"]

"""The demo's stages. Each takes its own output folder and a shared context, and returns a JSON summary.

Honest evaluation on the phantom, by construction:
* the synthesis model is trained on the first ``synthesis_knees`` knees only, without the true transforms;
  registration accuracy (TRE) is reported on the other knees;
* teacher, distilled student and baseline student are trained by **patient-level cross-fitting**: with K folds,
  K models of each kind are trained, each on the patients of K-1 folds, and each predicts only the patients of
  its held-out fold. Every regression figure and every diagnosis input is therefore an out-of-sample prediction
  for every patient, and hyper-parameters come from the fixed demo config (nothing is tuned on test patients);
* the diagnosis aggregators are cross-validated (patient-level, stratified) on those out-of-sample parameters;
* the knee analysed by ``ctsma infer`` uses the student of the fold that held it out, and a diagnosis model
  trained on the other knees.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .. import PARAMETERS, progress
from ..io import write_json
from .settings import DemoSettings


@dataclass
class Context:
    out: Path
    s: DemoSettings
    info: dict = field(default_factory=dict)
    store: Path | None = None  # the patch store; default: the demo's own, out/dataset/store ('ctsma crossfit': yours)

    @property
    def store_dir(self) -> Path:
        return self.store if self.store is not None else self.out / "dataset" / "store"

    @property
    def manifest(self) -> Path:
        return self.out / "phantom" / "manifest.csv"

    def cohort(self) -> pd.DataFrame:
        return pd.read_csv(self.manifest, dtype={"subject": str})

    def synthesis_subjects(self) -> list[str]:
        return sorted(self.cohort().subject)[: self.s.synthesis_knees]


def _registration_manifest(ctx: Context, subjects, path: Path) -> Path:
    """The cohort manifest as registration sees it, as for new patients: the two images and nothing of the phantom's
    ground truth (registration segments the CT and the pseudo-CT itself, for its masks, its initialisation and the
    bone Dice of its QA, which the dataset's quality gate reads), with absolute paths."""
    df = ctx.cohort()
    df = df[df.subject.isin(subjects)][["subject", "mr", "ct"]].copy()
    for col in ("mr", "ct"):
        df[col] = [str((ctx.manifest.parent / p).resolve()) for p in df[col]]
    df.to_csv(path, index=False)
    return path


# ------------------------------------------------------------------ phantom
def phantom(ctx: Context, d: Path) -> dict:
    from ..phantom import generate_cohort, make_settings

    generate_cohort(make_settings(ctx.s.phantom_preset), ctx.s.n, ctx.s.seed, d, workers=ctx.s.workers)
    df = ctx.cohort()
    # the diagnosis stage would refuse such a cohort only after the synthesis, registration, dataset and training
    check_classes(df, f"the cohort (n = {ctx.s.n}, seed {ctx.s.seed})", "use another --seed or a larger --n")
    return {"n": int(len(df)), "oa": int(df.oa.sum()), "kl_grades": df.kl_grade.value_counts().sort_index().to_dict()}


# ------------------------------------------------------------------ synthesis
def synthesis(ctx: Context, d: Path) -> dict:
    from ..io import read_image
    from ..synthesis.training import load_train_config, train

    subjects = ctx.synthesis_subjects()
    rows = ctx.cohort().set_index("subject").loc[subjects]
    root = ctx.manifest.parent
    pairs = [(read_image(root / r.mr, what="MR"), read_image(root / r.ct, what="CT"), None) for r in rows.itertuples()]
    model = train(pairs, load_train_config("demo"), names=subjects)
    model.save(d / "synthesis.safetensors")
    return {"model": str(d / "synthesis.safetensors"), "trained_on": subjects,
            "timings": model.meta.get("training", {}).get("timings", {})}


# ------------------------------------------------------------------ registration
REGISTRATION_VARIANTS = {
    "no_synthesis": {"use_synthesis": False},
    "no_per_bone": {"per_bone": {"enabled": False}},
    "rigid_only": {"per_bone": {"enabled": False}, "affine": {"enabled": False}, "deformable": {"enabled": False}},
}


def _tre(ctx: Context, reg_dir: Path, subjects) -> tuple[np.ndarray, dict]:
    import SimpleITK as sitk

    from ..registration.tre import tre_mm

    df = ctx.cohort().set_index("subject")
    errs, per = [], {}
    for s in subjects:
        t = reg_dir / s / "transform_ct_to_mr.h5"
        if not t.is_file():
            continue
        lm = pd.read_csv(ctx.manifest.parent / df.loc[s, "landmarks"])
        e = tre_mm(sitk.ReadTransform(str(t)), lm)
        per[s] = float(e.mean())
        errs.append(e)
    return (np.concatenate(errs) if errs else np.zeros(0)), per


def _seconds(reg_dir: Path, subjects) -> float:
    secs = []
    for s in subjects:
        q = reg_dir / s / "qa.json"
        if q.is_file():
            secs.append(float(json.loads(q.read_text(encoding="utf-8")).get("total_seconds", np.nan)))
    return float(np.nanmean(secs)) if secs else float("nan")


def registration_key(s: DemoSettings) -> dict:
    """The registration stage's settings for its cache key (``variant_knees`` is an ``own`` setting of the stage: the
    later stages read only the cohort's registrations). A shipped preset's file is in the code fingerprint; a preset
    file of the user's adds its text, so that editing the file reruns the stage (as for ``train_config``)."""
    key = {"preset": s.registration_preset}
    path = Path(s.registration_preset)
    if path.is_file():
        key["preset_text"] = path.read_text(encoding="utf-8")
    return key


def registration(ctx: Context, d: Path) -> dict:
    """Every knee with the demo preset, and the first ``variant_knees`` unseen knees with each variant, all in one
    pool of workers (the variants' shorter registrations last, so that they fill the end)."""
    from ..registration.cohort import QA_FAILED, Cohort, run_cohorts
    from ..registration.presets import load_preset

    model = ctx.out / "synthesis" / "synthesis.safetensors"
    man = _registration_manifest(ctx, ctx.cohort().subject, d / "manifest.csv")
    unseen = [s for s in sorted(ctx.cohort().subject) if s not in set(ctx.synthesis_subjects())]
    sub = unseen[: ctx.s.variant_knees]
    cohorts = [Cohort(man, d / "cohort", load_preset(ctx.s.registration_preset))]
    if sub:
        vman = _registration_manifest(ctx, sub, d / "variants_manifest.csv")
        cohorts += [Cohort(vman, d / "variants" / name, load_preset(ctx.s.registration_preset, over))
                    for name, over in REGISTRATION_VARIANTS.items()]
    table = run_cohorts(cohorts, model_path=str(model), jobs=ctx.s.workers)[0]
    errs, per = _tre(ctx, d / "cohort", unseen)
    result = {"full": {"tre_mean_mm": float(errs.mean()), "tre_p95_mm": float(np.percentile(errs, 95)),
                       "seconds_per_knee": _seconds(d / "cohort", unseen), "n_knees": len(per),
                       "n_landmarks": int(errs.size)}}
    if sub:
        errs_full, _ = _tre(ctx, d / "cohort", sub)
        result["full"]["tre_mean_mm_variant_knees"] = float(errs_full.mean())
        for name in REGISTRATION_VARIANTS:
            vd = d / "variants" / name
            e, _ = _tre(ctx, vd, sub)
            if e.size:
                result[name] = {"tre_mean_mm": float(e.mean()), "tre_p95_mm": float(np.percentile(e, 95)),
                                "seconds_per_knee": _seconds(vd, sub), "n_knees": len(sub),
                                "n_landmarks": int(e.size)}
    failed = table[table.status.isin(["failed", QA_FAILED])] if "status" in table else table.iloc[0:0]
    write_json(d / "registration_metrics.json", result)
    return {"registration": result, "failed": failed.subject.tolist() if len(failed) else [],
            "tre_per_knee": per}


# ------------------------------------------------------------------ dataset
def dataset_settings(ctx: Context):
    from ..dataset.build import BuildSettings

    # ROIs from the automatic bone segmentation of each CT, as for a new patient: the phantom's own ROI labels
    # (the manifest's ct_rois) are ground truth and only score the segmentation
    return BuildSettings(seed=ctx.s.seed, roi_source="auto")


def dataset(ctx: Context, d: Path) -> dict:
    from ..dataset.build import build_dataset

    summary = build_dataset(ctx.manifest, d / "store", dataset_settings(ctx),
                            registrations=ctx.out / "registration" / "cohort", workers=ctx.s.workers)
    return {"n_patches": summary.get("n_patches"), "n_subjects": summary.get("n_subjects"),
            "excluded": summary.get("excluded", {})}


# ------------------------------------------------------------------ training (cross-fitting)
def train_config_path(s: DemoSettings) -> Path:
    """``train_config``: a shipped config by name (``demo``: CPU-sized, ``gpu``: the wider networks) or a YAML path."""
    from ..errors import ConfigError
    from ..models.config import SHIPPED_TRAIN_CONFIGS, shipped_or_path

    if s.train_config in SHIPPED_TRAIN_CONFIGS:
        return shipped_or_path(s.train_config)
    path = Path(s.train_config).expanduser()
    if not path.is_file():
        raise ConfigError(f"train_config: no such file {path} (or name a shipped config: "
                          f"{', '.join(SHIPPED_TRAIN_CONFIGS)})")
    return path


def check_settings(s: DemoSettings) -> None:
    """Refuse, before the first stage, settings that a later stage would refuse only after minutes of work (and after
    clearing that stage's earlier results): a missing training config, an unknown registration preset or aggregator,
    no knee left to score the registration on, more cross-fitting folds than knees."""
    from ..diagnosis.aggregators import AGGREGATORS
    from ..errors import ConfigError
    from ..registration.presets import load_preset

    train_config_path(s)
    load_preset(s.registration_preset)
    if s.synthesis_knees >= s.n:
        raise ConfigError(f"synthesis_knees = {s.synthesis_knees} leaves none of the n = {s.n} knees to score the "
                          "registration on (it is scored on the knees the synthesis never saw): use fewer "
                          "synthesis_knees or a larger n")
    if s.folds > s.n:
        raise ConfigError(f"folds = {s.folds} is more than the n = {s.n} knees: each cross-fitting fold holds out "
                          "at least one knee")
    unknown = [a for a in s.aggregators if a not in AGGREGATORS]
    if unknown or not s.aggregators:
        raise ConfigError(f"aggregators: {'unknown ' + ', '.join(map(repr, unknown)) if unknown else 'none given'}; "
                          f"choose from {', '.join(AGGREGATORS)}")


def fold_config(ctx: Context, fold: int):
    from ..models import load_train_config

    path = train_config_path(ctx.s)
    over = {"data": {"store": str(ctx.store_dir), "k_folds": ctx.s.folds, "fold": fold,
                     "use_stored_split": False, "split_seed": ctx.s.seed},
            "output": {"dir": str(ctx.out / "training" / f"fold{fold}")},
            "trainer": {"seed": ctx.s.seed, "progress_bar": False}}
    return load_train_config(path, over)


def training_key(ctx: Context) -> dict:
    """The training stage's settings: the training config as loaded (its layout and comments aside) without the
    ``evaluate`` section, which only the evaluation reads (a new ``n_boot`` retrained the nine CNNs), and without
    the paths that the demo sets inside its folder."""
    cfg = asdict(fold_config(ctx, 0))
    for section, name in (("data", "store"), ("data", "fold"), ("output", "dir")):
        del cfg[section][name]
    del cfg["evaluate"], cfg["base_dir"]
    return {"folds": ctx.s.folds, "config": ctx.s.train_config, "training": cfg}


def evaluation_key(ctx: Context) -> dict:
    """The evaluation stage's own settings: the training config's ``evaluate`` section."""
    return {"evaluate": asdict(fold_config(ctx, 0).evaluate)}


def training(ctx: Context, d: Path) -> dict:
    """Teacher, distilled student and baseline of every fold.

    On a CPU with ``workers`` > 1 each fold is a lane (teacher, then its distilled student, then the baseline) in a
    process of its own, all lanes at once (at most ``2 × workers``), with the cores shared out as torch threads (one
    each when there are more lanes than cores): the demo's small 3D CNNs use a second thread poorly, and three
    single-threaded lanes on two cores keep both cores busy to the end, where two workers taking the nine trainings
    one by one left one core idle while the last training ran alone (docs/demo.md). With a GPU they run one after
    the other."""
    cfgs = [fold_config(ctx, f) for f in range(ctx.s.folds)]
    if ctx.s.workers > 1 and all(_on_cpu(c.trainer.accelerator) for c in cfgs):
        train_in_lanes(cfgs, ctx.s.workers)
    else:
        from functools import partial

        for f, cfg in enumerate(cfgs):
            for which in LANE:
                if _train_job(which, cfg, cfg.trainer.threads, partial(_say, f, ctx.s.folds, which)) is None:
                    _say(f, ctx.s.folds, which, KEPT)
    return {f"fold{f}": str(d / f"fold{f}") for f in range(ctx.s.folds)}


def _on_cpu(accelerator: str) -> bool:
    """Whether Lightning trains on the CPU: ``cpu``, or ``auto`` without a CUDA or Apple GPU (``gpu.yaml``'s
    setting on a CPU-only machine, whose folds then also train side by side)."""
    if accelerator == "cpu":
        return True
    if accelerator != "auto":
        return False
    import torch

    mps = getattr(torch.backends, "mps", None)
    return not torch.cuda.is_available() and not (mps is not None and mps.is_available())


LANE = ("teacher", "student", "baseline")  # the student needs its fold's teacher; the baseline needs nothing
KEPT = "kept"  # train(reuse=True) has said which file and why


def _say(fold: int, n: int, which: str, what: str = "") -> None:
    """One line of the training stage's progress: ``fold 1/3: teacher <what>``."""
    progress.info(f"  fold {fold + 1}/{n}: {which}" + (f" {what}" if what else ""))


def _train_job(which: str, cfg, threads: int, started) -> float | None:
    """One training; returns its seconds, or None for a model kept from an interrupted run of the stage: one whose
    file records the same run (``train(reuse=True)``: settings, split, store and, for the student, the teacher it
    was distilled from; the folder of a stage whose key changed is emptied first). A model killed mid-training
    resumes from its checkpoint of the same run (its seconds are those of the remaining epochs). ``started()`` is
    called when the training starts (not for a kept model)."""
    import time

    from ..models.train import train

    cfg.trainer.threads = threads
    began, t = [], time.perf_counter()
    train(which, cfg, reuse=True, started=lambda: (began.append(True), started()))
    return time.perf_counter() - t if began else None


def _lane(fold: int, n: int, cfg, threads: int, job) -> list[tuple[str, float]]:
    """One fold's trainings in order, in a worker process; returns (model, seconds) of each. A model is announced as
    started only when its training starts, and a kept one only as kept."""
    from functools import partial

    done = []
    for which in LANE:
        secs = job(which, cfg, threads, partial(_say, fold, n, which, "(started)"))
        _say(fold, n, which, KEPT if secs is None else f"finished in {secs:.0f} s")
        done.append((which, secs or 0.0))
    return done


def train_in_lanes(cfgs: list, workers: int, job=_train_job) -> list[tuple[int, str]]:
    """Train every fold's teacher, student and baseline (``cfgs``: one training config per fold): one spawned process
    per fold, up to ``2 × workers`` at once, each with ``cpu_count // processes`` torch threads (at least 1), each
    running its fold's teacher, student and baseline in that order. Returns the (fold, model) pairs in the order the
    lanes finished. The first training that fails stops the others and its error is raised. ``job(which, cfg,
    threads, started)`` runs one training, calling ``started()`` as it starts, and returns its seconds, or None
    without calling ``started`` for a model it keeps (injected by the tests)."""
    import os

    from ..processes import run_jobs

    n = len(cfgs)
    processes = max(1, min(n, 2 * workers))
    threads = max(1, (os.cpu_count() or 1) // processes)
    finished: list[tuple[int, str]] = []
    # not quiet: each lane reports its trainings as they start and finish
    run_jobs(_lane, [(f, n, cfg, threads, job) for f, cfg in enumerate(cfgs)], processes,
             on_done=lambda f, lane: finished.extend((f, which) for which, _ in lane), quiet=False)
    return finished


# ------------------------------------------------------------------ evaluation (pooled out-of-fold)
def oof_predictions(ctx: Context, store) -> tuple[np.ndarray, dict]:
    """Every knee's patches in ``store`` predicted by the models of the fold that held that knee out: the store rows
    (fold by fold) and each source's predictions (n, 4) in that order. ``store`` may be another store of the same
    knees as the one the models trained on (``benchmarks/bench_crossfit.py --eval-store``)."""
    from ..evaluation.regression import predict_sources

    all_idx, preds = [], {}
    for f in range(ctx.s.folds):
        cfg = fold_config(ctx, f)
        c = cfg.data
        split = store.patient_split(c.test_fraction, c.val_fraction, k=c.k_folds, fold=f, seed=c.split_seed,
                                    use_stored=False)
        p, _ = predict_sources(cfg, store, split.test)  # refuses a model trained on any of these patients
        all_idx.append(split.test)
        for k, v in p.items():
            preds.setdefault(k, []).append(v)
    return np.concatenate(all_idx), {k: np.concatenate(v) for k, v in preds.items()}


def evaluation(ctx: Context, d: Path) -> dict:
    from ..dataset.store import PatchStore
    from ..evaluation.regression import SOURCES, agreement_block, ct_direct, distillation_gain, patch_ids, write_outputs

    store = PatchStore(ctx.store_dir)
    idx, preds = oof_predictions(ctx, store)
    preds["ct_direct"], ct_info = ct_direct(store, idx)
    subjects = store.table["subject"].astype(str).to_numpy()[idx]
    ref = store.targets("mr")[idx]
    truth = store.targets("true")[idx]
    res = {"regression": {s: agreement_block(ref, preds[s], subjects) for s in SOURCES if s in preds}}
    has_truth = bool(np.isfinite(truth).all(axis=1).sum() >= 3)
    if has_truth:
        res["regression_vs_truth"] = {s: agreement_block(truth, preds[s], subjects) for s in SOURCES if s in preds}
        res["regression_vs_truth"]["mr_reference"] = agreement_block(truth, ref, subjects)
    n_boot = fold_config(ctx, 0).evaluate.n_boot
    res["distillation_gain"] = distillation_gain(ref, preds["student_distilled"], preds["student_baseline"],
                                                 subjects, n_boot=n_boot, seed=ctx.s.seed)
    if has_truth:
        res["distillation_gain_vs_truth"] = distillation_gain(truth, preds["student_distilled"],
                                                              preds["student_baseline"], subjects,
                                                              n_boot=n_boot, seed=ctx.s.seed)
    res["regression_info"] = {"level": "patch", "design": f"{ctx.s.folds}-fold patient-level cross-fitting: every "
                              "prediction comes from a model that never saw that patient",
                              "n_patients": int(len(set(subjects))), "n_patches": int(len(idx)),
                              "flips": fold_config(ctx, 0).evaluate.flips, "ct_direct": ct_info}
    write_outputs(d, res, ref, truth if has_truth else None, preds, patch_ids(store, idx))
    np.save(d / "oof_index.npy", idx)
    return {"mean_icc21": {k: v.get("mean_icc21") for k, v in res["regression"].items()},
            "distillation_gain": res["distillation_gain"]["mean_icc21_diff"],
            "gain_ci": res["distillation_gain"]["ci"]}


def _oof_tables(ctx: Context) -> dict[str, pd.DataFrame]:
    """Per-patch parameter tables per source: out-of-fold student predictions, MR reference, phantom truth."""
    from ..dataset.store import PatchStore

    store = PatchStore(ctx.store_dir)
    ev = ctx.out / "evaluation"
    idx = np.load(ev / "oof_index.npy")
    pred = pd.read_csv(ev / "regression_predictions.csv")
    base = store.table.iloc[idx][["subject", "roi", "rel_x", "rel_y", "rel_z"]].reset_index(drop=True)
    base["subject"] = base["subject"].astype(str)
    tables = {}
    for src, prefix in (("student_distilled", "student_distilled_"), ("student_baseline", "student_baseline_"),
                        ("mr_reference", "mr_"), ("truth", "true_")):
        t = base.copy()
        for p in PARAMETERS:
            t[p] = pred[prefix + p].to_numpy() if prefix + p in pred else np.nan
        t = t[np.isfinite(t[list(PARAMETERS)]).all(axis=1)]
        if len(t):
            tables[src] = t.reset_index(drop=True)
    return tables


def _labels(ctx: Context) -> pd.DataFrame:
    return ctx.cohort()[["subject", "oa", "kl_grade", "severity"]].assign(subject=lambda x: x.subject.astype(str))


def _analysable_labels(ctx: Context, tables: dict[str, pd.DataFrame]) -> tuple[pd.DataFrame, dict]:
    """Labels of the knees that have valid patches in every source (e.g. not excluded by registration QA)."""
    labels = _labels(ctx)
    keep = set(labels.subject)
    for t in tables.values():
        keep &= set(t.subject)
    dropped = sorted(set(labels.subject) - keep)
    if dropped:
        progress.info(f"  diagnosis: {len(dropped)} knee(s) without valid patches in every source are left out: "
                      + ", ".join(dropped))
    return labels[labels.subject.isin(keep)].reset_index(drop=True), dropped


# ------------------------------------------------------------------ diagnosis
def check_classes(labels: pd.DataFrame, what: str, hint: str = "use a larger --n") -> int:
    """The number of knees in the smaller class (with or without OA) of ``labels``; a one-line error naming ``what``
    the knees are when it is below 2, which the diagnosis's cross-validation needs."""
    from ..errors import UserError

    n_oa, n_no = int((labels.oa == 1).sum()), int((labels.oa == 0).sum())
    if min(n_oa, n_no) < 2:
        raise UserError(f"{what} has {n_oa} knee(s) with OA and {n_no} without: the diagnosis needs at least 2 of "
                        f"each ({hint})")
    return min(n_oa, n_no)


def diagnosis_folds(ctx: Context, labels: pd.DataFrame, what: str = "the cohort's analysable knees") -> int:
    """The diagnosis cross-validation's folds: ``diagnosis_folds``, or fewer when a small cohort has fewer knees
    with (or without) OA than that (each fold needs one of each); a clear error below 2, naming ``what`` the
    knees are."""
    smallest = check_classes(labels, what)
    if smallest < ctx.s.diagnosis_folds:
        progress.info(f"  diagnosis: {smallest}-fold cross-validation instead of {ctx.s.diagnosis_folds}: the "
                      f"cohort has only {smallest} knees in its smaller class")
    return min(ctx.s.diagnosis_folds, smallest)


def diagnosis(ctx: Context, d: Path) -> dict:
    from .. import diagnosis as dx
    from ..diagnosis import report as dxreport

    tables = _oof_tables(ctx)
    labels, dropped = _analysable_labels(ctx, tables)
    folds = diagnosis_folds(ctx, labels)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        block, results = dx.compare_sources(tables, labels, ctx.s.aggregators, folds, ctx.s.seed,
                                            pairs=[("student_distilled", "student_baseline")], workers=ctx.s.workers)
    write_json(d / "diagnosis_metrics.json", block)
    dxreport.write_table(block, d)
    dxreport.write_roc_plots(results, d)
    dxreport.write_oof(results, d / "oof_predictions.csv")
    return {"auc": {k: v.get("auc") for k, v in block.items()}, "n_knees": int(len(labels)),
            "folds": folds, "knees_without_patches": dropped}


# ------------------------------------------------------------------ inference on one held-out knee
def inference_subject(ctx: Context) -> str:
    from ..dataset.store import PatchStore

    cfg = fold_config(ctx, 0)
    store = PatchStore(ctx.store_dir)
    c = cfg.data
    split = store.patient_split(c.test_fraction, c.val_fraction, k=c.k_folds, fold=0, seed=c.split_seed,
                                use_stored=False)
    return sorted(split.subjects["test"])[0]


def inference(ctx: Context, d: Path) -> dict:
    from .. import diagnosis as dx
    from ..inference.engine import InferSettings, infer

    subject = inference_subject(ctx)
    tables = _oof_tables(ctx)
    labels, _ = _analysable_labels(ctx, tables)
    others = tables["student_distilled"]
    others = others[others.subject != subject]
    labels = labels[labels.subject != subject]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        folds = diagnosis_folds(ctx, labels, f"the cohort's analysable knees without the held-out knee {subject}")
        model = dx.train(others, labels, "transformer", seed=ctx.s.seed, folds=folds,
                         source="student_distilled", workers=ctx.s.workers)
    dpath = dx.save(model, d / "diagnosis_model.safetensors")
    row = ctx.cohort().set_index("subject").loc[subject]
    student = ctx.out / "training" / "fold0" / "student_distilled.safetensors"
    summary = infer(ctx.manifest.parent / row.ct, d / subject, model_path=student,
                    settings=InferSettings(side=str(row.side)), diagnosis_path=dpath, subject=subject)
    return {"subject": subject, "n_patches": summary["n_patches"], "oa_probability": summary.get("oa_probability"),
            "true_oa": int(row.oa), "seconds": summary["seconds"]}

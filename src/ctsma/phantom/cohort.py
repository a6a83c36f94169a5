"""Generate one knee or a whole cohort: files, metadata, manifest, resume and parallelism."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import time
import warnings
from concurrent.futures import as_completed
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import PARAMETERS, ROIS, progress
from ..errors import InputImageError, UserError
from ..io import atomic_dir, ensure_writable_dir, write_json, write_text
from ..processes import worker_pool
from .anatomy import BONE_NAMES, TISSUES, KneeModel
from .imaging import simulate_ct, simulate_mr
from .pose import bone_jacobians, build_transform, ct_grid, map_points
from .settings import GENERATOR_VERSION, PhantomSettings, settings_dict, settings_hash
from .subject import sample_subject
from .truth import measure_truth

FILES = {"ct": "ct.nii.gz", "mr": "mr.nii.gz", "ct_bones": "ct_bones.nii.gz", "mr_bones": "mr_bones.nii.gz",
         "ct_rois": "ct_rois.nii.gz", "mr_rois": "mr_rois.nii.gz", "transform_ct_to_mr": "transform_ct_to_mr.h5",
         "landmarks": "landmarks.csv"}
EXTRA_FILES = {"ct_tissues": "ct_tissues.nii.gz", "mr_tissues": "mr_tissues.nii.gz", "metadata": "metadata.json"}
MANIFEST_COLUMNS = (["subject", "side", "kl_grade", "oa", "severity"] + list(FILES)
                    + [f"true_{r}_{p}" for r in ROIS for p in PARAMETERS] + list(EXTRA_FILES))
LANDMARKS_PER_ROI = 5
MAX_KNEES = 100_000
"""The most knees one cohort may hold (about 1.7 TB of files at the demo settings)."""


def subject_id(index: int) -> str:
    return f"P{index:04d}"


def _landmarks(model: KneeModel, comp: sitk.Transform, ct_rois: sitk.Image, rng) -> list[dict]:
    """Points inside each ROI seen in both frames: a CT point (sub-voxel) and its MR image under ``T``."""
    arr = sitk.GetArrayViewFromImage(ct_rois)
    rows = []
    for name, val in ROIS.items():
        idx = np.argwhere(arr == val)
        if len(idx) == 0:
            continue
        pick = idx[rng.permutation(len(idx))[: 8 * LANDMARKS_PER_ROI]]
        got = 0
        for z, y, x in pick:
            jitter = rng.uniform(-0.25, 0.25, 3)
            p = ct_rois.TransformContinuousIndexToPhysicalPoint([float(x + jitter[0]), float(y + jitter[1]),
                                                                  float(z + jitter[2])])
            p = tuple(round(v, 6) for v in p)
            q = comp.TransformPoint(p)
            if model.evaluate(np.array([q]), design_margin=-1e9)["roi"][0] != val:
                continue
            rows.append({"roi": name, "ct_x": p[0], "ct_y": p[1], "ct_z": p[2], "mr_x": q[0], "mr_y": q[1],
                         "mr_z": q[2]})
            got += 1
            if got == LANDMARKS_PER_ROI:
                break
    return rows


def _write_img(img: sitk.Image, path: Path) -> None:
    sitk.WriteImage(img, str(path), True, 1)


def generate_knee(settings: PhantomSettings, seed: int, index: int, out_dir) -> dict:
    """Build knee ``index`` of the cohort ``seed`` into ``out_dir/<subject>/`` (atomically).

    Returns the knee's manifest row (paths relative to ``out_dir``).
    """
    t0 = time.perf_counter()
    c0 = time.process_time()
    timing = {}
    out_dir = Path(out_dir)
    sid = subject_id(index)
    p = sample_subject(settings, seed, index)
    model = KneeModel(p)
    rng = np.random.Generator(np.random.PCG64(p["noise_seed"]))
    timing["setup"] = time.perf_counter() - t0
    comp, tinfo = build_transform(model, settings, p["pose"])
    timing["transform"] = time.perf_counter() - t0 - sum(timing.values())
    mr_imgs, mr_info = simulate_mr(model, settings, rng)
    timing["mr"] = time.perf_counter() - t0 - sum(timing.values())
    grid = ct_grid(settings, p["pose"])
    mapped = map_points(comp, grid)
    ct_imgs, ct_info = simulate_ct(model, settings, grid, mapped, bone_jacobians(p["pose"], tinfo["motion_scale"]), rng)
    del mapped
    timing["ct"] = time.perf_counter() - t0 - sum(timing.values())
    lms = _landmarks(model, comp, ct_imgs["ct_rois"], rng)
    truth, truth_info = measure_truth(model, settings, rng)
    timing["truth"] = time.perf_counter() - t0 - sum(timing.values())
    row = {"subject": sid, "side": p["side"], "kl_grade": p["kl_grade"], "oa": p["oa"],
           "severity": round(p["severity"], 6)}
    row.update({k: f"{sid}/{v}" for k, v in FILES.items()})
    row.update({f"true_{r}_{q}": truth[r][q] for r in ROIS for q in PARAMETERS})
    row.update({k: f"{sid}/{v}" for k, v in EXTRA_FILES.items()})
    with atomic_dir(out_dir / sid) as tmp:
        for key, img in {**mr_imgs, **ct_imgs}.items():
            _write_img(img, tmp / (FILES.get(key) or EXTRA_FILES[key]))
        sitk.WriteTransform(comp, str(tmp / FILES["transform_ct_to_mr"]))
        lines = ["roi,ct_x,ct_y,ct_z,mr_x,mr_y,mr_z"] + [
            ",".join([r["roi"]] + [repr(float(r[k])) for k in ("ct_x", "ct_y", "ct_z", "mr_x", "mr_y", "mr_z")])
            for r in lms]
        write_text(tmp / FILES["landmarks"], "\n".join(lines) + "\n")
        timing["write"] = time.perf_counter() - t0 - sum(timing.values())
        meta = {
            "generator": "ctsma.phantom", "generator_version": GENERATOR_VERSION, "seed": int(seed),
            "index": int(index), "subject_id": sid, "settings": settings_dict(settings),
            "settings_hash": settings_hash(settings), "manifest_row": row,
            "labels": {"tissues": TISSUES, "bones_image": {**{b: i + 1 for i, b in enumerate(BONE_NAMES)},
                                                          "femoral_cartilage": 10, "tibial_cartilage": 11,
                                                          "patellar_cartilage": 12},
                       "rois": ROIS},
            "frames": {"mr": mr_info["grid"], "ct": ct_info["grid"], "mr_frame": "anatomical (LPS mm), knee centre "
                       "at the origin", "transform": "CT -> MR (ITK convention), Composite[Displacement, Euler3D]",
                       **tinfo},
            "truth": {"per_roi": truth, **truth_info},
            "mr_noise_sigma": mr_info["noise_sigma"], "landmarks": len(lms),
            "subject": p, "timing_s": {k: round(v, 3) for k, v in timing.items()},
            "cpu_s": round(time.process_time() - c0, 3),
        }
        write_json(tmp / EXTRA_FILES["metadata"], meta)
    return row


def _run_one(args):
    settings_d, seed, index, out = args
    from .settings import from_dict
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    return generate_knee(from_dict(settings_d), seed, index, out)


def _done(out: Path, sid: str, shash: str, seed: int) -> dict | None:
    mp = out / sid / "metadata.json"
    if not mp.is_file():
        return None
    try:
        meta = json.loads(mp.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    if meta.get("settings_hash") != shash or meta.get("seed") != seed:
        return None
    if not all((out / sid / f).is_file() for f in FILES.values()):
        return None
    return meta["manifest_row"]


def _check_no_foreign_knee_folders(out: Path, n: int) -> None:
    """Refuse a folder named as one of the ``n`` knees (P0000, ...) that no phantom run wrote: generating that knee
    would replace it, with everything in it."""
    for d in sorted(out.glob("P*")):
        if not (re.fullmatch(r"P\d{4,}", d.name) and int(d.name[1:]) < n and d.name == subject_id(int(d.name[1:]))):
            continue
        try:
            ours = json.loads((d / "metadata.json").read_text(encoding="utf-8")).get("generator") == "ctsma.phantom"
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise UserError(f"{d} is not a phantom knee (no phantom metadata.json) and knee {d.name} would replace "
                            "it; choose another --out folder")


def generate_cohort(settings: PhantomSettings, n: int, seed: int, out, workers: int = 1) -> Path:
    """Generate (or resume) a cohort of ``n`` knees in ``out``; returns the manifest path. With ``workers`` > 1 the
    knees are made in spawned worker processes: a Python script that calls this must do so under
    ``if __name__ == "__main__":``, because each worker imports the script."""
    if int(n) < 1:
        raise UserError(f"--n must be at least 1 (got {n})")
    if int(n) > MAX_KNEES:  # a huge n hung without a word, listing the knees to make
        raise UserError(f"--n must be at most {MAX_KNEES} (got {n})")
    if int(seed) < 0:
        raise UserError(f"--seed must be 0 or more (got {seed})")
    if int(workers) < 1:
        raise UserError(f"--workers must be at least 1 (got {workers})")
    out = ensure_writable_dir(out)
    shash = settings_hash(settings)
    info_path = out / "phantom.json"
    if info_path.is_file():
        try:
            old = json.loads(info_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            old = {}
        if old.get("settings_hash") != shash or old.get("seed") != seed:
            raise UserError(f"{out} holds a phantom cohort made with other settings or seed; "
                            "choose another --out folder or delete it")
    elif (out / "manifest.csv").exists():  # someone's own manifest, not a cohort of ours: never overwrite it
        raise UserError(f"{out} holds a manifest.csv that no phantom run wrote; choose another --out folder")
    _check_no_foreign_knee_folders(out, int(n))
    write_json(info_path, {"generator_version": GENERATOR_VERSION, "seed": int(seed), "n": int(n),
                           "settings_hash": shash, "settings": settings_dict(settings)})
    for leftover in out.glob(".P*.partial"):  # from an interrupted run: never a finished knee
        if re.fullmatch(r"\.P\d{4,}\..*\.partial", leftover.name):  # P0000 ... P9999, P10000 ...
            shutil.rmtree(leftover, ignore_errors=True)
    rows, todo = {}, []
    for i in range(int(n)):
        r = _done(out, subject_id(i), shash, int(seed))
        if r is None:
            todo.append(i)
        else:
            rows[i] = r
    if rows:
        progress.info(f"phantom: {len(rows)} of {n} knees already done, {len(todo)} to generate")
    if todo:
        sd = settings_dict(settings)
        if workers == 1 or len(todo) == 1:
            for i in progress.track(todo, "phantom", total=len(todo), unit="knee"):
                rows[i] = generate_knee(settings, seed, i, out)
        else:
            with worker_pool(min(int(workers), len(todo))) as ex:
                futs = {ex.submit(_run_one, (sd, int(seed), i, str(out))): i for i in todo}
                for f in progress.track(as_completed(futs), "phantom", total=len(todo), unit="knee"):
                    rows[futs[f]] = f.result()
    _warn_misses_rois(out, [rows[i] for i in range(int(n))], settings)
    return write_manifest(out, [rows[i] for i in range(int(n))])


def _misses(out: Path, row: dict, modality: str) -> str | None:
    """What of the knee's subchondral ROIs its ``modality`` image lacks (``"P0000: MFC, LFC (no voxel, no
    landmark)"``; the landmarks are the CT's), or None."""
    present = set(np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(out / row[f"{modality}_rois"])))).tolist())
    no_voxel = [r for r, v in ROIS.items() if v not in present]
    no_mark = []
    if modality == "ct":
        with open(out / row["landmarks"], encoding="utf-8") as fh:
            marked = {line.split(",", 1)[0] for line in fh.read().splitlines()[1:]}
        no_mark = [r for r in ROIS if r not in marked and r not in no_voxel]
    lacks = "no voxel, no landmark" if modality == "ct" else "no voxel"
    parts = ([f"{', '.join(no_voxel)} ({lacks})"] if no_voxel else []) + \
        ([f"{', '.join(no_mark)} (no landmark)"] if no_mark else [])
    return f"{row['subject']}: {'; '.join(parts)}" if parts else None


_NEEDED_BY = {"ct": ("ct_rois.nii.gz and landmarks.csv lack", "'ctsma dataset' and the registration's landmark "
                     "error need them"),
              "mr": ("mr_rois.nii.gz lacks", "the MR reference of those ROIs cannot be measured")}


def _warn_misses_rois(out: Path, rows: list[dict], settings: PhantomSettings) -> None:
    """Warn when the CT's or the MR's field of view misses subchondral ROIs of some knees: the CT-side stages need
    them in ``ct_rois.nii.gz`` and ``landmarks.csv`` (``ctsma dataset``'s ROIs, the registration's landmark
    error), the MR reference in ``mr_rois.nii.gz``. The other image, the transform and the true parameters stay
    valid, so it is no error."""
    from .settings import PRESETS
    for modality in ("ct", "mr"):
        short = [m for m in (_misses(out, r, modality) for r in rows) if m]
        if not short:
            continue
        key = f"{modality}_fov"
        fov = " x ".join(f"{v:g}" for v in getattr(settings, key))
        usual = " x ".join(f"{v:g}" for v in PRESETS[settings.preset].get(key, getattr(PhantomSettings, key)))
        listed = "; ".join(short[:4]) + (f"; and {len(short) - 4} more" if len(short) > 4 else "")
        lack, need = _NEEDED_BY[modality]
        warnings.warn(f"the {modality.upper()} field of view ({key} {fov} mm) misses subchondral ROIs of {len(short)} "
                      f"of {len(rows)} knees, so their {lack} them: {listed}; {need}: give a larger {key} (the "
                      f"{settings.preset} preset's is {usual} mm)", stacklevel=2)


def write_manifest(out: Path, rows: list[dict]) -> Path:
    import io as _io
    buf = _io.StringIO()
    w = csv.DictWriter(buf, fieldnames=MANIFEST_COLUMNS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: (repr(float(r[k])) if isinstance(r[k], float) else r[k]) for k in MANIFEST_COLUMNS})
    return write_text(Path(out) / "manifest.csv", buf.getvalue())


def load_manifest(directory):
    """The cohort manifest as a pandas DataFrame, with file columns resolved to absolute paths."""
    import pandas as pd
    d = Path(directory)
    mp = d / "manifest.csv" if d.is_dir() else d
    if not mp.is_file():
        raise InputImageError(f"phantom manifest not found: {mp} (run 'ctsma phantom --out {d}' first)")
    df = pd.read_csv(mp, dtype={"subject": str, "side": str})
    base = mp.parent.resolve()
    for col in list(FILES) + list(EXTRA_FILES):
        if col in df:
            df[col] = [str(base / v) for v in df[col]]
    return df

"""Multi-stage registration: presets, per-bone blending, the pipeline on analytic knee pairs, QA, errors, cohort."""

from __future__ import annotations

import json
import warnings

import numpy as np
import scipy.ndimage as ndi
import pandas as pd
import pytest
import SimpleITK as sitk

from ctsma.errors import ConfigError, InputImageError
from ctsma.registration import blend, load_preset, preset_names, register, variant, write_outputs
from ctsma.registration import stages as st
from ctsma.registration.cohort import Cohort, cohort_request, parse_shard, run_cohort, run_cohorts
from knee_pair import make_knee_pair

# A fast preset for tests: same stages as the default, fewer iterations, no B-spline.
FAST = {"threads": 1, "deformable": {"enabled": False},
        "rigid": {"iterations": 40}, "per_bone": {"iterations": 40}}


def tre(transform, pair):
    lm = pair.landmarks
    mapped = np.array([transform.TransformPoint(p) for p in lm[:, 1:4].tolist()])
    return np.linalg.norm(mapped - lm[:, 4:7], axis=1)


@pytest.fixture(scope="module")
def pair():
    return make_knee_pair(3)


@pytest.fixture(scope="module")
def full_result(pair):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return register(pair.mr, pair.ct, preset=load_preset("default", FAST), ct_bones=pair.ct_bones,
                        pseudo_ct=pair.pseudo_ct_ideal, mr_bones=pair.mr_bones)


# --- presets -------------------------------------------------------------------------------------------------

def test_shipped_presets_load_and_name_their_stages():
    names = preset_names()
    assert {"default", "demo", "nosynth", "pairing", "pairing_pct"} <= set(names)
    for n in names:
        p = load_preset(n)
        assert p.name == n
    assert load_preset("nosynth").use_synthesis is False
    assert load_preset("default").per_bone.bones == ["femur", "tibia"]


def test_preset_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="unknown registration preset"):
        load_preset("no_such_preset")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"rigid": {"iterashuns": 3}}))
    with pytest.raises(ConfigError, match="rigid.iterashuns"):
        load_preset(bad)
    with pytest.raises(ConfigError, match="metric"):
        load_preset({"rigid": {"metric": "psnr"}})
    v = variant(load_preset("default"), per_bone={"enabled": False})
    assert v.per_bone.enabled is False and v.rigid.enabled is True


# --- blending per-bone transforms ---------------------------------------------------------------------------

def _box_mask(ref, lo, hi):
    arr = np.zeros(sitk.GetArrayViewFromImage(ref).shape, np.uint8)
    arr[lo[2]:hi[2], lo[1]:hi[1], lo[0]:hi[0]] = 1
    m = sitk.GetImageFromArray(arr)
    m.CopyInformation(ref)
    return m


def test_blended_field_is_exactly_rigid_inside_each_bone_and_identity_far_away():
    ref = sitk.Image([40, 40, 60], sitk.sitkUInt8)
    femur = _box_mask(ref, (10, 10, 35), (30, 30, 55))
    tibia = _box_mask(ref, (10, 10, 5), (30, 30, 25))
    r_f = sitk.Euler3DTransform((20, 20, 45), 0.05, -0.03, 0.02, (1.0, -0.5, 0.3))
    r_t = sitk.Euler3DTransform((20, 20, 15), -0.08, 0.0, 0.04, (-0.7, 0.2, 1.1))
    grid = blend.field_grid(sitk.Or(femur, tibia), 1.0, 12.0)
    field = blend.blend_rigid(grid, [femur, tibia], [r_f, r_t], power=4, radius_mm=12, rigid_margin_mm=1.5)
    rng = np.random.default_rng(0)
    for mask_lo, mask_hi, r in (((11, 11, 36), (28, 28, 53), r_f), ((11, 11, 6), (28, 28, 23), r_t)):
        pts = rng.uniform(mask_lo, mask_hi, (50, 3))
        got = np.array([field.TransformPoint(p) for p in pts.tolist()])
        want = np.array([r.TransformPoint(p) for p in pts.tolist()])
        np.testing.assert_allclose(got, want, atol=1e-6)
    # far outside the bones (beyond the field) the displacement is zero
    far = (20.0, 20.0, 200.0)
    np.testing.assert_allclose(field.TransformPoint(far), far)
    # in the joint space the motion lies between the two bones' motions
    mid = np.array([20.0, 20.0, 30.0])
    got = np.array(field.TransformPoint(mid.tolist())) - mid
    df = np.array(r_f.TransformPoint(mid.tolist())) - mid
    dt = np.array(r_t.TransformPoint(mid.tolist())) - mid
    lo, hi = np.minimum(df, dt) - 1e-9, np.maximum(df, dt) + 1e-9
    assert np.all((got >= lo) & (got <= hi))


def test_kabsch_and_rigidify_recover_a_rigid_motion():
    rng = np.random.default_rng(1)
    src = rng.normal(size=(100, 3))
    r = sitk.Euler3DTransform((0, 0, 0), 0.2, -0.1, 0.3, (1, 2, 3))
    m = np.asarray(r.GetMatrix()).reshape(3, 3)
    rot, t = blend.kabsch(src, src @ m.T + [1, 2, 3])
    np.testing.assert_allclose(rot, m, atol=1e-10)
    np.testing.assert_allclose(t, [1, 2, 3], atol=1e-10)
    ref = sitk.Image([20, 20, 20], sitk.sitkUInt8)
    bone = _box_mask(ref, (5, 5, 5), (15, 15, 15))
    pts = blend.grid_points(ref)
    rigid = pts @ m.T + [1, 2, 3] - pts
    wobble = 0.3 * np.sin(pts[..., :1] / 3.0)  # a non-rigid deformation
    out = blend.rigidify(ref, rigid + wobble, [bone], strength=1.0, power=4, radius_mm=10, rigid_margin_mm=0.0)
    inside = sitk.GetArrayViewFromImage(bone) > 0
    fit_r, fit_t = blend.kabsch(pts[inside], pts[inside] + out[inside])
    np.testing.assert_allclose(pts[inside] @ fit_r.T + fit_t, pts[inside] + out[inside], atol=1e-8)


# --- the pipeline --------------------------------------------------------------------------------------------

def test_full_pipeline_recovers_per_bone_motion(pair, full_result):
    before = tre(sitk.Transform(), pair)
    after = tre(full_result.transform, pair)
    assert before.mean() > 2.0
    assert after.mean() < 0.45 and np.percentile(after, 95) < 0.8, after
    names = [s.name for s in full_result.stages]
    assert names == ["init", "rigid", "per_bone"]
    for s in full_result.stages:
        assert s.kept == (s.metric_after <= s.metric_before)
        assert s.seconds > 0 and s.metric == "correlation"
    assert full_result.bone_dice["femur"] > 0.8 and full_result.bone_dice["tibia"] > 0.8


def test_per_bone_stage_beats_global_rigid(pair, full_result):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rigid = register(pair.mr, pair.ct, preset=load_preset("default", {**FAST, "per_bone": {"enabled": False}}),
                         ct_bones=pair.ct_bones, pseudo_ct=pair.pseudo_ct_ideal)
    assert [s.name for s in rigid.stages] == ["init", "rigid"]
    assert tre(full_result.transform, pair).mean() < 0.6 * tre(rigid.transform, pair).mean()


def test_mr_bone_labels_only_score_the_registration(pair, full_result):
    """MR bone labels (on the phantom: ground truth) make the QA's bone Dice exact and nothing else: with wrong
    labels, or none, the transform is the same."""
    shifted = sitk.Image(pair.mr_bones)
    shifted.SetOrigin((np.asarray(shifted.GetOrigin()) + [15.0, -10.0, 8.0]).tolist())  # labels in the wrong place
    shifted = sitk.Resample(shifted, pair.mr_bones, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    preset = load_preset("default", FAST)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        wrong = register(pair.mr, pair.ct, preset=preset, ct_bones=pair.ct_bones, pseudo_ct=pair.pseudo_ct_ideal,
                         mr_bones=shifted)
        none = register(pair.mr, pair.ct, preset=preset, ct_bones=pair.ct_bones, pseudo_ct=pair.pseudo_ct_ideal)
    pts = pair.landmarks[:, 1:4].tolist()
    ref = np.array([full_result.transform.TransformPoint(q) for q in pts])
    for other in (wrong, none):
        assert np.array_equal(np.array([other.transform.TransformPoint(q) for q in pts]), ref)
    assert wrong.bone_dice["mean"] < full_result.bone_dice["mean"] - 0.2  # the QA scores the labels it was given


def test_a_stage_that_makes_the_metric_worse_is_rejected(pair, monkeypatch):
    real = st.linear_stage

    def spoiled(fixed, moving, current, cfg, *, kind, **kw):
        tx = real(fixed, moving, current, cfg, kind=kind, **kw)
        if kind == "affine":  # push the result 6 mm off
            tx.SetTranslation((np.asarray(tx.GetTranslation()) + [6.0, 0, 0]).tolist())
        return tx

    monkeypatch.setattr(st, "linear_stage", spoiled)
    preset = load_preset("default", {**FAST, "per_bone": {"enabled": False}, "affine": {"enabled": True,
                                                                                        "iterations": 5}})
    with pytest.warns(UserWarning, match="stage affine made the correlation metric worse"):
        res = register(pair.mr, pair.ct, preset=preset, ct_bones=pair.ct_bones, pseudo_ct=pair.pseudo_ct_ideal)
    rec = {s.name: s for s in res.stages}
    assert rec["affine"].kept is False and rec["affine"].metric_after > rec["affine"].metric_before
    assert rec["affine"].warning and rec["rigid"].kept
    # the result is the rigid stage's: 6 mm better than the rejected one
    assert tre(res.transform, pair).mean() < 1.5


def test_outputs_are_written_and_reopen(pair, full_result, tmp_path):
    qa = write_outputs(full_result, pair.mr, pair.ct, tmp_path)
    for name in ("transform_ct_to_mr.h5", "mr_in_ct.nii.gz", "pseudo_ct_in_ct.nii.gz", "qa.json",
                 "checkerboard_mr.png", "checkerboard_pseudo_ct.png"):
        assert (tmp_path / name).is_file(), name
    assert not list(tmp_path.glob(".*partial*"))
    tx = sitk.ReadTransform(str(tmp_path / "transform_ct_to_mr.h5"))
    np.testing.assert_allclose(tre(tx, pair), tre(full_result.transform, pair), atol=1e-6)
    mr_in_ct = sitk.ReadImage(str(tmp_path / "mr_in_ct.nii.gz"))
    assert mr_in_ct.GetSize() == pair.ct.GetSize()
    np.testing.assert_allclose(mr_in_ct.GetOrigin(), pair.ct.GetOrigin(), atol=1e-4)
    # its bone voxels show the MR where the true motion puts them (the phantom's own CT->MR map), not elsewhere
    bones = sitk.GetArrayFromImage(pair.ct_bones)
    kji = np.argwhere((bones == 1) | (bones == 2))[::7]
    pts = np.array([pair.ct.TransformIndexToPhysicalPoint(tuple(int(v) for v in q[::-1])) for q in kji])
    where = pair.ct_to_mr(pts, bones[tuple(kji.T)])
    mr = sitk.GetArrayFromImage(pair.mr).astype(np.float64)

    def mr_at(points):
        idx = np.array([pair.mr.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in points])[:, ::-1]
        return ndi.map_coordinates(mr, idx.T, order=1, mode="nearest")

    shown = sitk.GetArrayFromImage(mr_in_ct)[tuple(kji.T)]
    r_true, r_unmoved = np.corrcoef(shown, mr_at(where))[0, 1], np.corrcoef(shown, mr_at(pts))[0, 1]
    assert r_true > 0.75 and r_true > r_unmoved + 0.4, (r_true, r_unmoved)  # measured: 0.84 and 0.12
    on_disk = json.loads((tmp_path / "qa.json").read_text())
    assert on_disk["total_seconds"] == pytest.approx(qa["total_seconds"])
    assert [s["name"] for s in on_disk["stages"]] == ["init", "rigid", "per_bone"]
    for s in on_disk["stages"]:
        assert {"metric_before", "metric_after", "kept", "bone_dice", "seconds"} <= set(s)
    # the pseudo-CT in CT space matches the CT on bone (it is the ideal pseudo-CT here)
    pct = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "pseudo_ct_in_ct.nii.gz")))
    ct = sitk.GetArrayFromImage(pair.ct)
    inner = sitk.GetArrayFromImage(sitk.BinaryErode(pair.ct_bones > 0, [2, 2, 2])) > 0
    assert np.median(np.abs(pct[inner] - ct[inner])) < 150


# --- errors --------------------------------------------------------------------------------------------------

def test_clear_errors_for_wrong_inputs(pair):
    p = load_preset("default", FAST)
    with pytest.raises(InputImageError, match="Hounsfield"):  # MR given where the CT is expected
        register(pair.mr, pair.mr, preset=p, pseudo_ct=pair.pseudo_ct_ideal)
    with pytest.raises(InputImageError, match="give the MR first"):  # CT given as MR
        register(pair.ct, pair.ct, preset=p, ct_bones=pair.ct_bones, pseudo_ct=pair.pseudo_ct_ideal)
    empty = sitk.Image(pair.ct_bones.GetSize(), sitk.sitkUInt8)
    empty.CopyInformation(pair.ct_bones)
    with pytest.raises(InputImageError, match="no voxels for femur, tibia"):
        register(pair.mr, pair.ct, preset=p, ct_bones=empty, pseudo_ct=pair.pseudo_ct_ideal)
    flat = sitk.Image([40, 40], sitk.sitkFloat32)
    with pytest.raises(InputImageError, match="2D"):
        register(flat, pair.ct, preset=p, ct_bones=pair.ct_bones)
    with pytest.raises(InputImageError, match="synthesis model"):
        register(pair.mr, pair.ct, preset=p, ct_bones=pair.ct_bones)
    far = sitk.Image(pair.pseudo_ct_ideal)
    far.SetOrigin((np.asarray(far.GetOrigin()) + 500.0).tolist())
    mr_far = sitk.Image(pair.mr)
    mr_far.SetOrigin(far.GetOrigin())
    with pytest.raises(InputImageError, match="do not overlap"):
        register(mr_far, pair.ct, preset=variant(p, init={"enabled": False}), ct_bones=pair.ct_bones,
                 pseudo_ct=far)


# --- cohort mode ---------------------------------------------------------------------------------------------

def test_parse_shard():
    assert parse_shard("1/4") == (1, 4) and parse_shard(None) == (0, 1)
    for bad in ("4/4", "a/b", "1", "-1/3"):
        with pytest.raises(ConfigError):
            parse_shard(bad)
    # '--shard "$SHARD"' with the variable unset ran every job of an array on the whole cohort, as shard 0/1
    with pytest.raises(ConfigError, match="not ''"):
        parse_shard("")


def test_cohort_shards_resume_and_report(tmp_path, pair):
    rows = ["subject,mr,ct,ct_bones"]
    for s in ("kA", "kB"):
        for name in ("mr", "ct", "ct_bones"):
            sitk.WriteImage(getattr(pair, name), str(tmp_path / f"{s}_{name}.nii.gz"))
        rows.append(f"{s},{s}_mr.nii.gz,{s}_ct.nii.gz,{s}_ct_bones.nii.gz")
    rows.append("kC,missing_mr.nii.gz,kA_ct.nii.gz,")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    preset = load_preset("nosynth", {**FAST, "rigid": {"iterations": 10}, "per_bone": {"enabled": False}})
    out = tmp_path / "out"
    s0 = run_cohort(tmp_path / "manifest.csv", out, preset=preset, shard=(0, 2))
    assert list(s0.subject) == ["kA", "kC"]
    assert list(s0.status) == ["done", "failed"] and "not found" in s0.error.iloc[1]
    assert (out / "kA" / "qa.json").is_file() and not (out / "kB").exists()
    assert (out / "cohort_0of2.csv").is_file()
    again = run_cohort(tmp_path / "manifest.csv", out, preset=preset, shard=(0, 2))
    assert again.status.iloc[0].startswith("skipped")
    assert again.bone_dice_mean.iloc[0] == pytest.approx(s0.bone_dice_mean.iloc[0])  # its QA, not blanks
    # a scan corrected and exported again at the same path: redone, not kept
    sitk.WriteImage(sitk.Cast(pair.ct + 1.0, pair.ct.GetPixelID()), str(tmp_path / "kA_ct.nii.gz"))
    fresh = run_cohort(tmp_path / "manifest.csv", out, preset=preset, shard=(0, 2))
    assert fresh.status.iloc[0] == "done" and "redone" in fresh.note.iloc[0]
    # another preset into the same folder: the subject is redone, not kept from the first preset
    other = load_preset("nosynth", {**FAST, "rigid": {"iterations": 12}, "per_bone": {"enabled": False}})
    redone = run_cohort(tmp_path / "manifest.csv", out, preset=other, shard=(0, 2))
    assert redone.status.iloc[0] == "done" and "redone" in redone.note.iloc[0]
    qa = json.loads((out / "kA" / "qa.json").read_text())
    assert qa["request"]["preset_hash"] != json.loads(json.dumps(cohort_request({}, preset, None)))["preset_hash"]
    # a manifest with a header only is refused
    (tmp_path / "empty.csv").write_text("mr,ct\n")
    with pytest.raises(InputImageError, match="no rows"):
        run_cohort(tmp_path / "empty.csv", tmp_path / "e", preset=preset)


def test_a_cohort_rerun_redoes_pairs_whose_synthesis_model_was_retrained_at_the_same_path(tmp_path, pair, full_result,
                                                                                           monkeypatch):
    """The request recorded the synthesis model's path only: a model trained again into the same file left every
    registered pair 'skipped (done before)', registered through the old model's pseudo-CT. Its file's bytes stamp it
    now (whatever its size and time); records from before that stamp redo nothing."""
    import os
    import shutil

    import torch

    import ctsma.registration.pipeline as pipeline
    from ctsma.resources import resource_path
    from ctsma.synthesis.model import SynthesisModel

    model = tmp_path / "synth.safetensors"
    shutil.copyfile(resource_path("Models", "synthesis.safetensors"), model)
    for name in ("mr", "ct", "ct_bones"):
        sitk.WriteImage(getattr(pair, name), str(tmp_path / f"{name}.nii.gz"))
    (tmp_path / "manifest.csv").write_text("subject,mr,ct,ct_bones\nkA,mr.nii.gz,ct.nii.gz,ct_bones.nii.gz\n")
    monkeypatch.setattr(pipeline, "register", lambda *a, **k: full_result)  # the registration itself is not tested
    preset, out = load_preset("default", FAST), tmp_path / "out"

    def status():
        s = run_cohort(tmp_path / "manifest.csv", out, preset=preset, model_path=str(model))
        return s.status.iloc[0], s.note.iloc[0]

    assert status()[0] == "done"
    assert status()[0].startswith("skipped")
    before = model.stat()
    retrained = SynthesisModel.load(model)
    with torch.no_grad():
        next(retrained.net.parameters()).add_(0.01)
    retrained.save(model)
    os.utime(model, ns=(before.st_atime_ns, before.st_mtime_ns))  # its time kept, as cp -p or rsync -t would
    assert model.stat().st_size == before.st_size
    done, note = status()
    assert done == "done" and "redone" in note
    # a record from before the model was stamped is compared without that stamp: an upgrade redoes nothing
    qa = json.loads((out / "kA" / "qa.json").read_text())
    del qa["request"]["stamps"]["synthesis_model_sha256"]
    (out / "kA" / "qa.json").write_text(json.dumps(qa))
    assert status()[0].startswith("skipped")


def test_one_pair_records_which_synthesis_model_made_its_pseudo_ct(tmp_path, pair, full_result, monkeypatch):
    """``ctsma register MR CT`` recorded the images' stamps but not the synthesis model (cohort mode records it in
    its request): qa.json now names the model file and the SHA-256 of its bytes; a preset without a pseudo-CT
    names none."""
    import hashlib
    import shutil

    import ctsma.registration.pipeline as pipeline
    from ctsma.cli.main import main
    from ctsma.resources import resource_path

    model = tmp_path / "synth.safetensors"
    shutil.copyfile(resource_path("Models", "synthesis.safetensors"), model)
    for name in ("mr", "ct"):
        sitk.WriteImage(getattr(pair, name), str(tmp_path / f"{name}.nii.gz"))
    monkeypatch.setattr(pipeline, "register", lambda *a, **k: full_result)  # the registration itself is not tested
    args = ["--quiet", "register", str(tmp_path / "mr.nii.gz"), str(tmp_path / "ct.nii.gz")]
    assert main(args + ["--model", str(model), "--out", str(tmp_path / "a")]) == 0
    inputs = json.loads((tmp_path / "a" / "qa.json").read_text())["inputs"]
    assert inputs["synthesis_model"] == str(model.resolve())
    assert inputs["stamps"]["synthesis_model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert main(args + ["--preset", "nosynth", "--out", str(tmp_path / "b")]) == 0
    inputs = json.loads((tmp_path / "b" / "qa.json").read_text())["inputs"]
    assert "synthesis_model" not in inputs and set(inputs["stamps"]) == {"mr", "ct"}


def test_a_cohort_rerun_with_other_threads_skips_the_registered_pairs(tmp_path, pair):
    """The request recorded the preset's ITK thread count: a cohort registered as shards with --threads 1 (as the
    docs advise for repeatable registrations) was registered again entirely by a rerun without --threads (or with
    --jobs instead), which gives each pair the same one thread on two cores. Threads are hardware: only a real
    setting redoes a pair."""
    for name in ("mr", "ct", "ct_bones"):
        sitk.WriteImage(getattr(pair, name), str(tmp_path / f"{name}.nii.gz"))
    (tmp_path / "manifest.csv").write_text("subject,mr,ct,ct_bones\nkA,mr.nii.gz,ct.nii.gz,ct_bones.nii.gz\n")
    out = tmp_path / "out"

    def status(**over):
        settings = {**FAST, "rigid": {"iterations": 10}, "per_bone": {"enabled": False}, **over}
        s = run_cohort(tmp_path / "manifest.csv", out, preset=load_preset("nosynth", settings))
        return s.status.iloc[0], s.note.iloc[0]

    assert status(threads=1)[0] == "done"
    assert status(threads=0)[0].startswith("skipped")
    assert status(threads=2)[0].startswith("skipped")
    done, note = status(threads=0, rigid={"iterations": 11})  # another setting: redone
    assert done == "done" and "redone" in note
    assert status(threads=1, rigid={"iterations": 11})[0].startswith("skipped")


def test_a_cohort_split_into_other_shards_removes_the_summaries_of_the_earlier_split(tmp_path, capsys):
    """A cohort registered with --shard 1/2 and then with --shard 1/3 into one folder left cohort_1of2.csv beside
    cohort_1of3.csv, and no one could tell which was current. The shards of one split (a job array, run at the same
    time) keep each other's summaries, and a file that only looks like a summary is not touched."""
    from ctsma.cli.main import main

    manifest = tmp_path / "manifest.csv"  # pairs that fail at once (no images): the summaries are what is tested
    manifest.write_text("subject,mr,ct\n" + "".join(f"k{k},mr{k}.nii.gz,ct{k}.nii.gz\n" for k in range(4)))
    out = tmp_path / "out"

    def shard(i_n):
        assert main(["register", "--manifest", str(manifest), "--preset", "nosynth", "--shard", i_n,
                     "--out", str(out)]) == 1
        return {p.name for p in out.glob("cohort_*")}

    assert shard("0/2") == {"cohort_0of2.csv"}
    assert shard("1/2") == {"cohort_0of2.csv", "cohort_1of2.csv"}  # one split: both kept
    (out / "cohort_notes_of3.csv").write_text("mine")  # a user's file, not a summary
    capsys.readouterr()
    assert shard("1/3") == {"cohort_1of3.csv", "cohort_notes_of3.csv"}
    assert "cohort_0of2.csv, cohort_1of2.csv" in capsys.readouterr().err  # said, not silent
    assert list(pd.read_csv(out / "cohort_1of3.csv").subject) == ["k1"]
    assert shard("0/3") | shard("2/3") == {f"cohort_{i}of3.csv" for i in range(3)} | {"cohort_notes_of3.csv"}
    assert shard("0/1") == {"cohort_0of1.csv", "cohort_notes_of3.csv"}  # no --shard: one shard of 1
    assert len(pd.read_csv(out / "cohort_0of1.csv")) == 4


def test_a_killed_cohort_run_leaves_its_own_summary_and_not_the_earlier_runs(tmp_path, monkeypatch):
    """cohort_<i>of<N>.csv was written only at the end (or in a finally): a run killed outright (SIGKILL, no finally)
    left the earlier run's summary of its shard, with that run's statuses. It is now written before the first pair
    and after each, the pairs not reached marked 'not run'."""
    from ctsma.registration import cohort

    manifest = tmp_path / "manifest.csv"
    manifest.write_text("subject,mr,ct\n" + "".join(f"k{k},mr{k}.nii.gz,ct{k}.nii.gz\n" for k in range(3)))
    out = tmp_path / "out"
    summary = out / "cohort_0of1.csv"
    preset = load_preset("nosynth")
    cohort.run_cohort(manifest, out, preset=preset)  # the earlier run: every pair failed (no images)
    assert set(pd.read_csv(summary).status) == {"failed"}
    seen = []

    def killed_at_the_third(row, *args):
        seen.append(list(pd.read_csv(summary).status))  # what a SIGKILL now would leave
        if len(seen) == 3:
            raise KeyboardInterrupt
        return cohort._qa_record({}, row["subject"], "done", 1.0, 0, "")

    monkeypatch.setattr(cohort, "_run_one", killed_at_the_third)
    with pytest.raises(KeyboardInterrupt):
        cohort.run_cohort(manifest, out, preset=preset)
    stopped = "not run (the run stopped)"
    assert seen == [[stopped] * 3, ["done", stopped, stopped], ["done", "done", stopped]]
    assert list(pd.read_csv(summary).status) == ["done", "done", stopped]


def _transform_values(path):
    t = sitk.CompositeTransform(sitk.ReadTransform(str(path)))
    return [np.asarray(f(t.GetNthTransform(i))) for i in range(t.GetNumberOfTransforms())
            for f in (lambda x: x.GetParameters(), lambda x: x.GetFixedParameters())]


def test_several_cohorts_in_one_pool_give_each_cohorts_own_results(tmp_path, pair):
    """The demo registers the cohort and its variants in one pool of workers: every pair gets its own cohort's
    preset, output folder and summary, and the same transform as a cohort run on its own."""
    rows = ["subject,mr,ct"]
    for s in ("kA", "kB"):
        for name in ("mr", "ct"):
            sitk.WriteImage(getattr(pair, name), str(tmp_path / f"{s}_{name}.nii.gz"))
        rows.append(f"{s},{s}_mr.nii.gz,{s}_ct.nii.gz")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    man = tmp_path / "manifest.csv"
    fast = {**FAST, "rigid": {"iterations": 10}, "per_bone": {"enabled": False}}
    rigid = load_preset("nosynth", fast)
    affine = load_preset("nosynth", {**fast, "affine": {"enabled": True, "iterations": 10}})
    both = run_cohorts([Cohort(man, tmp_path / "rigid", rigid), Cohort(man, tmp_path / "affine", affine, limit=1)],
                       jobs=2)
    assert [list(t.subject) for t in both] == [["kA", "kB"], ["kA"]]
    assert all((t.status == "done").all() for t in both)
    assert (tmp_path / "rigid" / "cohort_0of1.csv").is_file() and (tmp_path / "affine" / "cohort_0of1.csv").is_file()
    assert not (tmp_path / "affine" / "kB").exists()
    stages = {d: [s["name"] for s in json.loads((tmp_path / d / "kA" / "qa.json").read_text())["stages"]]
              for d in ("rigid", "affine")}
    assert "affine" in stages["affine"] and "affine" not in stages["rigid"]
    alone = run_cohort(man, tmp_path / "alone", preset=affine, limit=1)
    assert list(alone.status) == ["done"]
    a, b = (_transform_values(tmp_path / d / "kA" / "transform_ct_to_mr.h5") for d in ("affine", "alone"))
    assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))


def test_cohort_workers_with_a_damaged_model_give_its_clear_error(tmp_path):
    """With --jobs > 1 the synthesis model is checked before the workers start: its one-line error, not a broken
    worker pool (each worker would fail to load it)."""
    from ctsma.errors import ModelFileError
    from ctsma.registration.presets import load_preset

    (tmp_path / "model.safetensors").write_bytes(b"not a model")
    (tmp_path / "manifest.csv").write_text("subject,mr,ct\nA,a_mr.nii.gz,a_ct.nii.gz\nB,b_mr.nii.gz,b_ct.nii.gz\n")
    with pytest.raises(ModelFileError):
        run_cohort(tmp_path / "manifest.csv", tmp_path / "out", preset=load_preset("demo"),
                   model_path=str(tmp_path / "model.safetensors"), jobs=2)


def _rigid_fit_rms(transform, pair, bone: int) -> float:
    """RMS (mm) by which ``transform`` departs from its best rigid fit (Kabsch) over ``bone``'s CT voxels."""
    lab = sitk.GetArrayFromImage(pair.ct_bones)
    kji = np.argwhere(lab == bone)[::3]
    p = np.array([pair.ct.TransformIndexToPhysicalPoint(tuple(int(v) for v in q[::-1])) for q in kji])
    q = np.array([transform.TransformPoint(tuple(x)) for x in p])
    pc, qc = p - p.mean(0), q - q.mean(0)
    u, _, vt = np.linalg.svd(pc.T @ qc)
    r = vt.T @ np.diag([1.0, 1.0, np.sign(np.linalg.det(vt.T @ u.T))]) @ u.T
    return float(np.sqrt(((qc - pc @ r.T) ** 2).sum(1).mean()))


def test_the_deformable_stage_deforms_and_keeps_each_bone_rigid(pair):
    """The B-spline stage (on in the default preset): it moves points (the bones bend when `bone_rigidity` is 0),
    and with the default rigidity each bone's part of the final transform is rigid to a hundredth of a millimetre
    while the landmarks stay sub-millimetre (measured: RMS 0.0007 / 0.0000 mm and TRE 0.26 mm, against 0.14 / 0.30
    mm and 0.35 mm unconstrained)."""
    results = {}
    for rigidity in (1.0, 0.0):
        de = {"enabled": True, "iterations": 10, "mesh_mm": 20.0, "bone_rigidity": rigidity}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            results[rigidity] = register(pair.mr, pair.ct, preset=load_preset("default", {**FAST, "deformable": de}),
                                         ct_bones=pair.ct_bones, pseudo_ct=pair.pseudo_ct_ideal)
    stages = {s.name: s for s in results[1.0].stages}
    assert "deformable" in stages and stages["deformable"].kept
    assert max(_rigid_fit_rms(results[1.0].transform, pair, b) for b in (1, 2)) < 0.01
    assert max(_rigid_fit_rms(results[0.0].transform, pair, b) for b in (1, 2)) > 0.05
    assert tre(results[1.0].transform, pair).mean() < 0.5


def _flipped_z(img):
    """The image with its header's z axis reversed: the upside-down export that a QA must catch."""
    out = sitk.Image(img)
    d = np.asarray(out.GetDirection()).reshape(3, 3)
    d[:, 2] *= -1
    out.SetDirection(d.ravel().tolist())
    return out


def test_a_failed_registration_says_so_everywhere(tmp_path, pair, capsys, monkeypatch):
    """An MR exported upside down (its header's z reversed): registered in memory, its bones miss the CT's (Dice
    0). Such a result gets a warning, qa.json's qa_problem, the cohort status 'qa failed' (kept on resume) and
    exit 1 from the command line; the outputs stay for inspection. From files, the MR's own bone labels already
    give it away: their femur lies below their tibia."""
    import ctsma.registration.pipeline as pipeline
    from ctsma.cli.main import main
    from ctsma.registration.cohort import QA_FAILED
    from ctsma.registration.qa import EXIT_QA_FAILED, MIN_BONE_DICE, registration_qa_problem
    preset = load_preset("nosynth", {**FAST, "rigid": {"iterations": 10}, "per_bone": {"enabled": False}})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        failed = register(_flipped_z(pair.mr), pair.ct, preset=preset, ct_bones=pair.ct_bones,
                          mr_bones=_flipped_z(pair.mr_bones))
    assert failed.bone_dice["femur"] < 0.05 and "femur Dice" in registration_qa_problem(
        {"bone_dice": failed.bone_dice}, MIN_BONE_DICE)
    for name, img in (("mr", pair.mr), ("ct", pair.ct), ("ct_bones", pair.ct_bones), ("flipped_mr", _flipped_z(pair.mr)),
                      ("flipped_mr_bones", _flipped_z(pair.mr_bones))):
        sitk.WriteImage(img, str(tmp_path / f"{name}.nii.gz"))
    (tmp_path / "flip.csv").write_text("subject,mr,ct,mr_bones\n"
                                       "flip,flipped_mr.nii.gz,ct.nii.gz,flipped_mr_bones.nii.gz\n")
    s = run_cohort(tmp_path / "flip.csv", tmp_path / "f", preset=preset)
    assert s.status.iloc[0] == "failed" and "upside down" in s.error.iloc[0]
    (tmp_path / "manifest.csv").write_text("subject,mr,ct,ct_bones\nbad,mr.nii.gz,ct.nii.gz,ct_bones.nii.gz\n")
    real = pipeline.register
    monkeypatch.setattr(pipeline, "register", lambda *a, **k: failed)  # the pair registers as above
    s = run_cohort(tmp_path / "manifest.csv", tmp_path / "out", preset=preset)
    assert list(s.status) == [QA_FAILED] and "femur Dice 0.00 < 0.6" in s.error.iloc[0]
    assert json.loads((tmp_path / "out" / "bad" / "qa.json").read_text())["qa_problem"].startswith("registration QA")
    assert (tmp_path / "out" / "bad" / "transform_ct_to_mr.h5").is_file()
    again = run_cohort(tmp_path / "manifest.csv", tmp_path / "out", preset=preset)  # resumed: its QA as it was
    assert list(again.status) == [QA_FAILED] and again.bone_dice_mean.iloc[0] == pytest.approx(0.0)
    (tmp_path / "nosynth.json").write_text(json.dumps(preset.to_dict()))
    rc = main(["--quiet", "register", str(tmp_path / "mr.nii.gz"), str(tmp_path / "ct.nii.gz"), "--preset",
               str(tmp_path / "nosynth.json"), "--out", str(tmp_path / "one")])
    err = capsys.readouterr().err
    assert rc == EXIT_QA_FAILED == 3 and "error: registration QA failed: femur Dice 0.00 < 0.6: the pair is not usable" in err
    assert (tmp_path / "one" / "qa.json").is_file()
    monkeypatch.setattr(pipeline, "register", real)
    good = run_cohort(tmp_path / "manifest.csv", tmp_path / "good", preset=preset)
    assert list(good.status) == ["done"] and good.error.iloc[0] == ""
    events = tmp_path / "events.jsonl"  # one pair from the command line: an event (and a line) as each stage ends
    assert main(["--quiet", "--progress-jsonl", str(events), "register", str(tmp_path / "mr.nii.gz"),
                 str(tmp_path / "ct.nii.gz"), "--ct-bones", str(tmp_path / "ct_bones.nii.gz"), "--preset",
                 str(tmp_path / "nosynth.json"), "--out", str(tmp_path / "one_good")]) == 0
    steps = [json.loads(line) for line in events.read_text().splitlines()]
    assert [(e["stage"], e["done"], e["total"]) for e in steps] == [("register", 1, 2), ("register", 2, 2)]
    assert "init" in steps[0]["message"] and "rigid" in steps[1]["message"]


def test_cohort_refuses_to_overwrite_or_misplace(tmp_path, pair):
    for name in ("mr", "ct", "ct_bones"):
        sitk.WriteImage(getattr(pair, name), str(tmp_path / f"{name}.nii.gz"))
    preset = load_preset("nosynth", {**FAST, "rigid": {"iterations": 10}, "per_bone": {"enabled": False}})
    # a folder holding a transform no registration wrote (a phantom's truth): refused, the file untouched
    (tmp_path / "out" / "kA").mkdir(parents=True)
    (tmp_path / "out" / "kA" / "transform_ct_to_mr.h5").write_bytes(b"the truth")
    (tmp_path / "m.csv").write_text("subject,mr,ct\nkA,mr.nii.gz,ct.nii.gz\n")
    s = run_cohort(tmp_path / "m.csv", tmp_path / "out", preset=preset)
    assert s.status.iloc[0] == "failed" and "no 'ctsma register' run wrote" in s.error.iloc[0]
    assert (tmp_path / "out" / "kA" / "transform_ct_to_mr.h5").read_bytes() == b"the truth"
    # a folder of this command's whose rerun was killed while moving its files in (qa.json removed first): redone
    from ctsma.registration.cohort import OWNER_MARKER
    (tmp_path / "own" / "kA").mkdir(parents=True)
    (tmp_path / "own" / "kA" / "transform_ct_to_mr.h5").write_bytes(b"half moved")
    (tmp_path / "own" / "kA" / OWNER_MARKER).touch()
    assert list(run_cohort(tmp_path / "m.csv", tmp_path / "own", preset=preset).status) == ["done"]
    # rows whose outputs would land in the cohort's own folder, or with no image, are refused up front
    for bad, match in (("subject,mr,ct\n,mr.nii.gz,ct.nii.gz\n", "no subject name"),
                       ("subject,mr,ct\n.,mr.nii.gz,ct.nii.gz\n", "no subject name"),
                       ("subject,mr,ct\nkB,mr.nii.gz,\n", "ct column is empty for subject.* kB")):
        (tmp_path / "bad.csv").write_text(bad)
        with pytest.raises(InputImageError, match=match):
            run_cohort(tmp_path / "bad.csv", tmp_path / "o2", preset=preset)
    # the subchondral ROI image given as the bone labels (MFC=1, LFC=2 side by side): refused by name
    from ctsma.registration.masks import read_bone_labels
    rois = np.zeros(sitk.GetArrayViewFromImage(pair.ct_bones).shape, np.uint8)
    rois[20:26, 20:30, 10:20], rois[20:26, 20:30, 30:40] = 1, 2
    img = sitk.GetImageFromArray(rois)
    img.CopyInformation(pair.ct)
    sitk.WriteImage(img, str(tmp_path / "rois.nii.gz"))
    with pytest.raises(InputImageError, match="does not lie above the tibia.*rois.nii.gz"):
        read_bone_labels(tmp_path / "rois.nii.gz", pair.ct)
    assert read_bone_labels(tmp_path / "ct_bones.nii.gz", pair.ct).GetSize() == pair.ct.GetSize()


def test_no_valid_samples_is_no_overlap(pair):
    """ITK reports a metric without valid samples as the largest double: that is 'no overlap' (inf, null in
    qa.json), not a finite number printed with 309 digits."""
    far = sitk.TranslationTransform(3, (500.0, 0.0, 0.0))
    mask = sitk.Cast(pair.ct_bones > 0, sitk.sitkUInt8)
    v = st.evaluate(pair.ct, pair.mr, far, metric="mattes_mi", bins=32, mask=mask)
    assert v == float("inf")


def test_a_label_image_given_as_the_mr_is_refused(pair, tmp_path, capsys):
    """mr_rois.nii.gz or mr_bones.nii.gz given as the MR passed the MR checks (never negative): it was registered,
    with bone Dice 0.0, and exit code 3 blamed the images' orientation. It is refused as a label image, before any
    work, as dataset build and synthesis apply refuse it."""
    from ctsma.cli.main import main

    labels = sitk.Cast(sitk.BinaryThreshold(pair.mr, 300.0, 1e9, 1, 0) + 2 * (pair.mr > 800), sitk.sitkUInt8)
    with pytest.raises(InputImageError, match="a label image, not an MR"):
        register(labels, pair.ct, preset=load_preset("nosynth", FAST), ct_bones=pair.ct_bones)
    sitk.WriteImage(labels, str(tmp_path / "mr_rois.nii.gz"))
    sitk.WriteImage(pair.ct, str(tmp_path / "ct.nii.gz"))
    assert main(["register", str(tmp_path / "mr_rois.nii.gz"), str(tmp_path / "ct.nii.gz"), "--preset", "nosynth",
                 "--out", str(tmp_path / "out")]) == 2
    assert "a label image, not an MR" in capsys.readouterr().err
    assert not (tmp_path / "out" / "qa.json").exists()


def test_manifest_rows_with_extra_cells_are_refused_not_shifted(tmp_path):
    """A row with more cells than the header made pandas take the first column for an index and shift the others:
    'P1,mr.nii.gz,ct.nii.gz,extra' was registered as subject mr.nii.gz with the CT 'extra', and a trailing comma on
    every row ('P1,mr.nii.gz,ct.nii.gz,') read the MR as the subject and left the CT empty. A header typed with spaces
    ('subject, mr, ct') was refused for lacking mr and ct."""
    from ctsma.registration.cohort import read_manifest

    man = tmp_path / "m.csv"
    man.write_text("subject,mr,ct\nP1,mr.nii.gz,ct.nii.gz\nP2,mr2.nii.gz,ct2.nii.gz,extra\n")
    with pytest.raises(InputImageError, match="line 3 has 4 cells, the header 3"):
        read_manifest(man)
    man.write_text("subject,mr,ct\nP1,mr.nii.gz,ct.nii.gz,\nP2,mr2.nii.gz,ct2.nii.gz,\n")
    df = read_manifest(man)
    assert list(df.subject) == ["P1", "P2"] and df.ct[1] == str((tmp_path / "ct2.nii.gz").resolve())
    man.write_text("subject, mr, ct\nP1, mr.nii.gz, ct.nii.gz \n")
    df = read_manifest(man)
    assert df.subject[0] == "P1" and df.mr[0] == str((tmp_path / "mr.nii.gz").resolve())


def test_one_pair_records_absolute_input_paths_and_refuses_a_file_as_out(tmp_path, pair, full_result, monkeypatch,
                                                                        capsys):
    """qa.json's inputs kept the MR and CT paths as typed ('in dir/mr.nii.gz'), relative to a folder no later reader
    knows (the synthesis model's was absolute); --out naming a file said only 'File exists'."""
    import ctsma.registration.pipeline as pipeline
    from ctsma.cli.main import main

    (tmp_path / "in dir").mkdir()
    for name in ("mr", "ct"):
        sitk.WriteImage(getattr(pair, name), str(tmp_path / "in dir" / f"{name}.nii.gz"))
    monkeypatch.setattr(pipeline, "register", lambda *a, **k: full_result)  # the registration itself is not tested
    monkeypatch.chdir(tmp_path)
    args = ["--quiet", "register", "in dir/mr.nii.gz", "in dir/ct.nii.gz", "--preset", "nosynth"]
    assert main(args + ["--out", "out dir"]) == 0
    inputs = json.loads((tmp_path / "out dir" / "qa.json").read_text())["inputs"]
    assert inputs["mr"] == str((tmp_path / "in dir" / "mr.nii.gz").resolve())
    assert inputs["ct"] == str((tmp_path / "in dir" / "ct.nii.gz").resolve())
    (tmp_path / "afile").write_text("")
    assert main(args + ["--out", "afile"]) == 2
    assert "output path afile exists and is not a folder" in capsys.readouterr().err

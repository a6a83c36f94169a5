"""The MR-CT patch-dataset builder on a tiny synthetic cohort with known transforms and a known MR texture."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).parent))
from test_segmentation import analytic_knee  # noqa: E402

from ctsma import ROIS  # noqa: E402
from ctsma.dataset import PatchStore  # noqa: E402
from ctsma.dataset.build import (BuildSettings, assign_splits, build_dataset,  # noqa: E402
                                 registration_qa_problem)
from ctsma.dataset.sampling import cut, patch_reference  # noqa: E402
from ctsma.errors import UserError  # noqa: E402
from ctsma.io.images import AIR_FLOOR_HU  # noqa: E402
from ctsma.segmentation import subchondral_rois  # noqa: E402

PERIOD, THICK = 4.4, 1.6   # MR texture: dark (bone) plates normal to LPS z in CT space; BV/TV 0.36


def plates(z):
    """The MR texture as a function of the CT-space LPS z (mm): bone 0.1 inside plates, marrow 1.0."""
    return np.where(np.mod(z, PERIOD) < THICK, 0.1, 1.0).astype(np.float32)


def patch_z(centres_lps, size, extent):
    """LPS z of every voxel of axis-aligned CT-space patches (n, size, size, size)."""
    sp = extent / size
    off = -0.5 * extent + 0.5 * sp + sp * np.arange(size)
    z = centres_lps[:, 2][:, None] + off[None]
    return np.broadcast_to(z[:, :, None, None], (len(centres_lps), size, size, size))


def make_subject(root: Path, name: str, ct: sitk.Image, rois: sitk.Image, angle: float, shift):
    d = root / name
    d.mkdir(parents=True)
    t = sitk.Euler3DTransform((0, 0, 0), np.deg2rad(angle), 0.0, np.deg2rad(angle / 2), tuple(shift))  # CT -> MR
    # MR(q) = plates(z of T^-1(q)), evaluated exactly on the MR grid around the joint
    mr = sitk.Image(200, 170, 90, sitk.sitkFloat32)
    mr.SetSpacing((0.5, 0.5, 0.5))
    mr.SetOrigin(tuple(np.array((-50.0, -35.0, -22.0)) + np.array(shift)))
    inv = t.GetInverse()
    a_inv = np.asarray(inv.GetMatrix()).reshape(3, 3)
    b_inv = np.asarray(inv.TransformPoint((0.0, 0.0, 0.0)))
    kk, jj, ii = np.meshgrid(*(np.arange(n) for n in mr.GetSize()[::-1]), indexing="ij")
    q = np.stack([ii, jj, kk], -1) * 0.5 + np.asarray(mr.GetOrigin())
    zc = q @ a_inv[2] + b_inv[2]
    arr = plates(zc)
    mr = sitk.GetImageFromArray(arr)
    mr.SetSpacing((0.5, 0.5, 0.5))
    mr.SetOrigin(tuple(np.array((-50.0, -35.0, -22.0)) + np.array(shift)))
    sitk.WriteImage(ct, str(d / "ct.nii.gz"))
    sitk.WriteImage(mr, str(d / "mr.nii.gz"))
    sitk.WriteImage(rois, str(d / "ct_rois.nii.gz"))
    sitk.WriteTransform(t, str(d / "transform_ct_to_mr.h5"))
    return {"subject": name, "side": "R", "ct": f"{name}/ct.nii.gz", "mr": f"{name}/mr.nii.gz",
            "ct_rois": f"{name}/ct_rois.nii.gz", "transform_ct_to_mr": f"{name}/transform_ct_to_mr.h5",
            **{f"true_{r}_BV/TV": 1 / 3 for r in ROIS}}, t


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    root = tmp_path_factory.mktemp("cohort")
    ct, bones = analytic_knee(spacing=1.0)
    rois = subchondral_rois(ct, bones)
    rows, tx = [], {}
    for i in range(3):
        row, t = make_subject(root, f"k{i}", ct, rois, angle=3.0 * i, shift=(1.5 * i, -i, 0.5))
        rows.append(row)
        tx[row["subject"]] = t
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    return root, tx, ct


# The texture is point-sampled on the MR grid (no partial volume), so the bvf reference does not apply to it.
SMALL = dict(max_per_roi=6, stride_mm=3.0, mr_size=16, truth=False, min_per_roi=2, quality=False,
             mr_threshold="otsu-patch")


def test_build_with_given_transforms(cohort, tmp_path):
    root, tx, ct = cohort
    s = BuildSettings(transform_column="transform_ct_to_mr", **dict(SMALL, truth=True, quality=True))
    summary = build_dataset(root / "manifest.csv", tmp_path / "ds", s)
    store = PatchStore(tmp_path / "ds")
    t = store.table
    assert summary["n_subjects"] == 3 and len(store) == summary["n_patches"] == len(t)
    assert set(t["roi"]) == set(ROIS) and t.groupby(["subject", "roi"]).size().max() <= 6
    assert store.ct_shape == (16, 16, 16) and store.mr_shape == (16, 16, 16)
    # splits are by patient: every subject in exactly one part; folds are per subject
    assert t.groupby("subject")["split"].nunique().max() == 1 and t.groupby("subject")["fold"].nunique().max() == 1
    assert set(t["split"]) <= {"train", "val", "test"} and "train" in set(t["split"])
    # the MR patch through the transform shows the CT-space texture at the same place
    ras = t[["centre_x", "centre_y", "centre_z"]].to_numpy()
    lps = ras * np.array([-1, -1, 1])
    expect = plates(patch_z(lps, 16, s.extent_mm))
    got = store.read("mr", np.arange(len(t)))[:, 0]
    for e, g in zip(expect, got):
        assert np.corrcoef(e.ravel(), g.ravel())[0, 1] > 0.8   # 0.5-mm MR: partial volume at plate edges
    # MR morphometry: BV/TV per patch agrees with the texture's bone fraction inside the patch's ROI part
    # (computed directly in CT space on a 0.25-mm grid); plates 1.6 mm thick, MR voxels 0.5 mm
    rois = sitk.ReadImage(str(root / "k0" / "ct_rois.nii.gz"))
    sel = np.flatnonzero(t["subject"] == "k0")
    c = lps[sel]
    fine = plates(patch_z(c, 32, s.extent_mm)) < 0.55
    lab = cut(rois, c, 32, s.extent_mm, interpolator=sitk.sitkNearestNeighbor, pixel_type=sitk.sitkUInt8)
    want = np.array([fine[i][lab[i] == ROIS[r]].mean() for i, r in enumerate(t["roi"].to_numpy()[sel])])
    got_bv = t["mr_BV/TV"].to_numpy()[sel]
    assert np.nanmedian(np.abs(got_bv - want)) < 0.1, (got_bv, want)
    assert 1.2 < np.nanmedian(t["mr_Tb.Th"]) < 2.2
    # CT patches are in HU and the masks are the patch's ROI
    ctm = store.read("ct_mask", np.arange(len(t)))
    assert ctm.reshape(len(t), -1).mean(1).min() >= 0.4
    # ... exactly what SimpleITK resamples at each centre (linear, air outside the image and floored, as a student
    # sees it; the ROI label image nearest-neighbour): the vectorised cutting neither shifts nor flips a patch
    ctp = store.read("ct", np.arange(len(t)))[:, 0]
    roi_images = {k: sitk.ReadImage(str(root / k / "ct_rois.nii.gz")) for k in set(t["subject"])}
    for i, (c, k, r) in enumerate(zip(lps, t["subject"], t["roi"])):
        ref = patch_reference(c, 16, s.extent_mm)
        want = sitk.GetArrayFromImage(sitk.Resample(ct, ref, sitk.Transform(), sitk.sitkLinear, -1000.0,
                                                    sitk.sitkFloat32))
        np.testing.assert_allclose(ctp[i], np.maximum(want, AIR_FLOOR_HU), atol=1e-2)
        lab = sitk.GetArrayFromImage(sitk.Resample(roi_images[k], ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0))
        np.testing.assert_array_equal(ctm[i, 0], lab == ROIS[r])
    assert np.ptp(ctp.reshape(len(t), -1), axis=1).min() > 100  # every patch shows structure a flip would move
    assert np.allclose(t["true_BV/TV"], 1 / 3)   # per-ROI manifest truth (no phantom metadata here)
    info = json.loads((tmp_path / "ds" / "summary.json").read_text())
    assert set(info["patches_per_subject_roi"]) == {"k0", "k1", "k2"}
    # each knee's CT resolution is recorded (for the student's model file): the analytic knee is blurred by a
    # 0.7-mm Gaussian on a 1-mm grid
    res = json.loads(store.attrs["subject_info"])["k0"]["ct_resolution"]
    assert res["spacing_mm"] == [1.0, 1.0, 1.0] and res["inplane_edge_sigma_mm"] == pytest.approx(0.7, rel=0.15)
    assert (tmp_path / "ds" / "quality" / "patch_pairs.png").stat().st_size > 1000


def test_registered_transforms_and_qa_exclusion(cohort, tmp_path):
    root, tx, _ = cohort
    reg = tmp_path / "reg"
    for name, t in tx.items():
        if name == "k1":
            continue                      # no registration at all
        (reg / name).mkdir(parents=True)
        sitk.WriteTransform(t, str(reg / name / "transform_ct_to_mr.h5"))
        dice = 0.3 if name == "k2" else 0.9
        (reg / name / "qa.json").write_text(json.dumps({"stages": [], "bone_dice": {"femur": dice, "tibia": 0.9}}))
    summary = build_dataset(root / "manifest.csv", tmp_path / "ds", BuildSettings(**SMALL), registrations=reg)
    assert summary["n_subjects"] == 1 and PatchStore(tmp_path / "ds").subjects == ["k0"]
    # a knee never registered (a shard not run) was 'registration incomplete', which sent users looking for a
    # half-written folder: it is said not to be registered, naming the folder looked for
    assert "femur Dice 0.30" in summary["excluded"]["k2"]
    assert summary["excluded"]["k1"].startswith(f"not registered: no folder {reg / 'k1'} (register it")
    (reg / "k1").mkdir()
    again = build_dataset(root / "manifest.csv", tmp_path / "ds", BuildSettings(**SMALL), registrations=reg)
    assert again["excluded"]["k1"].startswith(f"registration incomplete in {reg / 'k1'}")


def test_interrupted_build_resumes_from_shards(cohort, tmp_path, monkeypatch):
    import ctsma.dataset.build as b

    root, _, _ = cohort
    s = BuildSettings(transform_column="transform_ct_to_mr", **SMALL)
    real = b.build_subject
    calls = []

    def flaky(row, *a, **k):
        calls.append(row["subject"])
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(row, *a, **k)

    monkeypatch.setattr(b, "build_subject", flaky)
    with pytest.raises(KeyboardInterrupt):
        build_dataset(root / "manifest.csv", tmp_path / "ds", s)
    assert not (tmp_path / "ds" / "patches.h5").exists()          # nothing half-written
    assert len(list((tmp_path / "ds" / ".shards").glob("*.npz"))) == 1
    calls.clear()
    monkeypatch.setattr(b, "build_subject", lambda row, *a, **k: (calls.append(row["subject"]), real(row, *a, **k))[1])
    summary = build_dataset(root / "manifest.csv", tmp_path / "ds", s)
    assert calls == ["k1", "k2"] and summary["n_subjects"] == 3      # only the unfinished subjects rebuilt


def test_few_patches_warn_and_splits_by_patient(cohort, tmp_path):
    root, _, _ = cohort
    s = BuildSettings(transform_column="transform_ct_to_mr", **dict(SMALL, max_per_roi=1, min_per_roi=3))
    with pytest.warns(UserWarning, match="only 1 valid patches"):
        with pytest.warns(UserWarning, match="only 1 usable knee.*no test patient"):  # said now, not by evaluate
            summary = build_dataset(root / "manifest.csv", tmp_path / "ds", s, subjects=["k0"])
    assert any("no test patient" in w for w in summary["warnings"])
    sp = assign_splits([f"s{i}" for i in range(24)], BuildSettings())
    parts = [v[0] for v in sp.values()]
    assert parts.count("test") == 5 and parts.count("val") == 4 and parts.count("train") == 15
    assert sorted({v[1] for v in sp.values()}) == [0, 1, 2, 3, 4]


def test_a_split_without_training_patients_is_said_at_build_time(cohort, tmp_path):
    """test_fraction 0.9 of 3 knees put every knee in the test set without a word; training refused it later."""
    root, _, _ = cohort
    s = BuildSettings(transform_column="transform_ct_to_mr", test_fraction=0.9, **SMALL)
    with pytest.warns(UserWarning, match=r"no train and no val patient \(test_fraction 0.9, val_fraction 0.2\)"):
        summary = build_dataset(root / "manifest.csv", tmp_path / "ds", s)
    assert set(PatchStore(tmp_path / "ds").table["split"]) == {"test"}
    assert any("'ctsma train' with it will refuse" in w for w in summary["warnings"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        warnings.filterwarnings("ignore", message="only .* valid patches")
        build_dataset(root / "manifest.csv", tmp_path / "ok", BuildSettings(transform_column="transform_ct_to_mr",
                                                                          **SMALL))


def test_qa_rules():
    assert registration_qa_problem({"bone_dice": {"femur": 0.9, "tibia": 0.95}}, 0.6) is None
    assert "tibia" in registration_qa_problem({"bone_dice": {"femur": 0.9, "tibia": 0.2}}, 0.6)
    assert registration_qa_problem({"passed": False}, 0.6)
    assert registration_qa_problem({"stages": [{"kept": True, "bone_dice": {"femur": 0.1}}]}, 0.6)


def test_cli_dataset(cohort, tmp_path):
    from ctsma.cli.main import main

    root, _, _ = cohort
    rc = main(["--quiet", "dataset", "build", "--manifest", str(root / "manifest.csv"), "--out", str(tmp_path / "o"),
               "--transform-column", "transform_ct_to_mr", "--max-per-roi", "2", "--no-truth", "--subjects", "k1, k2"])
    assert rc == 0 and PatchStore(tmp_path / "o").subjects == ["k1", "k2"]  # "P1,P2" as synthesis takes them
    assert main(["--quiet", "dataset", "build", "--manifest", str(tmp_path / "none.csv"), "--out",
                 str(tmp_path / "x")]) == 2


def test_parallel_build_gives_the_same_store(cohort, tmp_path):
    """Subjects built in two processes give the store that one process gives, patch for patch, also after this
    process ran numba's parallel code: the workers are spawned, since numba documents a fork from a process using
    its OpenMP layer as unsafe (forked workers were killed so in one full run of this suite)."""
    import numba

    from ctsma.morphometry import local_thickness

    block = np.zeros((40, 40, 40), bool)
    block[10:30, 10:30, 15:20] = True
    local_thickness(block, threads=2)
    assert numba.threading_layer() in ("omp", "tbb", "workqueue")  # a parallel region has run here
    root, _, _ = cohort
    s = BuildSettings(transform_column="transform_ct_to_mr", **SMALL)
    build_dataset(root / "manifest.csv", tmp_path / "one", s)
    build_dataset(root / "manifest.csv", tmp_path / "two", s, workers=2)
    a, b = PatchStore(tmp_path / "one"), PatchStore(tmp_path / "two")
    pd.testing.assert_frame_equal(a.table, b.table)
    idx = np.arange(len(a))
    for k in ("ct", "mr", "ct_mask", "mr_mask"):
        np.testing.assert_array_equal(a.read(k, idx), b.read(k, idx))


def test_ct_edge_sigma_blurs_every_ct_to_one_sharpness(cohort, tmp_path):
    root, tx, ct = cohort
    base = dict(SMALL, transform_column="transform_ct_to_mr", max_per_roi=3)
    build_dataset(root / "manifest.csv", tmp_path / "as_is", BuildSettings(**base), subjects=["k0"])
    with pytest.warns(UserWarning, match="softer in-plane"):   # the analytic CT (0.7 mm) is softer than 0.3 mm
        build_dataset(root / "manifest.csv", tmp_path / "soft", BuildSettings(**base, ct_edge_sigma_mm=0.3),
                      subjects=["k0"])
    build_dataset(root / "manifest.csv", tmp_path / "matched", BuildSettings(**base, ct_edge_sigma_mm=1.0),
                  subjects=["k0"])
    res = json.loads(PatchStore(tmp_path / "matched").attrs["subject_info"])["k0"]["ct_resolution"]
    assert res["inplane_edge_sigma_raw_mm"] == pytest.approx(0.7, rel=0.15)
    assert res["inplane_edge_sigma_mm"] == pytest.approx(1.0, abs=0.006)
    assert res["harmonisation_blur_mm"] == pytest.approx(np.sqrt(1.0 - res["inplane_edge_sigma_raw_mm"] ** 2), rel=0.1)
    a, m = PatchStore(tmp_path / "as_is"), PatchStore(tmp_path / "matched")
    assert a.table[["centre_x", "centre_y", "centre_z"]].equals(m.table[["centre_x", "centre_y", "centre_z"]])
    ca, cm = a.read("ct", np.arange(len(a))), m.read("ct", np.arange(len(m)))
    assert np.abs(np.diff(cm, axis=-1)).mean() < 0.9 * np.abs(np.diff(ca, axis=-1)).mean()  # smoother in-plane
    assert np.abs(cm.mean() - ca.mean()) < 0.02 * np.abs(ca).mean()                        # same HU on average
    np.testing.assert_array_equal(PatchStore(tmp_path / "soft").read("ct", np.arange(len(a))), ca)
    assert a.table["mr_BV/TV"].equals(m.table["mr_BV/TV"])                                 # the MR is untouched


@pytest.mark.parametrize("interp", [sitk.sitkLinear, sitk.sitkNearestNeighbor])
def test_vectorised_cut_equals_simpleitk_on_an_oblique_anisotropic_grid(interp):
    """`cut` without a transform takes a vectorised path; it must give SimpleITK's resampling, voxel for voxel,
    on a grid with a rotated direction and anisotropic spacing, and air (the default) outside the image."""
    rng = np.random.default_rng(3)
    img = sitk.GetImageFromArray(rng.normal(0, 100, (18, 26, 30)).astype(np.float32))
    img.SetSpacing((0.7, 0.45, 1.3))
    img.SetOrigin((4.0, -7.0, 2.5))
    rot = sitk.VersorTransform((0.3, -0.5, 0.8), 0.4)
    img.SetDirection(rot.GetMatrix())
    inside = [img.TransformContinuousIndexToPhysicalPoint(tuple(rng.uniform(2, n - 3) for n in img.GetSize()))
              for _ in range(6)]
    edge = [img.TransformContinuousIndexToPhysicalPoint((0.0, 13.0, 9.0))]  # half the patch outside the image
    centres = np.array(inside + edge)
    got = cut(img, centres, 8, 5.0, interpolator=interp, default=-1000.0)
    for g, c in zip(got, centres):
        want = sitk.GetArrayFromImage(sitk.Resample(img, patch_reference(c, 8, 5.0), sitk.Transform(), interp,
                                                    -1000.0, sitk.sitkFloat32))
        np.testing.assert_allclose(g, want, atol=1e-3)
    assert (got[-1] == -1000.0).mean() > 0.2 and (got[-1] != -1000.0).mean() > 0.2


def test_the_default_mr_reference_measures_partial_volume_plates_in_mm():
    """The store's default MR reference (`bvf`): BFFE-like patches of plates 0.3 mm thick every 1.2 mm, imaged
    with true partial volume in 0.25-mm voxels (thinner than two voxels, as trabeculae are), give BV/TV, Tb.Th and
    Tb.Sp near the plates' own on the 2x finer grid the binarisation returns (its spacing must be halved)."""
    from ctsma.dataset.build import mr_reference_binary
    from ctsma.morphometry import measure_batch

    vox, fine, thick, period = 0.25, 0.005, 0.3, 1.2
    k = int(round(vox / fine))
    patches = []
    for shift in (0.0, 0.07, 0.161):  # plates at three sub-voxel positions
        z = (np.arange(32 * k) + 0.5) * fine + shift
        profile = 1.0 - (np.mod(z, period) < thick).reshape(32, k).mean(1)
        patches.append(np.broadcast_to(profile[:, None, None], (32, 32, 32)))
    mr = (np.stack(patches) * 0.9 + np.random.default_rng(0).normal(0, 0.01, (3, 32, 32, 32))).astype(np.float32)
    masks = np.ones(mr.shape, np.uint8)
    bone, bmasks, sp, _ = mr_reference_binary(mr, masks, "bvf", vox)
    assert sp == (vox / 2,) * 3 and bone.shape == (3, 64, 64, 64) and bmasks.shape == bone.shape
    res = measure_batch(bone, sp, masks=bmasks, workers=1)
    np.testing.assert_allclose(res["BV/TV"], thick / period, atol=0.03)
    np.testing.assert_allclose(res["Tb.Th"], thick, atol=0.07)
    np.testing.assert_allclose(res["Tb.Sp"], period - thick, atol=0.1)


def test_the_phantom_truth_is_regenerated_where_the_transform_puts_the_patch(tmp_path):
    """`true_patches` (the truth behind `regression_vs_truth`) regenerates the phantom's microstructure in the MR
    frame around each transformed CT patch. Where it calls bone, the knee's own MR (bone dark) must be darker than
    where it calls marrow: measured 0.91-0.95 of the marrow signal with the true transform, and 0.96-0.99 when the
    patch is misplaced by 0.7 mm, less than one trabecular spacing, which this test also checks."""
    import scipy.ndimage as ndi
    from test_phantom import TINY

    from ctsma.dataset.build import true_patches
    from ctsma.dataset.sampling import roi_centres
    from ctsma.phantom import generate_cohort, make_settings

    row = pd.read_csv(generate_cohort(make_settings("demo", TINY), 1, 5, tmp_path / "c", workers=1)).iloc[0]
    root = tmp_path / "c"
    rois, mr = sitk.ReadImage(str(root / row["ct_rois"])), sitk.ReadImage(str(root / row["mr"]))
    tf = sitk.ReadTransform(str(root / row["transform_ct_to_mr"]))
    rng = np.random.default_rng(0)
    centres = np.concatenate([roi_centres(rois, v, 4.0, 8.0, 0.5, 2, rng)[0] for v in ROIS.values()])
    s = BuildSettings()
    mr_arr = sitk.GetArrayFromImage(mr).astype(np.float64)

    def bone_over_marrow(transform) -> np.ndarray:
        truth = true_patches((root / row["ct"]).parent, transform, centres, s)
        n = truth.shape[1]
        off = -0.5 * s.truth_extent_mm + (np.arange(n) + 0.5) * s.truth_extent_mm / n
        zz, yy, xx = (g.ravel()[::7] for g in np.meshgrid(off, off, off, indexing="ij"))
        out = []
        for c, b in zip(centres, truth):
            q = [tf.TransformPoint((c[0] + x, c[1] + y, c[2] + z)) for x, y, z in zip(xx, yy, zz)]
            idx = np.array([mr.TransformPhysicalPointToContinuousIndex(p) for p in q])[:, ::-1]
            v, bb = ndi.map_coordinates(mr_arr, idx.T, order=1, mode="nearest"), b.ravel()[::7]
            out.append(v[bb].mean() / v[~bb].mean())
        return np.array(out)

    assert len(centres) == 8
    assert bone_over_marrow(tf).max() < 0.96
    shifted = sitk.CompositeTransform(3)
    shifted.AddTransform(tf)
    shifted.AddTransform(sitk.TranslationTransform(3, (0.6, 0.4, 0.0)))  # the truth box 0.7 mm off
    assert bone_over_marrow(shifted).mean() > 0.96


def _registrations(tx, reg: Path, dice=0.9, request=None):
    for name, t in tx.items():
        (reg / name).mkdir(parents=True, exist_ok=True)
        sitk.WriteTransform(t, str(reg / name / "transform_ct_to_mr.h5"))
        qa = {"stages": [], "bone_dice": {"femur": dice, "tibia": 0.9}}
        if request:
            qa["request"] = request(name)
        (reg / name / "qa.json").write_text(json.dumps(qa))


def test_a_rerun_sees_changed_registrations_and_images(cohort, tmp_path):
    """Cached shards are keyed by the files they came from: a registration that now fails its QA, or was removed,
    excludes its knee on the next run; untouched knees are reused, not rebuilt."""
    root, tx, _ = cohort
    reg = tmp_path / "reg"
    _registrations(tx, reg)
    out = tmp_path / "ds"
    first = build_dataset(root / "manifest.csv", out, BuildSettings(**SMALL), registrations=reg)
    assert first["n_subjects"] == 3
    kept = (out / ".shards" / "k0.npz").stat().st_mtime_ns
    (reg / "k2" / "qa.json").write_text(json.dumps({"stages": [], "bone_dice": {"femur": 0.2, "tibia": 0.9}}))
    (reg / "k1" / "qa.json").unlink()
    again = build_dataset(root / "manifest.csv", out, BuildSettings(**SMALL), registrations=reg)
    assert again["n_subjects"] == 1 and PatchStore(out).subjects == ["k0"]
    assert "femur Dice 0.20" in again["excluded"]["k2"] and "incomplete" in again["excluded"]["k1"]
    assert (out / ".shards" / "k0.npz").stat().st_mtime_ns == kept  # k0's files did not change: reused


def test_registrations_of_other_images_or_a_label_image_as_mr_are_excluded(cohort, tmp_path):
    root, tx, _ = cohort
    reg = tmp_path / "reg"
    other = tmp_path / "other_mr.nii.gz"
    sitk.WriteImage(sitk.ReadImage(str(root / "k0" / "mr.nii.gz")), str(other))
    # k0 was registered from another MR file; k1 records no request (registered by an earlier version); k2's
    # project was moved after its registration (other paths, the same files)
    from ctsma.io.atomic import input_stamp

    def request(name):
        mr = other if name == "k0" else root / name / "mr.nii.gz"
        base = Path("/elsewhere") if name == "k2" else root
        return {} if name == "k1" else {"mr": str(base / name / "mr.nii.gz") if name == "k2" else str(mr),
                                        "ct": str(base / name / "ct.nii.gz"),
                                        "stamps": {"mr": input_stamp(mr), "ct": input_stamp(root / name / "ct.nii.gz")}}
    _registrations(tx, reg, request=request)
    table = pd.read_csv(root / "manifest.csv")
    table.loc[table.subject == "k1", "mr"] = "k1/ct_rois.nii.gz"  # a label image in the mr column
    for col in ("ct", "mr", "ct_rois", "transform_ct_to_mr"):
        table[col] = [str(root / v) for v in table[col]]
    table.to_csv(tmp_path / "m.csv", index=False)
    summary = build_dataset(tmp_path / "m.csv", tmp_path / "ds", BuildSettings(**SMALL), registrations=reg)
    assert PatchStore(tmp_path / "ds").subjects == ["k2"]
    assert "made from another MR" in summary["excluded"]["k0"]
    assert "a label image, not an MR" in summary["excluded"]["k1"]


def test_refused_up_front(cohort, tmp_path):
    root, tx, _ = cohort
    foreign = tmp_path / "infer_out"
    foreign.mkdir()
    (foreign / "summary.json").write_text("{}")
    with pytest.raises(UserError, match="no patch store"):  # another tool's folder is not overwritten
        build_dataset(root / "manifest.csv", foreign, BuildSettings(**SMALL), registrations=tmp_path)
    assert (foreign / "summary.json").read_text() == "{}"
    with pytest.raises(UserError, match="is not a folder"):
        build_dataset(root / "manifest.csv", tmp_path / "d1", BuildSettings(**SMALL), registrations=tmp_path / "no")
    with pytest.raises(UserError, match="no column 'transform'"):
        build_dataset(root / "manifest.csv", tmp_path / "d2", BuildSettings(transform_column="transform", **SMALL))
    table = pd.read_csv(root / "manifest.csv")
    table["subject"] = ["", "k1", "NA"]
    table.to_csv(tmp_path / "blank.csv", index=False)
    with pytest.raises(UserError, match="line.s. 2 have no subject name"):
        build_dataset(tmp_path / "blank.csv", tmp_path / "d3", BuildSettings(**SMALL), registrations=tmp_path)


def test_a_rebuild_removes_what_killed_runs_left(cohort, tmp_path):
    root, _, _ = cohort
    out = tmp_path / "ds"
    s = BuildSettings(transform_column="transform_ct_to_mr", **dict(SMALL, quality=True))
    (out / "quality").mkdir(parents=True)
    dead = [out / ".patches.h5.partial-999999999", out / ".patches.csv.partial-999999999",
            out / "quality" / ".patch_pairs.x1y2.partial.png", out / "quality" / ".parameters.x1y2.partial.png"]
    for f in dead:
        f.write_bytes(b"left by a killed run")
    build_dataset(root / "manifest.csv", out, s)
    assert not [f for f in dead if f.exists()]
    assert (out / "quality" / "patch_pairs.png").is_file() and (out / "patches.h5").is_file()
    # a rebuild without figures removes the earlier build's (they showed another store), keeping a user's file
    (out / "quality" / "notes.txt").write_text("the user's")
    build_dataset(root / "manifest.csv", out, BuildSettings(transform_column="transform_ct_to_mr", **SMALL))
    assert sorted(p.name for p in (out / "quality").iterdir()) == ["notes.txt"]


def _restored(img: sitk.Image, axis: int) -> sitk.Image:
    """The same physical image stored the other way along ``axis`` (x, y, z): its array reversed, that axis's
    direction negated and the origin moved to the other end (as a scanner writing the slices the other way)."""
    arr = sitk.GetArrayFromImage(img)
    out = sitk.GetImageFromArray(np.flip(arr, 2 - axis).copy())
    out.SetSpacing(img.GetSpacing())
    d = np.array(img.GetDirection()).reshape(3, 3)
    d[:, axis] *= -1
    end = [0, 0, 0]
    end[axis] = img.GetSize()[axis] - 1
    out.SetOrigin(img.TransformIndexToPhysicalPoint(end))
    out.SetDirection(tuple(d.ravel()))
    return out


def _blob_roi() -> sitk.Image:
    zz, yy, xx = np.mgrid[:30, :80, :70]
    a = (((zz - 14) ** 2 / 60 + (yy - 40) ** 2 / 500 + (xx - 35) ** 2 / 400) < 1).astype(np.uint8)
    a[14, 40, 5:] = 1  # not symmetric
    img = sitk.GetImageFromArray(np.pad(a, 12))  # a patch's half width from the edges, as a knee in its CT
    img.SetSpacing((0.4, 0.45, 0.7))  # even and odd cube widths in voxels (20, 18, 11)
    img.SetOrigin((-12.3, 40.1, 7.7))
    return img


def test_patch_centres_do_not_depend_on_the_order_in_which_the_image_is_stored():
    """The centre grid is anchored on the ROI's first voxel in index space: the same ROI stored with its slices (or
    columns) the other way gave other centres; on a phantom knee 32 instead of 20 patches in one ROI, and its BV/TV
    mean 0.304 against 0.292. The grid is now laid on the array viewed along S, P and L, the same for any storage
    (and, for an image stored that way, as before: the demo's figures did not move)."""
    from ctsma.dataset.sampling import roi_centres
    from ctsma.segmentation.geometry import lps_to_index

    img = _blob_roi()

    def centres(im, n=10 ** 6):
        return roi_centres(im, 1, 4.0, 8.0, 0.5, n, np.random.default_rng(3))

    base, n_valid = centres(img)
    assert n_valid == len(base) >= 15
    for stored in [_restored(img, a) for a in range(3)] + [sitk.PermuteAxes(img, [2, 0, 1]),
                                                          sitk.PermuteAxes(_restored(img, 1), [1, 2, 0]),
                                                          sitk.ConstantPad(img, [3, 0, 5], [0, 2, 0], 0)]:
        c, n = centres(stored)
        assert n == n_valid and np.allclose(c, base, atol=1e-9)  # the same points, in the same order
        assert np.allclose(centres(stored, 7)[0], centres(img, 7)[0], atol=1e-9)  # and the same random subset
    idx = lps_to_index(img, base)
    assert np.allclose(idx, np.rint(idx), atol=1e-9)  # voxel centres, inside the ROI
    assert all(sitk.GetArrayViewFromImage(img)[tuple(i)] for i in np.rint(idx).astype(int))


def test_a_missing_image_is_named_as_missing_not_as_registered_from_another(cohort, tmp_path):
    """A typo in the mr column, with a registration that records its images: the knee is excluded because its MR
    is not found, not because 'its registration was made from another MR' (which sent the user to register it
    again)."""
    root, tx, _ = cohort
    from ctsma.io.atomic import input_stamp

    reg = tmp_path / "reg"
    _registrations(tx, reg, request=lambda name: {
        "mr": str(root / name / "mr.nii.gz"), "ct": str(root / name / "ct.nii.gz"),
        "stamps": {k: input_stamp(root / name / f"{k}.nii.gz") for k in ("mr", "ct")}})
    table = pd.read_csv(root / "manifest.csv")
    table.loc[table.subject == "k0", "mr"] = "k0/mr_typo.nii.gz"
    for col in ("ct", "mr", "ct_rois", "transform_ct_to_mr"):
        table[col] = [str(root / v) for v in table[col]]
    table.to_csv(tmp_path / "typo.csv", index=False)
    summary = build_dataset(tmp_path / "typo.csv", tmp_path / "ds", BuildSettings(**SMALL), registrations=reg)
    assert "not found" in summary["excluded"]["k0"] and "mr_typo" in summary["excluded"]["k0"]
    assert "another MR" not in summary["excluded"]["k0"]


def test_a_damaged_shard_is_rebuilt_not_a_traceback(cohort, tmp_path):
    """A shard cut short (a copy of the output folder interrupted, a full disk) raised zipfile.BadZipFile from the
    rerun; it is rebuilt like any shard that cannot be reused."""
    root, _, _ = cohort
    s = BuildSettings(transform_column="transform_ct_to_mr", **SMALL)
    out = tmp_path / "ds"
    first = build_dataset(root / "manifest.csv", out, s)
    shard = out / ".shards" / "k1.npz"
    data = shard.read_bytes()
    for damaged in (data[: len(data) // 2], data[:-30]):
        shard.write_bytes(damaged)
        again = build_dataset(root / "manifest.csv", out, s)
        assert again["n_patches"] == first["n_patches"] and not again["excluded"]
        assert shard.read_bytes() == data

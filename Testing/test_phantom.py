"""Digital knee phantom: files and contracts, exact transforms and labels, determinism, resume,
validation, truth microstructure (controllability, convergence, OA direction)."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from ctsma import PARAMETERS, ROIS
from ctsma.cli.main import main as cli_main
from ctsma.errors import ConfigError, UserError
from ctsma.jit import TINY_KNEE as TINY  # a phantom knee that builds in a few seconds
from ctsma.phantom import generate_cohort, generate_knee, knee_model, load_manifest, make_settings, truth_binary
from ctsma.phantom.cohort import FILES
from ctsma.phantom.pose import euler_matrix
from ctsma.phantom.subject import micro_design, sample_subject

# Small, coarse settings so a knee takes about a second; the physics is the same as the presets.


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("phantom") / "cohort"
    cfg = out.parent / "tiny.json"
    cfg.write_text(json.dumps(TINY))
    rc = cli_main(["--quiet", "phantom", "--n", "2", "--seed", "5", "--out", str(out), "--config", str(cfg)])
    assert rc == 0
    return out


def test_manifest_and_files_follow_the_contract(cohort):
    df = pd.read_csv(cohort / "manifest.csv")
    expected = (["subject", "side", "kl_grade", "oa", "severity"] + list(FILES)
                + [f"true_{r}_{p}" for r in ROIS for p in PARAMETERS])
    assert list(df.columns[:len(expected)]) == expected
    assert len(df) == 2 and set(df["side"]) <= {"L", "R"}
    assert ((df["oa"] == (df["kl_grade"] >= 2).astype(int))).all()
    assert df["severity"].between(0, 1).all()
    for col in FILES:
        for rel in df[col]:
            assert not Path(rel).is_absolute() and (cohort / rel).is_file()
    for r in ROIS:
        assert df[f"true_{r}_BV/TV"].between(0.05, 0.7).all()
        assert df[f"true_{r}_Tb.Th"].between(0.08, 0.6).all()
        assert df[f"true_{r}_Tb.Sp"].between(0.2, 2.0).all()
    m = load_manifest(cohort)
    assert Path(m.loc[0, "mr"]).is_absolute() and Path(m.loc[0, "mr"]).is_file()
    meta = json.loads((cohort / df.loc[0, "subject"] / "metadata.json").read_text())
    assert meta["generator_version"] and meta["seed"] == 5 and meta["settings"]["mr_spacing"] == TINY["mr_spacing"]


def test_images_reopen_with_consistent_geometry_and_labels(cohort):
    knee = cohort / "P0000"
    for mod in ("mr", "ct"):
        img = sitk.ReadImage(str(knee / f"{mod}.nii.gz"))
        for lab in ("bones", "rois", "tissues"):
            li = sitk.ReadImage(str(knee / f"{mod}_{lab}.nii.gz"))
            assert li.GetSize() == img.GetSize()
            assert np.allclose(li.GetOrigin(), img.GetOrigin()) and np.allclose(li.GetSpacing(), img.GetSpacing())
        bones = sitk.GetArrayFromImage(sitk.ReadImage(str(knee / f"{mod}_bones.nii.gz")))
        assert {1, 2, 10, 11} <= set(np.unique(bones)) <= {0, 1, 2, 3, 4, 10, 11, 12}
        rois = sitk.GetArrayFromImage(sitk.ReadImage(str(knee / f"{mod}_rois.nii.gz")))
        assert set(np.unique(rois)) == {0, 1, 2, 3, 4}
        # ROIs lie inside the right bone: femoral ROIs in the femur, tibial ROIs in the tibia
        assert (bones[(rois == 1) | (rois == 2)] == 1).all() and (bones[(rois == 3) | (rois == 4)] == 2).all()
    assert sitk.ReadImage(str(knee / "ct.nii.gz")).GetPixelID() == sitk.sitkInt16


def test_landmarks_map_exactly_through_the_stored_transform(cohort):
    knee = cohort / "P0001"
    tf = sitk.ReadTransform(str(knee / "transform_ct_to_mr.h5"))
    lm = pd.read_csv(knee / "landmarks.csv")
    assert list(lm.columns) == ["roi", "ct_x", "ct_y", "ct_z", "mr_x", "mr_y", "mr_z"]
    assert set(lm["roi"]) == set(ROIS) and len(lm) >= 12
    model = knee_model(knee)
    ct_rois = sitk.ReadImage(str(knee / "ct_rois.nii.gz"))
    for r in lm.itertuples():
        q = np.array(tf.TransformPoint((r.ct_x, r.ct_y, r.ct_z)))
        assert np.abs(q - [r.mr_x, r.mr_y, r.mr_z]).max() < 1e-3
        # same anatomy: the analytic ROI at the MR point, and the CT label at the CT point
        assert model.evaluate(q[None])["roi"][0] == ROIS[r.roi]
        idx = ct_rois.TransformPhysicalPointToIndex((r.ct_x, r.ct_y, r.ct_z))
        assert ct_rois[idx] == ROIS[r.roi]
    # the global pose is a real difference between the frames (several mm)
    d = np.hypot.reduce(lm[["ct_x", "ct_y", "ct_z"]].to_numpy() - lm[["mr_x", "mr_y", "mr_z"]].to_numpy(), axis=1)
    assert d.min() > 1.0


def test_ct_labels_are_the_truth_seen_through_the_transform(cohort):
    knee = cohort / "P0000"
    tf = sitk.ReadTransform(str(knee / "transform_ct_to_mr.h5"))
    img = sitk.ReadImage(str(knee / "ct_tissues.nii.gz"))
    arr = sitk.GetArrayFromImage(img)
    model = knee_model(knee)
    rng = np.random.default_rng(0)
    bone_vox = np.argwhere((arr >= 1) & (arr <= 4))
    pick = np.concatenate([bone_vox[rng.choice(len(bone_vox), 300)],
                           np.stack([rng.integers(0, n, 300) for n in arr.shape], -1)])
    q = np.array([tf.TransformPoint(img.TransformIndexToPhysicalPoint([int(x), int(y), int(z)]))
                  for z, y, x in pick])
    assert (model.evaluate(q)["tissue"] == arr[tuple(pick.T)]).all()


def test_mr_and_ct_intensities_are_plausible(cohort):
    from scipy import ndimage
    knee = cohort / "P0000"
    ct = sitk.GetArrayFromImage(sitk.ReadImage(str(knee / "ct.nii.gz"))).astype(float)
    ctt = sitk.GetArrayFromImage(sitk.ReadImage(str(knee / "ct_tissues.nii.gz")))
    mr = sitk.GetArrayFromImage(sitk.ReadImage(str(knee / "mr.nii.gz")))
    mrt = sitk.GetArrayFromImage(sitk.ReadImage(str(knee / "mr_tissues.nii.gz")))

    def med(img, lab, code, it=2):
        m = ndimage.binary_erosion(lab == code, iterations=it) if it else lab == code
        return float(np.median(img[m]))
    assert med(ct, ctt, 0) < -950
    assert -140 < med(ct, ctt, 22) < -60
    assert 20 < med(ct, ctt, 23) < 70
    assert 150 < med(ct, ctt, 2, 3) < 800            # trabecular tibia, partial volume of bone and marrow
    # BFFE: fat bright, muscle darker, meniscus dark, marrow bright but darkened by trabeculae
    assert med(mr, mrt, 22) > 2 * med(mr, mrt, 23)
    assert med(mr, mrt, 21, 0) < 0.3 * med(mr, mrt, 22)
    assert 0.3 * med(mr, mrt, 22) < med(mr, mrt, 2, 3) < med(mr, mrt, 22)


def test_same_seed_gives_identical_files(tmp_path):
    s = make_settings("demo", TINY)
    generate_knee(s, 9, 3, tmp_path / "a")
    generate_knee(s, 9, 3, tmp_path / "b")
    for f in sorted((tmp_path / "a" / "P0003").iterdir()):
        g = tmp_path / "b" / "P0003" / f.name
        if f.suffix == ".h5":  # HDF5 stores object times: compare the transform itself
            ta, tb = sitk.ReadTransform(str(f)), sitk.ReadTransform(str(g))
            pa = sitk.CompositeTransform(ta).GetNthTransform(0).GetParameters()
            pb = sitk.CompositeTransform(tb).GetNthTransform(0).GetParameters()
            assert pa == pb
        elif f.name == "metadata.json":
            ma, mb = json.loads(f.read_text()), json.loads(g.read_text())
            for m in (ma, mb):
                m.pop("timing_s"), m.pop("cpu_s"), m["truth"].pop("pid")
            assert ma == mb
        else:
            assert sha(f) == sha(g), f.name


def test_resume_skips_finished_knees_and_cleans_partials(cohort, tmp_path):
    out = tmp_path / "c"
    shutil.copytree(cohort, out)
    keep = out / "P0000" / "mr.nii.gz"
    before = keep.stat().st_mtime_ns
    shutil.rmtree(out / "P0001")
    (out / ".P0001.abc.partial").mkdir()
    (out / ".P10000.abc.partial").mkdir()  # of a cohort of more than 10,000 knees (it was left behind)
    s = make_settings("demo", TINY)
    generate_cohort(s, 2, 5, out)
    assert keep.stat().st_mtime_ns == before
    assert (out / "P0001" / "ct.nii.gz").is_file() and not (out / ".P0001.abc.partial").exists()
    assert not (out / ".P10000.abc.partial").exists()
    assert pd.read_csv(out / "manifest.csv").equals(pd.read_csv(cohort / "manifest.csv"))
    with pytest.raises(UserError, match="other settings or seed"):
        generate_cohort(s, 2, 6, out)


def test_another_n_keeps_the_knees_in_the_folder(cohort, tmp_path):
    """Knee i does not depend on n (``generate_knee`` is not given it), and the demo's phantom stage relies on a
    cohort of another n resuming in the same folder: the knees there are kept, the manifest lists the first n."""
    out = tmp_path / "c"
    shutil.copytree(cohort, out)
    stamps = {f: f.stat().st_mtime_ns for f in out.glob("P*/*")}
    s = make_settings("demo", TINY)
    first = pd.read_csv(cohort / "manifest.csv")
    generate_cohort(s, 1, 5, out)
    assert pd.read_csv(out / "manifest.csv").equals(first.iloc[:1])
    generate_cohort(s, 2, 5, out)
    assert pd.read_csv(out / "manifest.csv").equals(first)
    assert {f: f.stat().st_mtime_ns for f in out.glob("P*/*")} == stamps


@pytest.mark.parametrize("over, msg", [
    ({"mr_spacing": [-0.3, 0.3, 0.3]}, "mr_spacing"),
    ({"ct_fov": [0, 10, 10]}, "ct_fov"),
    ({"bvtv": 0.05}, "impossible"),
    ({"bvtv": 0.6, "tb_th": 0.1, "tb_sp": 1.0}, "impossible"),
    ({"mr_spacing": [0.05, 0.05, 0.05], "mr_subsample_mm": 0.05}, "M voxels"),
    ({"nonsense": 1}, "unknown setting"),
])
def test_invalid_settings_are_refused(over, msg):
    with pytest.raises(ConfigError, match=msg):
        make_settings("demo", over)


def test_cli_errors_before_any_work(tmp_path, capsys):
    out = tmp_path / "never"
    assert cli_main(["phantom", "--n", "2", "--out", str(out), "--preset", "huge"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert cli_main(["phantom", "--n", "0", "--out", str(out)]) == 2
    assert not out.exists()


def test_a_huge_n_is_refused_at_once(tmp_path, capsys):
    """--n 99999999999999999999 hung without a word (the list of knees to make grew until memory ran out)."""
    import threading

    out = tmp_path / "never"
    rc = []
    t = threading.Thread(target=lambda: rc.append(cli_main(["phantom", "--n", "99999999999999999999",
                                                            "--out", str(out)])), daemon=True)
    t.start()
    t.join(60)
    assert rc == [2], "no answer within a minute"
    assert "--n must be at most 100000" in capsys.readouterr().err and not out.exists()


def test_euler_matrix_matches_itk():
    t = sitk.Euler3DTransform()
    t.SetRotation(0.1, -0.2, 0.3)
    assert np.allclose(np.array(t.GetMatrix()).reshape(3, 3),
                       euler_matrix([math.degrees(0.1), math.degrees(-0.2), math.degrees(0.3)]))


def test_truth_binary_is_deterministic_and_box_independent(cohort):
    meta = json.loads((cohort / "P0000" / "metadata.json").read_text())
    c = np.array(meta["truth"]["patches"]["MTP"]["centres_mm"][0])
    a = truth_binary(cohort / "P0000", c, (40, 30, 20), 0.04)
    b = truth_binary(meta, c + np.array([0.4, 0.2, 0.12]), (16, 12, 10), 0.04)
    assert a.shape == (20, 30, 40) and a.dtype == bool
    assert np.array_equal(a[3:13, 5:17, 10:26], b)
    assert 0.05 < a.mean() < 0.8


def test_microstructure_targets_are_controllable():
    from ctsma.morphometry import measure_batch
    from ctsma.phantom.anatomy import FieldFrames
    from ctsma.phantom.texture import TILE_SAMPLES_PER_WAVELENGTH, occupancy, tile
    from ctsma.phantom.subject import _rotation
    _, g = tile()
    h, n = 0.04, 60
    ax = np.arange(n) * h
    zz, yy, xx = np.meshgrid(ax, ax, ax, indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel(), zz.ravel()], -1)
    for bv, th, sp in ((0.22, 0.16, 0.70), (0.33, 0.24, 0.60)):
        d = micro_design(bv, th, sp)
        scale = TILE_SAMPLES_PER_WAVELENGTH / d["wavelength"]
        bins = []
        for k in range(3):
            rng = np.random.default_rng(k)
            ff = FieldFrames(_rotation(rng)[None] * scale, rng.uniform(0, 128, (1, 3)), np.array([g.mean() * scale]))
            occ = occupancy(pts, np.zeros(len(pts), int), np.full(len(pts), d["tp"]), np.full(len(pts), d["tr"]),
                            ff, np.zeros((1, 3)), 1.0, hard=True)
            bins.append(occ.reshape(n, n, n) > 0.5)
        r = {k: float(np.mean(v)) for k, v in measure_batch(np.stack(bins), (h, h, h), workers=1).items()}
        assert r["BV/TV"] == pytest.approx(bv, rel=0.15)
        assert r["Tb.Th"] == pytest.approx(th, rel=0.15)
        assert r["Tb.Sp"] == pytest.approx(sp, rel=0.15)


def test_truth_morphometry_has_converged(cohort):
    """Halving the truth voxel changes the mean Tb.Th by less than 5 %."""
    from ctsma.morphometry import measure_batch
    meta = json.loads((cohort / "P0000" / "metadata.json").read_text())
    c = np.array(meta["truth"]["patches"]["LTP"]["centres_mm"][0])
    res = []
    for h in (0.04, 0.02):
        n = int(round(1.6 / h))
        b = truth_binary(meta, c - (n - 1) / 2 * h, (n, n, n), h, trabecular_only=True)
        res.append(float(measure_batch(b[None], (h, h, h), workers=1)["Tb.Th"][0]))
    assert abs(res[1] - res[0]) / res[1] < 0.05


def test_oa_thickens_medial_subchondral_bone_more_than_lateral():
    s = make_settings("demo", TINY)
    p0 = sample_subject(s, 1, 2)
    frac = {}
    for sev in (0.0, 1.0):
        p = json.loads(json.dumps(p0))
        p["severity"] = sev
        model = knee_model({"subject": p})
        for roi in ("MTP", "LTP"):
            t = p["anatomy"]["tibia"]
            cx = p["anatomy"]["roi"]["tib_cx"] * (1 if roi == "MTP" else -1) * (1 if p["side"] == "R" else -1)
            zt = t["zt_med"] if roi == "MTP" else t["zt_lat"]
            c = np.array([cx, t["y0"], zt - 3.5])
            assert model.evaluate(c[None])["roi"][0] == ROIS[roi]
            b = truth_binary({"subject": p}, c - 0.8, (40, 40, 40), 0.04, trabecular_only=True)
            frac[roi, sev] = b.mean()
    gain_m = frac["MTP", 1.0] / frac["MTP", 0.0]
    gain_l = frac["LTP", 1.0] / frac["LTP", 0.0]
    assert gain_m > 1.15 and gain_m > gain_l > 1.0


def test_tile_is_bit_reproducible():
    """The texture tile is built from exact arithmetic only: its hash is the same on any machine."""
    from ctsma.phantom.texture import TILE_SHA256, make_tile
    t, _ = make_tile()
    assert hashlib.sha256(t.tobytes()).hexdigest() == TILE_SHA256


def test_a_folder_named_as_a_knee_that_no_phantom_wrote_is_refused(tmp_path):
    """A user's own P0000 folder in --out was replaced, with everything in it, by the generated knee."""
    out = tmp_path / "c"
    mine = out / "P0000" / "notes.txt"
    mine.parent.mkdir(parents=True)
    mine.write_text("a user's file")
    with pytest.raises(UserError, match="P0000 is not a phantom knee"):
        generate_cohort(make_settings("demo", TINY), 1, 5, out)
    assert mine.read_text() == "a user's file" and not (out / "phantom.json").exists()


def test_a_ct_field_of_view_that_misses_the_rois_is_warned(cohort, tmp_path):
    """A ct_fov too small for the knee gave a CT without ROIs and landmarks, without a word. The MR side stays
    valid, so the knee is made, with a warning naming the knee and what its CT lacks."""
    import warnings

    s = make_settings("demo", {**TINY, "ct_fov": [12.0, 12.0, 12.0]})  # 12 x 12 x 8 voxels around the joint
    with pytest.warns(UserWarning, match=r"ct_fov 12 x 12 x 12 mm\) misses subchondral ROIs of 1 of 1 knees.*"
                                         r"P0000: MFC, LFC, LTP \(no voxel, no landmark\).*150 x 150 x 60 mm"):
        generate_cohort(s, 1, 5, tmp_path / "small")  # (a corner of this knee's MTP lies in it)
    rois = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "small" / "P0000" / "ct_rois.nii.gz")))
    assert set(np.unique(rois)) == {0, ROIS["MTP"]}
    assert (tmp_path / "small" / "P0000" / "mr.nii.gz").is_file()
    # the MR's field of view alike: its ROIs are where the MR reference is measured
    s = make_settings("demo", {**TINY, "mr_fov": [12.0, 12.0, 12.0]})
    with pytest.warns(UserWarning, match=r"MR field of view \(mr_fov 12 x 12 x 12 mm\) misses subchondral ROIs of 1 "
                                         r"of 1 knees, so their mr_rois.nii.gz lacks them: P0000: .*\(no voxel\).*"
                                         r"84 x 66 x 36 mm") as said:
        generate_cohort(s, 1, 5, tmp_path / "small_mr")
    assert not [w for w in said if "CT field of view" in str(w.message)]
    # a field of view that holds the knee: no warning (the fixture's cohort, resumed)
    out = tmp_path / "c"
    shutil.copytree(cohort, out)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate_cohort(make_settings("demo", TINY), 2, 5, out)


def test_a_truth_cube_too_large_to_measure_is_refused_before_any_work():
    """truth_patch_mm 10 at truth_spacing 0.005 (within each setting's range) asked for 8 G-voxel truth cubes, which
    ran out of memory after the images were made; it is refused with the settings, like images over 60 M voxels."""
    from ctsma.errors import ConfigError

    with pytest.raises(ConfigError, match="each truth cube would have 8000 M voxels .*limit 16 M"):
        make_settings("demo", {"truth_patch_mm": 10.0, "truth_spacing": 0.005, "tb_th": 0.2})
    make_settings("full", {})  # 1 M voxels a cube

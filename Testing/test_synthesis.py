"""MR→pseudo-CT synthesis: network, loss, normalisation, model files, weak-pairing training, quality, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from ctsma.cli.main import main
from ctsma.errors import ModelFileError
from ctsma.modelfile import read_metadata, save_model
from knee_pair import make_knee_pair
from ctsma.synthesis import SynthesisModel, load_train_config, train
from ctsma.synthesis.model import DEFAULT_NORMALISATION, ct_to_target, resample_isotropic, target_to_ct
from ctsma.synthesis.network import UNet25D, build_network
from ctsma.synthesis.quality import quality
from ctsma.synthesis.training import shift_tolerant_l1

ARCH = {"type": "unet25d", "in_slices": 3, "base": 4, "depth": 2}


def _model(seed=0):
    torch.manual_seed(seed)
    meta = {"architecture": ARCH, "normalisation": DEFAULT_NORMALISATION, "working_spacing_mm": 1.5,
            "planes": ["axial", "coronal"]}
    return SynthesisModel(build_network(ARCH), meta)


def test_unet_keeps_the_slice_size():
    net = UNet25D(5, 4, 3)
    y = net(torch.zeros(2, 5, 32, 24))
    assert y.shape == (2, 1, 32, 24)


def test_shift_tolerant_loss_forgives_a_one_voxel_shift_only():
    g = torch.Generator().manual_seed(0)
    target = torch.rand(2, 1, 24, 24, generator=g)
    pred = torch.roll(target, shifts=1, dims=-1)  # the prediction is the target moved by one voxel
    valid = torch.ones_like(target)
    assert float(shift_tolerant_l1(pred, target, valid, 1, 1.0)) < 1e-6
    assert float(shift_tolerant_l1(pred, target, valid, 0, 1.0)) > 0.2
    moved2 = torch.roll(target, shifts=2, dims=-1)
    assert float(shift_tolerant_l1(moved2, target, valid, 1, 1.0)) > 0.2
    # invalid voxels do not count
    assert float(shift_tolerant_l1(pred, target, torch.zeros_like(valid), 0, 1.0)) == 0.0


def test_ct_normalisation_round_trip():
    hu = np.array([-3000.0, -1000, -50, 0, 400, 1999, 5000])
    back = target_to_ct(ct_to_target(hu, DEFAULT_NORMALISATION), DEFAULT_NORMALISATION)
    np.testing.assert_allclose(back, np.clip(hu, -1000, 2000), atol=1e-3)


def test_resample_isotropic_keeps_the_extent():
    img = sitk.Image([30, 20, 10], sitk.sitkFloat32)
    img.SetSpacing((0.5, 0.5, 2.0))
    img.SetOrigin((3.0, -4.0, 7.0))
    iso = resample_isotropic(img, 1.0)
    assert iso.GetSize() == (15, 10, 20)
    lo = np.asarray(img.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    lo_iso = np.asarray(iso.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    np.testing.assert_allclose(lo, lo_iso, atol=1e-6)


def test_model_file_round_trip_and_refusals(tmp_path):
    m = _model()
    path = m.save(tmp_path / "m.safetensors")
    meta = read_metadata(path)
    assert meta["kind"] == "synthesis" and meta["architecture"] == ARCH
    assert meta["normalisation"]["ct_scale_hu"] == 1000.0
    loaded = SynthesisModel.load(path)
    mr = sitk.GetImageFromArray(np.random.default_rng(0).random((12, 16, 20)).astype(np.float32) * 500)
    a = sitk.GetArrayFromImage(m.apply(mr))
    b = sitk.GetArrayFromImage(loaded.apply(mr))
    np.testing.assert_array_equal(a, b)
    assert a.min() >= -1000 and a.max() <= 2000
    # a model of another kind, and one without the synthesis metadata, are refused
    save_model(tmp_path / "other.safetensors", m.net.state_dict(), {}, kind="teacher")
    with pytest.raises(ModelFileError, match="'teacher' model"):
        SynthesisModel.load(tmp_path / "other.safetensors")
    save_model(tmp_path / "bare.safetensors", m.net.state_dict(), {"architecture": ARCH}, kind="synthesis")
    with pytest.raises(ModelFileError, match="lacks 'normalisation'"):
        SynthesisModel.load(tmp_path / "bare.safetensors")


def test_quality_is_perfect_for_the_truth_and_worse_for_a_shift():
    pair = make_knee_pair(1, ct_size=(40, 40, 40), mr_size=(40, 40, 40), flex_deg=0, rot_deg=0, shift_mm=0)
    ident = sitk.Transform()
    q = quality(pair.ct, pair.ct, ident, pair.ct_bones)
    assert q["mae_bone_hu"] == 0 and q["mae_soft_hu"] == 0 and q["ssim"] == pytest.approx(1.0)
    q2 = quality(pair.ct, pair.ct, sitk.TranslationTransform(3, (2.0, 0, 0)), pair.ct_bones)
    assert q2["mae_bone_hu"] > 50 and q2["ssim"] < 0.95


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    pairs = [make_knee_pair(s, ct_size=(48, 48, 48), mr_size=(52, 52, 48)) for s in (0, 1)]
    cfg = load_train_config("demo", {"iterations": 150, "refine_iterations": 20, "patch": 32, "batch": 8,
                                     "base": 8, "threads": 1, "working_spacing_mm": 1.5, "min_valid": 0.5})
    model = train([(p.mr, p.ct, p.ct_bones) for p in pairs], cfg, names=["a", "b"])
    path = model.save(tmp_path_factory.mktemp("syn") / "model.safetensors")
    return model, path


def test_weak_pairing_training_learns_ct_contrast_without_true_transforms(trained):
    model, path = trained
    tr = model.meta["training"]
    assert tr["ground_truth_transforms_used"] is False
    assert tr["steps_round1"] == 150 and tr["steps_round2"] == 20 and tr["subjects"] == ["a", "b"]
    assert tr["final_loss_round1"] < 0.7 * tr["initial_loss_round1"]  # it learns from weakly paired data
    test = make_knee_pair(7, ct_size=(48, 48, 48), mr_size=(52, 52, 48))
    out = model.apply(test.mr)
    pct = sitk.GetArrayFromImage(out)
    ideal = sitk.GetArrayFromImage(sitk.Resample(test.pseudo_ct_ideal, out, sitk.Transform(), sitk.sitkLinear,
                                                 -1000.0))
    bone = ideal > 150  # cortex and marrow
    soft = (ideal > -200) & (ideal < 200) & ~bone
    # the untrained network knows no HU; the trained one makes bone brighter than soft tissue
    untrained = SynthesisModel(build_network(model.architecture), model.meta)
    raw = sitk.GetArrayFromImage(untrained.apply(test.mr))
    contrast = np.mean(pct[bone]) - np.mean(pct[soft])
    assert contrast > 50 and contrast > abs(np.mean(raw[bone]) - np.mean(raw[soft])) + 30
    assert SynthesisModel.load(path).meta["training"]["n_pairs"] == 2


def test_cli_synthesis_apply_and_register_errors(trained, tmp_path, capsys):
    _, path = trained
    pair = make_knee_pair(2, ct_size=(40, 40, 40), mr_size=(40, 40, 40))
    sitk.WriteImage(pair.mr, str(tmp_path / "mr.nii.gz"))
    sitk.WriteImage(pair.ct, str(tmp_path / "ct.nii.gz"))
    assert main(["--quiet", "synthesis", "apply", str(tmp_path / "mr.nii.gz"), "--model", str(path),
                 "--out", str(tmp_path / "pct.nii.gz")]) == 0
    pct = sitk.ReadImage(str(tmp_path / "pct.nii.gz"))
    assert pct.GetSpacing() == pytest.approx((1.5, 1.5, 1.5))
    # a CT given as the MR, and an output that would overwrite the input: refused, the input untouched
    before = (tmp_path / "mr.nii.gz").read_bytes()
    for src, out in (("ct.nii.gz", "pct2.nii.gz"), ("mr.nii.gz", "mr.nii.gz")):
        assert main(["--quiet", "synthesis", "apply", str(tmp_path / src), "--model", str(path),
                     "--out", str(tmp_path / out)]) == 2
    err = capsys.readouterr().err
    assert "not from a CT" in err and "also an input" in err and not (tmp_path / "pct2.nii.gz").exists()
    assert (tmp_path / "mr.nii.gz").read_bytes() == before
    # MR and CT swapped: one clear line, exit code 2
    rc = main(["--quiet", "register", str(tmp_path / "ct.nii.gz"), str(tmp_path / "mr.nii.gz"), "--out",
               str(tmp_path / "reg"), "--model", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "error:" in err and len(err.strip().splitlines()) == 1
    rc = main(["--quiet", "register", str(tmp_path / "mr.nii.gz"), str(tmp_path / "mr.nii.gz"), "--out",
               str(tmp_path / "reg"), "--model", str(path)])
    err = capsys.readouterr().err
    assert rc == 2 and "Hounsfield" in err and len(err.strip().splitlines()) == 1
    # a cohort manifest without the truth cannot be scored
    (tmp_path / "m.csv").write_text("subject,mr,ct\nk,mr.nii.gz,ct.nii.gz\n")
    rc = main(["--quiet", "synthesis", "evaluate", "--manifest", str(tmp_path / "m.csv"), "--model", str(path),
               "--out", str(tmp_path / "q.json")])
    assert rc == 2 and "transform_ct_to_mr" in capsys.readouterr().err
    assert not (tmp_path / "q.json").exists()
    assert json.loads(json.dumps(read_metadata(path)))["kind"] == "synthesis"


def test_make_pair_normalises_the_mr_by_its_own_scale():
    """Regression: the MR scale was read through a NumPy view of a freed temporary image (random values)."""
    from ctsma.synthesis.model import mr_scale
    from ctsma.synthesis.training import make_pair

    p = make_knee_pair(3, ct_size=(40, 40, 40), mr_size=(44, 44, 40))
    cfg = load_train_config("demo", {"working_spacing_mm": 1.5, "patch": 16})
    tf = sitk.AffineTransform(3)
    tf.SetMatrix(p.global_matrix[:3, :3].ravel().tolist())
    tf.SetTranslation(p.global_matrix[:3, 3].tolist())
    pairs = [make_pair(p.mr, p.ct, tf, cfg, 10) for _ in range(3)]
    scale = mr_scale(sitk.GetArrayFromImage(resample_isotropic(p.mr, 1.5)))
    ref = sitk.GetArrayFromImage(sitk.Resample(p.mr, resample_isotropic(p.ct, 1.5), tf,
                                               sitk.sitkLinear, -1.0, sitk.sitkFloat32))
    inside = ref >= 0
    expected = np.clip(ref[inside] / scale, 0, 2)
    for pair in pairs:
        got = pair.mr[10:-10, 10:-10, 10:-10][inside]
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    assert 0.5 < np.percentile(expected, 99) <= 2.0


def test_a_collapsed_model_is_refused_not_saved(monkeypatch):
    import ctsma.synthesis.training as tr

    pairs = [make_knee_pair(s, ct_size=(40, 40, 40), mr_size=(44, 44, 40)) for s in (0,)]
    cfg = load_train_config("demo", {"iterations": 3, "refine_iterations": 0, "patch": 16, "batch": 2,
                                     "base": 4, "threads": 1, "working_spacing_mm": 1.5, "min_valid": 0.5})
    monkeypatch.setattr(tr.SynthesisModel, "apply", lambda self, mr, planes=None: resample_isotropic(mr, 1.5) * 0 - 1000.0)
    with pytest.raises(tr.UserError, match="pseudo-CT is flat"):
        train([(p.mr, p.ct, p.ct_bones) for p in pairs], cfg)


def test_pairing_registers_on_one_thread_each_the_same_in_workers_and_in_process():
    """Mattes MI on several ITK threads gives run-to-run differences; pair_transforms runs each registration on
    one thread, so two workers and this process give identical transforms, and ITK's thread count is restored."""
    from ctsma.synthesis.training import pair_transforms

    knees = [make_knee_pair(s, ct_size=(40, 40, 40), mr_size=(44, 44, 40)) for s in (0, 1)]
    pairs = [(p.mr, p.ct, p.ct_bones) for p in knees]
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    pts = [(x, y, z) for x in (-15.0, 15.0) for y in (-15.0, 15.0) for z in (-10.0, 10.0)]
    runs, tfs = [], []
    for workers in (2, 1):
        tfs = pair_transforms(pairs, "pairing", workers, "test pairing")
        runs.append(np.array([[tf.TransformPoint(p) for p in pts] for tf in tfs]))
        assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before
    np.testing.assert_array_equal(runs[0], runs[1])
    assert np.abs(runs[0] - np.array(pts)[None]).max() > 0.1  # they registered (not identities)
    # ... accurately: over the bone voxels, within a millimetre of the pairs' true motion (measured 0.26-0.48 mm,
    # against 2.8-3.3 mm without registration)
    for tf, knee in zip(tfs, knees):
        lab = sitk.GetArrayFromImage(knee.ct_bones)
        kji = np.argwhere((lab == 1) | (lab == 2))[::5]
        p = np.array([knee.ct.TransformIndexToPhysicalPoint(tuple(int(v) for v in q[::-1])) for q in kji])
        got = np.array([tf.TransformPoint(tuple(q)) for q in p])
        err = np.linalg.norm(got - knee.ct_to_mr(p, lab[tuple(kji.T)]), axis=1)
        assert err.mean() < 1.0, err.mean()


def test_a_typo_in_exclude_is_refused(tmp_path):
    """--exclude keeps knees out of training: a misspelt name would silently keep one in."""
    import argparse

    from ctsma.cli.synthesis import _rows
    from ctsma.errors import UserError
    (tmp_path / "m.csv").write_text("subject,mr,ct\nP0000,a.nii.gz,b.nii.gz\nP0001,c.nii.gz,d.nii.gz\n")
    args = argparse.Namespace(manifest=tmp_path / "m.csv", subjects=None, exclude="P0000", limit=None)
    assert list(_rows(args).subject) == ["P0001"]
    args.exclude = "P000O"
    with pytest.raises(UserError, match="--exclude: subjects not in the manifest: P000O"):
        _rows(args)
    args.subjects, args.exclude = "P0001", "P0000"  # checked against the manifest, not the --subjects selection
    assert list(_rows(args).subject) == ["P0001"]


def test_evaluate_refuses_a_missing_or_unreadable_true_transform_in_one_line(tmp_path, capsys):
    """A manifest row whose transform_ct_to_mr was empty, missing or not a transform gave ITK's traceback."""
    pair = make_knee_pair(2, ct_size=(40, 40, 40), mr_size=(40, 40, 40))
    sitk.WriteImage(pair.mr, str(tmp_path / "mr.nii.gz"))
    sitk.WriteImage(pair.ct, str(tmp_path / "ct.nii.gz"))
    model = _model().save(tmp_path / "m.safetensors")
    for tx in ("", "missing.h5", "ct.nii.gz"):
        (tmp_path / "m.csv").write_text(f"subject,mr,ct,transform_ct_to_mr\nk,mr.nii.gz,ct.nii.gz,{tx}\n")
        rc = main(["--quiet", "synthesis", "evaluate", "--manifest", str(tmp_path / "m.csv"), "--model", str(model),
                   "--out", str(tmp_path / "q.json")])
        err = capsys.readouterr().err
        assert rc == 2 and "transform_ct_to_mr" in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "q.json").exists()


def test_apply_and_evaluate_refuse_a_label_image_as_the_mr_and_swapped_columns(tmp_path, capsys):
    """A label image given as the MR made a pseudo-CT of labels, and evaluate scored swapped mr/ct columns, both
    without a word."""
    pair = make_knee_pair(2, ct_size=(40, 40, 40), mr_size=(40, 40, 40))
    for name, img in (("mr", pair.mr), ("ct", pair.ct), ("mr_bones", pair.mr_bones)):
        sitk.WriteImage(img, str(tmp_path / f"{name}.nii.gz"))
    sitk.WriteTransform(sitk.Euler3DTransform(), str(tmp_path / "t.tfm"))
    model = str(_model().save(tmp_path / "m.safetensors"))
    assert main(["--quiet", "synthesis", "apply", str(tmp_path / "mr_bones.nii.gz"), "--model", model,
                 "--out", str(tmp_path / "pct.nii.gz")]) == 2
    assert "a label image" in capsys.readouterr().err and not (tmp_path / "pct.nii.gz").exists()
    for mr, ct, msg in (("mr_bones", "ct", "a label image"), ("ct", "mr", "Hounsfield"), ("mr", "ct", None)):
        (tmp_path / "m.csv").write_text(f"subject,mr,ct,transform_ct_to_mr\nk,{mr}.nii.gz,{ct}.nii.gz,t.tfm\n")
        rc = main(["--quiet", "synthesis", "evaluate", "--manifest", str(tmp_path / "m.csv"), "--model", model,
                   "--out", str(tmp_path / "q.json")])
        err = capsys.readouterr().err
        assert rc == (2 if msg else 0) and (msg is None or msg in err), err
        assert (tmp_path / "q.json").exists() == (msg is None)


def test_train_names_the_pair_whose_mr_or_ct_is_wrong_before_pairing(tmp_path, capsys):
    """A CT in the mr column, a label image as the MR or an MR in the ct column was refused only by the pairing
    registration, in a worker, naming no subject and advising to 'give the MR first and the CT second' (the advice
    of 'ctsma register')."""
    good = make_knee_pair(2, ct_size=(40, 40, 40), mr_size=(40, 40, 40))
    bad = make_knee_pair(3, ct_size=(40, 40, 40), mr_size=(40, 40, 40))
    for name, img in (("mr", good.mr), ("ct", good.ct), ("mr2", bad.mr), ("ct2", bad.ct), ("lab2", bad.mr_bones)):
        sitk.WriteImage(img, str(tmp_path / f"{name}.nii.gz"))
    for mr2, ct2, msg in (("ct2", "ct2", "the mr column of K2"), ("lab2", "ct2", "MR of K2 holds only"),
                          ("mr2", "mr2", "CT of K2 intensities")):
        (tmp_path / "m.csv").write_text(f"subject,mr,ct\nK1,mr.nii.gz,ct.nii.gz\nK2,{mr2}.nii.gz,{ct2}.nii.gz\n")
        rc = main(["--quiet", "synthesis", "train", "--manifest", str(tmp_path / "m.csv"), "--threads", "1",
                   "--out", str(tmp_path / "s.safetensors")])
        err = capsys.readouterr().err
        assert rc == 2 and msg in err and "give the MR first" not in err, err
        assert len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("key, value", [("planes", ["foo"]), ("planes", []), ("working_spacing_mm", 0),
                                        ("working_spacing_mm", "abc"), ("normalisation", {}),
                                        ("normalisation", {**DEFAULT_NORMALISATION, "ct_scale_hu": 0})])
def test_a_model_whose_metadata_apply_cannot_use_is_refused_on_loading(tmp_path, key, value):
    """The checksum covers the weights only: a model file with such metadata loaded, and apply then stopped with a
    KeyError, ValueError or ITK traceback (or divided by zero)."""
    meta = {**_model().meta, key: value}
    path = save_model(tmp_path / "m.safetensors", build_network(ARCH).state_dict(), meta, kind="synthesis")
    with pytest.raises(ModelFileError, match=f"damaged '{key}'"):
        SynthesisModel.load(path)
    SynthesisModel.load(save_model(tmp_path / "ok.safetensors", build_network(ARCH).state_dict(), _model().meta,
                                   kind="synthesis"))

"""Morphometry on real bone (committed LHDL crop), the command line, binarisation and sliding-window maps."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ctsma.cli.main import main
from ctsma.errors import UserError
from ctsma.morphometry import binarise, measure, sliding_window_maps

DATA = Path(__file__).parent / "data" / "lhdl_3155_D_4_bc_crop72_19.5um.nii.gz"
# Peer figures on this crop with the reference segmentation; provenance in Testing/data/README.md.
LOCALTHICKNESS = {"Tb.Th": 0.33269, "Tb.Sp": 0.64337}  # localthickness 0.1.3, continuous radii (approximate)
PORESPY = {"Tb.Th": 0.29997, "Tb.Sp": 0.59410}  # porespy 3.2.0 bf, integer radii


@pytest.fixture(scope="module")
def lhdl():
    return sitk.ReadImage(str(DATA))


@pytest.fixture(scope="module")
def lhdl_results(lhdl):
    kw = dict(modality="microct", threshold=63, smooth_sigma_vox=1.0)
    return {conv: measure(lhdl, convention=conv, **kw) for conv in ("bonej", "default")}


def test_lhdl_crop_reference_segmentation_and_peers(lhdl_results):
    bj = lhdl_results["bonej"]
    assert bj["BV/TV"] == pytest.approx(154425 / 72 ** 3)  # the count in Testing/data/README.md
    assert bj["binarisation"]["threshold"] == 63 and bj["binarisation"]["polarity"] == "bone bright"
    for key in ("Tb.Th", "Tb.Sp"):
        # continuous radii: between porespy (integer radii, runs low) and localthickness (approximate, runs high)
        assert PORESPY[key] < bj[key] < LOCALTHICKNESS[key]
        assert bj[key] == pytest.approx(LOCALTHICKNESS[key], rel=0.06)
    assert bj["Tb.N"] == pytest.approx(1 / (bj["Tb.Th"] + bj["Tb.Sp"]))


def test_lhdl_default_convention_close_to_bonej(lhdl_results):
    d, bj = lhdl_results["default"], lhdl_results["bonej"]
    voxel = 0.0195
    for key in ("Tb.Th", "Tb.Sp"):
        assert abs(d[key] - bj[key]) < 0.5 * voxel  # the conventions differ by sub-voxel corrections only


def test_exact_and_fast_methods_agree_on_real_bone(lhdl):
    arr = sitk.GetArrayFromImage(lhdl)[:40, :40, :40]
    kw = dict(modality="microct", threshold=63, smooth_sigma_vox=1.0)
    fast = measure(arr, (0.0195,) * 3, **kw)
    exact = measure(arr, (0.0195,) * 3, thickness_method="exact", **kw)
    for key in ("Tb.Th", "Tb.Sp"):
        assert fast[key] <= exact[key] + 1e-9  # the reduced axis never paints above the exact map
        assert fast[key] == pytest.approx(exact[key], rel=0.01)


def test_cli_writes_contract_json_and_maps_in_image_geometry(tmp_path, lhdl):
    crop = sitk.RegionOfInterest(lhdl, [32, 32, 32], [0, 0, 0])
    crop.SetOrigin((1.0, -2.0, 3.0))
    src = tmp_path / "crop.nii.gz"
    sitk.WriteImage(crop, str(src))
    mask = sitk.Image(crop.GetSize(), sitk.sitkUInt8)
    mask.CopyInformation(crop)
    mask[4:28, 4:28, 4:28] = 1
    sitk.WriteImage(mask, str(tmp_path / "mask.nii.gz"))
    out = tmp_path / "out"
    rc = main(["--quiet", "morphometry", str(src), "--mask", str(tmp_path / "mask.nii.gz"), "--modality", "microct",
               "--threshold", "63", "--smooth-sigma", "1", "--out", str(out), "--maps", "--window", "8",
               "--stride", "2", "--threads", "1"])
    assert rc == 0
    res = json.loads((out / "morphometry.json").read_text())
    for key in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N", "BS/BV", "Conn.D", "Tb.Th.sd", "Tb.Sp.sd", "Tb.N.formula",
                "convention", "binarisation", "spacing", "roi_voxels"):
        assert key in res
    assert res["roi_voxels"] == 24 ** 3 and res["binarisation"]["threshold"] == 63
    th = sitk.ReadImage(str(out / "tbth_map.nii.gz"))
    assert th.GetSize() == crop.GetSize() and np.allclose(th.GetOrigin(), crop.GetOrigin())
    bvtv = sitk.ReadImage(str(out / "maps" / "bvtv.nii.gz"))
    assert bvtv.GetSize() == (16, 16, 16) and np.allclose(bvtv.GetSpacing(), [2 * 0.0195] * 3)
    # a window of 8 voxels on voxel i covers i-4 .. i+3: its centre, the map's sample, is half a voxel before i
    assert np.allclose(bvtv.GetOrigin(), np.array(crop.GetOrigin()) - 0.5 * 0.0195)
    valid = sitk.GetArrayFromImage(sitk.ReadImage(str(out / "maps" / "valid.nii.gz")))
    v = sitk.GetArrayFromImage(bvtv)
    assert 0 < valid.sum() < valid.size and set(np.unique(valid)) == {0.0, 1.0}
    assert (v[valid == 0] == 0).all() and np.isfinite(v).all()  # empty windows 0, not NaN (ITK reads NaN as 0)
    assert res["files"]["valid"] == "maps/valid.nii.gz"


def test_cli_user_errors_exit_2(tmp_path, capsys):
    img = sitk.GetImageFromArray(np.random.default_rng(0).normal(size=(8, 8, 8)).astype(np.float32))
    sitk.WriteImage(img, str(tmp_path / "grey.nii.gz"))
    assert main(["--quiet", "morphometry", str(tmp_path / "grey.nii.gz"), "--out", str(tmp_path / "o")]) == 2
    assert "binary" in capsys.readouterr().err  # a grey image given as binary: told to pick a modality
    assert main(["--quiet", "morphometry", str(tmp_path / "missing.nii.gz"), "--out", str(tmp_path / "o")]) == 2


def _plates_grey(shape=(32, 24, 24)):
    b = np.zeros(shape, bool)
    for s in range(2, shape[0] - 4, 8):
        b[s:s + 3] = True
    return b


def test_binarise_polarity_by_modality():
    b = _plates_grey()
    ct = np.where(b, 800.0, 50.0)
    mr = np.where(b, 50.0, 400.0)  # BFFE MR: bone dark
    got_ct, info_ct = binarise(ct, (0.2, 0.2, 0.2), modality="ct")
    got_mr, info_mr = binarise(mr, (0.2, 0.2, 0.2), modality="mr")
    assert (got_ct == b).all() and (got_mr == b).all()
    assert info_ct["polarity"] == "bone bright" and info_mr["polarity"] == "bone dark"
    assert info_ct["method"] == "global-otsu"


@pytest.mark.parametrize("sigma", [-1.0, float("nan"), float("inf")])
def test_binarise_refuses_a_smoothing_width_that_is_no_width(sigma):
    """A negative or NaN ``smooth_sigma_vox`` skipped the smoothing without a word and was recorded as given (the
    command line refuses them)."""
    ct = np.where(_plates_grey(), 800.0, 50.0)
    with pytest.raises(UserError, match="smooth_sigma_vox"):
        binarise(ct, (0.2, 0.2, 0.2), modality="ct", smooth_sigma_vox=sigma)
    with pytest.raises(UserError, match="smooth_sigma_vox"):
        measure(ct, (0.2, 0.2, 0.2), modality="ct", smooth_sigma_vox=sigma)


def test_local_binarisation_and_n4_handle_a_bias_field():
    from scipy import ndimage
    rng = np.random.default_rng(0)
    b = ndimage.gaussian_filter(rng.normal(size=(32, 32, 32)), 1.5) > 0.1
    bias = np.exp(np.linspace(0, 1.5, b.shape[0]))[:, None, None]
    mr = np.where(b, 60.0, 300.0) * bias * (1 + 0.02 * rng.normal(size=b.shape))  # BFFE-like: bone dark
    glob, _ = binarise(mr, (0.2, 0.2, 0.2), modality="mr")  # Otsu
    assert (glob == b).mean() < 0.8  # one global threshold fails under a 4.5-fold drift along z
    loc, info = binarise(mr, (0.2, 0.2, 0.2), modality="mr", method="local", window_mm=3.0)
    assert (loc == b).mean() > 0.85 and info["method"] == "local-gaussian-mean"


def test_n4_reduces_a_smooth_bias_field():
    from scipy import ndimage
    from ctsma.morphometry.binarise import _n4
    rng = np.random.default_rng(0)
    b = ndimage.gaussian_filter(rng.normal(size=(16, 16, 16)), 1.5) > 0.1
    mr = (np.where(b, 60.0, 300.0) * np.exp(np.linspace(0, 1.5, 16))[:, None, None]).astype(np.float32)
    corrected = _n4(mr, np.ones(b.shape, bool), (0.2, 0.2, 0.2))
    m = ~b

    def drift(a):
        return a[-3:][m[-3:]].mean() / a[:3][m[:3]].mean()
    assert drift(mr) > 3.5 and drift(corrected) < 0.75 * drift(mr)


def test_sliding_window_maps_on_plates():
    b = np.zeros((40, 16, 16), bool)
    for s in range(4, 40, 10):
        b[s:s + 2] = True  # plates 2 thick, period 10, away from the image border
    maps = sliding_window_maps(b, (1.0, 1.0, 1.0), window=10, stride=1)
    inner = maps["BV/TV"][5:35, 5:11, 5:11]
    assert np.allclose(inner, 0.2)
    assert np.allclose(maps["Tb.Th"][5:35, 5:11, 5:11], 2.0)
    assert np.nanmax(np.abs(maps["Tb.N"][5:35, 5:11, 5:11] - 1 / (2.0 + maps["Tb.Sp"][5:35, 5:11, 5:11]))) < 1e-5


def test_window_bvtv_is_never_negative_and_zero_without_bone():
    """The box filter's running sums left windows without bone (a marrow cavity in random bone) at BV/TV down to
    -3e-17: a negative volume fraction, and not the 0 of a bone-free window. Windows with bone keep their values."""
    rng = np.random.default_rng(0)
    b = rng.random((40, 40, 40)) < 0.3
    b[10:30, 10:30, 10:30] = False
    maps = sliding_window_maps(b, (0.3, 0.3, 0.3), window=5, stride=1)
    bvtv = maps["BV/TV"]
    assert not (bvtv < 0).any()  # NaN where a window holds less than half ROI
    assert (bvtv[14:26, 14:26, 14:26] == 0).all() and np.isnan(maps["Tb.Th"][14:26, 14:26, 14:26]).all()
    counts = ndimage.uniform_filter(b.astype(float), 5, mode="constant") * 125
    n_roi = ndimage.uniform_filter(np.ones(b.shape), 5, mode="constant") * 125
    some = (counts > 0.5) & np.isfinite(bvtv)
    assert np.allclose(bvtv[some], (counts / n_roi)[some], rtol=1e-6, atol=0)


def test_window_refusal_names_plain_voxel_counts():
    """The refusal of a zero window printed NumPy reprs: "window (np.int64(0), np.int64(0), np.int64(0))"."""
    b = np.zeros((8, 8, 8), bool)
    b[2:4] = True
    with pytest.raises(UserError) as err:
        sliding_window_maps(b, (1.0, 1.0, 1.0), window=0, stride=2)
    assert str(err.value) == "window (0, 0, 0) and stride (2, 2, 2) must be positive voxel counts"


def test_window_maps_sample_where_the_map_says(tmp_path):
    """Odd and even windows: a bone half-space x >= 6 of a 1 mm grid; the BV/TV map is 0.5 exactly at the
    physical x of the face (5.5 mm), wherever the map's origin puts its samples."""
    for window in (3, 4, 5, 6):
        a = np.zeros((12, 12, 16), np.uint8)
        a[..., 6:] = 1
        img = sitk.GetImageFromArray(a)
        src = tmp_path / f"half{window}.nii.gz"
        sitk.WriteImage(img, str(src))
        out = tmp_path / f"w{window}"
        assert main(["--quiet", "morphometry", str(src), "--out", str(out), "--window", str(window)]) == 0
        bvtv = sitk.ReadImage(str(out / "maps" / "bvtv.nii.gz"))
        row = sitk.GetArrayFromImage(bvtv)[6, 6]
        xs = np.array([bvtv.TransformIndexToPhysicalPoint((i, 6, 6))[0] for i in range(row.size)])
        assert np.interp(0.5, row[window:-window], xs[window:-window]) == pytest.approx(5.5, abs=1e-6)


def test_cli_mask_labels_offset_and_grids(tmp_path, capsys):
    rng = np.random.default_rng(1)
    b = (rng.random((24, 24, 24)) < 0.3).astype(np.uint8)
    img = sitk.GetImageFromArray(b)
    img.SetSpacing((0.03, 0.03, 0.03))
    sitk.WriteImage(img, str(tmp_path / "b.nii.gz"))
    labels = np.zeros_like(b)
    labels[2:12], labels[12:22] = 1, 2
    lab = sitk.GetImageFromArray(labels)
    lab.CopyInformation(img)
    sitk.WriteImage(lab, str(tmp_path / "labels.nii.gz"))
    args = ["--quiet", "morphometry", str(tmp_path / "b.nii.gz"), "--mask", str(tmp_path / "labels.nii.gz")]
    with pytest.warns(UserWarning, match="2 labels .* give --label N"):
        assert main([*args, "--out", str(tmp_path / "both")]) == 0
    assert main([*args, "--label", "2", "--out", str(tmp_path / "two")]) == 0
    two = json.loads((tmp_path / "two" / "morphometry.json").read_text())
    assert two["roi_voxels"] == 10 * 24 * 24 and two["mask_label"] == 2
    assert two["BV/TV"] == pytest.approx(b[12:22].mean())
    assert main([*args, "--label", "3", "--out", str(tmp_path / "three")]) == 2
    assert "no voxel of label 3" in capsys.readouterr().err and not (tmp_path / "three" / "morphometry.json").exists()
    # a mask whose spacing differs by 0.7 % (0.0302 against 0.03 mm): 0.15 voxel apart at the far corner, refused
    # (the absolute 1e-3 mm of before let it pass)
    lab.SetSpacing((0.0302, 0.03, 0.03))
    sitk.WriteImage(lab, str(tmp_path / "off.nii.gz"))
    assert main(["--quiet", "morphometry", str(tmp_path / "b.nii.gz"), "--mask", str(tmp_path / "off.nii.gz"),
                 "--out", str(tmp_path / "off")]) == 2
    assert "voxels apart" in capsys.readouterr().err
    # --offset reaches the local binarisation, and is refused without it
    grey = sitk.GetImageFromArray((100 + 50 * rng.random((24, 24, 24))).astype(np.float32))
    sitk.WriteImage(grey, str(tmp_path / "g.nii.gz"))
    g = ["--quiet", "morphometry", str(tmp_path / "g.nii.gz"), "--modality", "mr"]
    assert main([*g, "--method", "local", "--offset", "0.1", "--out", str(tmp_path / "loc")]) == 0
    loc = json.loads((tmp_path / "loc" / "morphometry.json").read_text())
    assert loc["binarisation"]["offset"] == 0.1
    assert main([*g, "--offset", "0.1", "--out", str(tmp_path / "glob")]) == 2
    assert "--offset belongs to --method local" in capsys.readouterr().err


def test_local_offsets_that_decide_every_voxel_alike_are_refused(tmp_path, capsys):
    """On a non-negative image (MR magnitude) no voxel lies a whole local mean or more below it: a bone-dark
    offset of 1 or more marks no bone (it used to give BV/TV 0 with only a warning), and a bone-bright offset
    of -1 or less marks every non-zero voxel. CT in HU has no such bound: every offset stays allowed there."""
    from ctsma.morphometry.validate import MorphometryError
    b = _plates_grey()
    mr = np.where(b, 50.0, 400.0)
    sp = (0.2, 0.2, 0.2)
    for offset in (1.0, 1.5, 1e6):
        with pytest.raises(MorphometryError, match=r"can never mark bone.*must be below 1"):
            binarise(mr, sp, modality="mr", method="local", offset=offset)
    for offset in (0.0, 0.5):  # legal values still binarise (0.999 may find no bone on some image: a warning)
        assert (binarise(mr, sp, modality="mr", method="local", offset=offset)[0] == b).all()
    binarise(mr, sp, modality="mr", method="local", offset=0.999)
    for offset in (-1.0, -1.5):
        with pytest.raises(MorphometryError, match=r"every non-zero voxel .*must be above -1"):
            binarise(mr, sp, modality="microct", method="local", offset=offset)
    assert not binarise(mr, sp, modality="microct", method="local", offset=-0.5)[0].all()
    hu = np.where(b, 800.0, -60.0)  # CT in HU: fatty marrow below 0, the relative difference is unbounded
    for offset in (-1.5, 1.0, 3.0):
        binarise(hu, sp, modality="ct", method="local", offset=offset)
    # the command line: one line, exit code 2, no output folder
    img = sitk.GetImageFromArray(mr.astype(np.float32))
    img.SetSpacing(sp)
    sitk.WriteImage(img, str(tmp_path / "mr.nii.gz"))
    args = ["--quiet", "morphometry", str(tmp_path / "mr.nii.gz"), "--modality", "mr", "--method", "local"]
    capsys.readouterr()
    assert main([*args, "--offset", "1", "--out", str(tmp_path / "one")]) == 2
    err = capsys.readouterr().err
    assert "offset (--offset) 1 can never mark bone" in err and "below 1" in err and not (tmp_path / "one").exists()
    assert main([*args, "--offset", "0.2", "--out", str(tmp_path / "ok")]) == 0


def test_api_refuses_a_mask_on_another_grid():
    from ctsma.errors import InputImageError
    img = sitk.GetImageFromArray(np.ones((8, 8, 8), np.uint8))
    mask = sitk.Image(img)
    mask.SetOrigin((1.0, 0.0, 0.0))
    with pytest.raises(InputImageError, match="origin"):
        measure(img, mask=mask)


def test_header_rounding_of_the_spacing_does_not_move_the_result():
    """Isotropic voxels whose z spacing carries a header's rounding (3e-6 relative) measure as isotropic ones:
    before, the ties of voxel centres on sphere surfaces broke the other way and moved Tb.Th by 0.6 %."""
    rng = np.random.default_rng(2)
    from scipy import ndimage
    b = ndimage.gaussian_filter(rng.normal(size=(28, 28, 28)), 1.5) > 0.02
    iso = measure(b, (0.03, 0.03, 0.03))
    eps = measure(b, (0.0300001, 0.03, 0.03))
    for key in ("Tb.Th", "Tb.Sp"):
        assert eps[key] == pytest.approx(iso[key], rel=1e-5)
    # and the scale itself decides no tie: 0.7 mm voxels read 0.7 times the 1 mm values (before: 0.5 % less)
    for conv in ("default", "bonej"):
        one, big = measure(b, (1.0, 1.0, 1.0), convention=conv), measure(b, (0.7, 0.7, 0.7), convention=conv)
        for key in ("Tb.Th", "Tb.Sp"):
            assert big[key] == pytest.approx(0.7 * one[key], rel=1e-6)
    from ctsma.morphometry.validate import MorphometryError
    with pytest.raises(MorphometryError, match="100 times longer"):
        measure(b, (1e-9, 0.03, 0.03))


def test_a_failed_rerun_leaves_the_earlier_run_whole(tmp_path, monkeypatch):
    """The outputs move in together when a run succeeds: a rerun that dies after writing its first map leaves
    the first run's json and maps, not its own maps beside the old json (a cluster job at its time limit)."""
    import ctsma.io
    b = sitk.GetImageFromArray((np.random.default_rng(3).random((20, 20, 20)) < 0.3).astype(np.uint8))
    sitk.WriteImage(b, str(tmp_path / "b.nii.gz"))
    out = tmp_path / "o"
    assert main(["--quiet", "morphometry", str(tmp_path / "b.nii.gz"), "--out", str(out), "--maps"]) == 0
    before = {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real = ctsma.io.write_image
    calls = []

    def dies_on_second(img, path, **kw):
        calls.append(path)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(img, path, **kw)
    monkeypatch.setattr(ctsma.io, "write_image", dies_on_second)
    assert main(["--quiet", "morphometry", str(tmp_path / "b.nii.gz"), "--out", str(out), "--maps", "--window", "5",
                 "--convention", "bonej"]) == 130  # interrupted
    assert len(calls) == 2
    assert {p.name: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_spacing_snapping_is_one_rule_everywhere():
    """Near-equal spacings snap as one cluster (single linkage, whatever their order), and the z-slab path snaps as
    the whole image does: a header-rounded spacing gives the same values in memory and in slabs."""
    from ctsma.morphometry.validate import check_spacing
    assert len(set(check_spacing((1.0, 1.0 + 0.9e-5, 1.0 + 1.8e-5)))) == 1
    assert check_spacing((1.0 + 1.8e-5, 1.0, 1.0 + 0.9e-5)) == check_spacing((1.0, 1.0 + 0.9e-5, 1.0 + 1.8e-5))
    assert len(set(check_spacing((0.5, 1.0, 1.0 + 1e-6)))) == 2  # 0.5 stays apart
    from scipy import ndimage
    b = ndimage.gaussian_filter(np.random.default_rng(4).normal(size=(24, 24, 24)), 1.5) > 0
    sp = (0.7 * (1 + 4e-6), 0.7, 0.7)
    whole, slabs = measure(b, sp), measure(b, sp, slabs=6)
    for key in ("Tb.Th", "Tb.Sp"):
        assert slabs[key] == pytest.approx(whole[key], rel=1e-12)


@pytest.mark.parametrize("args,obstacle,message", [
    (["--window", "4"], "maps", "maps is a file, not a folder"),
    (["--maps"], "tbth_map.nii.gz/", "a folder of that name is in the way"),
    ([], "morphometry.json/", "a folder of that name is in the way")])
def test_a_name_in_the_way_is_refused_before_the_work(tmp_path, monkeypatch, capsys, args, obstacle, message):
    """An output name held by a folder (or a file named as an output folder) was refused only when the finished
    run's files were moved into place, after the whole computation; now before the image is measured."""
    import ctsma.morphometry as morphometry

    a = np.zeros((12, 12, 16), np.uint8)
    a[..., 6:] = 1
    src = tmp_path / "half.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(a), str(src))
    out = tmp_path / "o"
    out.mkdir()
    if obstacle.endswith("/"):
        (out / obstacle).mkdir()
    else:
        (out / obstacle).write_text("the user's")
    monkeypatch.setattr(morphometry, "binarise", lambda *a, **k: pytest.fail("measured before the refusal"))
    assert main(["--quiet", "morphometry", str(src), "--out", str(out), *args]) == 2
    assert message in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == [obstacle.rstrip("/")]


def test_binarise_refuses_settings_it_would_ignore():
    """The API ignored grey-level settings for a binary image and the local method's settings for the global one
    (run and recorded without them); the command line refused them by flag. Now the API refuses them too."""
    rng = np.random.default_rng(0)
    grey = rng.normal(100, 20, (12, 12, 12)).astype(np.float32)
    binary = (grey > 100).astype(np.uint8)
    for kw, said in ((dict(n4=True), "n4 applies"), (dict(threshold=0.5), "threshold applies"),
                     (dict(method="local", offset=0.1), "method='local', offset apply"),
                     (dict(smooth_sigma_vox=1.0), "smooth_sigma_vox applies")):
        with pytest.raises(UserError, match=f"{re.escape(said)} to binarising a grey-level image"):
            binarise(binary, (1, 1, 1), modality="binary", **kw)
    for kw in (dict(window_mm=5.0), dict(offset=0.1)):
        with pytest.raises(UserError, match="belong to method='local'"):
            binarise(grey, (1, 1, 1), modality="microct", **kw)
        with pytest.raises(UserError, match="belong to method='local'"):
            measure(grey, (1, 1, 1), modality="microct", **kw)
    bone, info = binarise(grey, (1, 1, 1), modality="microct", method="local", window_mm=5.0, offset=0.1)
    assert info["window_mm"] == 5.0 and info["offset"] == 0.1 and 0 < bone.mean() < 1


def test_a_threshold_with_the_local_method_is_refused_before_reading(tmp_path, capsys):
    """'--threshold otsu --method local' was accepted and the threshold ignored, and a number was refused only
    after the image was read (and N4 run): now both are refused first, and the API refuses 'otsu' too."""
    grey = np.random.default_rng(0).normal(100, 20, (12, 12, 12)).astype(np.float32)
    for value in ("otsu", "90"):
        rc = main(["--quiet", "morphometry", str(tmp_path / "not_read.nii.gz"), "--out", str(tmp_path / "o"),
                   "--modality", "microct", "--method", "local", "--threshold", value])
        assert rc == 2 and "--method local takes no --threshold" in capsys.readouterr().err
    for value in ("otsu", 90.0):
        with pytest.raises(UserError, match="a local \\(adaptive\\) binarisation takes no threshold"):
            binarise(grey, (1, 1, 1), modality="microct", method="local", threshold=value)


def test_run_options_are_checked_before_the_work():
    """threads <= 0 or fractional were taken as one thread, histogram_bins=0 failed with numpy's error after the
    whole computation, and a window of 9.5 voxels was cut to 9: each is now refused in one line, first."""
    from ctsma.morphometry import measure_binary

    bone = np.zeros((12, 12, 12), bool)
    bone[:, :, 4:8] = True
    for threads in (0, -1, 1.5, "2", True):
        with pytest.raises(UserError, match=f"threads must be a whole number from 1, got {re.escape(repr(threads))}"):
            measure_binary(bone, (1, 1, 1), threads=threads)
    for bins in (0, -3, "nonsense"):
        with pytest.raises(UserError, match=f"histogram_bins {re.escape(repr(bins))} cannot bin"):
            measure_binary(bone, (1, 1, 1), histogram_bins=bins)
        with pytest.raises(UserError, match="cannot bin"):
            measure(bone.astype(np.uint8), (1, 1, 1), modality="binary", histogram_bins=bins)
    assert measure_binary(bone, (1, 1, 1), histogram_bins="auto")["Tb.Th"] == pytest.approx(4.0)
    for window in (9.5, "a", float("inf"), (4, 4), [[4, 4, 4]]):
        with pytest.raises(UserError, match="window must be a whole number of voxels or three of them"):
            sliding_window_maps(bone, (1, 1, 1), window)
    with pytest.raises(UserError, match="stride must be a whole number"):
        sliding_window_maps(bone, (1, 1, 1), 4, stride=1.5)
    assert sliding_window_maps(bone, (1, 1, 1), 4.0)["BV/TV"].shape == (12, 12, 12)


def test_a_0_255_binary_image_gets_a_hint_about_its_values(tmp_path, capsys):
    a = np.zeros((12, 12, 12), np.uint8)
    a[:, :, 4:8] = 255
    src = tmp_path / "mask255.nii.gz"
    sitk.WriteImage(sitk.GetImageFromArray(a), str(src))
    assert main(["--quiet", "morphometry", str(src), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "holds 0 and 255: save it with bone = 1" in err and "--modality microct --threshold 127.5" in err
    assert main(["--quiet", "morphometry", str(src), "--out", str(tmp_path / "o"), "--modality", "microct",
                 "--threshold", "127.5"]) == 0
    assert json.loads((tmp_path / "o" / "morphometry.json").read_text())["BV/TV"] == pytest.approx(1 / 3)

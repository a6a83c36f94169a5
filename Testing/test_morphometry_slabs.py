"""Morphometry over the memory budget: z-slabs with an exact halo give the whole-image results.

A synthetic trabecular-like image (thresholded anisotropic Gaussian noise: plates and rods of varied
thickness, marrow spaces of varied size) with anisotropic voxels and a non-box ROI (an ellipsoid with a
tunnel) is measured whole and in slabs of several sizes. The local-thickness maps must be equal bit for bit,
and so must BV/TV, the Tb.Th/Tb.Sp means and histograms and Conn.D; the SDs and BS/BV are sums in another
order (tolerance 1e-12 relative). The command line must chunk under a small CTSMA_MEMORY_GB, report each
slab, write maps that read back identical, and still refuse (exit 2, one line, nothing left) when even one
slab cannot fit.
"""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

from ctsma.cli.main import main as cli_main
from ctsma.morphometry import measure, measure_binary

EXACT = ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N", "Tb.N.plate", "Conn.D", "roi_voxels", "bone_voxels", "TV_mm3", "histograms")
CLOSE = ("Tb.Th.sd", "Tb.Sp.sd", "BS/BV")
RTOL = 1e-12


def _phantom(shape=(36, 42, 40), seed=0):
    rng = np.random.default_rng(seed)
    field = ndimage.gaussian_filter(rng.normal(size=shape).astype(np.float32), (1.1, 1.9, 2.2))
    bone = field > 0.04
    z, y, x = np.mgrid[:shape[0], :shape[1], :shape[2]].astype(np.float32)
    cz, cy, cx = [(n - 1) / 2 for n in shape]
    roi = ((z - cz) / (0.48 * shape[0])) ** 2 + ((y - cy) / (0.46 * shape[1])) ** 2 + ((x - cx) / (0.47 * shape[2])) ** 2 < 1
    roi &= ~((np.abs(y - cy) < 4) & (np.abs(x - cx + 5) < 3))  # a tunnel through the ellipsoid
    return bone, roi, field


@pytest.fixture(scope="module")
def sample():
    bone, roi, field = _phantom()
    return {"bone": bone, "roi": roi, "field": field, "spacing": (0.5, 0.3, 0.25)}


def _assert_same(whole, part, maps_w=None, maps_p=None):
    for k in EXACT:
        assert part[k] == whole[k], (k, part[k], whole[k])
    for k in CLOSE:
        assert part[k] == pytest.approx(whole[k], rel=RTOL, abs=0), k
    if maps_w is not None:
        for k in ("thickness", "separation"):
            np.testing.assert_array_equal(maps_p[k], maps_w[k], err_msg=k)


@pytest.mark.parametrize("method,spheres,planes", [("fast", "roi", 1), ("fast", "roi", 7), ("fast", "image", 4),
                                                   ("exact", "roi", 3), ("exact", "image", 9)])
def test_slabs_equal_the_whole_image(sample, method, spheres, planes):
    kw = dict(method=method, spheres=spheres, return_maps=True)
    whole, mw = measure_binary(sample["bone"], sample["spacing"], sample["roi"], slabs="never", **kw)
    part, mp = measure_binary(sample["bone"], sample["spacing"], sample["roi"], slabs=planes, **kw)
    _assert_same(whole, part, mw, mp)
    assert "slabs" in part and "slabs" not in whole
    info = part["slabs"]
    k = {ph: int(np.ceil(info[ph]["max_distance_mm"] / sample["spacing"][0])) + 1 for ph in ("bone", "marrow")}
    for ph in ("bone", "marrow"):  # the documented halo: 3k planes (fast) or k + 1 (exact)
        assert info[ph]["halo_planes"] == (3 * k[ph] if method == "fast" else k[ph] + 1)
        assert info[ph]["core_planes"] == planes


def test_isotropic_ties_and_bonej_convention(sample):
    """Isotropic voxels make exact ties in the power diagram; the z pass told its offset breaks them alike."""
    bone, roi, _ = _phantom((30, 34, 32), seed=3)
    for conv in ("default", "bonej"):
        whole, mw = measure_binary(bone, (0.3, 0.3, 0.3), roi, convention=conv, return_maps=True, slabs="never")
        part, mp = measure_binary(bone, (0.3, 0.3, 0.3), roi, convention=conv, return_maps=True, slabs=2)
        _assert_same(whole, part, mw, mp)


def test_largest_distance_is_exact_and_halos_grow_until_certified(sample):
    from ctsma.morphometry.slabs import Phase, max_distance
    from ctsma.morphometry.thickness import distance_sq

    bone, roi, sp = sample["bone"], sample["roi"], sample["spacing"]
    box = tuple(slice(0, n) for n in bone.shape)
    for name, phase in (("bone", bone & roi), ("marrow", roi & ~bone)):
        ph = Phase(name, bone, roi, box, "roi")
        truth = float(distance_sq(phase, sp).max())
        for core in (1, 5, 40):
            assert max_distance(ph, sp, core=core) == truth


def test_degenerate_phases_match(sample):
    """No marrow (all bone in the ROI) and no bone: the same NaNs and warnings as the whole-image run."""
    bone, roi, sp = sample["bone"], sample["roi"], sample["spacing"]
    for b in (roi.copy(), np.zeros_like(bone)):
        with pytest.warns(UserWarning):
            whole = measure_binary(b, sp, roi, slabs="never")
        with pytest.warns(UserWarning):
            part = measure_binary(b, sp, roi, slabs=5)
        for k in ("BV/TV", "Tb.Th", "Tb.Sp", "Tb.N", "Conn.D", "BS/BV"):
            assert part[k] == whole[k] or (np.isnan(part[k]) and np.isnan(whole[k])), k
        assert part["histograms"] == whole["histograms"]


def test_measure_api_chunks_by_itself_under_a_small_budget(sample, monkeypatch):
    """``measure`` on a grey image: over CTSMA_MEMORY_GB it chunks on its own, reports each slab, same result."""
    grey = (sample["field"] * 1000 + 300).astype(np.float32)
    sp, roi = sample["spacing"], sample["roi"]
    whole = measure(grey, sp, roi, modality="ct", slabs="never")
    n = grey.size
    monkeypatch.setenv("CTSMA_MEMORY_GB", str(60 * n / 1e9))  # under the 128 B/voxel whole-image estimate
    seen = []
    part = measure(grey, sp, roi, modality="ct", progress=lambda d, t, m: seen.append((d, t, m)))
    assert "slabs" in part
    _assert_same(whole, part)
    assert [d for d, _, _ in seen] == list(range(1, seen[-1][1] + 1))  # one report per slab, in order
    assert all(re.match(r"(bone|marrow) slab \d+/\d+: planes \d+-\d+ \(halo \d+ planes\)", m) for _, _, m in seen)


def test_streamed_nifti_matches_simpleitk(tmp_path):
    """The streamed writer's header is SimpleITK's byte for byte, and the pixels read back identical."""
    from ctsma.io.memory import Geometry, streamed_nifti

    rng = np.random.default_rng(1)
    arr = rng.normal(size=(7, 5, 6)).astype(np.float32)
    for direction in ((1, 0, 0, 0, 1, 0, 0, 0, 1), (0, -1, 0, 1, 0, 0, 0, 0, -1)):
        img = sitk.GetImageFromArray(arr)
        img.SetSpacing((0.25, 0.3, 0.5))
        img.SetOrigin((1.5, -2.0, 7.25))
        img.SetDirection(direction)
        sitk.WriteImage(img, str(tmp_path / "ref.nii"), False)
        with streamed_nifti(tmp_path / "s.nii.gz", Geometry.of(img)) as w:
            w.write(arr[:3])
            w.write(arr[3])
            w.write(arr[4:])
        with gzip.open(tmp_path / "s.nii.gz", "rb") as fh:
            streamed = fh.read()
        assert streamed[:352] == (tmp_path / "ref.nii").read_bytes()[:352]
        back = sitk.ReadImage(str(tmp_path / "s.nii.gz"))
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), arr)
        assert back.GetDirection() == img.GetDirection() and back.GetOrigin() == img.GetOrigin()
    with pytest.raises(RuntimeError, match="planes"):
        with streamed_nifti(tmp_path / "short.nii.gz", Geometry.of(img)) as w:
            w.write(arr[:2])
    assert not list(tmp_path.glob("*short*"))  # an incomplete image leaves nothing


# -- command line --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def files(tmp_path_factory, sample):
    d = tmp_path_factory.mktemp("slabs")
    for name, a in (("bone", sample["bone"].astype(np.uint8)), ("roi", sample["roi"].astype(np.uint8))):
        im = sitk.GetImageFromArray(a)
        im.SetSpacing(tuple(reversed(sample["spacing"])))
        im.SetOrigin((1.0, 2.0, 3.0))
        im.SetDirection((0, 1, 0, -1, 0, 0, 0, 0, 1))
        sitk.WriteImage(im, str(d / f"{name}.nii.gz"))
    return d


def _argv(files, out, *extra):
    return ["morphometry", str(files / "bone.nii.gz"), "--mask", str(files / "roi.nii.gz"), "--out", str(out),
            "--maps", "--threads", "1", *extra]


def test_cli_chunks_under_the_budget_with_identical_outputs(files, tmp_path, monkeypatch, capsys):
    n = sitk.GetArrayFromImage(sitk.ReadImage(str(files / "bone.nii.gz"))).size
    assert cli_main(["--quiet", *_argv(files, tmp_path / "whole", "--window", "6", "--stride", "2")]) == 0
    monkeypatch.setenv("CTSMA_MEMORY_GB", str(100 * n / 1e9))  # under the whole-image estimate (128 B/voxel)
    events = tmp_path / "progress.jsonl"
    capsys.readouterr()
    assert cli_main(["--progress-jsonl", str(events), *_argv(files, tmp_path / "part", "--window", "6",
                                                              "--stride", "2")]) == 0
    err = capsys.readouterr().err
    whole = json.loads((tmp_path / "whole" / "morphometry.json").read_text())
    part = json.loads((tmp_path / "part" / "morphometry.json").read_text())
    assert "slabs" in part and part["slabs"]["slabs"] > 2
    for k in EXACT:
        assert part[k] == whole[k], k
    for k in CLOSE:
        assert part[k] == pytest.approx(whole[k], rel=RTOL), k
    assert part["files"] == whole["files"]
    for name in whole["files"].values():  # thickness maps and sliding-window maps
        a, b = sitk.ReadImage(str(tmp_path / "whole" / name)), sitk.ReadImage(str(tmp_path / "part" / name))
        for get in ("GetSize", "GetSpacing", "GetOrigin", "GetDirection", "GetPixelIDValue"):
            assert getattr(a, get)() == getattr(b, get)(), (name, get)
        x, y = sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b)
        if name.startswith("maps/"):  # box filters sum in another order: float32 rounding at most
            np.testing.assert_allclose(y, x, rtol=1e-6, equal_nan=True)
        else:
            np.testing.assert_array_equal(y, x)
    # progress: one event and one line per slab
    ev = [json.loads(line) for line in events.read_text().splitlines()]
    ev = [e for e in ev if e["stage"] == "morphometry slabs"]
    total = part["slabs"]["slabs"]
    assert [e["done"] for e in ev] == list(range(1, total + 1)) and all(e["total"] == total for e in ev)
    assert len(re.findall(r"^(bone|marrow) slab \d+/\d+", err, re.M)) == total
    assert "measuring in z-slabs" in err


@pytest.mark.parametrize("budget,when", [(1e-3, "before reading"), (1.5e-3, "after the distance pass")])
def test_cli_refuses_when_one_slab_cannot_fit(files, tmp_path, monkeypatch, capsys, budget, when):
    """Too small for the smallest slab (known from the header), or for the halo the distances need."""
    monkeypatch.setenv("CTSMA_MEMORY_GB", str(budget))
    out = tmp_path / "out"
    rc = cli_main(["--quiet", *_argv(files, out)])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2 and "Traceback" not in err and len(lines) == 1, err
    assert re.match(r"ctsma morphometry: error: morphometry of bone\.nii\.gz \([\d,]+ voxels, .*z-slabs.*\) needs "
                    r"about [\d.]+ GB, over the memory budget of [\d.]+ GB \(set CTSMA_MEMORY_GB", lines[0]), lines[0]
    if when == "after the distance pass":
        assert "distances reach" in lines[0]
    assert not out.exists()  # nothing left behind, not even the folder

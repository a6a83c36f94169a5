"""Bone segmentation, subchondral ROIs and label IO (ctsma.segmentation) on an analytic knee CT and a real hip CT."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage as ndi

from ctsma import BONES, ROIS
from ctsma.errors import InputImageError
from ctsma.segmentation import (NoKneeFoundError, LateralityError, knee_side, labels_from_segments,
                                read_user_labels, segment_bones, subchondral_rois, write_seg_nrrd)
from ctsma.segmentation.geometry import crop_box, fill_holes, index_to_lps, lps_to_index

DATA = Path(__file__).parent / "data"


def analytic_knee(spacing=1.0, side="R", gap=3.0, seed=0):
    """Knee CT with known bones: LPS mm, joint line at z=0; for a right knee medial is +x, the fibula at -x.

    Femur: shaft + two ellipsoidal condyles; tibia: elliptic plateau + shaft with a central spine; patella
    anterior (-y); fibula posterolateral with its head 2 voxels from the tibia. Cortex 1100 HU (1.5 mm), marrow
    280 HU, soft tissue 40 HU, air outside the body; Gaussian blur 0.7 mm and 15 HU noise.
    """
    sx, sy, sz = 120, 110, 140
    nx, ny, nz = int(sx / spacing), int(sy / spacing), int(sz / spacing)
    x = (np.arange(nx) * spacing - sx / 2)[None, None, :]
    y = (np.arange(ny) * spacing - sy / 2 + 5)[None, :, None]
    z = (np.arange(nz) * spacing - sz / 2)[:, None, None]
    shape = (nz, ny, nx)
    m = 1.0 if side == "R" else -1.0
    femur = (x ** 2 + (y - 3) ** 2 < 14 ** 2) & (z > 25)
    for cx in (-20, 20):
        femur = femur | (((x - cx) ** 2 / 18 ** 2 + (y - 3) ** 2 / 24 ** 2 + (z - (20 + gap / 2)) ** 2 / 20 ** 2 < 1)
                         & (z > gap / 2))
    femur = femur | (((x ** 2 / 36 ** 2 + (y - 3) ** 2 / 24 ** 2) < 1) & (z > 22) & (z < 45))
    tibia = ((x ** 2 / 38 ** 2 + (y - 5) ** 2 / 26 ** 2) < 1) & (z < -gap / 2) & (z > -30)
    tibia = tibia | (((x ** 2 + (y - 5) ** 2) < 15 ** 2) & (z <= -30))
    tibia = tibia | (((x ** 2 / 6 ** 2 + (y - 5) ** 2 / 10 ** 2) < 1) & (z < -gap / 2 + 5) & (z > -gap / 2 - 1))
    tibia = np.broadcast_to(tibia, shape)
    fib = (((x + m * 36) ** 2 + (y - 32) ** 2) < 7 ** 2) & (z < -12)
    fib = fib | (((x + m * 36) ** 2 + (y - 32) ** 2 + (z + 18) ** 2) < 9 ** 2)
    fib = np.broadcast_to(fib, shape) & ~ndi.binary_dilation(tibia, iterations=2)
    pat = (x ** 2 / 20 ** 2 + (y + 35) ** 2 / 9 ** 2 + (z - 22) ** 2 / 22 ** 2) < 1
    lab = np.zeros(shape, np.uint8)
    for mask, v in ((pat, 3), (fib, 4), (tibia, 2), (femur, 1)):
        lab[np.broadcast_to(mask, shape)] = v
    rng = np.random.default_rng(seed)
    ct = np.full(shape, 40.0, np.float32)
    ct[~np.broadcast_to((x ** 2 / 55 ** 2 + (y - 5) ** 2 / 50 ** 2) < 1, shape)] = -1000
    bone = lab > 0
    ct[bone] = 1100.0
    ct[ndi.binary_erosion(bone, iterations=max(1, int(round(1.5 / spacing))))] = 280.0
    ct = ndi.gaussian_filter(ct, 0.7 / spacing) + rng.normal(0, 15.0, shape)
    img = sitk.GetImageFromArray(ct.astype(np.float32))
    img.SetSpacing((spacing,) * 3)
    img.SetOrigin((-sx / 2, -sy / 2 + 5, -sz / 2))
    truth = sitk.GetImageFromArray(lab)
    truth.CopyInformation(img)
    return img, truth


def dice(a, b):
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


@pytest.fixture(scope="module")
def knee_r():
    return analytic_knee(side="R", gap=3.0)


@pytest.fixture(scope="module")
def bones_r(knee_r):
    return segment_bones(knee_r[0], return_info=True)


def test_geometry_round_trip_on_rotated_grid():
    img = sitk.Image(10, 12, 14, sitk.sitkUInt8)
    img.SetSpacing((0.5, 0.7, 1.2))
    img.SetOrigin((3.0, -4.0, 5.0))
    th = np.deg2rad(30)
    img.SetDirection((np.cos(th), -np.sin(th), 0, np.sin(th), np.cos(th), 0, 0, 0, 1))
    zyx = np.array([[1, 2, 3], [13, 11, 9]])
    pts = index_to_lps(img, zyx)
    for p, q in zip(pts, zyx):
        assert np.allclose(p, img.TransformIndexToPhysicalPoint(tuple(int(v) for v in q[::-1])))
    assert np.allclose(lps_to_index(img, pts), zyx)


def test_bones_found_with_high_dice(knee_r, bones_r):
    truth = sitk.GetArrayFromImage(knee_r[1])
    lab, info = bones_r
    a = sitk.GetArrayFromImage(lab)
    assert set(info["bones"]) == set(BONES)
    d = {k: dice(a == v, truth == v) for k, v in BONES.items()}
    assert d["femur"] > 0.93 and d["tibia"] > 0.93, d
    assert d["patella"] > 0.9 and d["fibula"] > 0.85, d
    assert lab.GetSize() == knee_r[0].GetSize() and lab.GetPixelID() == sitk.sitkUInt8


def test_touching_femur_and_tibia_are_separated():
    ct, truth = analytic_knee(side="L", gap=0.0, spacing=1.0)   # bone on bone: no joint space at all
    a = sitk.GetArrayFromImage(segment_bones(ct))
    t = sitk.GetArrayFromImage(truth)
    assert dice(a == 1, t == 1) > 0.93 and dice(a == 2, t == 2) > 0.93
    # the cut between them follows the contact: in a 6-mm slab around the joint line, labels agree with truth
    zc = index_to_lps(ct, np.array([[k, 0, 0] for k in range(a.shape[0])]))[:, 2]
    slab = np.abs(zc) < 3.0
    sel = np.isin(t[slab], (1, 2))
    assert np.mean(a[slab][sel] == t[slab][sel]) > 0.9


def test_real_hip_ct_says_no_knee():
    ct = sitk.Cast(sitk.ReadImage(str(DATA / "hip_ct_crop_3mm.nii.gz")), sitk.sitkFloat32)
    with pytest.raises(NoKneeFoundError, match="no knee joint found") as err:
        segment_bones(ct)
    # the way round it, named for each command that segments (ctsma infer has no --bones)
    assert all(flag in str(err.value) for flag in ("infer --segmentation", "register --ct-bones", "segment --bones"))


def test_rois_band_depth_side_and_labels(knee_r, bones_r):
    ct, truth = knee_r
    rois, info = subchondral_rois(ct, truth, start_mm=2.0, end_mm=6.0, return_info=True)
    r = sitk.GetArrayFromImage(rois)
    t = sitk.GetArrayFromImage(truth)
    assert info["side"] == "R" and info["side_from"].startswith("anatomy")
    assert set(np.unique(r)) == {0, 1, 2, 3, 4}
    # femoral ROIs lie in the femur, tibial in the tibia, at the requested depth below the SURFACE, which lies
    # half a voxel (0.5 mm here) outside the last bone voxel centre: voxel-centre distance in [2.5, 6.5] mm
    assert np.all(t[(r == 1) | (r == 2)] == 1) and np.all(t[(r == 3) | (r == 4)] == 2)
    for bone, labels in ((1, (1, 2)), (2, (3, 4))):
        depth = ndi.distance_transform_edt(t == bone)
        d = depth[np.isin(r, labels)]
        assert d.min() >= 2.5 - 1e-6 and d.max() <= 6.5 + 1e-6
        assert d.min() < 3.2 and d.max() > 5.8                     # and the band is filled end to end
    # right knee: medial is +x (patient's left); femoral ROIs above the joint line, tibial below
    cen = {k: index_to_lps(ct, np.argwhere(r == v)).mean(0) for k, v in ROIS.items()}
    assert cen["MFC"][0] > 5 and cen["LFC"][0] < -5 and cen["MTP"][0] > 5 and cen["LTP"][0] < -5
    assert cen["MFC"][2] > 0 > cen["MTP"][2]
    # the load-bearing band excludes the femoral shaft and the patellar groove
    assert index_to_lps(ct, np.argwhere(r == 1))[:, 2].max() < 25
    # metadata side overrides anatomy: medial and lateral swap
    r_l = sitk.GetArrayFromImage(subchondral_rois(ct, truth, side="L", start_mm=2.0, end_mm=6.0))
    assert np.array_equal(r_l == 1, r == 2) and np.array_equal(r_l == 3, r == 4)


def test_rois_on_automatic_bones_match_rois_on_true_bones(knee_r, bones_r):
    ct, truth = knee_r
    auto = sitk.GetArrayFromImage(subchondral_rois(ct, bones_r[0]))
    ref = sitk.GetArrayFromImage(subchondral_rois(ct, truth))
    for v in ROIS.values():
        assert dice(auto == v, ref == v) > 0.8


def test_laterality_needs_fibula_or_side(knee_r):
    ct, truth = knee_r
    t = sitk.GetArrayFromImage(truth)
    assert knee_side(t, truth) == "R"
    no_fib = sitk.GetImageFromArray(np.where(t == 4, 0, t).astype(np.uint8))
    no_fib.CopyInformation(truth)
    assert knee_side(sitk.GetArrayFromImage(no_fib), no_fib) is None
    with pytest.raises(LateralityError, match="pass the side"):
        subchondral_rois(ct, no_fib)
    assert sitk.GetArrayFromImage(subchondral_rois(ct, no_fib, side="R")).max() == 4


@pytest.mark.parametrize("side", ["R", "L"])
def test_laterality_from_a_fibular_head_fused_to_the_tibia(side):
    """Where the segmentation merged the fibular head into the tibia (as on the phantom's CTs), the posterolateral
    lobe it leaves tells the side, with a warning; the tibia alone tells nothing."""
    ct, truth = analytic_knee(side=side)
    t = sitk.GetArrayFromImage(truth)
    fused = sitk.GetImageFromArray(np.where(t == 4, 2, t).astype(np.uint8))
    fused.CopyInformation(truth)
    assert knee_side(sitk.GetArrayFromImage(fused), fused) == side
    with pytest.warns(UserWarning, match="shape of the proximal tibia"):
        rois, info = subchondral_rois(ct, fused, return_info=True)
    assert info["side"] == side and info["side_from"] == "anatomy (fibular head fused to the tibia)"
    # the same ROIs as with the fibula labelled: medial and lateral are where they belong
    ref = sitk.GetArrayFromImage(subchondral_rois(ct, truth))
    assert dice(sitk.GetArrayFromImage(rois) == ROIS["MTP"], ref == ROIS["MTP"]) > 0.95


def test_seg_nrrd_and_user_labels_round_trip(tmp_path, knee_r):
    ct, truth = knee_r
    p = write_seg_nrrd(truth, tmp_path / "bones.seg.nrrd", kind="bones")
    back = read_user_labels(p, ct, "bones")
    assert np.array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(truth))
    # a cropped label map (as Slicer saves) is resampled back onto the CT grid
    crop = truth[10:100, 5:90, 20:120]
    sitk.WriteImage(crop, str(tmp_path / "crop.nii.gz"))
    back = sitk.GetArrayFromImage(read_user_labels(tmp_path / "crop.nii.gz", ct, "bones"))
    assert np.array_equal(back[20:120, 5:90, 10:100], sitk.GetArrayFromImage(crop))
    assert back.sum() == sitk.GetArrayFromImage(crop).astype(int).sum()
    # named in-memory masks (a Slicer segmentation node's segments)
    t = sitk.GetArrayFromImage(truth)
    img = labels_from_segments({"Femur": t == 1, "tibia": t == 2}, ct, "bones")
    assert np.array_equal(sitk.GetArrayFromImage(img), np.where(t <= 2, t, 0))
    bad = sitk.GetImageFromArray((t * 3).astype(np.uint8))
    bad.CopyInformation(truth)
    sitk.WriteImage(bad, str(tmp_path / "bad.nrrd"))
    from ctsma.errors import InputImageError
    with pytest.raises(InputImageError, match="label value"):
        read_user_labels(tmp_path / "bad.nrrd", ct, "bones")


@pytest.mark.mrml
def test_rois_seg_nrrd_opens_as_slicer_segmentation(tmp_path, knee_r):
    slicer = pytest.importorskip("slicer")
    if not hasattr(slicer, "vtkMRMLSegmentationStorageNode"):
        pytest.skip("slicer-core MRML classes not available")
    ct, truth = knee_r
    rois = subchondral_rois(ct, truth)
    p = write_seg_nrrd(rois, tmp_path / "rois.seg.nrrd", kind="rois")
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = slicer.vtkMRMLSegmentationStorageNode()
    scene.AddNode(storage)
    storage.SetFileName(str(p))
    assert storage.ReadData(node)
    seg = node.GetSegmentation()
    names = [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]
    assert names == list(ROIS)
    for i, (name, value) in enumerate(ROIS.items()):
        assert seg.GetNthSegment(i).GetLabelValue() == value


def test_cli_segment(tmp_path, knee_r):
    from ctsma.cli.main import main

    ct, _ = knee_r
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    assert main(["--quiet", "segment", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "o"), "--figure"]) == 0
    for f in ("bones.nii.gz", "rois.nii.gz", "rois.seg.nrrd", "bones.seg.nrrd", "segmentation.json", "rois.png"):
        assert (tmp_path / "o" / f).is_file()
    rois = sitk.ReadImage(str(tmp_path / "o" / "rois.nii.gz"))
    assert set(np.unique(sitk.GetArrayFromImage(rois))) == {0, 1, 2, 3, 4}
    # a rerun with --no-rois into the same folder leaves no ROIs of the earlier run beside its bones
    assert main(["--quiet", "segment", str(tmp_path / "ct.nii.gz"), "--out", str(tmp_path / "o"), "--no-rois"]) == 0
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["bones.nii.gz", "bones.seg.nrrd",
                                                                    "segmentation.json"]
    hip = sitk.ReadImage(str(DATA / "hip_ct_crop_3mm.nii.gz"))
    sitk.WriteImage(hip, str(tmp_path / "hip.nii.gz"))
    assert main(["--quiet", "segment", str(tmp_path / "hip.nii.gz"), "--out", str(tmp_path / "h")]) == 2


def test_result_does_not_depend_on_where_the_knee_sits(knee_r, bones_r):
    """The same knee shifted by 150 mm (scanner coordinates differ between sites) gets the same labels."""
    ct = sitk.Image(knee_r[0])
    ct.SetOrigin(tuple(np.array(ct.GetOrigin()) + np.array([40.0, -70.0, -150.0])))
    a = sitk.GetArrayFromImage(segment_bones(ct))
    assert np.array_equal(a, sitk.GetArrayFromImage(bones_r[0]))


def test_bones_and_rois_found_in_the_bone_box_equal_those_of_the_whole_ct(knee_r, bones_r):
    """segment_bones works on the bone's bounding box grown by a margin of air (a clinical knee CT is mostly air
    and soft tissue): the labels and edge threshold are those of the whole CT, and padding the CT with air in-plane
    changes neither the bones nor the ROIs (not along z: the knee's shafts run out of the field of view there, and
    air below them would be a bone end)."""
    from ctsma.segmentation import bones as bones_mod

    pad = [25, 30, 0]
    ct = sitk.ConstantPad(knee_r[0], pad, pad, -1000.0)
    arr = sitk.GetArrayViewFromImage(ct)
    box = bones_mod._bone_box(arr, bones_mod.BoneSegmentationSettings().threshold_hu)
    assert box is not None and all(b.stop - b.start < n for b, n in zip(box[1:], arr.shape[1:]))  # smaller in-plane
    got, info = segment_bones(ct, return_info=True)
    whole, _, edge = bones_mod._segment(ct, bones_mod.BoneSegmentationSettings(), None)
    assert np.array_equal(sitk.GetArrayFromImage(got), whole)
    assert info["edge_hu"] == edge == bones_r[1]["edge_hu"]
    inner = tuple(slice(p, n - p) for p, n in zip(pad[::-1], arr.shape))
    assert np.array_equal(whole[inner], sitk.GetArrayFromImage(bones_r[0]))
    rois = sitk.GetArrayFromImage(subchondral_rois(ct, got))
    assert np.array_equal(rois[inner], sitk.GetArrayFromImage(subchondral_rois(knee_r[0], bones_r[0])))
    assert rois.any() and not rois[:, :pad[1]].any() and not rois[:, :, :pad[0]].any()


def test_plateau_frame_recovers_a_rotated_tilted_plateau():
    """An elliptic plateau (37 x 25 mm, rotated 12 deg about the vertical, tilted 4 deg) with a 3-mm eminence and a
    fibula head 6 mm below it: its centre, axes and tilt come back; the eminence and the fibula do not bias them."""
    from ctsma.segmentation.rois import plateau_frame

    step, sp_ax = 0.5, 0.5
    gx, gy = np.meshgrid(np.arange(-60, 60, step), np.arange(-50, 50, step))
    c, ang = np.array([5.0, -3.0]), np.radians(12.0)
    u = (gx - c[0]) * np.cos(ang) + (gy - c[1]) * np.sin(ang)
    v = -(gx - c[0]) * np.sin(ang) + (gy - c[1]) * np.cos(ang)
    plate = (u / 37.0) ** 2 + (v / 25.0) ** 2 < 1
    top = 30.0 + np.tan(np.radians(4.0)) * gx + 3.0 * np.exp(-0.5 * (u / 3.5) ** 2 - 0.5 * (v / 7.0) ** 2)
    fib = ((u + 36.0) ** 2 + (v - 16.0) ** 2 < 10.0 ** 2) & ~plate
    height = np.where(plate, top, np.where(fib, top - 6.0, -1.0))
    has_t = height > 0
    t_high = np.where(has_t, np.round(height / sp_ax), -1).astype(int)
    f = plateau_frame(t_high, has_t, gx, gy, sp_ax)
    assert np.allclose(f.centre, c, atol=0.3)
    assert abs(np.degrees(np.arctan2(f.u[1], f.u[0])) - 12.0) < 0.5
    assert abs(f.half_width - 37.0) < 0.5 and abs(f.half_depth - 25.0) < 0.5
    assert abs(f.tilt_deg - 4.0) < 0.3
    # a round plateau has no medio-lateral axis of its own: the image x axis is kept
    round_ = (gx ** 2 + gy ** 2) < 30.0 ** 2
    f = plateau_frame(np.where(round_, 60, -1), round_, gx, gy, sp_ax)
    assert np.allclose(f.u, [1.0, 0.0]) and abs(f.half_width - 30.0) < 0.5


def test_rois_turn_with_an_axially_rotated_knee(knee_r):
    """The knee turned 15 deg about the vertical axis (external rotation in the scanner) gets the same ROIs,
    turned: the footprints follow the plateau's own axes, not the image's."""
    ct, truth = knee_r
    rot = sitk.Euler3DTransform()
    rot.SetCenter((0.0, 5.0, 0.0))
    rot.SetRotation(0.0, 0.0, np.radians(15.0))
    turned = sitk.Resample(truth, truth, rot, sitk.sitkNearestNeighbor, 0)
    ref = sitk.Resample(subchondral_rois(ct, truth, side="R"), truth, rot, sitk.sitkNearestNeighbor, 0)
    got = sitk.GetArrayFromImage(subchondral_rois(ct, turned, side="R"))
    ref = sitk.GetArrayFromImage(ref)
    for k, v in ROIS.items():
        assert dice(got == v, ref == v) > 0.9, k      # measured 0.97-0.98 (image-axis footprints: MTP 0.80)


@pytest.mark.parametrize("plane_axis", [None, 0, 1, 2])
def test_fill_holes_equals_scipy(plane_axis):
    """The label-based hole filling gives scipy's array, with the 3D structure and in-plane structures."""
    rng = np.random.default_rng(3)
    st = None
    if plane_axis is not None:
        st = np.zeros((3, 3, 3), bool)
        idx = [slice(None)] * 3
        idx[plane_axis] = 1
        st[tuple(idx)] = ndi.generate_binary_structure(2, 1)
    for trial in range(6):
        shape = tuple(int(n) for n in rng.integers(4, 30, 3))
        f = ndi.gaussian_filter(rng.normal(size=shape), rng.uniform(0.5, 2.5))
        mask = f > np.quantile(f, rng.uniform(0.2, 0.8))
        mask[tuple(s // 2 for s in shape)] = False  # a hole candidate in the middle
        np.testing.assert_array_equal(fill_holes(mask, st), ndi.binary_fill_holes(mask, structure=st))
    shell = np.zeros((9, 9, 9), bool)
    shell[1:8, 1:8, 1:8] = True
    shell[3:6, 3:6, 3:6] = False  # an enclosed cavity is filled; a cavity open to a face is not
    filled = fill_holes(shell)
    assert filled[4, 4, 4] and not filled[0].any()
    shell[3:6, 3:6, 0:6] = False
    assert not fill_holes(shell)[4, 4, 4]


@pytest.mark.parametrize("margin", [0, 3, (1, 0, 7)])
def test_crop_box_is_the_grown_bounding_box(margin):
    """crop_box (from the mask's projections) against the bounding box of np.argwhere, clipped at the borders."""
    rng = np.random.default_rng(3)
    for _ in range(20):
        mask = np.zeros((30, 25, 40), np.uint8)
        lo = rng.integers(0, [30, 25, 40])
        hi = lo + rng.integers(1, 12, 3)
        mask[lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]] = rng.integers(0, 3, size=mask[lo[0]:hi[0], lo[1]:hi[1],
                                                                                   lo[2]:hi[2]].shape)
        if not mask.any():
            continue
        idx = np.argwhere(mask > 0)
        m = np.broadcast_to(np.asarray(margin), (3,))
        want = tuple(slice(max(a - k, 0), min(b + k + 1, n)) for a, b, k, n in
                     zip(idx.min(0), idx.max(0), m, mask.shape))
        assert crop_box(mask, margin) == want
    with pytest.raises(ValueError, match="crop_box of an empty mask"):
        crop_box(np.zeros((4, 4, 4)), 1)


def test_fill_holes_takes_any_mask_dtype_and_falls_back_for_other_structures():
    cube = np.ones((5, 5, 5), np.uint8)
    cube[2, 2, 2] = 0
    assert fill_holes(cube).all()  # a uint8 mask is a mask, not bits to invert
    big = np.ones((5, 5, 5), bool)  # a 5x5x5 structure: scipy's own fill
    np.testing.assert_array_equal(fill_holes(cube.astype(bool), big), ndi.binary_fill_holes(cube.astype(bool), big))


def test_both_knees_are_found_even_when_one_knees_bones_touch():
    """In a CT of both knees, an arthritic knee's femur and tibia may come out as one piece (a narrowed joint):
    the second knee is still seen (any big piece far away in x), the side picks the parts of one knee, and no
    side is refused."""
    import numpy as np

    from ctsma.segmentation.bones import BothKneesError, _one_knee, _Part

    def part(label, ml, x, z):
        return _Part(label, int(ml * 1000), ml, np.array([x, 0.0, z]), z - 30, z + 30, 70.0)

    right = [part(1, 300.0, -90.0, 40.0), part(2, 250.0, -90.0, -40.0), part(3, 20.0, -95.0, 10.0)]  # separate
    left = [part(4, 520.0, 90.0, 0.0)]                                    # femur and tibia touching: one piece
    with pytest.raises(BothKneesError, match="both knees"):
        _one_knee(right + left, None)
    assert [p.label for p in _one_knee(right + left, "L")] == [4]        # the patient's left knee lies at +x
    assert [p.label for p in _one_knee(right + left, "R")] == [1, 2, 3]
    assert _one_knee(right, None) == right                                # one knee: nothing to choose
    pelvis = [part(5, 500.0, 0.0, 0.0)]
    pelvis[0].width_x = 290.0                                            # too wide for a knee: no "both knees"
    assert _one_knee(pelvis + [part(6, 100.0, 110.0, -60.0), part(7, 100.0, -110.0, -60.0)], None)[0] is pelvis[0]


@pytest.mark.parametrize("extra, message", [
    (["--no-rois", "--figure"], "--figure applies to the ROIs"),
    (["--no-rois", "--start-mm", "2", "--end-mm", "5"], "--start-mm, --end-mm apply to the ROIs"),
    (["--bones", "bones.nii.gz", "--threshold-hu", "300"], "--threshold-hu applies to the automatic"),
])
def test_cli_segment_refuses_options_that_other_options_make_meaningless(tmp_path, capsys, extra, message):
    """They were silently ignored: --no-rois wrote no rois.png for --figure, --bones ignored --threshold-hu."""
    from ctsma.cli.main import main

    out = tmp_path / "o"
    assert main(["--quiet", "segment", str(tmp_path / "missing_ct.nii.gz"), "--out", str(out), *extra]) == 2
    assert message in capsys.readouterr().err and not out.exists()


def test_cli_segment_refuses_an_infer_output_folder(tmp_path, capsys):
    """Its bones and ROIs would have replaced infer's (and --no-rois removed its rois.nii.gz): the maps and tables
    beside them then described other ROIs."""
    from ctsma.cli.main import main

    for marker in ("summary.json", "roi_table.csv"):
        out = tmp_path / marker.split(".")[0]
        out.mkdir()
        (out / marker).write_text("{}")
        (out / "rois.nii.gz").write_text("infer's")
        assert main(["--quiet", "segment", str(tmp_path / "missing_ct.nii.gz"), "--out", str(out), "--no-rois"]) == 2
        assert "is the output folder of 'ctsma infer'" in capsys.readouterr().err
        assert (out / "rois.nii.gz").read_text() == "infer's"


def test_user_bones_with_femur_and_tibia_swapped_are_refused(tmp_path, knee_r):
    """Labels 1 and 2 swapped (another tool's numbering): 'infer' ran, placing the tibial ROIs on the femur, with the
    femoral ROIs empty and a warning to check the ROI segmentation."""
    ct, truth = knee_r
    t = sitk.GetArrayFromImage(truth)
    swapped = sitk.GetImageFromArray(np.choose(t, [0, 2, 1, 3, 4]).astype(np.uint8))
    swapped.CopyInformation(truth)
    sitk.WriteImage(swapped, str(tmp_path / "swapped.nii.gz"))
    with pytest.raises(InputImageError, match=r"label 1 \(femur\) lies \d+ mm below label 2 \(tibia\).*swapped"):
        read_user_labels(tmp_path / "swapped.nii.gz", ct, "bones")
    sitk.WriteImage(truth, str(tmp_path / "right.nii.gz"))  # the right way round passes
    assert np.array_equal(sitk.GetArrayFromImage(read_user_labels(tmp_path / "right.nii.gz", ct, "bones")), t)

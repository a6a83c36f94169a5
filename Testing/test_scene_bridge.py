"""Scene bridge round trips against the real MRML scene of the slicer-core wheel.

Every check compares physical positions (LPS mm) of voxels or mapped points, never raw arrays
alone, on right- and left-handed, oblique and anisotropic grids. Tolerance: 1e-4 mm.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

pytestmark = pytest.mark.mrml

TOL_MM = 1e-4
F = np.array([-1.0, -1.0, 1.0])  # LPS <-> RAS


def _rotation(axis, angle):
    return np.array(sitk.VersorTransform(tuple(map(float, axis)), float(angle)).GetMatrix()).reshape(3, 3)


GEOMETRIES = {
    # name: (spacing (x, y, z), direction 3x3, origin)
    "axis_rh_aniso": ((0.3, 0.5, 1.25), np.eye(3), (10.0, -20.0, 30.0)),
    "oblique_rh_aniso": ((0.4, 0.7, 1.1), _rotation((0.2, 0.3, 0.9), 0.6), (-5.5, 12.0, 7.25)),
    "oblique_lh_aniso": ((0.35, 0.6, 1.4), _rotation((0.5, -0.2, 0.4), 0.8) @ np.diag([1, 1, -1]), (3.0, 4.0, -8.0)),
    "axis_lh_flip_x": ((0.8, 0.8, 2.0), np.diag([-1.0, 1.0, 1.0]), (0.0, 0.0, 0.0)),
}


def _image(geometry, size=(7, 6, 5), pixel=np.float32, seed=0):
    spacing, direction, origin = GEOMETRIES[geometry]
    rng = np.random.default_rng(seed)
    arr = rng.normal(size=size[::-1]).astype(pixel)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetDirection(tuple(map(float, np.asarray(direction).ravel())))
    img.SetOrigin(origin)
    return img


def _assert_same_physical_image(a, b, tol=TOL_MM, label=False):
    """Every voxel of ``a`` is found in ``b`` at the same LPS position with the same value."""
    arr_a = sitk.GetArrayViewFromImage(a)
    arr_b = sitk.GetArrayViewFromImage(b)
    nx, ny, nz = a.GetSize()
    worst = 0.0
    for k in range(nz):
        for j in range(ny):
            for i in range(nx):
                p = a.TransformIndexToPhysicalPoint((i, j, k))
                cidx = np.array(b.TransformPhysicalPointToContinuousIndex(p))
                idx = np.round(cidx).astype(int)
                worst = max(worst, float(np.max(np.abs(np.array(b.TransformIndexToPhysicalPoint(
                    tuple(map(int, idx)))) - np.array(p)))))
                assert np.all(idx >= 0) and np.all(idx < np.array(b.GetSize())), f"voxel {(i, j, k)} left the grid"
                va, vb = arr_a[k, j, i], arr_b[idx[2], idx[1], idx[0]]
                assert va == vb if label else math.isclose(float(va), float(vb), abs_tol=1e-6)
    assert worst < tol, f"physical position error {worst} mm"


def _lps_points_inside(img, n=25, margin=1.0, seed=3):
    rng = np.random.default_rng(seed)
    size = np.array(img.GetSize(), float)
    idx = rng.uniform(margin, size - 1 - margin, size=(n, 3))
    return np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(map(float, i))) for i in idx])


def _max_mapping_error(sitk_tx, node, points_lps):
    from CTSMALib import scene_bridge as sb

    return max(float(np.abs(np.array(sitk_tx.TransformPoint(tuple(map(float, p))))
                            - sb.transform_point_ras(node, p * F) * F).max()) for p in points_lps)


# -- the test bed ------------------------------------------------------------------------------
def test_headless_scene_is_set_up_like_the_application(headless_slicer):
    import slicer

    scene = headless_slicer.scene
    assert slicer.mrmlScene is scene
    assert slicer.modules.volumes.logic().IsA("vtkSlicerVolumesLogic")
    assert slicer.modules.segmentations.logic().IsA("vtkSlicerSegmentationsModuleLogic")
    assert slicer.modules.transforms.logic().IsA("vtkSlicerTransformLogic")
    assert headless_slicer.app_logic.GetModuleLogic("Tables").IsA("vtkSlicerTablesLogic")
    assert scene.GetFirstNodeByName("Grey") is not None
    scene.Clear(0)  # the default colour tables survive a scene close, as in Slicer
    assert scene.GetFirstNodeByName("Grey") is not None
    # slicer.util helpers that need the global scene work
    node = slicer.util.addVolumeFromArray(np.zeros((2, 3, 4), np.float32), name="probe")
    assert slicer.util.getNode("probe") is node


# -- volumes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_volume_round_trip_keeps_physical_positions(mrml_scene, geometry):
    from CTSMALib import scene_bridge as sb

    img = _image(geometry)
    node = sb.sitk_to_volume_node(img, mrml_scene, "v")
    # the node's own geometry: voxel (i, j, k) at RAS = F * LPS
    import vtk

    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    for ijk in [(0, 0, 0), (6, 5, 4), (3, 1, 2)]:
        ras = np.array(m.MultiplyPoint((*ijk, 1.0))[:3])
        assert np.abs(ras * F - np.array(img.TransformIndexToPhysicalPoint(ijk))).max() < TOL_MM
    back = sb.volume_node_to_sitk(node)
    _assert_same_physical_image(img, back)


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_volume_agrees_with_slicer_file_io(mrml_scene, tmp_path, geometry):
    """Slicer's own reader/writer (not our matrix code) agree with the bridge."""
    import slicer

    from CTSMALib import scene_bridge as sb

    img = _image(geometry, seed=1)
    # ours -> Slicer writer -> SimpleITK reader
    node = sb.sitk_to_volume_node(img, mrml_scene, "v")
    writer = slicer.vtkMRMLVolumeArchetypeStorageNode()
    writer.SetFileName(str(tmp_path / "from_slicer.nrrd"))
    assert writer.WriteData(node)
    _assert_same_physical_image(img, sitk.ReadImage(str(tmp_path / "from_slicer.nrrd")))
    # SimpleITK writer -> Slicer reader (flips left-handed grids) -> ours
    sitk.WriteImage(img, str(tmp_path / "from_sitk.nrrd"))
    read_node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "read")
    reader = slicer.vtkMRMLVolumeArchetypeStorageNode()
    reader.SetFileName(str(tmp_path / "from_sitk.nrrd"))
    assert reader.ReadData(read_node)
    _assert_same_physical_image(img, sb.volume_node_to_sitk(read_node))


def test_volume_under_linear_transform_exports_world_geometry(mrml_scene):
    from CTSMALib import scene_bridge as sb

    img = _image("oblique_rh_aniso")
    node = sb.sitk_to_volume_node(img, mrml_scene, "v")
    shift = sitk.TranslationTransform(3, (4.0, -2.0, 1.5))  # fixed->moving: FromParent
    tnode = sb.sitk_transform_to_node(shift, mrml_scene, "shift")
    node.SetAndObserveTransformNodeID(tnode.GetID())
    world = sb.volume_node_to_sitk(node, world=True)
    local = sb.volume_node_to_sitk(node, world=False)
    # ToParent = inverse of the fixed->moving shift: the volume appears moved by -shift
    assert np.allclose(np.array(world.GetOrigin()) - local.GetOrigin(), (-4.0, 2.0, -1.5), atol=TOL_MM)


def test_volume_rejects_non_scalar_images(mrml_scene):
    from ctsma.errors import InputImageError

    from CTSMALib import scene_bridge as sb

    with pytest.raises(InputImageError):
        sb.sitk_to_volume_node(sitk.Image([4, 4], sitk.sitkFloat32), mrml_scene)
    with pytest.raises(InputImageError):
        sb.sitk_to_volume_node(sitk.Image([4, 4, 4], sitk.sitkVectorFloat32, 3), mrml_scene)


def test_dicom_slice_thickness_of_a_volume_node(mrml_scene):
    """The analysis passes the DICOM SliceThickness of the CT's series on (the exported NIfTI loses it); a node
    not loaded from DICOM, or a database without the value, gives None (infer then uses the slice spacing)."""
    from CTSMALib.volumes import dicom_slice_thickness

    class Database:  # the two calls of Slicer's ctkDICOMDatabase that are used, on a fixed table
        def __init__(self, values):
            self.values = values

        def fileForInstance(self, uid):
            return f"/dicom/{uid}.dcm"

        def fileValue(self, path, tag):
            return self.values.get((path, tag), "")

    node = mrml_scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "ct")
    db = Database({("/dicom/1.2.3.dcm", "0018,0050"): "1.25"})
    assert dicom_slice_thickness(node, db) is None                         # not from DICOM
    node.SetAttribute("DICOM.instanceUIDs", "1.2.3 1.2.4")
    assert dicom_slice_thickness(node, db) == pytest.approx(1.25)          # the first instance's value
    for bad in ("", "n/a", "0", "-1", "nan"):
        assert dicom_slice_thickness(node, Database({("/dicom/1.2.3.dcm", "0018,0050"): bad})) is None
    assert dicom_slice_thickness(node, None) is None                       # no database (headless)


# -- transforms --------------------------------------------------------------------------------
def _linear_transforms():
    euler = sitk.Euler3DTransform((1.0, 2.0, 3.0), 0.1, -0.2, 0.3, (4.0, -5.0, 6.0))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.03, 0.02, 0.0, -0.01, 0.97, 0.04, 0.0, 0.03, 1.01))
    affine.SetTranslation((2.0, -1.0, 0.5))
    affine.SetCenter((10.0, 20.0, -5.0))
    return {"euler": euler, "affine": affine,
            "composite": sitk.CompositeTransform([euler, affine])}


@pytest.mark.parametrize("kind", ["euler", "affine", "composite"])
def test_linear_transform_is_fromparent_and_round_trips(mrml_scene, tmp_path, kind):
    from CTSMALib import scene_bridge as sb

    tx = _linear_transforms()[kind]
    node = sb.sitk_transform_to_node(tx, mrml_scene, kind)
    assert node.IsLinear()
    pts = np.random.default_rng(0).uniform(-80, 80, size=(20, 3))
    assert _max_mapping_error(tx, node, pts) < TOL_MM
    back = sb.transform_node_to_sitk(node)
    assert max(np.abs(np.subtract(back.TransformPoint(tuple(p)), tx.TransformPoint(tuple(p)))).max()
               for p in pts) < TOL_MM
    # Slicer's own writer produces a file that SimpleITK maps the same way
    path = sb.write_transform_node(node, tmp_path / "t.h5")
    from_file = sitk.ReadTransform(str(path))
    assert max(np.abs(np.subtract(from_file.TransformPoint(tuple(p)), tx.TransformPoint(tuple(p)))).max()
               for p in pts) < TOL_MM


def test_hardening_a_moving_volume_matches_itk_resampling_direction(mrml_scene):
    """A moving (MR) volume under the fixed->moving transform lands where ITK resampling puts it."""
    import slicer

    from CTSMALib import scene_bridge as sb

    tx = _linear_transforms()["affine"]
    moving = _image("oblique_rh_aniso")
    node = sb.sitk_to_volume_node(moving, mrml_scene, "moving")
    tnode = sb.sitk_transform_to_node(tx, mrml_scene, "t")
    node.SetAndObserveTransformNodeID(tnode.GetID())
    slicer.vtkSlicerTransformLogic.hardenTransform(node)
    hardened = sb.volume_node_to_sitk(node, world=False)
    inverse = tx.GetInverse()
    for ijk in [(0, 0, 0), (6, 5, 4), (2, 3, 1)]:
        q = moving.TransformIndexToPhysicalPoint(ijk)  # a moving-space position
        expected = np.array(inverse.TransformPoint(q))  # the fixed-space point that samples it
        assert np.abs(np.array(hardened.TransformIndexToPhysicalPoint(ijk)) - expected).max() < TOL_MM


@pytest.mark.parametrize("geometry", ["oblique_rh_aniso", "oblique_lh_aniso"])
def test_bspline_transform_maps_like_itk(mrml_scene, geometry):
    from CTSMALib import scene_bridge as sb

    domain = _image(geometry, size=(16, 14, 12))
    bs = sitk.BSplineTransformInitializer(domain, [4, 4, 4])
    rng = np.random.default_rng(5)
    bs.SetParameters(tuple(rng.normal(scale=1.5, size=len(bs.GetParameters()))))
    node = sb.sitk_transform_to_node(bs, mrml_scene, "bspline")
    assert not node.IsLinear()
    pts = _lps_points_inside(domain)
    assert _max_mapping_error(bs, node, pts) < TOL_MM
    back = sb.transform_node_to_sitk(node)
    assert max(np.abs(np.subtract(back.TransformPoint(tuple(p)), bs.TransformPoint(tuple(p)))).max()
               for p in pts) < TOL_MM
    # rigid then B-spline, as a registration writes it
    comp = sitk.CompositeTransform([sitk.Euler3DTransform(domain.TransformContinuousIndexToPhysicalPoint(
        (8, 7, 6)), 0.02, -0.01, 0.03, (0.4, -0.2, 0.3)), bs])
    cnode = sb.sitk_transform_to_node(comp, mrml_scene, "composite")
    assert _max_mapping_error(comp, cnode, pts) < TOL_MM


def _displacement_field(geometry, seed=7):
    grid = _image(geometry, size=(10, 9, 8))
    rng = np.random.default_rng(seed)
    field = sitk.GetImageFromArray(rng.normal(scale=1.0, size=(8, 9, 10, 3)), isVector=True)
    field.CopyInformation(grid)
    return grid, sitk.DisplacementFieldTransform(field)


@pytest.mark.parametrize("geometry", ["oblique_rh_aniso", "oblique_lh_aniso"])
def test_displacement_field_interpolation_is_explicit(mrml_scene, geometry):
    from CTSMALib import scene_bridge as sb

    grid, df = _displacement_field(geometry)
    pts = _lps_points_inside(grid)
    linear = sb.sitk_transform_to_node(df, mrml_scene, "df", interpolation="linear")
    assert _max_mapping_error(df, linear, pts) < TOL_MM
    cubic = sb.sitk_transform_to_node(df, mrml_scene, "df_cubic", interpolation="cubic")
    assert _max_mapping_error(df, cubic, pts) > 0.05  # why the interpolation must be set
    back = sb.transform_node_to_sitk(linear)
    assert max(np.abs(np.subtract(back.TransformPoint(tuple(p)), df.TransformPoint(tuple(p)))).max()
               for p in pts) < TOL_MM
    with pytest.raises(ValueError, match="interpolation must be one of"):
        sb.sitk_transform_to_node(df, mrml_scene, interpolation="nearest")


# -- segmentations -----------------------------------------------------------------------------
def _labels(geometry):
    img = _image(geometry, size=(12, 10, 8))
    arr = np.zeros((8, 10, 12), np.uint8)
    arr[1:4, 2:6, 3:8] = 1
    arr[4:7, 1:4, 1:4] = 2
    arr[5:8, 6:10, 8:12] = 4  # a gap: there is no label 3
    lab = sitk.GetImageFromArray(arr)
    lab.CopyInformation(img)
    return lab


@pytest.mark.parametrize("geometry", sorted(GEOMETRIES))
def test_label_image_round_trips_through_named_segments(mrml_scene, geometry):
    from CTSMALib import scene_bridge as sb

    lab = _labels(geometry)
    n_before = mrml_scene.GetNumberOfNodes()
    seg_node = sb.labelmap_to_segmentation_node(lab, mrml_scene, names=sb.BONE_NAMES,
                                                colors={2: (0.1, 0.2, 0.3)}, name="bones")
    seg = seg_node.GetSegmentation()
    got = {seg.GetNthSegment(i).GetName(): seg.GetNthSegment(i).GetColor() for i in range(seg.GetNumberOfSegments())}
    assert sorted(got) == ["femur", "fibula", "tibia"]
    assert np.allclose(got["tibia"], (0.1, 0.2, 0.3))
    assert len({tuple(np.round(c, 3)) for c in got.values()}) == 3
    # only the segmentation and its display node stay behind
    assert mrml_scene.GetNumberOfNodes() == n_before + 2

    ref = sb.sitk_to_volume_node(sitk.Cast(lab, sitk.sitkFloat32), mrml_scene, "ref")
    back, names = sb.segmentation_node_to_labelmap(seg_node, ref)
    assert names == {1: "femur", 2: "tibia", 4: "fibula"}
    _assert_same_physical_image(lab, back, label=True)
    # without a reference: the smallest grid holding the segments, same physical content
    cropped, _ = sb.segmentation_node_to_labelmap(seg_node)
    assert np.prod(cropped.GetSize()) <= np.prod(lab.GetSize())
    resampled = sitk.Resample(cropped, lab, sitk.Transform(), sitk.sitkNearestNeighbor, 0, cropped.GetPixelID())
    assert np.array_equal(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(lab))


# -- tables ------------------------------------------------------------------------------------
def test_table_round_trip_with_units_and_file(mrml_scene, tmp_path):
    import pandas as pd
    import slicer

    from CTSMALib import scene_bridge as sb

    rows = [{"roi": "MFC", "Tb.Th": 0.21, "BV/TV": 0.3, "n_patches": 12, "kept": True},
            {"roi": "LTP", "Tb.Th": float("nan"), "BV/TV": 0.25, "n_patches": 3, "kept": False}]
    node = sb.table_to_node(rows, mrml_scene, name="roi table", units={"n_patches": "count"},
                            descriptions={"roi": "subchondral ROI"})
    df, units = sb.node_to_dataframe(node)
    expected = pd.DataFrame.from_records(rows)
    pd.testing.assert_frame_equal(df, expected, check_dtype=False)
    assert df["n_patches"].dtype.kind == "i" and df["kept"].dtype == bool
    assert units == {"Tb.Th": "mm", "n_patches": "count"}  # BV/TV is unitless
    assert node.GetColumnDescription("roi") == "subchondral ROI"
    # through Slicer's table storage (CSV + schema sidecar)
    writer = slicer.vtkMRMLTableStorageNode()
    writer.SetFileName(str(tmp_path / "t.tsv"))
    assert writer.WriteData(node)
    again = mrml_scene.AddNewNodeByClass("vtkMRMLTableNode")
    reader = slicer.vtkMRMLTableStorageNode()
    reader.SetFileName(str(tmp_path / "t.tsv"))
    assert reader.ReadData(again)
    df2, units2 = sb.node_to_dataframe(again)
    pd.testing.assert_frame_equal(df2, expected, check_dtype=False)
    assert units2 == units
    # a DataFrame works too, and refilling a node replaces its columns
    sb.table_to_node(expected[["roi"]], mrml_scene, node=node)
    assert list(sb.node_to_dataframe(node)[0].columns) == ["roi"]


# -- whole scene -------------------------------------------------------------------------------
def test_mrb_save_and_reload_round_trip(headless_slicer, tmp_path):
    from CTSMALib import scene_bridge as sb
    from CTSMALib.headless import HeadlessSlicer

    scene = headless_slicer.scene
    img = _image("oblique_lh_aniso", size=(8, 7, 6))
    sb.sitk_to_volume_node(img, scene, "CT")
    lab = _labels("oblique_rh_aniso")
    sb.labelmap_to_segmentation_node(lab, scene, names=sb.ROI_NAMES, name="rois")
    tx = _linear_transforms()["euler"]
    tnode = sb.sitk_transform_to_node(tx, scene, "reg")
    grid, df = _displacement_field("oblique_rh_aniso")
    sb.sitk_transform_to_node(df, scene, "field")
    table = sb.table_to_node([{"roi": "MTP", "Tb.Sp": 0.8}], scene, name="table")
    folder = sb.put_in_folder(scene, [tnode, table], "results")
    assert folder

    path = sb.save_scene_mrb(scene, tmp_path / "scene.mrb")
    assert path.exists() and not list(tmp_path.glob("*.partial*"))

    with HeadlessSlicer(cache_dir=tmp_path / "cache2", install_globals=False) as other:
        # a plain reload falls back to Slicer's cubic grid interpolation ...
        assert other.scene.ReadFromMRB(str(path), True)
        assert _max_mapping_error(df, other.scene.GetFirstNodeByName("field"), _lps_points_inside(grid)) > 0.05
        # ... which load_scene_mrb restores from the node attribute
        sb.load_scene_mrb(other.scene, path)
        s2 = other.scene
        _assert_same_physical_image(img, sb.volume_node_to_sitk(s2.GetFirstNodeByName("CT")))
        seg2 = s2.GetFirstNodeByName("rois")
        back, names = sb.segmentation_node_to_labelmap(seg2)
        assert names == {1: "MFC", 2: "LFC", 4: "LTP"}
        resampled = sitk.Resample(back, lab, sitk.Transform(), sitk.sitkNearestNeighbor, 0, back.GetPixelID())
        assert np.array_equal(sitk.GetArrayFromImage(resampled), sitk.GetArrayFromImage(lab))
        pts = np.random.default_rng(2).uniform(-50, 50, size=(10, 3))
        assert _max_mapping_error(tx, s2.GetFirstNodeByName("reg"), pts) < TOL_MM
        assert _max_mapping_error(df, s2.GetFirstNodeByName("field"), _lps_points_inside(grid)) < TOL_MM
        df_t, units = sb.node_to_dataframe(s2.GetFirstNodeByName("table"))
        assert df_t.to_dict("records") == [{"roi": "MTP", "Tb.Sp": 0.8}] and units == {"Tb.Sp": "mm"}

"""Label image <-> segmentation node with named, coloured segments.

Import goes through a temporary labelmap volume node and Slicer's
``ImportLabelmapToSegmentationNode`` (one segment per label value); each segment is then named
and coloured from the given table, and remembers its label value in the segment tag
``CTSMA.LabelValue``, so the export writes the same values back (even when values are not
consecutive, e.g. femur=1, tibia=2, fibula=4).
"""

from __future__ import annotations

import numpy as np

from ctsma import BONES, ROIS

from .scene_utils import scratch_nodes as _scratch
from .volumes import sitk_to_volume_node, volume_node_to_sitk

LABEL_TAG = "CTSMA.LabelValue"

# Colour-blind-safe defaults (Okabe-Ito), RGB 0..1.
_PALETTE = [(0.90, 0.62, 0.00), (0.34, 0.71, 0.91), (0.00, 0.62, 0.45), (0.94, 0.89, 0.26),
            (0.00, 0.45, 0.70), (0.84, 0.37, 0.00), (0.80, 0.47, 0.65), (0.60, 0.60, 0.60)]

BONE_NAMES = {v: k for k, v in BONES.items()}
ROI_NAMES = {v: k for k, v in ROIS.items()}


def default_color(label: int) -> tuple[float, float, float]:
    return _PALETTE[(int(label) - 1) % len(_PALETTE)]


def labelmap_to_segmentation_node(label_image, scene, names: dict[int, str] | None = None,
                                  colors: dict[int, tuple] | None = None, name: str = "Segmentation",
                                  node=None, reference_volume_node=None):
    """Put a SimpleITK label image into a segmentation node, one named, coloured segment per label.

    ``names`` maps label value -> segment name (missing labels are called ``label_<v>``);
    ``colors`` maps label value -> RGB in 0..1 (default: a colour-blind-safe palette).
    """
    import slicer
    import SimpleITK as sitk

    names = dict(names or {})
    colors = dict(colors or {})
    labels = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(label_image)) if v != 0]
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
    if reference_volume_node is not None:
        node.SetReferenceImageGeometryParameterFromVolumeNode(reference_volume_node)
    existing = {node.GetSegmentation().GetNthSegmentID(i)
                for i in range(node.GetSegmentation().GetNumberOfSegments())}
    with _scratch(scene, keep=[node]):
        tmp = sitk_to_volume_node(sitk.Cast(label_image, sitk.sitkInt16), scene, name="ctsma_tmp_labels",
                                  labelmap=True)
        if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(tmp, node):
            raise RuntimeError("Slicer could not import the label image into a segmentation")
    seg = node.GetSegmentation()
    new_ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())
               if seg.GetNthSegmentID(i) not in existing]
    if len(new_ids) != len(labels):
        raise RuntimeError(f"expected {len(labels)} segments from the label image, got {len(new_ids)}")
    for seg_id in new_ids:
        segment = seg.GetSegment(seg_id)
        value = int(segment.GetLabelValue())
        segment.SetName(names.get(value, f"label_{value}"))
        segment.SetColor(*map(float, colors.get(value, default_color(value))))
        segment.SetTag(LABEL_TAG, str(value))
    return node


def segment_label_values(node) -> dict[str, int]:
    """Segment ID -> label value (from the CT-SMA tag, else the segment's order + 1)."""
    import vtk

    seg = node.GetSegmentation()
    out = {}
    for i in range(seg.GetNumberOfSegments()):
        seg_id = seg.GetNthSegmentID(i)
        tag = vtk.reference("")
        found = seg.GetSegment(seg_id).GetTag(LABEL_TAG, tag)
        out[seg_id] = int(str(tag)) if found and str(tag).strip() else i + 1
    return out


def segmentation_node_to_labelmap(node, reference_volume_node=None):
    """A segmentation node as a SimpleITK label image (LPS) plus ``{label value: segment name}``.

    With ``reference_volume_node`` the label image has that volume's grid; otherwise the
    smallest grid holding every segment. Label values come from :func:`segment_label_values`.
    """
    values = segment_label_values(node)
    seg = node.GetSegmentation()
    names = {v: seg.GetSegment(sid).GetName() for sid, v in values.items()}
    with _scratch(node.GetScene(), keep=[node]):
        image = _export(node, values, names, reference_volume_node)
    return image, names


def _export(node, values, names, reference_volume_node):
    import slicer
    import vtk

    scene = node.GetScene()
    # A colour table whose entry names are the segment names makes the export use our label values.
    lut = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "ctsma_tmp_lut")
    lut.SetTypeToUser()
    lut.SetNumberOfColors(max(values.values(), default=0) + 1)
    lut.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
    for value, seg_name in names.items():
        lut.SetColor(value, seg_name, *default_color(value), 1.0)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "ctsma_tmp_export")
    ids = vtk.vtkStringArray()
    for sid in values:
        ids.InsertNextValue(sid)
    mode = slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        node, ids, labelmap, reference_volume_node, mode, lut)
    if not ok:
        raise RuntimeError(f"Slicer could not export segmentation '{node.GetName()}' to a label image")
    return volume_node_to_sitk(labelmap)

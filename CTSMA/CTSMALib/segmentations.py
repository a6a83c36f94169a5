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


def segment_label_values(node, kind: str | None = None) -> dict[str, int]:
    """Segment ID -> label value.

    Without ``kind``: the CT-SMA tag, else the segment's order + 1 (a segmentation of any content). With ``kind``
    (``"bones"`` or ``"rois"``) the values are CT-SMA's, read from the segment names (:func:`_values_by_name`):
    a segment's position in the list or a tag left from another kind says nothing about what it holds."""
    import vtk

    seg = node.GetSegmentation()
    if kind is not None:
        return _values_by_name(node, kind)
    out = {}
    for i in range(seg.GetNumberOfSegments()):
        seg_id = seg.GetNthSegmentID(i)
        tag = vtk.reference("")
        found = seg.GetSegment(seg_id).GetTag(LABEL_TAG, tag)
        try:
            out[seg_id] = int(str(tag)) if found and str(tag).strip() else i + 1
        except ValueError:
            out[seg_id] = i + 1  # a tag that is not a number (edited by hand): as an untagged segment
    return out


def _values_by_name(node, kind: str) -> dict[str, int]:
    """CT-SMA label values of a bone or ROI segmentation, from its segment names.

    Segments named for ``kind`` (``femur``, ``tibia``, ... or ``MFC``, ``LFC``, ..., with common aliases) get their
    value, several segments of one name share it, and other segments are left out with a warning. A segmentation
    whose every segment is named for the other kind (the ROIs chosen as the bones, or the reverse) is refused. One
    with no known name, such as a label image imported into Slicer (its segments named from a colour table), keeps
    the label values it was imported with when they are all CT-SMA values of ``kind``, with a warning."""
    import warnings

    from ctsma.errors import InputImageError
    from ctsma.segmentation.labelio import value_for_name

    table = BONES if kind == "bones" else ROIS
    other = "rois" if kind == "bones" else "bones"
    what = {"bones": "bone", "rois": "subchondral ROI"}
    seg = node.GetSegmentation()
    ids = [seg.GetNthSegmentID(i) for i in range(seg.GetNumberOfSegments())]
    names = {sid: seg.GetSegment(sid).GetName() or "" for sid in ids}
    known = {sid: value_for_name(n, kind) for sid, n in names.items()}
    known = {sid: v for sid, v in known.items() if v is not None}
    expected = ", ".join(f"{k}={v}" for k, v in table.items())
    if known:
        left = [names[sid] for sid in ids if sid not in known]
        if left:
            warnings.warn(f"segmentation '{node.GetName()}': segment(s) {', '.join(map(repr, left))} are not "
                          f"{what[kind]}s ({expected}); left out", stacklevel=3)
        return known
    if ids and all(value_for_name(n, other) is not None for n in names.values()):
        raise InputImageError(f"segmentation '{node.GetName()}' holds {what[other]}s ({', '.join(names.values())}), "
                              f"not {what[kind]}s: select the {what[kind]} segmentation")
    imported = {sid: int(seg.GetSegment(sid).GetLabelValue()) for sid in ids}
    if ids and set(imported.values()) <= set(table.values()):
        warnings.warn(f"segmentation '{node.GetName()}' has no segment named {' / '.join(table)}: its label values "
                      f"are taken as they were imported ({expected})", stacklevel=3)
        return imported
    raise InputImageError(f"no segment of '{node.GetName()}' is named {' / '.join(table)} (it has "
                          f"{', '.join(map(repr, names.values())) or 'no segments'}): name its segments so in the "
                          "Segment Editor")


def segmentation_node_to_labelmap(node, reference_volume_node=None, kind: str | None = None):
    """A segmentation node as a SimpleITK label image (LPS) plus ``{label value: segment name}``.

    With ``reference_volume_node`` the label image has that volume's grid; otherwise the
    smallest grid holding every segment. Label values come from :func:`segment_label_values` (by name for a
    ``kind``, ``"bones"`` or ``"rois"``).
    """
    values = segment_label_values(node, kind)
    seg = node.GetSegmentation()
    names = {v: seg.GetSegment(sid).GetName() for sid, v in values.items()}
    with _scratch(node.GetScene(), keep=[node]):
        image = _export(node, values, reference_volume_node)
    return image, names


def _export(node, values, reference_volume_node):
    import slicer
    import SimpleITK as sitk
    import vtk

    scene = node.GetScene()
    seg = node.GetSegmentation()
    # A colour table whose entry names are the segment names makes the export write each segment at its name's
    # entry. A table holds one name per entry, so segments of different names that share a label value (aliases,
    # "femur" and "Femoral") get entries of their own, mapped to the value afterwards.
    name_of = {sid: seg.GetSegment(sid).GetName() for sid in values}
    entry = {n: i + 1 for i, n in enumerate(dict.fromkeys(name_of.values()))}
    to_value = np.zeros(len(entry) + 1, np.int64)
    for sid, value in values.items():
        to_value[entry[name_of[sid]]] = value
    lut = scene.AddNewNodeByClass("vtkMRMLColorTableNode", "ctsma_tmp_lut")
    lut.SetTypeToUser()
    lut.SetNumberOfColors(len(entry) + 1)
    lut.SetColor(0, "Background", 0.0, 0.0, 0.0, 0.0)
    for seg_name, i in entry.items():
        lut.SetColor(i, seg_name, *default_color(i), 1.0)
    labelmap = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "ctsma_tmp_export")
    ids = vtk.vtkStringArray()
    for sid in values:
        ids.InsertNextValue(sid)
    mode = slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    ok = slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        node, ids, labelmap, reference_volume_node, mode, lut)
    if not ok:
        raise RuntimeError(f"Slicer could not export segmentation '{node.GetName()}' to a label image")
    exported = volume_node_to_sitk(labelmap)
    arr = sitk.GetArrayFromImage(exported).astype(np.int64)
    dtype = np.uint8 if to_value.max() < 256 else np.uint16
    out = sitk.GetImageFromArray(to_value[np.clip(arr, 0, len(to_value) - 1)].astype(dtype))
    out.CopyInformation(exported)
    return out

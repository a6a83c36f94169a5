"""The bridge between CT-SMA's files/SimpleITK objects and the Slicer scene.

One import for module code::

    from CTSMALib import scene_bridge as sb
    node = sb.sitk_to_volume_node(image, slicer.mrmlScene, "CT")

Conventions (see ``docs/slicer.md``): SimpleITK objects are in LPS mm, the scene in RAS;
a registration transform maps fixed (CT) points to moving (MR) points, which is Slicer's
FromParent direction. Round trips preserve physical positions, not necessarily voxel order
(Slicer may flip the last axis of a left-handed grid when it reads a file).
"""

from __future__ import annotations

from pathlib import Path

from .segmentations import (BONE_NAMES, ROI_NAMES, labelmap_to_segmentation_node, segment_label_values,
                            segmentation_node_to_labelmap)
from .tables import node_to_dataframe, table_to_node
from .transforms import (reapply_grid_interpolation, read_transform_file, set_grid_interpolation,
                         sitk_transform_to_node, transform_node_to_sitk, transform_point_ras,
                         write_transform_node)
from .volumes import (LPS_TO_RAS, ijk_to_ras_matrix, sitk_to_volume_node, volume_node_ijk_to_lps,
                      volume_node_to_sitk)

__all__ = [
    "BONE_NAMES", "ROI_NAMES", "LPS_TO_RAS",
    "sitk_to_volume_node", "volume_node_to_sitk", "ijk_to_ras_matrix", "volume_node_ijk_to_lps",
    "sitk_transform_to_node", "transform_node_to_sitk", "read_transform_file", "write_transform_node",
    "transform_point_ras", "set_grid_interpolation", "reapply_grid_interpolation",
    "labelmap_to_segmentation_node", "segmentation_node_to_labelmap", "segment_label_values",
    "table_to_node", "node_to_dataframe",
    "put_in_folder", "study_item_of", "save_scene_mrb", "load_scene_mrb",
]


def study_item_of(scene, node) -> int:
    """The subject-hierarchy study (else patient) item above ``node``; the scene item if none.

    A CT loaded from DICOM sits under its patient and study; results placed under that item
    appear with the CT in the Data module."""
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    scene_item = sh.GetSceneItemID()
    item = sh.GetItemByDataNode(node) if node is not None else 0
    found = {}
    while item and item != scene_item:
        level = sh.GetItemLevel(item)
        if level in ("Study", "Patient") and level not in found:
            found[level] = item
        item = sh.GetItemParent(item)
    return found.get("Study") or found.get("Patient") or scene_item


def put_in_folder(scene, nodes, folder_name: str, under=None) -> int:
    """Place nodes under a subject-hierarchy folder (created if needed); returns the folder item.

    ``under`` is a node (e.g. the CT): the folder then goes under that node's study, or patient,
    in the subject hierarchy (see :func:`study_item_of`); otherwise at the top of the scene.
    Outside the application, subject-hierarchy items are not created automatically, so each
    node gets one here.
    """
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    parent = study_item_of(scene, under) if under is not None else sh.GetSceneItemID()
    folder = sh.GetItemChildWithName(parent, folder_name)
    if not folder:
        folder = sh.CreateFolderItem(parent, folder_name)
    for node in nodes:
        if node is None:
            continue
        item = sh.GetItemByDataNode(node)
        if not item:
            item = sh.CreateItem(folder, node)
        else:
            sh.SetItemParent(item, folder)
    return folder


def save_scene_mrb(scene, path) -> Path:
    """Save the whole scene as a Slicer bundle (.mrb), written atomically.

    Every storable node without a storage node gets its default one first (as Slicer's
    save dialog does), so volumes, segmentations, transforms and tables are all written.
    """
    import os
    import shutil
    import tempfile

    path = Path(path)
    if path.suffix.lower() != ".mrb":
        raise ValueError(f"a scene bundle must end in .mrb: {path}")
    for i in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(i)
        if node.IsA("vtkMRMLStorableNode") and node.GetStorageNode() is None:
            node.AddDefaultStorageNode()
    path.parent.mkdir(parents=True, exist_ok=True)
    # Slicer names the bundle's inner scene after the file, so write under the final name in a
    # temporary folder beside the target, then rename into place (never a half-written .mrb).
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{path.stem}.", suffix=".partial", dir=path.parent))
    try:
        tmp = tmp_dir / path.name
        if not scene.WriteToMRB(str(tmp)) or not tmp.exists():
            raise RuntimeError(f"Slicer could not write the scene bundle {path}")
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return path


def load_scene_mrb(scene, path, clear: bool = True) -> None:
    """Load a .mrb bundle into ``scene`` (needs the remote-IO/data-IO logics of the app or
    :class:`CTSMALib.headless.HeadlessSlicer`), then restore the grid-transform interpolation
    that transform files do not store."""
    if not scene.ReadFromMRB(str(path), clear):
        raise RuntimeError(f"Slicer could not read the scene bundle {path}")
    reapply_grid_interpolation(scene)

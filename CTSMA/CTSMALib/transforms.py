"""ITK (SimpleITK) transform <-> MRML transform node.

Directions: an ITK registration transform maps **fixed (CT) points to moving (MR) points**; that
is Slicer's *FromParent* direction. A transform node built here therefore resamples the moving
image into the fixed space when the moving volume is placed under it.

- Linear transforms are set as a 4x4 FromParent matrix ``F @ M @ F`` (``F = diag(-1,-1,1,1)``)
  where ``M`` is the LPS matrix of the ITK transform, measured by mapping the origin and the unit
  vectors (so any linear SimpleITK transform, composite or not, works).
- Non-linear transforms (B-spline, displacement field, composites) go through an ITK ``.h5``
  file read by Slicer's own transform storage node, which converts ITK's LPS to RAS exactly.
  Grid (displacement-field) interpolation is then set explicitly: Slicer's default is cubic,
  ITK's ``DisplacementFieldTransform`` is linear, and the two differ by up to ~0.6 mm.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np

from .volumes import LPS_TO_RAS, _np_matrix, _vtk_matrix

INTERPOLATIONS = ("linear", "cubic")
INTERPOLATION_ATTRIBUTE = "CTSMA.GridInterpolation"


def linear_matrix_lps(transform) -> np.ndarray | None:
    """The 4x4 LPS matrix of a SimpleITK transform, or ``None`` if it is not linear.

    The matrix is measured by mapping the origin and three unit vectors, so it is right for
    every linear transform class and for composites of linear transforms.
    """
    if not transform.IsLinear():
        return None
    pts = np.vstack([np.zeros(3), np.eye(3) * 100.0])
    mapped = np.array([transform.TransformPoint(tuple(map(float, p))) for p in pts])
    m = np.eye(4)
    m[:3, 3] = mapped[0]
    m[:3, :3] = (mapped[1:] - mapped[0]).T / 100.0
    return m


def _set_grid_interpolation(vtk_transform, interpolation: str) -> int:
    """Set linear/cubic interpolation on every grid transform inside ``vtk_transform``."""
    import vtk

    count = 0
    if isinstance(vtk_transform, vtk.vtkGridTransform):
        if interpolation == "linear":
            vtk_transform.SetInterpolationModeToLinear()
        else:
            vtk_transform.SetInterpolationModeToCubic()
        return 1
    if isinstance(vtk_transform, vtk.vtkGeneralTransform):
        # A composite read from an ITK file lists its parts only once updated: without this, the
        # grid inside a (rigid + displacement field) composite kept Slicer's cubic default.
        vtk_transform.Update()
        for i in range(vtk_transform.GetNumberOfConcatenatedTransforms()):
            count += _set_grid_interpolation(vtk_transform.GetConcatenatedTransform(i), interpolation)
    return count


def sitk_transform_to_node(transform, scene, name: str = "Transform", node=None,
                           interpolation: str = "linear"):
    """Put a SimpleITK transform (fixed->moving, LPS) into a transform node (FromParent)."""
    import SimpleITK as sitk

    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}")
    m = linear_matrix_lps(transform)
    if m is not None:
        if node is None:
            node = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", name)
        node.SetMatrixTransformFromParent(_vtk_matrix(LPS_TO_RAS @ m @ LPS_TO_RAS))
        return node
    with tempfile.TemporaryDirectory(prefix="ctsma-tfm-") as tmp:
        path = Path(tmp) / "transform.h5"
        sitk.WriteTransform(transform, str(path))
        return read_transform_file(path, scene, name=name, node=node, interpolation=interpolation)


def read_transform_file(path, scene, name: str = "Transform", node=None, interpolation: str = "linear"):
    """Read an ITK transform file (.h5/.tfm/.txt) into a transform node with Slicer's reader."""
    import slicer

    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}")
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLTransformNode", name)
    storage = slicer.vtkMRMLTransformStorageNode()  # a fresh one: reusing a writer's failed
    storage.SetFileName(str(path))
    if not storage.ReadData(node):
        raise RuntimeError(f"Slicer could not read the transform file {path}")
    set_grid_interpolation(node, interpolation)
    return node


def set_grid_interpolation(node, interpolation: str = "linear") -> int:
    """Set the interpolation of every displacement grid in a transform node; returns how many.

    The choice is also kept in a node attribute, because ITK transform files do not store it
    and Slicer falls back to cubic when a scene is reloaded: :func:`reapply_grid_interpolation`
    restores it.
    """
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}")
    count = 0
    for vtk_transform in (node.GetTransformFromParent(), node.GetTransformToParent()):
        if vtk_transform is not None:
            count += _set_grid_interpolation(vtk_transform, interpolation)
    if count:
        node.SetAttribute(INTERPOLATION_ATTRIBUTE, interpolation)
        node.Modified()
    return count


def reapply_grid_interpolation(scene) -> int:
    """After loading a scene: restore the grid interpolation recorded on each transform node."""
    count = 0
    for i in range(scene.GetNumberOfNodesByClass("vtkMRMLTransformNode")):
        node = scene.GetNthNodeByClass(i, "vtkMRMLTransformNode")
        interpolation = node.GetAttribute(INTERPOLATION_ATTRIBUTE)
        if interpolation in INTERPOLATIONS:
            count += set_grid_interpolation(node, interpolation)
    return count


def write_transform_node(node, path) -> Path:
    """Write a transform node to an ITK transform file with Slicer's writer."""
    import slicer

    path = Path(path)
    storage = slicer.vtkMRMLTransformStorageNode()
    storage.SetFileName(str(path))
    if not storage.WriteData(node):
        raise RuntimeError(f"Slicer could not write the transform to {path}")
    return path


def transform_node_to_sitk(node):
    """The transform of a node as a SimpleITK transform (fixed->moving, LPS)."""
    import SimpleITK as sitk
    import vtk

    if node.IsLinear():
        vm = vtk.vtkMatrix4x4()
        node.GetMatrixTransformFromParent(vm)
        m = LPS_TO_RAS @ _np_matrix(vm) @ LPS_TO_RAS
        affine = sitk.AffineTransform(3)
        affine.SetMatrix(tuple(map(float, m[:3, :3].ravel())))
        affine.SetTranslation(tuple(map(float, m[:3, 3])))
        return affine
    with tempfile.TemporaryDirectory(prefix="ctsma-tfm-") as tmp:
        path = write_transform_node(node, Path(tmp) / "transform.h5")
        return sitk.ReadTransform(str(path))


def transform_point_ras(node, point_ras) -> np.ndarray:
    """Apply a node's FromParent transform to a RAS point (what Slicer does when resampling)."""
    return np.array(node.GetTransformFromParent().TransformPoint(tuple(map(float, point_ras))))

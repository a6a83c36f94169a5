"""SimpleITK image <-> MRML volume node, geometry preserved.

SimpleITK images live in LPS millimetres; the MRML scene lives in RAS. The voxel-to-world
matrix of a SimpleITK image is ``[D * diag(spacing) | origin]`` (LPS), so the volume node's
IJK->RAS matrix is ``F @ that`` with ``F = diag(-1, -1, 1, 1)``. Voxel arrays are copied
unchanged (numpy (z, y, x) order on both sides); only the matrix changes, so oblique,
anisotropic and left-handed (det < 0) grids all map exactly.
"""

from __future__ import annotations

import math

import numpy as np

from ctsma.errors import InputImageError, UserError

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def _vtk_matrix(m: np.ndarray):
    import vtk

    out = vtk.vtkMatrix4x4()
    for r in range(4):
        for c in range(4):
            out.SetElement(r, c, float(m[r, c]))
    return out


def _np_matrix(vm) -> np.ndarray:
    return np.array([[vm.GetElement(r, c) for c in range(4)] for r in range(4)])


def ijk_to_lps_matrix(image) -> np.ndarray:
    """4x4 voxel-index (x, y, z) -> LPS matrix of a SimpleITK image."""
    m = np.eye(4)
    direction = np.asarray(image.GetDirection(), float).reshape(3, 3)
    m[:3, :3] = direction @ np.diag(image.GetSpacing())
    m[:3, 3] = image.GetOrigin()
    return m


def ijk_to_ras_matrix(image) -> np.ndarray:
    """4x4 IJK -> RAS matrix of a SimpleITK image, as a volume node stores it."""
    return LPS_TO_RAS @ ijk_to_lps_matrix(image)


def _geometry_from_ijk_to_lps(m: np.ndarray):
    spacing = np.linalg.norm(m[:3, :3], axis=0)
    direction = m[:3, :3] / spacing
    return tuple(map(float, spacing)), tuple(map(float, direction.ravel())), tuple(map(float, m[:3, 3]))


def sitk_to_volume_node(image, scene, name: str = "Volume", node=None, labelmap: bool = False):
    """Put a 3D scalar SimpleITK image into a (new or given) scalar/labelmap volume node.

    The node gets the image's voxels and its exact geometry; a display node is created
    when the node is new. Returns the node.
    """
    import slicer
    import SimpleITK as sitk

    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise InputImageError(f"{name}: only 3D scalar images can be shown as volumes "
                              f"(got {image.GetDimension()}D with {image.GetNumberOfComponentsPerPixel()} components)")
    if node is None:
        cls = "vtkMRMLLabelMapVolumeNode" if labelmap else "vtkMRMLScalarVolumeNode"
        node = scene.AddNewNodeByClass(cls, name)
        node.CreateDefaultDisplayNodes()
    array = sitk.GetArrayFromImage(image)  # (z, y, x), a copy
    node.SetIJKToRASMatrix(_vtk_matrix(ijk_to_ras_matrix(image)))
    slicer.util.updateVolumeFromArray(node, array)
    return node


def volume_node_ijk_to_lps(node, world: bool = True) -> np.ndarray:
    """IJK -> LPS matrix of a volume node; with ``world``, linear parent transforms are applied."""
    import vtk

    ijk_to_ras = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(ijk_to_ras)
    m = _np_matrix(ijk_to_ras)
    parent = node.GetParentTransformNode()
    if world and parent is not None:
        if not parent.IsTransformToWorldLinear():
            raise UserError(f"volume '{node.GetName()}' is under a non-linear transform: harden the "
                            "transform (Data module) or remove it before exporting")
        to_world = vtk.vtkMatrix4x4()
        parent.GetMatrixTransformToWorld(to_world)
        m = _np_matrix(to_world) @ m
    return LPS_TO_RAS @ m


def volume_node_to_sitk(node, world: bool = True):
    """The voxels and geometry of a scalar volume node as a SimpleITK image (LPS)."""
    import slicer
    import SimpleITK as sitk

    if node is None:
        raise InputImageError("no volume selected: load or select a volume")
    if not (hasattr(node, "IsA") and node.IsA("vtkMRMLScalarVolumeNode")):
        name = node.GetName() if hasattr(node, "GetName") else str(node)
        raise InputImageError(f"'{name}' is not a scalar volume: select a volume")
    data = node.GetImageData()
    if data is None or data.GetPointData() is None or data.GetPointData().GetScalars() is None \
            or min(data.GetDimensions()) < 1:
        raise InputImageError(f"volume '{node.GetName()}' has no voxels: load or select another volume")
    array = slicer.util.arrayFromVolume(node)
    if array.ndim != 3:
        raise InputImageError(f"volume '{node.GetName()}' is not a 3D scalar volume")
    image = sitk.GetImageFromArray(np.ascontiguousarray(array))
    spacing, direction, origin = _geometry_from_ijk_to_lps(volume_node_ijk_to_lps(node, world=world))
    image.SetSpacing(spacing)
    image.SetDirection(direction)
    image.SetOrigin(origin)
    return image


def check_writable_geometry(image, name: str) -> None:
    """Refuse a volume whose grid is sheared (a sheared or non-uniformly scaled parent transform, or a hardened
    one). An image in memory can hold such a grid, but an image file holds rotations only: writing it for the
    command line would silently straighten the grid, which would then analyse other positions than the scene
    shows."""
    d = np.reshape(image.GetDirection(), (3, 3))
    if not np.allclose(d.T @ d, np.eye(3), atol=1e-4):
        raise InputImageError(f"volume '{name}' has a sheared grid (under or hardened from a transform that shears "
                              "it): resample it (Resample Scalar/Vector/DWI Volume) first")


def dicom_slice_thickness(volume_node, database=None) -> float | None:
    """The DICOM SliceThickness (mm) of the series a volume node was loaded from, or None when the node did not come
    from DICOM or the database cannot tell. Slicer's DICOM loader keeps the instance UIDs in the node attribute
    ``DICOM.instanceUIDs``; ``database`` is Slicer's DICOM database (``slicer.dicomDatabase`` by default)."""
    uids = (volume_node.GetAttribute("DICOM.instanceUIDs") or "").split()
    if not uids:
        return None
    if database is None:
        try:
            import slicer
        except ImportError:
            return None
        database = getattr(slicer, "dicomDatabase", None)
    try:
        value = database.fileValue(database.fileForInstance(uids[0]), "0018,0050")
        thickness = float(str(value).split("\\")[0])
    except (AttributeError, TypeError, ValueError):
        return None
    return thickness if math.isfinite(thickness) and thickness > 0 else None

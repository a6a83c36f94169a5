"""Views that check a registration: a fade between CT and MR, and a checkerboard of the two.

Both work on the scene's slice composite nodes (one per slice view, which the application creates
with its layout), so they run headless too: :func:`show_fade` sets the CT as background, the
resampled MR as foreground and the foreground opacity on every slice view; the widget's slider
changes the opacity. :func:`checkerboard_volume` builds a volume that alternates CT and MR
squares (both rescaled to 0..1 by their 1st-99th percentiles so the contrasts compare), the
classic view for spotting edges that do not continue across squares.
"""

from __future__ import annotations

import numpy as np


def slice_composite_nodes(scene) -> list:
    return [scene.GetNthNodeByClass(i, "vtkMRMLSliceCompositeNode")
            for i in range(scene.GetNumberOfNodesByClass("vtkMRMLSliceCompositeNode"))]


def show_fade(scene, background, foreground, opacity: float = 0.5) -> int:
    """CT (background) and MR in CT (foreground) with ``opacity`` in every slice view; returns
    the number of views set (0 when the scene has no views, e.g. without the application)."""
    if not 0.0 <= float(opacity) <= 1.0:
        raise ValueError(f"opacity must be between 0 and 1 (got {opacity})")
    nodes = slice_composite_nodes(scene)
    for comp in nodes:
        comp.SetBackgroundVolumeID(background.GetID() if background is not None else None)
        comp.SetForegroundVolumeID(foreground.GetID() if foreground is not None else None)
        comp.SetForegroundOpacity(float(opacity))
    return len(nodes)


def set_fade_opacity(scene, opacity: float) -> int:
    """Move the fade slider: only the foreground opacity changes."""
    nodes = slice_composite_nodes(scene)
    for comp in nodes:
        comp.SetForegroundOpacity(min(1.0, max(0.0, float(opacity))))
    return len(nodes)


def _unit_range(image):
    import SimpleITK as sitk

    arr = sitk.GetArrayViewFromImage(image).astype(np.float32)
    finite = arr[np.isfinite(arr)]
    lo, hi = (np.percentile(finite, [1, 99]) if finite.size else (0.0, 1.0))
    scaled = np.clip((np.nan_to_num(arr, nan=lo) - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    out = sitk.GetImageFromArray(scaled.astype(np.float32))
    out.CopyInformation(image)
    return out


def checkerboard_image(fixed, moving_in_fixed, square_mm: float = 10.0):
    """A SimpleITK checkerboard of two images on the same grid (squares of about ``square_mm``)."""
    import SimpleITK as sitk

    from ctsma.io import check_same_geometry

    check_same_geometry(fixed, moving_in_fixed, what_a="CT", what_b="MR in CT")
    size_mm = np.array(fixed.GetSize()) * np.array(fixed.GetSpacing())
    pattern = [int(max(1, round(s / square_mm))) for s in size_mm]
    return sitk.CheckerBoard(_unit_range(fixed), _unit_range(moving_in_fixed), pattern)


def checkerboard_volume(scene, ct_node, mr_in_ct_node, square_mm: float = 10.0, name: str = "CT/MR checkerboard"):
    """A volume node alternating CT and MR squares, shown alone in the slice views."""
    from . import scene_bridge as sb

    image = checkerboard_image(sb.volume_node_to_sitk(ct_node), sb.volume_node_to_sitk(mr_in_ct_node), square_mm)
    node = scene.GetFirstNodeByName(name)
    if node is not None:
        scene.RemoveNode(node)
    node = sb.sitk_to_volume_node(image, scene, name)
    display = node.GetDisplayNode()
    if display is not None:
        display.AutoWindowLevelOff()
        display.SetWindowLevelMinMax(0.0, 1.0)
    show_fade(scene, node, None, 0.0)
    return node

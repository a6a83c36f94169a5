"""Write a 3D image as a DICOM series (one file per axial slice), as a scanner export would give it to CT-SMA."""

from __future__ import annotations

import locale
from pathlib import Path

import SimpleITK as sitk


def write_ct_series(img: sitk.Image, folder: Path, *, thickness_mm: float | None = None,
                    series_uid: str = "1.2.826.0.1.3680043.2.1125.1", modality: str = "CT") -> Path:
    """``img`` (integer HU, axial) into ``folder`` as CT slices (or another ``modality``) with position,
    orientation, rescale 1/0 and, when given, SliceThickness (0018,0050)."""
    folder.mkdir(parents=True, exist_ok=True)
    vol = sitk.Cast(img, sitk.sitkInt16)
    d = vol.GetDirection()
    orientation = "\\".join(f"{v:g}" for v in (d[0], d[3], d[6], d[1], d[4], d[7]))
    w = sitk.ImageFileWriter()
    w.KeepOriginalImageUIDOn()
    # GDCM's writer sets the process's locale to "C", so that later read_text() calls without an encoding decode
    # ASCII (a test run after this one failed on a UTF-8 file): the locale is restored after the series
    saved = locale.setlocale(locale.LC_ALL)
    try:
        _write_slices(vol, folder, w, orientation, modality, series_uid, thickness_mm)
    finally:
        locale.setlocale(locale.LC_ALL, saved)
    return folder


def _write_slices(vol, folder, w, orientation, modality, series_uid, thickness_mm) -> None:
    for k in range(vol.GetDepth()):
        sl = vol[:, :, k]
        tags = {"0008|0060": modality, "0020|000e": series_uid, "0020|0013": str(k + 1), "0020|0037": orientation,
                "0020|0032": "\\".join(f"{v:f}" for v in vol.TransformIndexToPhysicalPoint((0, 0, k))),
                "0028|1052": "0", "0028|1053": "1"}
        if thickness_mm is not None:
            tags["0018|0050"] = f"{thickness_mm:g}"
        for tag, value in tags.items():
            sl.SetMetaData(tag, value)
        w.SetFileName(str(folder / f"s{k:03d}.dcm"))
        w.Execute(sl)

"""Target registration error at landmarks (the phantom's ``landmarks.csv``: ``roi, ct_x.., mr_x..``, LPS mm)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import SimpleITK as sitk

from ..errors import InputImageError

COLUMNS = ("roi", "ct_x", "ct_y", "ct_z", "mr_x", "mr_y", "mr_z")


def read_landmarks(path: str | Path) -> pd.DataFrame:
    df = pd.read_csv(path)
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise InputImageError(f"landmarks file {Path(path).name} lacks column(s) {', '.join(missing)}")
    return df


def tre_mm(transform: sitk.Transform, landmarks: pd.DataFrame) -> np.ndarray:
    """Distance (mm) between ``transform(ct point)`` and the true MR point, per landmark."""
    ct = landmarks[["ct_x", "ct_y", "ct_z"]].to_numpy(float)
    mr = landmarks[["mr_x", "mr_y", "mr_z"]].to_numpy(float)
    mapped = np.array([transform.TransformPoint(p) for p in ct.tolist()])
    return np.linalg.norm(mapped - mr, axis=1)

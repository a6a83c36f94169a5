"""Bone segmentation of knee CT and the subchondral ROIs (MFC=1, LFC=2, MTP=3, LTP=4).

``segment_bones(ct) -> label image`` (femur=1, tibia=2, patella=3, fibula=4) and
``subchondral_rois(ct, bones, side=None, start_mm, end_mm) -> label image``; user segmentations replace the
automatic one through :func:`read_user_labels`. See docs/segmentation.md.
"""

from .bones import BoneSegmentationSettings, BothKneesError, NoKneeFoundError, segment_bones
from .labelio import labels_from_segments, read_user_labels, write_seg_nrrd
from .rois import LateralityError, RoiSettings, knee_side, subchondral_rois

__all__ = ["segment_bones", "subchondral_rois", "BoneSegmentationSettings", "RoiSettings", "NoKneeFoundError",
           "BothKneesError", "LateralityError", "knee_side", "read_user_labels", "labels_from_segments", "write_seg_nrrd"]

"""Whole-module flows, run step by step through the Logic: the modules' self-tests use them on the
sample phantom inside Slicer, and the headless tests use them with the process swapped.

Each step waits for its background run and raises :class:`FlowError` with the command's last
error line when a step does not succeed, so a self-test failure names the step and the reason.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from ctsma import PARAMETERS, ROIS
from ctsma.report.paths import PATIENT_REPORT_FORMATS, patient_report_path


class FlowError(RuntimeError):
    pass


def finish(logic, what: str, timeout: float = 3600.0, on_wait: Callable | None = None, interval: float = 0.2):
    """Wait for the Logic's current run (calling ``on_wait`` between polls, e.g. processEvents)."""
    end = time.monotonic() + timeout
    status = logic.poll()
    while status is not None and not status.finished:
        if time.monotonic() > end:
            logic.cancel()
            raise FlowError(f"{what} did not finish within {timeout:.0f} s")
        if on_wait is not None:
            on_wait()
        time.sleep(interval)
        status = logic.poll()
    if status is None or status.state != "done":
        raise FlowError(f"{what} {status.state if status else 'never started'}: "
                        f"{status.last_error if status else ''}".rstrip(": "))
    return logic.run


def segment_names(segmentation_node) -> list[str]:
    seg = segmentation_node.GetSegmentation()
    return [seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())]


def analysis_flow(logic, ct, side: str = "auto", report_dir=None, timeout: float = 3600.0,
                  on_wait: Callable | None = None) -> dict:
    """Bones -> ROIs -> analysis -> (report) on ``ct``; returns the nodes and what was checked."""
    from . import scene_bridge as sb
    from .parameters import AnalysisParameters

    params = AnalysisParameters(side=side if side in ("L", "R") else "auto")
    logic.startBoneSegmentation(ct, params)
    bones = finish(logic, "bone segmentation", timeout, on_wait).outputs["bones"]
    logic.cleanupRun()
    logic.startRoiCreation(ct, bones, params)
    rois = finish(logic, "ROI creation", timeout, on_wait).outputs["rois"]
    logic.cleanupRun()
    if sorted(segment_names(rois)) != sorted(ROIS):
        raise FlowError(f"ROI creation gave segments {segment_names(rois)}, expected {list(ROIS)}")
    logic.startAnalysis(ct, params, bones, rois)
    run = finish(logic, "analysis", timeout, on_wait)
    out = dict(run.outputs, bones=bones, rois=rois) | {"result_dir": run.out_dir}
    missing = [p for p in PARAMETERS if p not in out]
    if missing:
        raise FlowError(f"the analysis loaded no map for {', '.join(missing)}")
    dims = ct.GetImageData().GetDimensions()
    wrong = [p for p in PARAMETERS if out[p].GetImageData().GetDimensions() != dims]
    if wrong:
        raise FlowError(f"the maps of {', '.join(wrong)} are not on the CT's grid {dims}")
    table, _ = sb.node_to_dataframe(out["table"])
    out["roi_table"] = table
    if len(table) != len(ROIS) * len(PARAMETERS):
        raise FlowError(f"the ROI table has {len(table)} rows, expected {len(ROIS)} ROIs x {len(PARAMETERS)} parameters")
    folder = results_folder(logic.scene, out["table"])
    if folder["parent"] != sb.study_item_of(logic.scene, ct):
        raise FlowError("the results folder is not under the CT's study in the subject hierarchy")
    if report_dir is not None:
        logic.cleanupRun(keep_outputs=True)
        logic.startReportExport(run.out_dir, Path(report_dir), subject=ct.GetName())
        finish(logic, "report export", timeout, on_wait)
        for fmt in PATIENT_REPORT_FORMATS:
            path = patient_report_path(report_dir, ct.GetName(), fmt)
            if not path.is_file():
                raise FlowError(f"the report export wrote no {path.name} under {path.parent}")
            out["report" if fmt == "pdf" else "report_html"] = path
    return out


def results_folder(scene, node) -> dict:
    """The subject-hierarchy folder holding ``node``, with its name and parent item."""
    import slicer

    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    folder = sh.GetItemParent(sh.GetItemByDataNode(node))
    return {"item": folder, "name": sh.GetItemName(folder), "parent": sh.GetItemParent(folder)}


def read_landmarks(path) -> tuple[np.ndarray, np.ndarray]:
    """CT and MR landmark positions (LPS mm) of a phantom ``landmarks.csv`` (read and checked by the package)."""
    from ctsma.registration.tre import read_landmarks as read_table

    table = read_table(path)
    return (table[["ct_x", "ct_y", "ct_z"]].to_numpy(float), table[["mr_x", "mr_y", "mr_z"]].to_numpy(float))


def landmark_errors(transform_node, landmarks_csv) -> np.ndarray:
    """Distance (mm) between each MR landmark and its CT landmark mapped by the node.

    The node maps CT to MR points in RAS (Slicer's FromParent direction); the landmarks are LPS,
    so both are flipped in x and y around the mapping."""
    from .transforms import transform_point_ras

    flip = np.array([-1.0, -1.0, 1.0])
    ct, mr = read_landmarks(landmarks_csv)
    mapped = np.array([transform_point_ras(transform_node, p * flip) * flip for p in ct])
    return np.linalg.norm(mapped - mr, axis=1)


def registration_flow(logic, mr, ct, params=None, landmarks_csv=None, timeout: float = 3600.0,
                      on_wait: Callable | None = None) -> dict:
    """Register ``mr`` to ``ct`` and return the outputs (plus landmark errors when given)."""
    logic.startRegistration(mr, ct, params=params)
    run = finish(logic, "registration", timeout, on_wait)
    out = dict(run.outputs)
    for role in ("transform", "qa") + (("mr_in_ct",) if params is None or params.resampleMr else ()):
        if out.get(role) is None:
            raise FlowError(f"the registration loaded no {role}")
    if landmarks_csv is not None:
        out["landmark_errors_mm"] = landmark_errors(out["transform"], landmarks_csv)
    return out

"""A self-contained Slicer scene (.mrb) of one analysed knee, written headless (used by ``ctsma demo``).

The scene holds the CT, the MR under its registration transform (so it shows aligned to the CT), the bone
and ROI segmentations, the four parameter maps and their uncertainty maps with CT-SMA colour tables and
display ranges, the ROI table and the diagnosis table, grouped under one subject-hierarchy folder.
"""

from __future__ import annotations

import json
from pathlib import Path

from ctsma import PARAMETER_FILE_NAMES, PARAMETER_UNITS

from . import scene_bridge as sb
from .colors import recorded_range, show_parameter_map


def write_demo_scene(path, *, ct, mr, infer_dir, transform) -> Path:
    import pandas as pd
    import SimpleITK as sitk

    from .headless import HeadlessSlicer

    infer_dir = Path(infer_dir)
    with HeadlessSlicer() as hs:
        scene = hs.scene
        nodes = []
        ct_node = sb.sitk_to_volume_node(sitk.ReadImage(str(ct)), scene, "CT")
        nodes.append(ct_node)
        tnode = sb.read_transform_file(transform, scene, "MR-to-CT registration (CT->MR points)")
        mr_node = sb.sitk_to_volume_node(sitk.ReadImage(str(mr)), scene, "MR (BFFE)")
        mr_node.SetAndObserveTransformNodeID(tnode.GetID())
        nodes += [tnode, mr_node]
        for kind, names in (("bones", sb.BONE_NAMES), ("rois", sb.ROI_NAMES)):
            f = infer_dir / f"{kind}.nii.gz"
            if f.is_file():
                nodes.append(sb.labelmap_to_segmentation_node(sitk.ReadImage(str(f)), scene, names=names,
                                                              name=f"CT {kind}"))
        summary = json.loads((infer_dir / "summary.json").read_text(encoding="utf-8"))
        for folder, label in (("maps", ""), ("uncertainty", " uncertainty (SD)")):
            for param, stem in PARAMETER_FILE_NAMES.items():
                f = infer_dir / folder / f"{stem}.nii.gz"
                if f.is_file():
                    node = sb.sitk_to_volume_node(sitk.ReadImage(str(f)), scene, f"{param}{label}")
                    node.SetAttribute("CTSMA.Parameter", param)
                    node.SetAttribute("CTSMA.Unit", PARAMETER_UNITS.get(param, ""))
                    show_parameter_map(node, param, uncertainty=bool(label), value_range=recorded_range(summary, param))
                    nodes.append(node)
        table = pd.read_csv(infer_dir / "roi_table.csv")
        table["unit"] = [PARAMETER_UNITS.get(p, "") for p in table["parameter"]]
        nodes.append(sb.table_to_node(table, scene, name="ROI table"))
        diag = {k: summary[k] for k in ("oa_probability", "severity", "auc") if summary.get(k) is not None}
        if diag:
            nodes.append(sb.table_to_node([diag], scene, name="Diagnosis"))
        sb.put_in_folder(scene, nodes, f"CT-SMA {summary.get('subject', '')}".strip())
        return sb.save_scene_mrb(scene, path)

"""The demo's Slicer scene: written headless from an inference folder, reopened with every node in place."""

import json

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

pytestmark = pytest.mark.mrml


def _infer_dir(tmp_path):
    ct = sitk.GetImageFromArray(np.random.default_rng(0).normal(0, 50, (8, 10, 12)).astype(np.float32))
    ct.SetSpacing((0.6, 0.6, 1.0))
    ct.SetOrigin((10.0, -5.0, 3.0))
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(ct, str(tmp_path / "mr.nii.gz"))
    sitk.WriteTransform(sitk.TranslationTransform(3, (1.0, 2.0, 3.0)), str(tmp_path / "t.h5"))
    d = tmp_path / "infer"
    (d / "maps").mkdir(parents=True)
    (d / "uncertainty").mkdir()
    lab = np.zeros((8, 10, 12), np.uint8)
    lab[:4] = 2
    lab[4:] = 1
    rois = np.zeros_like(lab)
    rois[5:7, 2:5, 2:5] = 1
    rois[1:3, 2:5, 2:5] = 3
    for name, arr in (("bones", lab), ("rois", rois)):
        img = sitk.GetImageFromArray(arr)
        img.CopyInformation(ct)
        sitk.WriteImage(img, str(d / f"{name}.nii.gz"))
    for stem in ("bvtv", "tbth", "tbsp", "tbn"):
        m = sitk.GetImageFromArray((rois > 0).astype(np.float32) * 0.3)
        m.CopyInformation(ct)
        sitk.WriteImage(m, str(d / "maps" / f"{stem}.nii.gz"))
        sitk.WriteImage(m, str(d / "uncertainty" / f"{stem}.nii.gz"))
    pd.DataFrame([{"roi": "MFC", "parameter": "Tb.Th", "mean": 0.2, "sd": 0.01, "median": 0.2, "iqr": 0.02,
                   "n_patches": 5}]).to_csv(d / "roi_table.csv", index=False)
    (d / "summary.json").write_text(json.dumps({"subject": "K1", "oa_probability": 0.8, "severity": 1.5,
                                                "auc": 0.9}))
    return tmp_path, d


def test_demo_scene_round_trip(tmp_path):
    from CTSMALib import scene_bridge as sb
    from CTSMALib.demo_scene import write_demo_scene
    from CTSMALib.headless import HeadlessSlicer

    root, d = _infer_dir(tmp_path)
    mrb = write_demo_scene(tmp_path / "scene" / "K1.mrb", ct=root / "ct.nii.gz", mr=root / "mr.nii.gz",
                           infer_dir=d, transform=root / "t.h5")
    assert mrb.is_file() and mrb.stat().st_size > 1000
    with HeadlessSlicer() as hs:
        sb.load_scene_mrb(hs.scene, mrb)
        names = {hs.scene.GetNthNode(i).GetName() for i in range(hs.scene.GetNumberOfNodes())}
        assert {"CT", "MR (BFFE)", "CT bones", "CT rois", "BV/TV", "Tb.N uncertainty (SD)", "ROI table",
                "Diagnosis"} <= names
        mr = hs.scene.GetFirstNodeByName("MR (BFFE)")
        tnode = mr.GetParentTransformNode()  # the registration file's transform, reopened: CT point -> MR point
        assert tnode.GetName() == "MR-to-CT registration (CT->MR points)"
        flip, p_lps = np.array([-1.0, -1.0, 1.0]), np.array([4.0, -2.0, 7.0])
        np.testing.assert_allclose(sb.transform_point_ras(tnode, p_lps * flip) * flip, p_lps + (1.0, 2.0, 3.0),
                                   atol=1e-6)
        bv = hs.scene.GetFirstNodeByName("BV/TV")
        assert bv.GetDisplayNode().GetColorNode().GetName() == "CTSMA_BVTV"
        img = sb.volume_node_to_sitk(bv)
        np.testing.assert_allclose(img.GetOrigin(), (10.0, -5.0, 3.0), atol=1e-4)

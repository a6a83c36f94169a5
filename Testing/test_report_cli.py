"""``ctsma report study|patient`` on files laid out as the contracts say (metrics.json, infer output folder)."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import SimpleITK as sitk

from ctsma import PARAMETER_FILE_NAMES
from ctsma.cli.main import main
from ctsma.io import write_json
from ctsma.report import synthetic


@pytest.fixture(autouse=True)
def _no_drawing_of_scatter(monkeypatch):
    """Keep the CLI tests fast: the figures themselves are covered by test_report.py."""
    from ctsma.report import figures
    monkeypatch.setattr(figures, "scatter_ba_figure", lambda df, src: None)


def test_report_study_cli(tmp_path):
    write_json(tmp_path / "metrics.json", synthetic.metrics())
    synthetic.cohort(6).to_csv(tmp_path / "manifest.csv", index=False)
    preds = synthetic.predictions(n_patients=2)
    pd.concat([d.assign(source=k) for k, d in preds.items()]).to_csv(tmp_path / "pred.csv", index=False)
    rows = [(k, y, s) for k, v in synthetic.roc().items() for y, s in zip(v["y_true"], v["y_score"])]
    pd.DataFrame(rows, columns=["key", "y_true", "y_score"]).to_csv(tmp_path / "roc.csv", index=False)
    rc = main(["--quiet", "report", "study", str(tmp_path), "--manifest", str(tmp_path / "manifest.csv"),
               "--predictions", str(tmp_path / "pred.csv"), "--roc", str(tmp_path / "roc.csv"),
               "--readme-snippet", str(tmp_path / "snippet")])
    assert rc == 0
    assert (tmp_path / "report" / "study.pdf").read_bytes().startswith(b"%PDF-")
    assert (tmp_path / "snippet" / "key_table.md").exists() and (tmp_path / "snippet" / "key_figure.png").exists()


def test_report_study_cli_user_errors(tmp_path, capsys):
    assert main(["report", "study", str(tmp_path)]) == 2
    assert "metrics.json does not exist" in capsys.readouterr().err
    write_json(tmp_path / "metrics.json", {})  # a JSON object, but none of a study's blocks
    assert main(["report", "study", str(tmp_path)]) == 2
    assert "none of the blocks" in capsys.readouterr().err
    write_json(tmp_path / "metrics.json", {"regression": {}})
    (tmp_path / "pred.csv").write_text("a,b\n1,2\n")
    assert main(["report", "study", str(tmp_path), "--predictions", str(tmp_path / "pred.csv")]) == 2
    assert "lacks the columns source" in capsys.readouterr().err


def _infer_dir(tmp_path):
    ct, rois, maps = synthetic.knee(shape_xyz=(48, 28, 56), spacing=(1.0, 1.0, 1.0))
    d = tmp_path / "infer"
    (d / "maps").mkdir(parents=True)
    sitk.WriteImage(ct, str(tmp_path / "ct.nii.gz"))
    sitk.WriteImage(rois, str(d / "rois.nii.gz"))
    for p, img in maps.items():
        sitk.WriteImage(img, str(d / "maps" / f"{PARAMETER_FILE_NAMES[p]}.nii.gz"))
    synthetic.roi_table(rois, maps).to_csv(d / "roi_table.csv", index=False)
    summary = {"subject": "../K 9", "provenance": synthetic.provenance(), **synthetic.diagnosis(),
               "reference_ranges": synthetic.reference_ranges().to_dict("records")}
    (d / "summary.json").write_text(json.dumps(summary))
    return d


def test_report_patient_cli(tmp_path, monkeypatch):
    d = _infer_dir(tmp_path)
    assert main(["--quiet", "report", "patient", str(tmp_path / "ct.nii.gz"), str(d)]) == 0
    out = d / "report" / "patient_K_9.pdf"  # subject ID sanitised, inside the folder
    assert out.read_bytes().startswith(b"%PDF-")
    html = out.with_suffix(".html").read_text(encoding="utf-8")  # both formats by default
    assert html.startswith("<!DOCTYPE html>") and "Subject ../K 9" in html and "NOT FOR CLINICAL USE" in html
    assert sorted(p.name for p in (d / "report").iterdir()) == ["patient_K_9.html", "patient_K_9.pdf"]
    from ctsma.report import patient_figures
    monkeypatch.setattr(patient_figures, "maps_figure", lambda *a: None)  # drawn once above is enough
    assert main(["--quiet", "report", "patient", str(tmp_path / "ct.nii.gz"), str(d), "--subject", "S1",
                 "--out", str(tmp_path / "run")]) == 0
    assert sorted(p.name for p in (tmp_path / "run" / "report").iterdir()) == ["patient_S1.html", "patient_S1.pdf"]


@pytest.mark.parametrize("fmt", ["pdf", "html"])
def test_report_patient_cli_format_option(tmp_path, monkeypatch, fmt):
    from ctsma.report import patient_figures
    for name in ("maps_figure", "overview_figure"):  # the figures are covered above and in test_report.py
        monkeypatch.setattr(patient_figures, name, lambda *a: None)
    d = _infer_dir(tmp_path)
    assert main(["--quiet", "report", "patient", str(tmp_path / "ct.nii.gz"), str(d), "--subject", "S1",
                 "--format", fmt]) == 0
    assert [p.name for p in (d / "report").iterdir()] == [f"patient_S1.{fmt}"]
    head = (d / "report" / f"patient_S1.{fmt}").read_bytes()[:15]
    assert head.startswith(b"%PDF-" if fmt == "pdf" else b"<!DOCTYPE html>")


def test_report_patient_cli_refuses_an_unknown_format(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["report", "patient", str(tmp_path / "ct.nii.gz"), str(tmp_path), "--format", "docx"])
    assert exc.value.code == 2 and "invalid choice: 'docx'" in capsys.readouterr().err


def test_report_patient_cli_user_errors(tmp_path, capsys):
    assert main(["report", "patient", str(tmp_path / "ct.nii.gz"), str(tmp_path / "nope")]) == 2
    assert "not a folder" in capsys.readouterr().err
    d = _infer_dir(tmp_path)
    (d / "roi_table.csv").unlink()
    assert main(["report", "patient", str(tmp_path / "ct.nii.gz"), str(d)]) == 2
    assert "ROI table file" in capsys.readouterr().err


def test_report_patient_refuses_an_incomplete_infer_folder(tmp_path, capsys):
    """Without summary.json the report said that no diagnosis model was available and dropped the demo model's
    NOT FOR CLINICAL USE notice; without the maps it left them out: a folder missing either is refused."""
    d = _infer_dir(tmp_path)
    (d / "summary.json").unlink()
    (d / "maps" / "tbn.nii.gz").unlink()
    assert main(["report", "patient", str(tmp_path / "ct.nii.gz"), str(d)]) == 2
    assert "not a complete 'ctsma infer' output folder: summary.json, maps/tbn.nii.gz missing" in capsys.readouterr().err
    assert not (d / "report").exists()


@pytest.mark.parametrize("text", ["[1, 2]", "null"])
def test_report_patient_refuses_a_summary_that_is_not_a_json_object(tmp_path, capsys, text):
    """A summary.json holding a list or null gave an AttributeError traceback ('list' object has no attribute 'get')."""
    d = _infer_dir(tmp_path)
    (d / "summary.json").write_text(text)
    assert main(["report", "patient", str(tmp_path / "ct.nii.gz"), str(d)]) == 2
    assert "summary.json is not a JSON object" in capsys.readouterr().err


def test_report_study_reads_the_roc_curves_from_diagnose_evaluates_oof_predictions(tmp_path, monkeypatch, capsys):
    """`--roc` took only key, y_true, y_score, so the out-of-fold predictions `ctsma diagnose evaluate` writes beside
    its metrics.json were refused ('lacks the columns key, y_true, y_score'): no documented way to the ROC section."""
    from ctsma.report import study

    write_json(tmp_path / "metrics.json", synthetic.metrics())
    rows = [(*k.split("/"), f"S{i}", i % 3, y, s) for k, v in synthetic.roc().items()
            for i, (y, s) in enumerate(zip(v["y_true"], v["y_score"]))]
    pd.DataFrame(rows, columns=["source", "aggregator", "subject", "fold", "oa", "oa_probability"]).to_csv(
        tmp_path / "oof_predictions.csv", index=False)
    seen = {}
    real = study.build_study_document
    monkeypatch.setattr(study, "build_study_document", lambda m, **kw: seen.update(kw) or real(m, **kw))
    assert main(["--quiet", "report", "study", str(tmp_path), "--roc", str(tmp_path / "oof_predictions.csv")]) == 0
    assert set(seen["roc"]) == set(synthetic.roc())
    key = next(iter(synthetic.roc()))
    assert list(seen["roc"][key]["y_score"]) == list(synthetic.roc()[key]["y_score"])
    (tmp_path / "roc.csv").write_text("key,score\nx,1\n")
    assert main(["report", "study", str(tmp_path), "--roc", str(tmp_path / "roc.csv")]) == 2
    assert "lacks the columns y_true, y_score" in capsys.readouterr().err


def test_report_study_reads_the_held_out_patches_from_evaluates_regression_predictions(tmp_path, monkeypatch,
                                                                                        capsys):
    """`--predictions` took only a long table (source, subject, roi, param, reference, predicted) that no command
    writes: the regression_predictions.csv of `ctsma evaluate` (one row per patch, a column per source and parameter)
    was refused ('lacks the columns source, param, reference, predicted')."""
    import numpy as np

    from ctsma.evaluation.regression import write_outputs
    from ctsma.report import study

    write_json(tmp_path / "metrics.json", synthetic.metrics())
    n = 12
    ref = np.random.default_rng(0).uniform(0.1, 1.0, (n, 4))
    preds = {"teacher": ref + 0.02, "student_distilled": ref + 0.03, "ct_direct": ref - 0.01}
    ids = {"subject": np.array([f"P{k % 3}" for k in range(n)]), "index": np.arange(n),
           "roi": np.array(["MFC", "LFC", "MTP", "LTP"] * 3), **{c: np.zeros(n) for c in ("rel_x", "rel_y", "rel_z")}}
    write_outputs(tmp_path / "evaluation", {}, ref, ref + 0.01, preds, ids, plots=False)  # as evaluate writes it
    table = tmp_path / "evaluation" / "regression_predictions.csv"
    seen = {}
    real = study.build_study_document
    monkeypatch.setattr(study, "build_study_document", lambda m, **kw: seen.update(kw) or real(m, **kw))
    assert main(["--quiet", "report", "study", str(tmp_path), "--predictions", str(table)]) == 0
    got = seen["predictions"]
    assert list(got) == list(preds)  # the MR reference (mr_) and the phantom's truth (true_) are no sources
    for src, values in preds.items():
        d = got[src]
        assert list(d.columns) == ["subject", "roi", "param", "reference", "predicted"] and len(d) == 4 * n
        tbsp = d[d.param == "Tb.Sp"]
        np.testing.assert_allclose(tbsp.reference, ref[:, 2])
        np.testing.assert_allclose(tbsp.predicted, values[:, 2])
        assert list(tbsp.roi) == list(ids["roi"]) and list(tbsp.subject) == list(ids["subject"])
    # a table of neither kind is refused with what both kinds hold
    pd.read_csv(table).drop(columns=[c for c in pd.read_csv(table).columns if c.startswith(
        ("teacher", "student", "ct_direct"))]).to_csv(tmp_path / "reference_only.csv", index=False)
    assert main(["report", "study", str(tmp_path), "--predictions", str(tmp_path / "reference_only.csv")]) == 2
    err = capsys.readouterr().err
    assert "lacks the columns source, param, reference, predicted" in err
    assert "regression_predictions.csv of 'ctsma evaluate': subject, roi, and mr_<param>" in err


def test_report_patient_on_a_batch_folder_asks_for_one_knees_folder(tmp_path, capsys):
    d = _infer_dir(tmp_path)
    batch = tmp_path / "batch"
    batch.mkdir()
    (batch / "batch_status_0of1.json").write_text("[]")
    d.rename(batch / "K9")
    assert main(["report", "patient", str(tmp_path / "ct.nii.gz"), str(batch)]) == 2
    assert "output folder of a batch of CTs" in capsys.readouterr().err


def test_report_patient_reference_ranges_of_another_naming(tmp_path, monkeypatch, capsys):
    """A --reference CSV whose ROI/parameter names match none of the ROI table's gave a report whose z-scores were
    all silently empty, noted as 'non-OA knees of the model's training cohort'; now refused, a partial match warns,
    and the note names the file."""
    from ctsma.report import patient_figures
    monkeypatch.setattr(patient_figures, "maps_figure", lambda *a: None)
    d = _infer_dir(tmp_path)
    ref = synthetic.reference_ranges()
    other = ref.assign(roi="medial femur " + ref["roi"].astype(str))
    other.to_csv(tmp_path / "other.csv", index=False)
    args = ["--quiet", "report", "patient", str(tmp_path / "ct.nii.gz"), str(d), "--format", "html"]
    assert main(args + ["--reference", str(tmp_path / "other.csv")]) == 2
    assert "name no ROI and parameter of the ROI table" in capsys.readouterr().err
    assert not (d / "report").exists()
    ref[ref["roi"] != ref["roi"].iloc[0]].to_csv(tmp_path / "part.csv", index=False)
    with pytest.warns(UserWarning, match="lack .* ROI/parameter pairs"):
        assert main(args + ["--reference", str(tmp_path / "part.csv")]) == 0
    html = (d / "report" / "patient_K_9.html").read_text(encoding="utf-8")
    assert "the ranges given in part.csv" in html and "training cohort; z" not in html


def test_report_patient_refuses_a_ct_that_is_not_in_hounsfield_units(tmp_path, capsys):
    """A label image (ct_bones.nii.gz) or an MR on the CT's grid, given as the CT, was drawn as the CT under the ROI
    outlines and maps (exit 0), while 'ctsma infer' refuses such an image; a CT of another knee gave only the grid
    mismatch. Both now say what is wrong."""
    d = _infer_dir(tmp_path)
    ct = sitk.ReadImage(str(tmp_path / "ct.nii.gz"))
    labels = sitk.Cast(ct > 300, sitk.sitkUInt8)  # a bone mask on the CT's grid
    sitk.WriteImage(labels, str(tmp_path / "bones.nii.gz"))
    assert main(["report", "patient", str(tmp_path / "bones.nii.gz"), str(d)]) == 2
    assert "not plausible Hounsfield units" in capsys.readouterr().err
    assert not (d / "report").exists()
    other = sitk.Image(ct)
    other.SetOrigin([o + 40.0 for o in ct.GetOrigin()])
    sitk.WriteImage(other, str(tmp_path / "other.nii.gz"))
    assert main(["report", "patient", str(tmp_path / "other.nii.gz"), str(d)]) == 2
    err = capsys.readouterr().err
    assert "does not match the geometry" in err and "the CT that 'ctsma infer' analysed" in err

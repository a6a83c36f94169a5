"""The one reader of user CSV tables (``ctsma.io.tables``) and the commands that read their manifests with it.

Each command read its manifest with its own pandas call: a row with one cell more than the header made pandas take
the first column for an index and shift every column (``dataset build`` took the CT path for the subject, batch
``infer`` stopped with a traceback), and a header typed with spaces (``subject, ct, mr``) was refused for lacking
its columns. The reader's behaviours are tested once here; each command has one test of what it got wrong."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from ctsma.errors import InputImageError, UserError
from ctsma.io.tables import line_numbers, numbers, read_table, side_letter


def _csv(tmp_path: Path, text: str, name: str = "m.csv", encoding: str = "utf-8") -> Path:
    path = tmp_path / name
    path.write_bytes(text.encode(encoding))
    return path


# ------------------------------------------------------------------ the reader
def test_a_row_with_more_cells_than_the_header_is_refused_with_its_line_and_the_header(tmp_path):
    path = _csv(tmp_path, 'subject,ct\n\nk1,"a\nb.nii"\nk2,c.nii,extra\n')  # a blank line, a quoted cell on 2 lines
    with pytest.raises(UserError, match=r"manifest m.csv: line 5 has 3 cells, the header 2 \(subject, ct\)"):
        read_table(path)
    # empty cells past the header's (a trailing comma on every row) are no cells; a short row is padded
    df = read_table(_csv(tmp_path, "subject,ct,side\nk1,a.nii,L,\nk2,b.nii\n"))
    assert df.to_dict("list") == {"subject": ["k1", "k2"], "ct": ["a.nii", "b.nii"], "side": ["L", ""]}


def test_names_and_cells_lose_their_spaces_and_stay_text_as_written(tmp_path):
    path = _csv(tmp_path, "\ufeff subject , ct, oa\n NA , a.nii ,1\nnan,b.nii,\n0001,c.nii,0\n")  # with a BOM
    df = read_table(path, required=("subject", "ct"), subjects=True)
    assert list(df.columns) == ["subject", "ct", "oa"]
    assert df.to_dict("list") == {"subject": ["NA", "nan", "0001"], "ct": ["a.nii", "b.nii", "c.nii"],
                                  "oa": ["1", "", "0"]}
    assert all(pd.api.types.is_string_dtype(df[c]) for c in df.columns)


def test_blank_and_comma_only_rows_are_skipped_and_lines_are_counted_as_in_the_file(tmp_path):
    df = read_table(_csv(tmp_path, 'subject,ct\n\nk1,"x\ny"\n,,\n  \nk2,b.nii\n'))
    assert list(df.subject) == ["k1", "k2"] and line_numbers(df) == [3, 7]
    assert line_numbers(df.iloc[1:]) == [2]  # rows dropped since: by position, as under a header
    for text in ("subject,ct\n", "subject,ct\n,\n\n"):
        with pytest.raises(UserError, match="manifest m.csv has no rows"):
            read_table(_csv(tmp_path, text))


def test_required_columns_are_named_with_the_ones_the_table_has(tmp_path):
    with pytest.raises(InputImageError, match=r"manifest m.csv lacks column\(s\) mr \(has: subject, ct\)"):
        read_table(_csv(tmp_path, "subject,ct\nk1,a\n"), required=("ct", "mr"), error=InputImageError)
    with pytest.raises(UserError, match="separated by semicolons"):
        read_table(_csv(tmp_path, "subject;ct\nk1;a\n"), required=("ct",))
    with pytest.raises(UserError, match="names column.s. ct more than once"):
        read_table(_csv(tmp_path, "subject,ct, ct\nk1,a,b\n"))


def test_subject_names_must_name_a_folder_once(tmp_path):
    for text, match in (("subject,ct\nk1,a\n,b\n", r"line\(s\) 3 have no subject name"),
                        ("subject,ct\n.,a\n", r"line\(s\) 2 have no subject name"),
                        ("subject,ct\n..,a\n", r"line\(s\) 2 have no subject name"),
                        ("subject,ct\nk1,a\nk2,b\n k1 ,c\n", r"repeats subject name\(s\): k1 \(lines 2 and 4\)")):
        with pytest.raises(UserError, match=match):
            read_table(_csv(tmp_path, text), subjects=True)
        read_table(_csv(tmp_path, text))  # not checked unless asked: a patch table has many rows per subject
    assert list(read_table(_csv(tmp_path, "ct\na\n"), subjects=True).columns) == ["ct"]  # no subject column: none


def test_unreadable_files_are_one_line_errors(tmp_path):
    for text, encoding, match in (("", "utf-8", "it is empty"), ('ct,subject\n"a.nii.gz,K1\n', "utf-8", "line 2"),
                                  ("subject,ct\nkné,a\n", "latin-1", "not UTF-8 text")):
        with pytest.raises(UserError, match=f"manifest m.csv is not a readable CSV table: .*{match}"):
            read_table(_csv(tmp_path, text, encoding=encoding))
    with pytest.raises(UserError, match="manifest not found"):
        read_table(tmp_path / "none.csv")
    with pytest.raises(UserError, match="is a folder; give the file itself"):
        read_table(tmp_path)


def test_number_columns_are_read_as_pandas_reads_them_and_text_in_them_is_refused(tmp_path):
    values = ["0.2913364197530864", "1e-3", "-7", "0.1", "2.220446049250313e-16", "", "NA", "nan", "inf"]
    path = _csv(tmp_path, "x,n\n" + "".join(f"{v},{i}\n" for i, v in enumerate(values)))
    df, ref = read_table(path), pd.read_csv(path)
    x, n = numbers(df, "x", "manifest m.csv"), numbers(df, "n", "manifest m.csv")
    assert x.dtype == ref.x.dtype == np.float64 and n.dtype == ref.n.dtype == np.int64
    assert np.array_equal(x.to_numpy(), ref.x.to_numpy(), equal_nan=True) and n.equals(ref.n)  # to the bit
    df.loc[3, "x"] = "0.1 mm"
    with pytest.raises(UserError, match=r"manifest m.csv: the x column must hold numbers \(or be empty\); "
                                        r"line 5: '0.1 mm'"):
        numbers(df, "x", "manifest m.csv")
    assert numbers(pd.DataFrame({"x": [1.5, None]}), "x", "t").tolist()[0] == 1.5  # a table given as numbers


# ------------------------------------------------------------------ the commands
def test_dataset_build_refuses_a_row_with_an_extra_cell_and_reads_a_spaced_header(tmp_path, capsys):
    """The extra cell was read as the side of a subject named after the CT path ('side 'extra' of subject
    .../ct.nii.gz is not L or R'), a trailing comma on every row made the CT path the subject, and 'subject, ct, mr'
    lacked the columns ct and mr."""
    from ctsma.cli.main import main
    from ctsma.dataset.build import read_manifest

    path = _csv(tmp_path, "subject,ct,mr,side\nP1,P1/ct.nii.gz,P1/mr.nii.gz,L,extra\n")
    assert main(["--quiet", "dataset", "build", "--manifest", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "manifest m.csv: line 2 has 5 cells, the header 4 (subject, ct, mr, side)" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    _csv(tmp_path, "subject, ct, mr, side, true_MFC_BV/TV\nP1, P1/ct.nii.gz, P1/mr.nii.gz, L, 0.25,\n"
                   "NA, NA/ct.nii.gz, NA/mr.nii.gz, , \n")
    df = read_manifest(path)
    truth = df.pop("true_MFC_BV/TV")  # the per-ROI truth as numbers, as pandas read it
    assert df.to_dict("list") == {"subject": ["P1", "NA"], "ct": ["P1/ct.nii.gz", "NA/ct.nii.gz"],
                                  "mr": ["P1/mr.nii.gz", "NA/mr.nii.gz"], "side": ["L", ""]}
    assert truth.dtype == np.float64 and truth[0] == 0.25 and np.isnan(truth[1])
    _csv(tmp_path, "subject,ct,mr,true_MFC_BV/TV\nP1,a,b,25 %\n")
    with pytest.raises(UserError, match=r"the true_MFC_BV/TV column must hold numbers .*line 2: '25 %'"):
        read_manifest(path)


def test_batch_infer_refuses_a_row_with_an_extra_cell_and_reads_a_spaced_header(tmp_path, capsys):
    """An extra cell (or a trailing comma on every row) stopped 'ctsma infer m.csv' with a ValueError traceback
    (the subjects, taken for the index, were read as row numbers); 'subject, ct, slice_thickness' had 'no ct
    column'; a subject 'NA' was named after its CT file."""
    from ctsma.cli.main import main
    from ctsma.inference.batch import list_cases

    path = _csv(tmp_path, "subject,ct\nk1,k1.nii.gz,extra\nk2,k2.nii.gz\n")
    assert main(["--quiet", "infer", str(path), "--out", str(tmp_path / "out")]) == 2
    assert "manifest m.csv: line 2 has 3 cells, the header 2 (subject, ct)" in capsys.readouterr().err
    _csv(tmp_path, "subject, ct, side, slice_thickness\nk1, k1.nii.gz, l, 1.25\nNA, b.nii.gz, , \n, c.nii.gz,R,2\n")
    df = list_cases(path)
    assert list(df.subject) == ["k1", "NA", "c"] and list(df.side) == ["L", "", "R"]
    assert df.ct[0] == str((tmp_path / "k1.nii.gz").resolve())
    assert df.slice_thickness.dtype == np.float64 and df.slice_thickness.tolist()[::2] == [1.25, 2.0]
    for cell, match in (("1 mm", r"slice_thickness column must hold numbers .*line 2: '1 mm'"),
                        ("30", r"slice_thickness must be a thickness in \(0, 20\] mm or empty; rows \[2\]")):
        _csv(tmp_path, f"ct,slice_thickness\na.nii.gz,{cell}\n")
        with pytest.raises(UserError, match=match):
            list_cases(path)


def test_register_reads_its_manifest_as_before(tmp_path):
    """The reader came from 'register': its own rules stay (subject optional, named by row; empty images refused;
    paths relative to the manifest)."""
    from ctsma.registration.cohort import read_manifest

    df = read_manifest(_csv(tmp_path, "mr, ct\nmr.nii.gz, ct.nii.gz,\n"))
    assert df.to_dict("list") == {"mr": [str((tmp_path / "mr.nii.gz").resolve())],
                                  "ct": [str((tmp_path / "ct.nii.gz").resolve())], "subject": ["row0000"]}
    with pytest.raises(InputImageError, match="the ct column is empty for subject.s. row0000"):
        read_manifest(_csv(tmp_path, "mr,ct\nmr.nii.gz,\n"))
    with pytest.raises(InputImageError, match=r"repeats subject name\(s\): k1 \(lines 2 and 3\)"):
        read_manifest(_csv(tmp_path, "subject,mr,ct\nk1,a,b\nk1,c,d\n"))


def test_a_patch_table_given_as_labels_names_each_repeated_subject_once(tmp_path):
    """A patch table (60 rows per knee) given as the labels was refused with 'P0001 (lines 2 and 3), P0001 (lines 2
    and 4), ...' ten times and 'and 430 more', naming one subject of seven and not what was wrong."""
    from ctsma.diagnosis.data import check_labels

    rows = "".join(f"P{k},1\n" for k in range(3) for _ in range(60))
    with pytest.raises(UserError) as err:
        check_labels(_csv(tmp_path, "subject,oa\n" + rows, "labels.csv"))
    msg = str(err.value)
    assert "repeats subject name(s): P0 (lines 2, 3, 4, 5 and 56 more), P1 (lines 62, 63, 64, 65 and 56 more), " \
           "P2 (lines 122, 123, 124, 125 and 56 more); it must have one row per subject" in msg
    assert msg.count("P0 (") == 1
    with pytest.raises(UserError, match=r"repeats subject name\(s\): k1 \(lines 2, 3 and 5\), k2 \(lines 4 and 6\)$"):
        check_labels(_csv(tmp_path, "subject,oa\nk1,1\nk1,1\nk2,0\nk1,1\nk2,0\n", "labels.csv"))


def test_diagnosis_labels_with_a_spaced_header_and_text_for_a_number(tmp_path):
    """'subject, oa, severity' lacked the column 'oa'; a subject 'NA' became 'nan' and a severity 'high' became
    NaN without a word."""
    from ctsma.diagnosis.data import check_labels, check_patch_table

    path = _csv(tmp_path, "subject, oa, severity\nNA, 1, 0.5\nk2, 0, \n", "labels.csv")
    lab = check_labels(path)
    assert list(lab.index) == ["NA", "k2"] and lab.oa.tolist() == [1, 0] and lab.oa.dtype == int
    assert lab.severity.iloc[0] == 0.5 and np.isnan(lab.severity.iloc[1])
    for text, match in (("subject,oa,severity\nk1,1,high\n", r"the severity column must hold numbers .*'high'"),
                        ("subject,oa\nk1,1\nk1,0\n", r"repeats subject name\(s\): k1"),
                        ("subject,oa\n,1\n", "no subject name")):
        with pytest.raises(UserError, match=match):
            check_labels(_csv(tmp_path, text, "labels.csv"))
    patches = _csv(tmp_path, "subject,roi,rel_x,rel_y,rel_z,BV/TV,Tb.Th,Tb.Sp,Tb.N\nNA,MFC,1,2,3,0.2,0.2,0.8,1.1\n"
                             "NA,LFC,1,2,3,,0.2,0.8,1.1\n", "patches.csv")
    table = check_patch_table(patches)
    assert table.subject.tolist() == ["NA", "NA"] and table.valid.tolist() == [True, False]  # empty: invalid patch


def test_report_study_manifest_with_an_extra_cell_or_a_spaced_header(tmp_path, capsys):
    """An extra cell shifted every column (the report rendered subject 'L', side '1'); 'subject, side, oa' gave
    columns ' side' and ' oa': the cohort summary left out the sides and OA counts without a word."""
    from ctsma.cli.main import main
    from ctsma.io import write_json
    from ctsma.report import synthetic
    from ctsma.report.study import _cohort

    write_json(tmp_path / "metrics.json", synthetic.metrics())
    path = _csv(tmp_path, "subject,side,oa\nk1,L,1,extra\n")
    assert main(["--quiet", "report", "study", str(tmp_path), "--manifest", str(path)]) == 2
    assert "manifest m.csv: line 2 has 4 cells, the header 3 (subject, side, oa)" in capsys.readouterr().err
    assert not (tmp_path / "report").exists()
    from ctsma.cli.report import _read_cohort_manifest

    df = _read_cohort_manifest(_csv(tmp_path, "subject, side, kl_grade, oa\nk1, L, 3, 1\nk2, , 0, 0\n"))
    assert df.oa.dtype == df.kl_grade.dtype == np.int64 and df.oa.tolist() == [1, 0]
    text = repr([vars(x) for x in _cohort(df)])
    assert "1 / 0" in text and "k1 (L), k2." in text  # sides L / R, and no "()" for a knee with no side
    with pytest.raises(UserError, match=r"the oa column must hold numbers .*'yes'"):
        _read_cohort_manifest(_csv(tmp_path, "subject,oa\nk1,yes\n"))


def test_one_rule_reads_a_knee_side_everywhere():
    """side_letter is the one rule (segment_bones, subchondral_rois, dataset build, batch infer): L/R, left/right or
    Lt/Rt in any case, None for no side, an error for anything else (it was ignored in some places, and read by its
    first letter in others: 'Rubbish' was a right knee)."""
    for value, letter in (("L", "L"), ("r", "R"), (" Left ", "L"), ("RIGHT", "R"), ("", None), ("  ", None),
                          (None, None), (float("nan"), None)):
        assert side_letter(value) == letter
    assert side_letter("Lt") == "L" and side_letter("rt") == "R"
    for bad in ("middle", "x", "1", "Rubbish", "LR", "left knee"):
        with pytest.raises(UserError, match=f"knee side must be L or R \\(or left/right\\), not '{bad}'"):
            side_letter(bad)


def test_a_quoted_cell_after_a_space_is_read_as_quoted(tmp_path):
    # 'subject, ct' typed by hand: a quoted cell after ', ' kept its quotes (the CT '"a.nii"' not found) or was split
    # at its comma (refused as a row with more cells than the header, whose message asks for the quotes it has)
    df = read_table(_csv(tmp_path, 'subject, ct, notes\nk1, "a.nii", "left knee, post-op"\nk2, b.nii, \n'))
    assert df.to_dict("list") == {"subject": ["k1", "k2"], "ct": ["a.nii", "b.nii"],
                                  "notes": ["left knee, post-op", ""]}

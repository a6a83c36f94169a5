"""A command that stops on a user mistake leaves earlier results as they were and shows one line, no traceback.

Each test puts an earlier result (or a sentinel) where the command writes, reruns it with one bad input and checks
the exit code, the message and that the earlier files are unchanged. Found by probing every subcommand (eleventh
session); the bad-input matrix in test_bad_input.py covers the inputs themselves.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from ctsma.cli.main import main
from ctsma.errors import UserError
from ctsma.io import atomic_path, ensure_output_file, write_json
from ctsma.report import synthetic
from ctsma.report.writing import write_outputs


def _err_line(capsys, command: str) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"ctsma {command}: error: ")]
    assert len(lines) == 1, err
    return lines[0]


def test_atomic_writes_refuse_a_folder_and_an_unwritable_place(tmp_path):
    (tmp_path / "adir.json").mkdir()
    with pytest.raises(UserError, match="is a folder"):
        with atomic_path(tmp_path / "adir.json"):
            pass
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserError, match="cannot create output folder"):
        with atomic_path(blocker / "below" / "x.json"):
            pass
    with pytest.raises(UserError, match="must end with .csv"):
        ensure_output_file(tmp_path / "p.json", (".csv",))
    with pytest.raises(UserError, match="is a folder"):
        ensure_output_file(tmp_path / "adir.json")
    assert ensure_output_file(tmp_path / "new" / "p.CSV", (".csv",)) == tmp_path / "new" / "p.CSV"


def test_write_outputs_is_all_or_nothing(tmp_path, monkeypatch):
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_text("earlier a")
    b.mkdir()  # a folder where the second file goes: refused before the first one changes
    with pytest.raises(UserError, match="is a folder"):
        write_outputs({a: b"new a", b: b"new b"})
    assert a.read_text() == "earlier a"
    b.rmdir()
    b.write_text("earlier b")
    real = os.replace
    calls = []

    def failing_second_rename(src, dst):
        calls.append(dst)
        if str(dst) == str(b) and str(src).endswith(".partial"):
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(os, "replace", failing_second_rename)
    with pytest.raises(OSError):
        write_outputs({a: b"new a", b: b"new b"})
    monkeypatch.setattr(os, "replace", real)
    assert a.read_text() == "earlier a" and b.read_text() == "earlier b"  # the earlier versions are back
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.txt"]  # no backup or partial file left
    write_outputs({a: b"new a", b: b"new b"})
    assert a.read_text() == "new a" and b.read_text() == "new b"


@pytest.fixture()
def study_dir(tmp_path, monkeypatch):
    from ctsma.report import figures
    monkeypatch.setattr(figures, "scatter_ba_figure", lambda df, src: None)
    write_json(tmp_path / "metrics.json", synthetic.metrics())
    assert main(["--quiet", "report", "study", str(tmp_path), "--readme-snippet", str(tmp_path / "snip")]) == 0
    return tmp_path


def test_report_study_checks_the_snippet_folder_before_replacing_the_report(study_dir, capsys):
    before = {p: p.read_bytes() for p in (study_dir / "report").iterdir()}
    (study_dir / "afile").write_text("not a folder")
    assert main(["--quiet", "report", "study", str(study_dir), "--readme-snippet", str(study_dir / "afile")]) == 2
    assert "afile" in _err_line(capsys, "report")
    assert {p: p.read_bytes() for p in (study_dir / "report").iterdir()} == before
    snip = study_dir / "snip"
    table = (snip / "key_table.md").read_bytes()
    (snip / "key_figure.png").unlink()
    (snip / "key_figure.png").mkdir()  # a folder where the figure goes
    assert main(["--quiet", "report", "study", str(study_dir), "--readme-snippet", str(snip)]) == 2
    assert "is a folder" in _err_line(capsys, "report")
    assert (snip / "key_table.md").read_bytes() == table
    assert {p: p.read_bytes() for p in (study_dir / "report").iterdir()} == before


def test_register_cohort_refuses_a_limit_or_jobs_below_one(tmp_path, capsys):
    out = tmp_path / "rc"
    out.mkdir()
    (out / "cohort_0of1.csv").write_text("earlier summary\n")
    (tmp_path / "m.csv").write_text("subject,mr,ct\nK1,mr.nii.gz,ct.nii.gz\n")
    for flag in ("--limit", "--jobs"):
        assert main(["--quiet", "register", "--manifest", str(tmp_path / "m.csv"), "--preset", "nosynth", flag, "-1",
                     "--out", str(out)]) == 2
        assert f"{flag} must be at least 1" in _err_line(capsys, "register")
    assert (out / "cohort_0of1.csv").read_text() == "earlier summary\n"


def test_diagnose_predict_keeps_the_table_and_its_json_apart(tmp_path, capsys):
    (tmp_path / "keep.json").write_text("earlier")
    assert main(["--quiet", "diagnose", "predict", "--model", str(tmp_path / "m.safetensors"), "--patches",
                 str(tmp_path / "p.csv"), "--out", str(tmp_path / "keep.json")]) == 2
    assert "must end with .csv" in _err_line(capsys, "diagnose")
    assert (tmp_path / "keep.json").read_text() == "earlier"


@pytest.mark.parametrize("argv,match", [
    (["synthesis", "apply", "{x}", "--model", "{x}", "--out", "{d}/pct.xyz"], "must end with"),
    (["synthesis", "apply", "{x}", "--model", "{x}", "--out", "{d}/adir.nii.gz"], "is a folder"),
    (["synthesis", "evaluate", "--manifest", "{x}", "--model", "{x}", "--out", "{d}/adir.json"], "is a folder"),
    (["synthesis", "train", "--manifest", "{x}", "--out", "{d}/adir.safetensors"], "is a folder"),
    (["diagnose", "train", "--patches", "{x}", "--labels", "{x}", "--out", "{d}/adir.safetensors"], "is a folder"),
])
def test_file_outputs_are_checked_before_any_work(tmp_path, capsys, argv, match):
    (tmp_path / "adir.nii.gz").mkdir()
    (tmp_path / "adir.json").mkdir()
    (tmp_path / "adir.safetensors").mkdir()
    x = tmp_path / "missing_input"  # would fail later: the output check must come first
    argv = [a.format(x=x, d=tmp_path) for a in argv]
    assert main(["--quiet", *argv]) == 2
    assert match in _err_line(capsys, argv[0])


def test_infer_batch_reads_its_manifest_and_models_once_before_any_case(tmp_path, capsys):
    broken = tmp_path / "broken.csv"
    broken.write_text('ct,subject\n"a.nii.gz,K1\n')
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    for manifest in (broken, empty):
        assert main(["--quiet", "infer", str(manifest), "--out", str(tmp_path / "out")]) == 2
        assert "not a readable CSV table" in _err_line(capsys, "infer")
    pd.DataFrame({"ct": ["k1.nii.gz", "k2.nii.gz"]}).to_csv(tmp_path / "m.csv", index=False)
    out = tmp_path / "ib"
    (out / "k1").mkdir(parents=True)
    (out / "k1" / "sentinel").write_text("earlier")
    assert main(["--quiet", "infer", str(tmp_path / "m.csv"), "--model", str(tmp_path / "nope.safetensors"),
                 "--out", str(out)]) == 2
    assert "nope.safetensors" in _err_line(capsys, "infer")
    assert sorted(p.name for p in out.rglob("*")) == ["k1", "sentinel"]  # no case folder, no status file


@pytest.mark.parametrize("command,argv,match", [
    ("dataset", ["dataset", "build", "--manifest", "{m}", "--subjects", "K1", "ZZ", "--out", "{d}/ds"],
     "ZZ not in the manifest"),
    ("diagnose", ["diagnose", "evaluate", "--patches", "a={m}", "--patches", "b={m}", "--labels", "{m}",
                  "--compare", "a:zz", "--out", "{d}/ev"], "--compare names zz"),
    ("report", ["report", "study", "{d}", "--figures", "{d}/no_figures"], "is not a folder of PNG figures"),
    ("morphometry", ["morphometry", "{m}", "--smooth-sigma", "-3", "--out", "{d}/mo"], "--smooth-sigma must be"),
    ("morphometry", ["morphometry", "{img}", "--modality", "binary", "--window", "40", "--out", "{d}/mo"],
     "--window 40 is too large"),
])
def test_option_values_that_would_be_ignored_are_refused(tmp_path, capsys, command, argv, match):
    m = tmp_path / "m.csv"
    m.write_text("subject,mr,ct\nK1,mr.nii.gz,ct.nii.gz\n")
    write_json(tmp_path / "metrics.json", synthetic.metrics())
    img = tmp_path / "plates.nii.gz"
    arr = np.zeros((20, 20, 20), np.uint8)
    arr[::5] = 1
    sitk.WriteImage(sitk.GetImageFromArray(arr), str(img))
    argv = [a.format(m=m, d=tmp_path, img=img) for a in argv]
    assert main(["--quiet", *argv]) == 2
    assert match in _err_line(capsys, command)
    assert not (tmp_path / "mo").exists()
    assert not (tmp_path / "report").exists() and not (tmp_path / "ds").exists() and not (tmp_path / "ev").exists()


def test_a_rerun_with_other_options_leaves_no_file_of_the_earlier_run(tmp_path, capsys):
    """Rerunning a command into the folder of an earlier run removes the outputs of its own that this run does not
    write again (maps without --maps, ROIs after --no-rois, a pseudo-CT under a preset without synthesis), so no
    file in the folder belongs to another run; files that are not the command's stay."""
    from ctsma.io.atomic import remove_stale_outputs
    from ctsma.registration import load_preset, register
    from ctsma.registration.pipeline import write_outputs as write_registration
    from knee_pair import make_knee_pair

    rng = np.random.default_rng(0)
    img = sitk.GetImageFromArray((rng.random((24, 24, 24)) > 0.6).astype(np.uint8))
    sitk.WriteImage(img, str(tmp_path / "bin.nii.gz"))
    out = tmp_path / "m"
    assert main(["--quiet", "morphometry", str(tmp_path / "bin.nii.gz"), "--out", str(out), "--maps",
                 "--window", "5", "--stride", "4"]) == 0
    assert (out / "tbth_map.nii.gz").is_file() and (out / "maps" / "bvtv.nii.gz").is_file()
    (out / "notes.txt").write_text("mine")
    assert main(["--quiet", "morphometry", str(tmp_path / "bin.nii.gz"), "--out", str(out)]) == 0
    assert not (out / "tbth_map.nii.gz").exists() and not list((out / "maps").glob("*.nii.gz"))
    assert (out / "notes.txt").read_text() == "mine" and (out / "morphometry.json").is_file()
    # registration: a pseudo-CT of an earlier preset goes when this run has none
    pair = make_knee_pair(1, ct_size=(40, 40, 40), mr_size=(44, 44, 40))
    fast = {"threads": 1, "rigid": {"iterations": 5}, "per_bone": {"enabled": False},
            "deformable": {"enabled": False}}
    reg = tmp_path / "r"
    write_registration(register(pair.mr, pair.ct, preset=load_preset("default", fast), ct_bones=pair.ct_bones,
                                pseudo_ct=pair.pseudo_ct_ideal), pair.mr, pair.ct, reg)
    assert (reg / "pseudo_ct_in_ct.nii.gz").is_file()
    qa = write_registration(register(pair.mr, pair.ct, preset=load_preset("nosynth", fast), ct_bones=pair.ct_bones),
                            pair.mr, pair.ct, reg)
    assert "pseudo_ct_in_ct" not in qa["files"]
    assert not (reg / "pseudo_ct_in_ct.nii.gz").exists() and not (reg / "checkerboard_pseudo_ct.png").exists()
    # the helper never touches what is not the command's, nor what this run wrote
    (tmp_path / "x").mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (tmp_path / "x" / name).write_text(name)
    assert remove_stale_outputs(tmp_path / "x", ("a.txt", "b.txt"), ["b.txt"]) == ["a.txt"]
    assert sorted(p.name for p in (tmp_path / "x").iterdir()) == ["b.txt", "c.txt"]


def test_a_rerun_removes_the_sub_folder_it_emptied(tmp_path):
    """'morphometry --window' then a rerun without it left an empty maps/ folder, which reads as maps being there;
    a sub-folder that still holds another file (a user's) stays."""
    from ctsma.io.atomic import remove_stale_outputs

    for name in ("maps/bvtv.nii.gz", "maps/tbth.nii.gz", "unc/tbn.nii.gz", "unc/notes.txt"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text(name)
    owned = ("maps/bvtv.nii.gz", "maps/tbth.nii.gz", "unc/tbn.nii.gz")
    assert remove_stale_outputs(tmp_path, owned, []) == sorted(owned)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == ["unc", "unc/notes.txt"]


def test_an_interrupted_registration_leaves_none_of_its_files(tmp_path, monkeypatch):
    """Ctrl-C while a registration writes its outputs (here at its last picture): the subject's folder holds
    nothing of the run, so no half-written registration sits beside finished ones in a cohort."""
    from ctsma.registration import load_preset, register
    from ctsma.registration import pipeline
    from knee_pair import make_knee_pair

    pair = make_knee_pair(1, ct_size=(40, 40, 40), mr_size=(44, 44, 40))
    res = register(pair.mr, pair.ct, preset=load_preset("nosynth", {"threads": 1, "rigid": {"iterations": 5},
                                                                    "per_bone": {"enabled": False},
                                                                    "deformable": {"enabled": False}}),
                   ct_bones=pair.ct_bones)

    def ctrl_c(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "checkerboard_png", ctrl_c)
    with pytest.raises(KeyboardInterrupt):
        pipeline.write_outputs(res, pair.mr, pair.ct, tmp_path / "P0001")
    assert not [p for p in (tmp_path / "P0001").rglob("*")]

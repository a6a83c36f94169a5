"""Foundation: validated image reading, atomic writers, safe paths."""

import os
import stat
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from ctsma.errors import InputImageError, MemoryBudgetError, UserError
from ctsma.io import (atomic_dir, atomic_path, check_same_geometry, ensure_writable_dir, read_image,
                      safe_join, write_image, write_json)
from ctsma.io.images import check_ct_intensities


def _img(shape_zyx=(6, 7, 8), spacing=(0.5, 0.6, 0.7), value=None, dtype=np.float32):
    arr = np.arange(np.prod(shape_zyx), dtype=dtype).reshape(shape_zyx) if value is None else \
        np.full(shape_zyx, value, dtype=dtype)
    img = sitk.GetImageFromArray(arr)
    img.SetSpacing(spacing)
    img.SetOrigin((1.0, -2.0, 3.0))
    return img


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_read_write_round_trip_keeps_geometry(tmp_path, suffix):
    img = _img()
    c, s = np.cos(0.3), np.sin(0.3)
    img.SetDirection((c, -s, 0, s, c, 0, 0, 0, 1))
    p = write_image(img, tmp_path / f"a{suffix}")
    back = read_image(p)
    assert back.GetSize() == img.GetSize()
    np.testing.assert_allclose(back.GetSpacing(), img.GetSpacing(), atol=1e-6)
    np.testing.assert_allclose(back.GetDirection(), img.GetDirection(), atol=1e-6)
    idx = (3, 2, 5)
    np.testing.assert_allclose(back.TransformIndexToPhysicalPoint(idx), img.TransformIndexToPhysicalPoint(idx),
                               atol=1e-4)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(img))
    assert sorted(os.listdir(tmp_path)) == [f"a{suffix}"]  # no temporary files left


def test_missing_file_is_a_user_error(tmp_path):
    with pytest.raises(InputImageError, match="not found"):
        read_image(tmp_path / "nope.nii.gz", what="CT")


@pytest.mark.parametrize("suffix,compress", [(".nii.gz", True), (".nii", False), (".nrrd", True),
                                             (".nrrd", False), (".mha", True)])
def test_truncated_file_is_a_user_error(tmp_path, suffix, compress):
    rng = np.random.default_rng(1)
    img = sitk.GetImageFromArray(rng.random((20, 20, 20)).astype(np.float32))
    p = tmp_path / f"a{suffix}"
    sitk.WriteImage(img, str(p), compress)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputImageError, match="truncated|corrupted"):
        read_image(p)


@pytest.mark.parametrize("offset", [1.0e12, float("inf"), float("nan"), -5.0, 4.0e6])
@pytest.mark.parametrize("suffix", [".nii", ".nii.gz"])
def test_corrupted_nifti_data_offset_is_a_user_error(tmp_path, offset, suffix):
    """Found by the deep fuzz run: a corrupted vox_offset made the payload check allocate or overflow."""
    import gzip
    import struct

    p = tmp_path / "a.nii"
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 5, 6), np.float32)), str(p), False)
    data = bytearray(p.read_bytes())
    data[108:112] = struct.pack("<f", offset)
    out = tmp_path / f"b{suffix}"
    out.write_bytes(gzip.compress(bytes(data)) if suffix.endswith(".gz") else bytes(data))
    try:
        read_image(out)
    except InputImageError as exc:
        assert "corrupted" in str(exc) or "truncated" in str(exc)
    else:
        raise AssertionError("a NIfTI whose data offset lies beyond its end was accepted")


def test_garbage_file_is_a_user_error(tmp_path):
    p = tmp_path / "x.nrrd"
    p.write_bytes(b"NRRD0004\nthis is not a header\n\x00\x01")
    with pytest.raises(InputImageError):
        read_image(p)


def test_2d_and_4d_refused(tmp_path):
    two = sitk.GetImageFromArray(np.zeros((5, 6), np.float32))
    sitk.WriteImage(two, str(tmp_path / "two.nii.gz"))
    with pytest.raises(InputImageError, match="2D"):
        read_image(tmp_path / "two.nii.gz")
    four = sitk.GetImageFromArray(np.zeros((3, 4, 5, 6), np.float32), isVector=False)
    sitk.WriteImage(four, str(tmp_path / "four.nii.gz"))
    with pytest.raises(InputImageError, match="4D"):
        read_image(tmp_path / "four.nii.gz")


def test_non_finite_voxels_refused(tmp_path):
    img = _img()
    arr = sitk.GetArrayFromImage(img)
    arr[1, 2, 3] = np.nan
    bad = sitk.GetImageFromArray(arr)
    # NIfTI matters most: ITK's reader silently turns NaN into 0, so ctsma checks the payload itself
    for name in ("nan.nii.gz", "nan.nii", "nan.nrrd"):
        with pytest.raises(InputImageError, match="1 non-finite"):
            read_image(write_image(bad, tmp_path / name, compress=name.endswith("gz")))


def test_bad_spacing_and_direction_refused():
    from ctsma.io import check_image
    img = _img()
    img.SetDirection((1, 0.3, 0, 0, 1, 0, 0, 0, 1))
    with pytest.raises(InputImageError, match="non-orthogonal"):
        check_image(img)
    # ITK refuses to store zero spacing, so a spacing error is checked through a file header
    img = _img()
    img.SetSpacing((0.5, 1e-9, 0.5))
    assert check_image(img)  # tiny but positive spacing is legal


def test_zero_spacing_in_header_refused(tmp_path):
    p = tmp_path / "z.nhdr"
    raw = tmp_path / "z.raw"
    np.zeros((4, 4, 4), np.float32).tofile(raw)
    p.write_text("NRRD0004\ntype: float\ndimension: 3\nsizes: 4 4 4\nspace: left-posterior-superior\n"
                 "space directions: (0,0,0) (0,1,0) (0,0,1)\nspace origin: (0,0,0)\nendian: little\n"
                 "encoding: raw\ndata file: z.raw\n")
    with pytest.raises(InputImageError):
        read_image(p)


def test_memory_budget_refused_before_reading(tmp_path):
    p = write_image(_img((10, 10, 10)), tmp_path / "a.nii.gz")
    with pytest.raises(MemoryBudgetError, match="1,000 voxels.*budget of 999"):
        read_image(p, max_voxels=999)


def test_geometry_mismatch_named():
    a, b = _img(), _img()
    b.SetOrigin((1.0, -2.0, 4.0))
    with pytest.raises(InputImageError, match="origin"):
        check_same_geometry(a, b)
    check_same_geometry(a, _img())
    # which size is whose (it said "size A vs B", and A was the CT's)
    small = sitk.Image(4, 5, 6, sitk.sitkFloat32)
    with pytest.raises(InputImageError, match=r"ROI label image does not match the geometry of the CT: size \(4, 5, "
                                              r"6\) against the CT's \(" + ", ".join(map(str, a.GetSize())) + r"\)"):
        check_same_geometry(a, small, what_a="CT", what_b="ROI label image")


def test_ct_intensity_check_separates_ct_from_mr():
    rng = np.random.default_rng(0)
    ct = np.full((20, 20, 20), -1000.0, np.float32)
    ct[5:15, 5:15, 5:15] = 40
    ct[8:12, 8:12, 8:12] = 1200
    check_ct_intensities(sitk.GetImageFromArray(ct + rng.normal(0, 10, ct.shape).astype(np.float32)))
    mr = rng.uniform(0, 800, (20, 20, 20)).astype(np.float32)
    with pytest.raises(InputImageError, match="Hounsfield"):
        check_ct_intensities(sitk.GetImageFromArray(mr))
    # real CTs that are still CTs: low-dose noise in air (SD 60 HU), a metal implant on an extended HU scale
    noisy = ct + rng.normal(0, 60, ct.shape).astype(np.float32)
    check_ct_intensities(sitk.GetImageFromArray(noisy))
    metal = ct.copy()
    metal[9:11, 9:11, 5:15] = 25000.0
    check_ct_intensities(sitk.GetImageFromArray(metal))
    # a CT whose rescale intercept was applied twice (every value 1024 HU low): its air reads as padding, and what
    # is left has no soft tissue near 0 HU
    with pytest.raises(InputImageError, match="applied twice"):
        check_ct_intensities(sitk.GetImageFromArray(ct + rng.normal(0, 10, ct.shape).astype(np.float32) - 1024))


def test_atomic_path_leaves_old_file_on_failure(tmp_path):
    target = tmp_path / "out.json"
    write_json(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("killed")
    assert target.read_text().strip().startswith("{")
    assert sorted(os.listdir(tmp_path)) == ["out.json"]


def test_atomic_dir_replaces_whole_folder(tmp_path):
    target = tmp_path / "run"
    with atomic_dir(target) as d:
        (d / "a.txt").write_text("1")
    with pytest.raises(ValueError):
        with atomic_dir(target) as d:
            (d / "b.txt").write_text("2")
            raise ValueError
    assert sorted(os.listdir(target)) == ["a.txt"]
    assert sorted(os.listdir(tmp_path)) == ["run"]


def test_write_json_is_strict(tmp_path):
    import json
    p = write_json(tmp_path / "m.json", {"x": float("nan"), "y": np.float32(1.5), "z": np.arange(2)})
    assert json.loads(p.read_text()) == {"x": None, "y": 1.5, "z": [0, 1]}


def test_safe_join_refuses_escape(tmp_path):
    assert safe_join(tmp_path, "a", "b.txt") == (tmp_path / "a" / "b.txt").resolve()
    for bad in ("../x", "/etc/passwd", "a/../../x"):
        with pytest.raises(UserError, match="outside"):
            safe_join(tmp_path, bad)


def test_unwritable_folder_named(tmp_path, monkeypatch):
    """A read-only output folder is refused by name. Root (as CI runs) writes into it anyway, so there the file
    system's refusal of the probe file is simulated, for that folder only; elsewhere the chmod is what refuses."""
    import errno
    import tempfile

    import ctsma.io.atomic as atomic

    d = tmp_path / "ro"
    d.mkdir()
    d.chmod(stat.S_IREAD | stat.S_IEXEC)
    if os.geteuid() == 0:
        real = tempfile.NamedTemporaryFile

        def refused(*args, **kw):
            if Path(kw.get("dir", "")) == d:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(d))
            return real(*args, **kw)
        monkeypatch.setattr(atomic.tempfile, "NamedTemporaryFile", refused)
    try:
        with pytest.raises(UserError, match=f"output folder {d} is not writable: {os.strerror(errno.EACCES)}"):
            ensure_writable_dir(d)
    finally:
        d.chmod(stat.S_IRWXU)
    assert not list(d.iterdir())  # the probe file left nothing behind


def test_output_path_that_is_a_file_refused(tmp_path):
    f = tmp_path / "f"
    f.write_text("x")
    with pytest.raises(UserError, match=f"output path {f} exists and is not a folder"):
        ensure_writable_dir(f)
    with pytest.raises(UserError, match=f"cannot create output folder {f / 'sub'}"):
        ensure_writable_dir(f / "sub")


def test_atomic_files_get_normal_permissions(tmp_path):
    old = os.umask(0o022)
    try:
        p = write_json(tmp_path / "m.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(p.stat().st_mode) == 0o644
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "knee") as d:  # a multi-file output (a phantom knee, a registration)
            (d / "x.txt").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "knee").stat().st_mode) == 0o755


def test_stale_partials_of_a_killed_atomic_write_are_removed(tmp_path):
    from ctsma.io.atomic import atomic_path, remove_stale_partials

    target = tmp_path / "P0000.npz"
    with atomic_path(target) as tmp:
        tmp.write_bytes(b"done")
    import fnmatch

    assert fnmatch.fnmatch(tmp.name, ".P0000.*.partial.npz")  # the temporary names atomic_path uses
    left = tmp_path / ".P0000.k1lled.partial.npz"  # what a write killed before its rename leaves
    left.write_bytes(b"half")
    other = tmp_path / ".P0001.abc.partial.npz"  # another file's temporary: not ours to remove
    other.write_bytes(b"other")
    remove_stale_partials(target)
    assert not left.exists() and other.exists() and target.read_bytes() == b"done"


def test_staged_outputs_move_the_completion_marker_last_and_clear_killed_stagings(tmp_path, monkeypatch):
    """A run killed while its files are moved must not leave a folder that looks complete (resume trusts
    ``summary.json``), and the staging folder of a killed run is removed by the next one, while the staging
    folders of live runs and of other machines are left alone."""
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    from ctsma.io.atomic import remove_stale_staging, staged_outputs

    out = tmp_path / "P0000"
    out.mkdir()
    host = socket.gethostname()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()            # a pid that has just ended
    stale = out / f".staging-{dead}@{host}.k1lled"
    (stale / "maps").mkdir(parents=True)
    (stale / "maps" / "bvtv.nii.gz").write_bytes(b"half")
    live = out / f".staging-{os.getpid()}@{host}.running"     # this process: alive
    elsewhere = out / f".staging-{dead}@another-host.example.org.abc"
    user = out / ".staging-notes"                             # not a name staged_outputs makes
    for d in (live, elsewhere, user):
        d.mkdir()
    (out / "notes.txt").write_text("the user's own file")
    (out / "summary.json").write_text("old run")              # a rerun into a finished folder
    moved = []
    real_replace = os.replace

    def replace(a, b):
        assert not (out / "summary.json").exists() or Path(b).name == "summary.json"   # old marker gone first
        moved.append(Path(b).relative_to(out).as_posix())
        real_replace(a, b)

    monkeypatch.setattr(os, "replace", replace)
    with staged_outputs(out) as stage:
        assert stage.name.startswith(f".staging-{os.getpid()}@{host}.")
        for name in ("summary.json", "uncertainty/tbn.nii.gz", "maps/bvtv.nii.gz", "roi_table.csv"):
            (stage / name).parent.mkdir(parents=True, exist_ok=True)
            (stage / name).write_text(name)
    assert moved[-1] == "summary.json" and sorted(moved[:-1]) == moved[:-1] and len(moved) == 4
    assert (out / "summary.json").read_text() == "summary.json"
    assert not stale.exists() and live.is_dir() and elsewhere.is_dir() and user.is_dir()
    assert (out / "notes.txt").read_text() == "the user's own file"
    remove_stale_staging(out)
    assert live.is_dir() and elsewhere.is_dir() and user.is_dir()


@pytest.mark.parametrize("obstacle", ["folder", "file"])
def test_staged_outputs_refuse_a_name_in_the_way_before_moving_anything(tmp_path, obstacle):
    """A folder named as an output file (or a file named as an output folder) made the moves fail half-way with a
    traceback: the earlier run's marker gone, some files of the new run in place. Now one line, nothing moved."""
    from ctsma.io.atomic import staged_outputs

    out = tmp_path / "out"
    out.mkdir()
    (out / "summary.json").write_text("old")
    (out / "a.txt").write_text("old")
    if obstacle == "folder":
        (out / "b.txt").mkdir()
        message = "b.txt: a folder of that name is in the way"
    else:
        (out / "maps").write_text("the user's")
        message = "maps is a file, not a folder"
    with pytest.raises(UserError, match=message):
        with staged_outputs(out) as stage:
            for name in ("summary.json", "a.txt", "b.txt", "maps/bvtv.nii.gz"):
                (stage / name).parent.mkdir(parents=True, exist_ok=True)
                (stage / name).write_text("new")
    assert (out / "summary.json").read_text() == "old" and (out / "a.txt").read_text() == "old"
    assert sorted(p.name for p in out.iterdir()) == sorted(["summary.json", "a.txt", "b.txt" if obstacle == "folder"
                                                            else "maps"])


def test_staging_liveness_never_signals_a_process_on_windows(monkeypatch):
    """``os.kill(pid, 0)`` terminates the process on Windows: there the check must not call it at all."""
    import os

    from ctsma.io import atomic

    monkeypatch.setattr(atomic.os, "name", "nt")
    monkeypatch.setattr(atomic.os, "kill", lambda *a: (_ for _ in ()).throw(AssertionError("os.kill called")))
    assert atomic.pid_alive(os.getpid() + 10 ** 6)


def test_a_dicom_folder_with_two_series_of_equal_size_is_refused(tmp_path):
    """The largest series is read (with a warning) when sizes differ; two of the same size leave no rule to choose,
    so the user is asked to separate them."""
    import shutil

    from dicom_series import write_ct_series

    from ctsma.io import read_image

    vol = sitk.GetImageFromArray(np.full((6, 12, 12), 40, np.int16))
    both = tmp_path / "both"
    both.mkdir()
    for uid, n in (("1.2.3.4.1", 6), ("1.2.3.4.2", 6)):
        write_ct_series(vol[:, :, :n], tmp_path / uid, series_uid=uid)
        for f in (tmp_path / uid).iterdir():
            shutil.move(str(f), both / f"{uid}_{f.name}")
    with pytest.raises(InputImageError, match=r"2 DICOM series of 6 files each \(1\.2\.3\.4\.1, 1\.2\.3\.4\.2\)"):
        read_image(both, what="CT")
    for f in both.glob("1.2.3.4.2_s00[4-5].dcm"):  # now the second is smaller: the first is read, with a warning
        f.unlink()
    with pytest.warns(UserWarning, match="using the largest \\(1.2.3.4.1, 6 files\\)"):
        assert read_image(both, what="CT").GetSize() == (12, 12, 6)


def test_a_study_folder_gives_the_series_of_the_asked_modality(tmp_path):
    """A folder holding a CT and a larger MR series: read as the CT, the CT series (by its DICOM Modality), not
    the largest; read as the MR, the MR; read as a plain image, the largest, as before."""
    import shutil

    from dicom_series import write_ct_series

    from ctsma.io import read_image

    vol = sitk.GetImageFromArray(np.full((8, 12, 12), 40, np.int16))
    both = tmp_path / "study"
    both.mkdir()
    for uid, n, modality in (("1.2.3.5.1", 4, "CT"), ("1.2.3.5.2", 8, "MR")):
        write_ct_series(vol[:, :, :n], tmp_path / uid, series_uid=uid, modality=modality)
        for f in (tmp_path / uid).iterdir():
            shutil.move(str(f), both / f"{uid}_{f.name}")
    with pytest.warns(UserWarning, match="holds 2 DICOM series; reading the CT one only"):
        assert read_image(both, what="CT").GetSize() == (12, 12, 4)
    with pytest.warns(UserWarning, match="reading the MR one only"):
        assert read_image(both, what="MR").GetSize() == (12, 12, 8)
    with pytest.warns(UserWarning, match="using the largest"):
        assert read_image(both, what="image").GetSize() == (12, 12, 8)


def test_input_stamps_ignore_junk_and_old_records_still_match(tmp_path):
    """A file manager's .DS_Store beside a DICOM series changes no request; a request recorded before stamps
    existed matches the same request with them, so an upgrade redoes nothing; a changed file is a new request."""
    from ctsma.io.atomic import input_stamp, same_request
    series = tmp_path / "series"
    series.mkdir()
    (series / "s001.dcm").write_bytes(b"x" * 10)
    before = input_stamp(series)
    (series / ".DS_Store").write_bytes(b"junk")
    (series / "Thumbs.db").write_bytes(b"junk")
    assert input_stamp(series) == before and before["files"] == 1
    request = {"ct": "a", "stamps": {"ct": before}}
    assert same_request({"ct": "a"}, request) and same_request(request, dict(request))
    assert not same_request({"ct": "b"}, request) and not same_request(None, request)
    (series / "s002.dcm").write_bytes(b"y")
    assert not same_request(request, {"ct": "a", "stamps": {"ct": input_stamp(series)}})

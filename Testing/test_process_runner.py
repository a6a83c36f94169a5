"""Background process runner and module Logic runs, with real tiny subprocesses.

The child processes are short ``python -c`` scripts that behave like ``ctsma`` (progress lines,
outputs, errors, sleeping); the Logic's loading of results into the scene is the real code.
"""

from __future__ import annotations

import json
import os
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from CTSMALib.process import CANCELLED, DONE, FAILED, RUNNING, ProcessRunner, ctsma_command
from ctsma.errors import InputImageError, UserError


def _script(body: str) -> list[str]:
    return [sys.executable, "-c", textwrap.dedent(body)]


PROGRESS_THEN_SLEEP = """
import json, sys, time
path = sys.argv[1]
with open(path, "a") as fh:
    for i in range(3):
        fh.write(json.dumps({"stage": "work", "done": i + 1, "total": 4, "message": "step"}) + "\\n")
        fh.flush()
    fh.write('{"stage": "work", "do')  # half a line: must wait for the rest
    fh.flush()
    time.sleep(float(sys.argv[2]))
    fh.write('ne": 4, "total": 4}\\n')
print("finished", flush=True)
"""


def test_runner_follows_progress_and_reports_done(tmp_path):
    progress = tmp_path / "p.jsonl"
    runner = ProcessRunner().start(_script(PROGRESS_THEN_SLEEP) + [str(progress), "0.3"], tmp_path, progress)
    seen = None
    for _ in range(100):
        status = runner.poll()
        if status.events:
            seen = status
            break
        time.sleep(0.02)
    assert seen is not None and seen.state == RUNNING
    assert seen.stage == "work" and [e.done for e in seen.events] == [1, 2, 3]  # no half line
    final = runner.wait(timeout=20)
    assert final.state == DONE and final.returncode == 0
    assert [e.done for e in final.events] == [1, 2, 3, 4] and final.fraction == 1.0
    assert "finished" in (tmp_path / "run.log").read_text()


def test_runner_reports_failure_with_last_error_line(tmp_path):
    body = """
    import sys
    for i in range(3):
        print(f"{i * 33}%|###       | {i}/3 [00:01<00:02]", file=sys.stderr, end="\\r")
    print("ctsma register: error: CT volume has no bone above 250 HU", file=sys.stderr)
    print("some trailing note", file=sys.stderr)
    sys.exit(2)
    """
    runner = ProcessRunner().start(_script(body), tmp_path)
    status = runner.wait(timeout=20)
    assert status.state == FAILED and status.returncode == 2
    assert status.last_error == "ctsma register: error: CT volume has no bone above 250 HU"


def test_cancel_terminates_the_whole_process_group(tmp_path):
    body = """
    import subprocess, sys, time
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    open("child.pid", "w").write(str(child.pid))
    time.sleep(60)
    """
    runner = ProcessRunner(grace_s=5).start(_script(body), tmp_path)
    pid_file = tmp_path / "child.pid"
    for _ in range(200):
        if pid_file.exists() and pid_file.read_text():
            break
        time.sleep(0.02)
    child = int(pid_file.read_text())
    t0 = time.monotonic()
    status = runner.cancel()
    assert status.state == CANCELLED and time.monotonic() - t0 < 5
    for _ in range(100):  # the grandchild got the signal too
        try:
            os.kill(child, 0)
        except ProcessLookupError:
            break
        try:  # reap it if it is ours (it is not: it belongs to the cancelled process)
            os.waitpid(child, os.WNOHANG)
        except ChildProcessError:
            pass
        time.sleep(0.02)
    else:
        pytest.fail("the worker's child process survived the cancel")


def test_cancel_kills_a_process_that_ignores_terminate(tmp_path):
    body = """
    import signal, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    open("ready", "w").write("1")
    time.sleep(60)
    """
    runner = ProcessRunner(grace_s=0.5).start(_script(body), tmp_path)
    for _ in range(200):
        if (tmp_path / "ready").exists():
            break
        time.sleep(0.02)
    status = runner.cancel()
    assert status.state == CANCELLED and not runner.is_running()


def test_command_is_an_argument_list_running_ctsma(tmp_path):
    cmd = ctsma_command(["register", "a b.nii", "c.nii"], tmp_path / "p.jsonl", python="/py")
    assert cmd == ["/py", "-m", "ctsma.cli.main", "--progress-jsonl", str(tmp_path / "p.jsonl"),
                   "register", "a b.nii", "c.nii"]
    with pytest.raises(TypeError):
        ctsma_command("register a b", tmp_path / "p.jsonl")
    with pytest.raises(TypeError):
        ProcessRunner().start("echo hi", tmp_path)


def test_real_ctsma_cli_runs_in_the_background(tmp_path):
    """The real command line through the runner: --version exits 0 and prints the version."""
    import ctsma

    runner = ProcessRunner().start_ctsma(["--version"], tmp_path)
    status = runner.wait(timeout=60)
    assert status.state == DONE, (tmp_path / "run.log").read_text()
    assert ctsma.__version__ in (tmp_path / "run.log").read_text()


# -- the Logic with the process swapped ------------------------------------------------------------
class FakeCtsma(ProcessRunner):
    """Runs a small Python script instead of ``ctsma``; the script sees the real argument list
    and writes the registration outputs that the contract names (or sleeps, or fails)."""

    behaviour = "succeed"

    def start_ctsma(self, args, work_dir, env=None, python=None):
        self.args = list(args)
        progress = Path(work_dir) / "progress.jsonl"
        body = """
        import json, sys, time
        import SimpleITK as sitk
        behaviour, progress, args = sys.argv[1], sys.argv[2], sys.argv[3:]
        def emit(done):
            with open(progress, "a") as fh:
                fh.write(json.dumps({"stage": "register", "done": done, "total": 2}) + "\\n")
        emit(0)
        if behaviour == "sleep":
            time.sleep(60)
        if behaviour == "fail":
            sys.exit("ctsma register: error: MR volume is empty")
        out = args[args.index("--out") + 1]
        import os; os.makedirs(out, exist_ok=True)
        mr, ct = sitk.ReadImage(args[1]), sitk.ReadImage(args[2])
        tx = sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, 0.1, (2.0, -1.0, 0.5))
        sitk.WriteTransform(tx, out + "/transform_ct_to_mr.h5")
        sitk.WriteImage(sitk.Resample(mr, ct, tx), out + "/mr_in_ct.nii.gz")
        sitk.WriteImage(ct, out + "/pseudo_ct_in_ct.nii.gz")
        qa = {"stages": [{"name": "rigid", "metric_before": -0.1, "metric_after": -0.5, "kept": True,
                          "bone_dice": 0.9, "seconds": 1.5}], "total_seconds": 1.5}
        json.dump(qa, open(out + "/qa.json", "w"))
        emit(2)
        """
        cmd = _script(body) + [self.behaviour, str(progress), *self.args]
        return self.start(cmd, work_dir, progress, env=env)


def _volume(scene, name, seed):
    from CTSMALib import scene_bridge as sb

    img = sitk.GetImageFromArray(np.random.default_rng(seed).normal(size=(6, 7, 8)).astype(np.float32))
    img.SetSpacing((0.7, 0.8, 1.5))
    img.SetOrigin((1.0, 2.0, 3.0))
    return sb.sitk_to_volume_node(img, scene, name)


def _registration_logic(tmp_path, behaviour):
    from CTSMALib.registration_logic import CTSMARegistrationLogic

    class Runner(FakeCtsma):
        pass

    Runner.behaviour = behaviour
    return CTSMARegistrationLogic(runner_factory=Runner, work_root=tmp_path)


@pytest.mark.mrml
def test_successful_registration_run_loads_outputs(mrml_scene, tmp_path):
    from CTSMALib import scene_bridge as sb

    logic = _registration_logic(tmp_path, "succeed")
    mr, ct = _volume(mrml_scene, "MR", 1), _volume(mrml_scene, "CT", 2)
    run = logic.startRegistration(mr, ct)
    assert logic.isRunning()
    assert run.runner.args[:2] == ["register", str(run.work_dir / "mr.nii")] and "--out" in run.runner.args
    status = logic.wait(timeout=60)
    assert status.state == DONE, status.last_error or (run.work_dir / "run.log").read_text()
    assert {k: n.GetClassName() for k, n in run.outputs.items()} == {
        "transform": "vtkMRMLTransformNode", "mr_in_ct": "vtkMRMLScalarVolumeNode",
        "pseudo_ct": "vtkMRMLScalarVolumeNode", "qa": "vtkMRMLTableNode"}
    tnode = run.outputs["transform"]
    expected = sitk.Euler3DTransform((0, 0, 0), 0.0, 0.0, 0.1, (2.0, -1.0, 0.5))
    p = np.array([3.0, -4.0, 5.0])
    assert np.allclose(sb.transform_point_ras(tnode, p * [-1, -1, 1]) * [-1, -1, 1],
                       expected.TransformPoint(tuple(p)), atol=1e-4)
    table, _ = sb.node_to_dataframe(run.outputs["qa"])
    assert list(table["name"]) == ["rigid", "total"] and table["seconds"].tolist() == [1.5, 1.5]
    logic.cleanupRun()
    assert not run.work_dir.exists()


@pytest.mark.mrml
def test_cancelled_and_failed_runs_add_no_nodes(mrml_scene, tmp_path):
    logic = _registration_logic(tmp_path, "sleep")
    mr, ct = _volume(mrml_scene, "MR", 1), _volume(mrml_scene, "CT", 2)
    n_nodes = mrml_scene.GetNumberOfNodes()
    logic.startRegistration(mr, ct)
    with pytest.raises(UserError, match="still running"):
        logic.startRegistration(mr, ct)
    status = logic.cancel()
    assert status.state == CANCELLED and not logic.isRunning()
    assert logic.poll().state == CANCELLED
    assert mrml_scene.GetNumberOfNodes() == n_nodes

    failing = _registration_logic(tmp_path, "fail")
    failing.startRegistration(mr, ct)
    status = failing.wait(timeout=60)
    assert status.state == FAILED and "MR volume is empty" in status.last_error
    assert mrml_scene.GetNumberOfNodes() == n_nodes


@pytest.mark.mrml
def test_incomplete_outputs_fail_the_run_and_leave_the_scene_unchanged(mrml_scene, tmp_path):
    from CTSMALib.registration_logic import CTSMARegistrationLogic

    logic = CTSMARegistrationLogic(work_root=tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "qa.json").write_text(json.dumps({"stages": []}))
    (out / "transform_ct_to_mr.h5").write_text("not a transform")
    n_nodes = mrml_scene.GetNumberOfNodes()
    with pytest.raises(FileNotFoundError, match="mr_in_ct"):
        logic.loadOutputs(out)
    for name in ("mr_in_ct.nii.gz", "pseudo_ct_in_ct.nii.gz"):
        sitk.WriteImage(sitk.Image([3, 3, 3], sitk.sitkFloat32), str(out / name))
    with pytest.raises(RuntimeError, match="transform"):
        logic.loadOutputs(out)  # a damaged transform: nothing half-loaded
    assert mrml_scene.GetNumberOfNodes() == n_nodes


class FakeInfer(ProcessRunner):
    """Stands in for ``ctsma segment`` / ``ctsma infer``: writes the contract's output files."""

    def start_ctsma(self, args, work_dir, env=None, python=None):
        self.args = list(args)
        progress = Path(work_dir) / "progress.jsonl"
        body = """
        import json, os, sys
        import numpy as np, SimpleITK as sitk
        args = sys.argv[1:]
        out = args[args.index("--out") + 1]
        os.makedirs(out + "/maps", exist_ok=True)
        ct = sitk.ReadImage(args[1])
        lab = np.zeros(sitk.GetArrayViewFromImage(ct).shape, np.uint8)
        lab[:3] = 2; lab[3:] = 1  # tibia below, femur above
        bones = sitk.GetImageFromArray(lab); bones.CopyInformation(ct)
        sitk.WriteImage(bones, out + "/bones.nii.gz")
        if args[0] == "infer":
            rois = sitk.GetImageFromArray((lab == 1).astype(np.uint8) * 1 + (lab == 2).astype(np.uint8) * 3)
            rois.CopyInformation(ct)
            sitk.WriteImage(rois, out + "/rois.nii.gz")
            for stem in ("bvtv", "tbth", "tbsp", "tbn"):
                m = sitk.GetImageFromArray(np.full(lab.shape, 0.25, np.float32)); m.CopyInformation(ct)
                sitk.WriteImage(m, out + f"/maps/{stem}.nii.gz")
            with open(out + "/roi_table.csv", "w") as fh:
                fh.write("roi,parameter,mean,sd,median,iqr,n_patches\\n")
                fh.write("MFC,Tb.Th,0.21,0.02,0.2,0.03,12\\nMTP,Tb.N,1.4,0.1,1.4,0.2,9\\n")
            json.dump({"oa_probability": 0.7, "severity": 2.1, "auc": 0.81, "warnings": ["the knee side R was "
                       "inferred from the anatomy"], "ct_resolution": {"through_plane_blur_mm": 0.42,
                       "slice_thickness_mm": 0.7, "model_slice_thickness_mm": 1.0}, "model": {"demo": True},
                       "display_range": {"Tb.Th": [0.6, 0.9], "Tb.N": "bad"}},
                      open(out + "/summary.json", "w"))
        """
        return self.start(_script(body) + list(args), work_dir, progress, env=env)


@pytest.mark.mrml
def test_analysis_logic_loads_segmentations_maps_and_tables(mrml_scene, tmp_path):
    from CTSMALib import scene_bridge as sb
    from CTSMALib.analysis_logic import DEMO_NOTE, SOURCE_ROLE, CTSMALogic
    from CTSMALib.parameters import AnalysisParameters

    logic = CTSMALogic(runner_factory=FakeInfer, work_root=tmp_path)
    ct = _volume(mrml_scene, "knee", 3)
    run = logic.startBoneSegmentation(ct)
    assert run.runner.args == ["segment", str(run.work_dir / "ct.nii"), "--out", str(run.out_dir), "--no-rois"]
    assert logic.wait(timeout=60).state == DONE, (run.work_dir / "run.log").read_text()
    bones = run.outputs["bones"]
    seg = bones.GetSegmentation()
    assert sorted(seg.GetNthSegment(i).GetName() for i in range(seg.GetNumberOfSegments())) == ["femur", "tibia"]
    assert bones.GetNodeReference(SOURCE_ROLE) is ct  # it remembers the CT it was made from
    logic.cleanupRun()

    run = logic.startAnalysis(ct, AnalysisParameters(device="cpu"), boneSegmentation=bones)
    assert "--segmentation" in run.runner.args and run.runner.args[run.runner.args.index("--device") + 1] == "cpu"
    assert (run.work_dir / "bones.nii").exists()  # the user's bones were exported for the command
    assert logic.wait(timeout=60).state == DONE, (run.work_dir / "run.log").read_text()
    out = run.outputs
    assert {"BV/TV", "Tb.Th", "Tb.Sp", "Tb.N", "rois", "table", "diagnosis"} <= set(out)
    assert "bones" not in out  # the bones it was given stay the ones in use: no second copy in the scene
    assert mrml_scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 2  # the given bones, the new ROIs
    assert out["rois"].GetNodeReference(SOURCE_ROLE) is ct
    assert out["Tb.Th"].GetAttribute("CTSMA.Unit") == "mm"
    disp = out["Tb.Sp"].GetDisplayNode()  # CT-SMA colour table, fixed physical range, background hidden
    assert disp.GetColorNode().GetName() == "CTSMA_TbSp" and disp.GetColorNode().GetNumberOfColors() == 256
    assert not disp.GetAutoWindowLevel()
    assert np.allclose((disp.GetWindowLevelMin(), disp.GetWindowLevelMax()), (0.3, 1.5))
    assert disp.GetApplyThreshold() and disp.GetLowerThreshold() > 0
    # the range the analysis's model records (its training references' mean ± 3 SD), where summary.json has one:
    # the demo's MR-apparent Tb.Th of about 0.74 mm filled the fixed 0.05-0.45 mm scale with its top colour
    disp = out["Tb.Th"].GetDisplayNode()
    assert np.allclose((disp.GetWindowLevelMin(), disp.GetWindowLevelMax()), (0.6, 0.9))
    disp = out["Tb.N"].GetDisplayNode()  # an unreadable recorded range: the fixed one
    assert np.allclose((disp.GetWindowLevelMin(), disp.GetWindowLevelMax()), (0.5, 2.5))
    img = sb.volume_node_to_sitk(out["BV/TV"])
    assert np.allclose(img.GetOrigin(), sb.volume_node_to_sitk(ct).GetOrigin())
    table, _ = sb.node_to_dataframe(out["table"])
    assert table["unit"].tolist() == ["mm", "1/mm"] and table["n_patches"].tolist() == [12, 9]
    diag, _ = sb.node_to_dataframe(out["diagnosis"])
    assert diag.to_dict("records") == [{"oa_probability": 0.7, "severity": 2.1, "auc": 0.81}]
    notes, _ = sb.node_to_dataframe(out["notes"])  # the report's analysis notes, in the scene and the status line
    assert notes["note"].tolist()[0] == DEMO_NOTE  # a demonstration model says so first
    assert notes["note"].tolist()[1] == "The knee side R was inferred from the anatomy."
    assert "blurred along z by 0.420 mm" in notes["note"].tolist()[2]
    assert logic.notesText(out) == f" {DEMO_NOTE} 3 analysis notes: see the table 'knee analysis notes'."
    assert logic.notesText({}) == ""
    assert logic.lastResultDir() == run.out_dir
    # the report of that analysis: 'ctsma report patient CT INFER_DIR --out DIR'
    logic.cleanupRun(keep_outputs=True)
    # the follow-up scan must not be analysed in the baseline's bones or ROIs
    followup = _volume(mrml_scene, "follow-up", 4)
    for kwargs in ({"boneSegmentation": bones}, {"roiSegmentation": out["rois"]}):
        with pytest.raises(InputImageError, match="was made from 'knee', not from the selected CT 'follow-up'"):
            logic.startAnalysis(followup, AnalysisParameters(), **kwargs)
    with pytest.raises(InputImageError, match="bone segmentation 'knee bones' was made from 'knee'"):
        logic.startRoiCreation(followup, bones)
    # the widget clears such selections: madeFromAnother names the other CT, and nothing for the CT's own
    assert logic.madeFromAnother(bones, followup) is ct and logic.madeFromAnother(bones, ct) is None
    assert logic.madeFromAnother(None, ct) is None and logic.madeFromAnother(bones, None) is None
    # a cancelled re-analysis leaves the last result (still shown in the scene) reportable
    class SlowInfer(FakeInfer):
        def start_ctsma(self, args, work_dir, env=None, python=None):
            self.args = list(args)
            return self.start(_script("import time; time.sleep(60)"), work_dir, Path(work_dir) / "progress.jsonl")

    logic.runnerFactory = SlowInfer
    logic.startAnalysis(ct, AnalysisParameters())
    assert logic.cancel().state == CANCELLED
    assert (run.out_dir / "summary.json").exists() and (run.work_dir / "ct.nii").exists()
    logic.cleanupRun()
    logic.runnerFactory = FakeInfer
    report = logic.startReportExport(run.out_dir, tmp_path / "reports", subject="knee")
    assert report.runner.args == ["report", "patient", str(run.work_dir / "ct.nii"), str(run.out_dir),
                                  "--out", str(tmp_path / "reports"), "--format", "both", "--subject", "knee"]
    logic.wait(timeout=60)


@pytest.mark.mrml
def test_analysis_logic_refuses_bad_inputs_with_user_errors(mrml_scene, tmp_path):
    from ctsma.errors import ConfigError, InputImageError, ModelFileError, UserError

    from CTSMALib.analysis_logic import CTSMALogic
    from CTSMALib.parameters import AnalysisParameters

    logic = CTSMALogic(runner_factory=FakeInfer, work_root=tmp_path)
    ct = _volume(mrml_scene, "knee", 3)
    with pytest.raises(InputImageError):
        logic.startBoneSegmentation(None)
    bvtv = _volume(mrml_scene, "knee BV/TV", 5)
    bvtv.SetAttribute("CTSMA.Parameter", "BV/TV")  # as an analysis loads its maps
    with pytest.raises(InputImageError, match="'knee BV/TV' is a CT-SMA parameter map, not a CT"):
        logic.startAnalysis(bvtv)
    with pytest.raises(InputImageError, match="segment the bones"):
        logic.startRoiCreation(ct, None)
    with pytest.raises(ModelFileError):
        logic.startAnalysis(ct, AnalysisParameters(modelPath=str(tmp_path / "missing.safetensors")))
    with pytest.raises(UserError, match="run the analysis first"):
        logic.startReportExport(tmp_path, tmp_path / "reports")
    with pytest.raises(ConfigError):
        logic.startTraining("student", tmp_path / "none.yaml", tmp_path / "train")
    (tmp_path / "c.yaml").write_text("a: 1\n")
    with pytest.raises(ConfigError, match="training kind"):
        logic.startTraining("teachers", tmp_path / "c.yaml", tmp_path / "train")
    assert logic.run is None


@pytest.mark.mrml
def test_a_work_folder_that_cannot_be_created_is_a_clear_error(mrml_scene, tmp_path):
    from CTSMALib.registration_logic import CTSMARegistrationLogic
    from ctsma.errors import UserError

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    logic = CTSMARegistrationLogic(work_root=blocker / "work")
    with pytest.raises(UserError, match="cannot create a work folder in .*a_file"):
        logic.newWorkDir("register")
    assert CTSMARegistrationLogic(work_root=tmp_path / "work").newWorkDir("register").is_dir()

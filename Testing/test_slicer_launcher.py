"""CT-SMA module features around the runs: training launcher, machine settings, dependency plan,
sample phantom. Headless: the training process is swapped for a small script that writes the
training log the way ``ctsma train`` does; the sample phantom is generated for real (tiny settings).
"""

from __future__ import annotations

import json
import shlex
import sys
import textwrap
import time
from pathlib import Path

import pytest

from CTSMALib.process import CANCELLED, DONE, FAILED, ProcessRunner, ctsma_command
from ctsma.jit import TINY_KNEE as TINY  # a phantom knee that builds in a few seconds

# -- cluster / remote command templates ------------------------------------------------------------
CMD = ctsma_command(["train", "student", "--config", "my configs/it's.yaml", "--out", "run;rm -rf x"],
                    "/tmp/p p/progress.jsonl", python="/opt/py env/bin/python")


@pytest.mark.parametrize("template,head", [
    ('sbatch --wrap "{cmd}"', ["sbatch", "--wrap"]),
    ("sbatch --gres=gpu:1 --wrap='{cmd}'", ["sbatch", "--gres=gpu:1"]),
    ("bash -lc 'conda activate ctsma && {cmd}'", ["bash", "-lc"]),
])
def test_quoted_or_embedded_cmd_becomes_one_safely_quoted_word(template, head):
    from CTSMALib.training import wrap_command

    out = wrap_command(template, CMD)
    assert out[:len(head)] == head and len(out) == len(head) + 1
    word = out[-1]
    inner = word.split("=", 1)[1] if word.startswith("--wrap=") else word
    if inner.startswith("conda activate ctsma && "):
        inner = inner[len("conda activate ctsma && "):]
    assert shlex.split(inner) == CMD  # spaces, quotes and ';' survive the remote shell unchanged


@pytest.mark.parametrize("template,head,tail", [
    ("ssh gpu01 {cmd}", ["ssh", "gpu01"], []),
    ("srun --gres=gpu:1 --time=02:00:00 {cmd}", ["srun", "--gres=gpu:1", "--time=02:00:00"], []),
    ("env CUDA_VISIBLE_DEVICES=0 {cmd} --seed 1", ["env", "CUDA_VISIBLE_DEVICES=0"], ["--seed", "1"]),
])
def test_bare_cmd_is_spliced_as_separate_arguments(template, head, tail):
    from CTSMALib.training import wrap_command

    assert wrap_command(template, CMD) == head + CMD + tail


def test_bad_templates_are_refused_with_a_clear_error():
    from ctsma.errors import ConfigError

    from CTSMALib.training import wrap_command

    with pytest.raises(ConfigError, match=r"\{cmd\}"):
        wrap_command("sbatch --wrap", CMD)
    with pytest.raises(ConfigError, match="cannot be split"):
        wrap_command('sbatch --wrap "{cmd}', CMD)
    with pytest.raises(TypeError):
        wrap_command("ssh h {cmd}", "python -m ctsma.cli.main train")


# -- the training launcher with the process swapped -----------------------------------------------
FAKE_TRAIN = """
import json, os, sys, time
args = sys.argv[1:]
behaviour = os.environ.get("FAKE_BEHAVIOUR", "succeed")
def arg(name):
    return args[args.index(name) + 1]
if args[0] == "dataset":
    store = arg("--out"); os.makedirs(store, exist_ok=True)
    open(os.path.join(store, "store.json"), "w").write(json.dumps({"from": arg("--manifest")}))
    sys.exit(0)
kind, out = args[1], arg("--out")
role = {"teacher": "teacher", "student": "student_distilled", "baseline": "student_baseline"}[kind]
run = os.path.join(out, role); os.makedirs(run, exist_ok=True)
open(os.path.join(out, "argv.json"), "w").write(json.dumps(args))
log = open(os.path.join(run, "progress.jsonl"), "a")
def write(rec):
    log.write(json.dumps(rec) + "\\n"); log.flush()
write({"event": "start", "role": role, "epoch": 0, "max_epochs": 3})
for e in range(1, 4):
    time.sleep(float(os.environ.get("FAKE_EPOCH_S", "0.3")))
    if behaviour == "fail" and e == 2:
        sys.exit("ctsma train: error: CUDA out of memory (tried to allocate 2.0 GiB)")
    rec = {"event": "epoch", "role": role, "epoch": e, "max_epochs": 3, "train_loss": 1.0 / e, "val_loss": 1.5 / e,
           "val_mae": {"BV/TV": 0.02, "Tb.Th": 0.01 / e, "Tb.Sp": None, "Tb.N": 0.1}, "seconds": 0.3 * e}
    line = json.dumps(rec) + "\\n"
    log.write(line[:20]); log.flush(); time.sleep(0.05); log.write(line[20:]); log.flush()  # a torn write
open(os.path.join(out, role + ".safetensors"), "wb").write(b"model")
write({"event": "end", "role": role, "epoch": 3, "stopped_early": False, "seconds": 1.0})
"""


class FakeTrain(ProcessRunner):
    """Runs FAKE_TRAIN instead of ``ctsma``, through the same python/wrapper the launcher asked for."""

    commands: list = []

    def start_ctsma(self, args, work_dir, env=None, python=None, wrapper=None):
        command = [python or sys.executable, "-c", textwrap.dedent(FAKE_TRAIN), *map(str, args)]
        if wrapper is not None:
            command = list(wrapper(command))
        FakeTrain.commands.append(command)
        return self.start(command, work_dir, Path(work_dir) / "progress.jsonl", env=env)


@pytest.fixture
def train_setup(tmp_path, monkeypatch):
    from CTSMALib.analysis_logic import CTSMALogic

    FakeTrain.commands = []
    config = tmp_path / "train.yaml"
    config.write_text("optim: {max_epochs: 3}\n")
    store = tmp_path / "store"
    store.mkdir()
    logic = CTSMALogic(runner_factory=FakeTrain, work_root=tmp_path / "work")
    return logic, config, store, tmp_path / "runs"


def test_training_runs_with_live_epochs_and_the_model_becomes_selectable(train_setup):
    logic, config, store, out = train_setup
    run = logic.startTraining("student", config, out, data=store, python=sys.executable)
    assert FakeTrain.commands[-1][0] == sys.executable
    assert run.args == ["train", "student", "--config", str(config.resolve()), "--out", str(out.resolve()),
                        "--store", str(store)]
    seen = []
    for _ in range(400):
        status = logic.poll()
        progress = logic.trainingProgress()
        if progress is not None and progress.epochs and (not seen or seen[-1] != progress.last.epoch):
            seen.append(progress.last.epoch)
            assert status.stage == "training student_distilled"
            if progress.ended:
                assert status.message == "student_distilled: finished after 3 epochs" and status.fraction == 1.0
            else:
                assert f"epoch {progress.last.epoch}/3" in status.message and "val loss" in status.message
                assert status.fraction == pytest.approx(progress.last.epoch / 3)
        if status.finished:
            break
        time.sleep(0.05)
    assert status.state == DONE, status.last_error
    assert seen[0] < 3 and seen[-1] == 3  # followed live, not only at the end
    progress = logic.trainingProgress()
    assert progress.ended and [e.epoch for e in progress.epochs] == [1, 2, 3]  # torn lines joined, none lost
    assert progress.epochs[1].val_mae["Tb.Th"] == pytest.approx(0.005) and progress.epochs[1].val_mae["Tb.Sp"] is None
    assert logic.trainedModel() == out / "student_distilled.safetensors"
    # a second training into the same folder appends to the log: only the new epochs are read
    logic.startTraining("student", config, out, data=store)
    assert logic.wait(timeout=60).state == DONE
    assert [e.epoch for e in logic.trainingProgress().epochs] == [1, 2, 3]


def test_teacher_model_is_not_offered_to_the_ct_analysis(train_setup):
    logic, config, store, out = train_setup
    logic.startTraining("teacher", config, out, data=store)
    assert logic.wait(timeout=60).state == DONE
    assert logic.trainingProgress().ended and (out / "teacher.safetensors").is_file()
    assert logic.trainedModel() is None


def test_stop_and_failure(train_setup, monkeypatch):
    logic, config, store, out = train_setup
    monkeypatch.setenv("FAKE_EPOCH_S", "5")
    logic.startTraining("baseline", config, out, data=store)
    for _ in range(200):
        if logic.trainingProgress() is not None and logic.trainingProgress().started:
            break
        time.sleep(0.05)
    assert logic.cancel().state == CANCELLED and not logic.isRunning()
    assert logic.trainedModel() is None
    monkeypatch.setenv("FAKE_EPOCH_S", "0.05")
    monkeypatch.setenv("FAKE_BEHAVIOUR", "fail")
    logic.startTraining("baseline", config, out, data=store)
    status = logic.wait(timeout=60)
    assert status.state == FAILED and "CUDA out of memory" in status.last_error


def test_a_manifest_is_turned_into_a_patch_store_first(train_setup, tmp_path):
    logic, config, _, out = train_setup
    manifest = tmp_path / "cohort" / "manifest.csv"
    manifest.parent.mkdir()
    manifest.write_text("subject,ct,mr,registration\nP0,ct.nii.gz,mr.nii.gz,reg/P0\n")
    first = logic.startTraining("student", config, out, data=manifest)
    assert first.args == ["dataset", "build", "--manifest", str(manifest.resolve()), "--out",
                          str((out / "store").resolve())]
    assert logic.wait(timeout=60).state == DONE
    assert logic.run is not first and logic.run.label == "training"
    assert json.loads((out / "argv.json").read_text())[-2:] == ["--store", str(out / "store")]
    assert not first.work_dir.exists()  # the dataset step's scratch folder is gone
    assert logic.trainedModel() == out / "student_distilled.safetensors"


def test_cluster_template_submission_is_followed_through_the_log(train_setup):
    """A template that returns at once (like sbatch) while the job goes on: the launcher keeps following
    RUN/<role>/progress.jsonl until the job writes its end event."""
    logic, config, store, out = train_setup
    logic.startTraining("student", config, out, data=store, clusterTemplate='sh -c "({cmd}) >/dev/null 2>&1 &"')
    command = FakeTrain.commands[-1]
    assert command[:2] == ["sh", "-c"] and len(command) == 3 and command[2].endswith(") >/dev/null 2>&1 &")
    states = set()
    for _ in range(400):
        status = logic.poll()
        states.add(status.state)
        if status.finished:
            break
        time.sleep(0.05)
    assert status.state == DONE and logic.run.runner.process.returncode == 0
    assert logic.trainingProgress().ended and logic.trainedModel() == out / "student_distilled.safetensors"
    # Stop on a submitted job: stop following it and say how to cancel it on the cluster
    logic.startTraining("student", config, out, data=store, clusterTemplate='sh -c "({cmd}) >/dev/null 2>&1 &"')
    for _ in range(200):
        if not logic.run.runner.is_running():
            break
        time.sleep(0.02)
    assert logic.poll().state == "running"  # submitted, not finished
    status = logic.cancel()
    assert status.state == CANCELLED and "scancel" in status.message and not logic.isRunning()
    time.sleep(1.2)  # let the background job end before the folder is removed


def test_training_inputs_are_checked_before_anything_starts(train_setup, tmp_path):
    from ctsma.errors import ConfigError, UserError

    logic, config, store, out = train_setup
    with pytest.raises(UserError, match="patch-store folder"):
        logic.startTraining("student", config, out, data=tmp_path / "nothing")
    with pytest.raises(ConfigError, match="not an executable"):
        logic.startTraining("student", config, out, data=store, python=str(config))
    with pytest.raises(ConfigError, match=r"\{cmd\}"):
        logic.startTraining("student", config, out, data=store, clusterTemplate="sbatch")
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject\n")
    with pytest.raises(UserError, match="cluster"):
        logic.startTraining("student", config, out, data=manifest, clusterTemplate="ssh h {cmd}")
    # a manifest without registrations would exclude every knee once the build had started
    manifest.write_text("subject,ct,mr,transform_ct_to_mr\nP0,ct.nii.gz,mr.nii.gz,t.h5\n")
    with pytest.raises(UserError, match="no 'registration' column"):
        logic.startTraining("student", config, out, data=manifest)
    assert logic.run is None and FakeTrain.commands == []


# -- machine settings ---------------------------------------------------------------------------
def _settings(s) -> dict:
    return {"device": s.device, "trainingPython": s.trainingPython, "clusterTemplate": s.clusterTemplate,
            "cacheDir": str(s.cacheDir), "torchBackend": s.torchBackend}


def test_machine_settings_persist_in_the_store_and_are_checked(tmp_path, monkeypatch):
    from ctsma.errors import ConfigError

    from CTSMALib.settings import MachineSettings

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    store = {}
    s = MachineSettings(store)
    assert _settings(s) == {"device": "auto", "trainingPython": "", "clusterTemplate": "",
                           "cacheDir": str(tmp_path / "xdg" / "CTSMA"), "torchBackend": "auto"}
    s.device, s.trainingPython, s.torchBackend = "cuda", sys.executable, "cu121"
    s.clusterTemplate, s.cacheDir = 'sbatch --wrap "{cmd}"', tmp_path / "cache"
    assert store["CTSMA/device"] == "cuda" and store["CTSMA/clusterTemplate"] == 'sbatch --wrap "{cmd}"'
    again = MachineSettings(store)  # a later session reads what the earlier one saved
    assert _settings(again) == {"device": "cuda", "trainingPython": sys.executable,
                               "clusterTemplate": 'sbatch --wrap "{cmd}"', "cacheDir": str(tmp_path / "cache"),
                               "torchBackend": "cu121"}
    for key, bad, match in (("device", "gpu", "device"), ("trainingPython", str(tmp_path), "executable"),
                            ("clusterTemplate", "ssh host", r"\{cmd\}"), ("torchBackend", "rocm", "torch build")):
        with pytest.raises(ConfigError, match=match):
            setattr(again, key, bad)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        again.cacheDir = tmp_path / "file"
    assert again.device == "cuda"  # refused values change nothing
    damaged = MachineSettings({"CTSMA/device": "tpu", "CTSMA/clusterTemplate": 'x "{cmd}', "CTSMA/torchBackend": "?"})
    assert (damaged.device, damaged.clusterTemplate, damaged.torchBackend) == ("auto", "", "auto")


def test_qsettings_store_adapter():
    from CTSMALib.settings import MachineSettings, QSettingsStore

    class FakeQSettings:  # the three QSettings calls the adapter uses
        def __init__(self):
            self.data = {}

        def contains(self, key):
            return key in self.data

        def value(self, key):
            return self.data.get(key)

        def setValue(self, key, value):
            self.data[key] = value

    q = FakeQSettings()
    MachineSettings(QSettingsStore(q)).device = "cpu"
    assert q.data == {"CTSMA/device": "cpu"} and MachineSettings(QSettingsStore(q)).device == "cpu"


# -- dependencies -------------------------------------------------------------------------------
def test_install_plan_finds_missing_and_old_packages_and_keeps_slicers_simpleitk():
    from CTSMALib.dependencies import plan_installation

    installed = {"numpy": "1.20.0", "simpleitk": "2.3.1", "pyyaml": "6.0.1", "torch": "2.5.1"}
    plan = plan_installation(["numpy>=1.24", "scipy>=1.10", "PyYAML>=6", "SimpleITK>=2.4", "torch>=2.2"],
                             lambda name: installed.get(name.lower()))
    assert plan.pip == ["numpy>=1.24", "scipy>=1.10"] and not plan.torch
    assert plan.keep == {"SimpleITK": "2.3.1"} and plan.constraints() == "SimpleITK==2.3.1\n"
    text = plan.describe("CT-SMA", backend="cpu")
    assert "numpy>=1.24" in text and "SimpleITK is kept" in text and "torch" not in text.split("\n")[1]
    old_torch = plan_installation([], {"torch": "2.0.1"}.get)
    assert old_torch.torch and old_torch.pip == [] and "CPU only" in old_torch.describe(backend="cpu")
    assert plan_installation([], {"torch": "2.6.0"}.get).empty


def test_torch_backend_choice_and_this_environment_needs_nothing():
    from ctsma.errors import ConfigError

    from CTSMALib.dependencies import plan_installation, torch_backend_argument

    assert torch_backend_argument("auto") is None
    assert torch_backend_argument("cpu") == "cpu" and torch_backend_argument("cu121") == "cu121"
    with pytest.raises(ConfigError):
        torch_backend_argument("cuda")
    plan = plan_installation()  # the project's own venv has every requirement
    assert plan.pip == [] and not plan.torch and "SimpleITK" in plan.keep


# -- sample data ------------------------------------------------------------------------------------


@pytest.mark.mrml
def test_sample_phantom_is_generated_once_cached_and_loaded_under_a_study(tmp_path, mrml_scene):
    import slicer
    import SimpleITK as sitk

    from CTSMALib import sample_data

    cache = tmp_path / "cache"
    polls = []
    paths = sample_data.ensure_sample_phantom(cache, overrides=TINY, on_poll=polls.append, interval=0.05)
    folder = sample_data.sample_folder(cache, overrides=TINY)
    assert paths["folder"] == folder and folder.is_dir() and polls  # generated in the background, followed
    assert [p.name for p in cache.iterdir()] == [folder.name]  # no partial folder left
    meta = json.loads((paths["ct"].parent / "metadata.json").read_text())
    assert meta["seed"] == sample_data.SEED and meta["settings"]["ct_spacing"] == TINY["ct_spacing"]
    assert sitk.ReadImage(str(paths["ct"])).GetSpacing() == pytest.approx(TINY["ct_spacing"])

    def must_not_run():
        raise AssertionError("the cached sample was generated again")

    assert sample_data.ensure_sample_phantom(cache, overrides=TINY, runner_factory=must_not_run) == paths
    assert sample_data.sample_folder(cache, overrides=dict(TINY, field_spacing=5.0)) != folder

    nodes = sample_data.load_sample(paths, mrml_scene)
    sh = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(mrml_scene)
    study = sh.GetItemParent(sh.GetItemByDataNode(nodes["ct"]))
    assert sh.GetItemLevel(study) == "Study" and sh.GetItemLevel(sh.GetItemParent(study)) == "Patient"
    assert sh.GetItemParent(sh.GetItemByDataNode(nodes["mr"])) == study


def test_cancelled_or_failed_sample_generation_leaves_nothing(tmp_path):
    from CTSMALib import sample_data

    cache = tmp_path / "cache"
    with pytest.raises(RuntimeError, match="did not finish: cancelled"):
        sample_data.ensure_sample_phantom(cache, overrides=TINY, on_poll=lambda status: False)
    with pytest.raises(RuntimeError, match="did not finish"):
        sample_data.ensure_sample_phantom(cache, overrides={"ct_spacing": [-1, 1, 1]})
    assert list(cache.iterdir()) == []

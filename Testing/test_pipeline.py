"""Cached stage runner: skip finished stages, rerun changed ones and everything after them."""

from pathlib import Path

import pytest

from ctsma.pipeline import Stage, StageRunner


def test_stages_are_cached_and_invalidated_downstream(tmp_path):
    calls = []

    def make(name):
        def run(d):
            calls.append(name)
            (d / "out.txt").write_text(name)
            return {"name": name}
        return run

    def stages(a_setting):
        return [Stage("a", make("a"), {"x": a_setting}), Stage("b", make("b"), {"y": 1}), Stage("c", make("c"))]

    r = StageRunner(tmp_path)
    r.run_all(stages(1))
    assert calls == ["a", "b", "c"] and r.summaries["b"] == {"name": "b"}
    calls.clear()
    r2 = StageRunner(tmp_path)
    r2.run_all(stages(1))
    assert calls == [] and all(r2.cached.values()) and set(r2.timings) == {"a", "b", "c"}
    calls.clear()
    StageRunner(tmp_path).run_all(stages(2))  # a changed: a, b and c rerun
    assert calls == ["a", "b", "c"]
    calls.clear()
    StageRunner(tmp_path, code="other code").run_all(stages(2))  # new code: everything reruns
    assert calls == ["a", "b", "c"]


def test_code_fingerprint_follows_the_sources(tmp_path):
    from ctsma.pipeline import code_fingerprint

    (tmp_path / "resources" / "Configs").mkdir(parents=True)
    (tmp_path / "stage.py").write_text("x = 1\n")
    (tmp_path / "resources" / "Configs" / "demo.yaml").write_text("a: 1\n")
    a = code_fingerprint(tmp_path)
    assert len(a) == 16 and a == code_fingerprint(tmp_path)
    (tmp_path / "__pycache__").mkdir()
    (tmp_path / "__pycache__" / "stage.cpython.pyc").write_bytes(b"compiled")
    assert code_fingerprint(tmp_path) == a                   # caches do not count
    (tmp_path / "resources" / "Configs" / "demo.yaml").write_text("a: 2\n")
    b = code_fingerprint(tmp_path)
    (tmp_path / "stage.py").write_text("x = 2\n")
    assert len({a, b, code_fingerprint(tmp_path)}) == 3      # a config or a source edit changes it
    assert code_fingerprint() != a                           # the installed package has its own


def test_code_fingerprint_follows_the_shipped_registration_presets(tmp_path):
    """An update that changes only a shipped registration preset (the demo's registration settings) reruns the
    demo's registration, as one that changes a training config does."""
    from ctsma.pipeline import code_fingerprint

    (tmp_path / "resources" / "Presets" / "registration").mkdir(parents=True)
    (tmp_path / "stage.py").write_text("x = 1\n")
    preset = tmp_path / "resources" / "Presets" / "registration" / "demo.json"
    preset.write_text('{"rigid": {"iterations": 50}}')
    a = code_fingerprint(tmp_path)
    preset.write_text('{"rigid": {"iterations": 5}}')
    assert code_fingerprint(tmp_path) != a


def test_demo_registration_reruns_when_its_preset_file_is_edited(tmp_path, monkeypatch):
    """A registration preset given as a file: editing the file reruns the registration (its name alone was the key,
    so the stage was skipped and the dataset built from registrations made with the old settings)."""
    from ctsma.demo.settings import DemoSettings
    from ctsma.demo.stages import registration_key

    monkeypatch.chdir(tmp_path)
    Path("mine.json").write_text('{"rigid": {"iterations": 50}}')
    a = registration_key(DemoSettings(registration_preset="mine.json"))
    Path("mine.json").write_text('{"rigid": {"iterations": 5}}')
    assert registration_key(DemoSettings(registration_preset="mine.json")) != a
    shipped = registration_key(DemoSettings())  # a shipped preset: its text is in the code fingerprint
    assert shipped == {"preset": "demo"}


def test_failed_stage_is_not_marked_done(tmp_path):
    state = {"fail": True}

    def flaky(d):
        if state["fail"]:
            raise RuntimeError("killed")
        return {}

    st = [Stage("ok", lambda d: {"v": 1}), Stage("flaky", flaky)]
    with pytest.raises(RuntimeError):
        StageRunner(tmp_path).run_all(st)
    state["fail"] = False
    r = StageRunner(tmp_path)
    r.run_all(st)
    assert r.cached == {"ok": True, "flaky": False}


def test_changed_stage_starts_empty_and_interrupted_stage_resumes(tmp_path):
    """A stage's own resumable work (files in its folder) is reused only under the same key."""
    seen = []

    def run(d):
        seen.append(sorted(p.name for p in d.iterdir()))
        (d / "piece.txt").write_text("done")
        if state["fail"]:
            raise RuntimeError("killed")
        return {}

    state = {"fail": True}
    with pytest.raises(RuntimeError):
        StageRunner(tmp_path).run_all([Stage("s", run, {"x": 1})])
    state["fail"] = False
    StageRunner(tmp_path).run_all([Stage("s", run, {"x": 1})])   # interrupted: resumes with its piece
    StageRunner(tmp_path).run_all([Stage("s", run, {"x": 2})])   # other settings: starts empty
    StageRunner(tmp_path, code="new").run_all([Stage("s", run, {"x": 2})])  # new code: starts empty
    assert seen == [[], ["piece.txt"], [], []]


def _recorded(tmp_path, plan):
    """``run(**kw)``: runs the stages ``plan(make, **kw)`` in ``tmp_path`` and returns, for each stage that ran, its
    name and the files its folder held when it started (each leaves a ``piece.txt``); ``make(name)`` gives such a
    stage's function."""
    seen = []

    def make(name):
        def run(d):
            seen.append((name, sorted(p.name for p in d.iterdir())))
            (d / "piece.txt").write_text("done")
            return {}
        return run

    def run(**kw):
        seen.clear()
        StageRunner(tmp_path).run_all(plan(make, **kw))
        return list(seen)
    return run


def test_extent_and_own_settings_keep_the_work_and_the_later_stages_that_do_not_depend_on_them(tmp_path):
    """``extent`` (e.g. a cohort's size) reruns its stage in its folder and every later stage; ``own`` (e.g. a side
    comparison no later stage reads) reruns its stage alone, in its folder; ``settings`` empty the folder."""
    def stages(make, x=1, n=10, v=3):
        return [Stage("a", make("a"), {"x": x}, extent={"n": n}), Stage("b", make("b"), {"y": 1}, own={"v": v}),
                Stage("c", make("c"))]

    run = _recorded(tmp_path, stages)
    assert run() == [("a", []), ("b", []), ("c", [])]
    assert run() == []
    assert run(v=4) == [("b", ["piece.txt"])]                              # own: b alone, in its folder
    assert run(v=4, n=12) == [("a", ["piece.txt"]), ("b", []), ("c", [])]  # extent: a in its folder, then the rest
    assert run(v=4, n=12, x=2) == [("a", []), ("b", []), ("c", [])]        # settings: from empty folders
    assert run(v=4, n=12, x=2) == []
    r, none = StageRunner(tmp_path), (lambda name: None)
    assert r.keys(stages(none, 2, 12, 4))[2] == r.keys(stages(none, 2, 12, 5))[2] != r.keys(stages(none, 2, 13, 4))[2]


def test_a_stage_free_of_an_earlier_extent_is_kept_and_a_per_unit_one_keeps_its_folder(tmp_path):
    """A change of an ``extent`` reran every later stage from an empty folder: also a stage whose result does not
    depend on it (``extent_free``: kept) and one whose folder holds checked per-unit work (``per_unit``: rerun in its
    folder). Their own settings still count as before."""
    def stages(make, n=10, y=1, z=1):
        return [Stage("a", make("a"), {"x": 1}, extent={"n": n}), Stage("free", make("free"), {"y": y},
                extent_free=True), Stage("unit", make("unit"), {"z": z}, per_unit=True), Stage("c", make("c"))]

    run = _recorded(tmp_path, stages)
    assert [name for name, _ in run()] == ["a", "free", "unit", "c"]
    assert run(n=12) == [("a", ["piece.txt"]), ("unit", ["piece.txt"]), ("c", [])]
    assert run(n=12, y=2) == [("free", []), ("unit", []), ("c", [])]  # its own settings: it and the rest, emptied
    assert run(n=12, y=2, z=2) == [("unit", []), ("c", [])]
    r, none = StageRunner(tmp_path), (lambda name: None)
    assert r.keys(stages(none, 10))[1] == r.keys(stages(none, 12))[1] != r.keys(stages(none, 12, 2))[1]
    assert r.keys(stages(none, 10))[2] != r.keys(stages(none, 12))[2]


def test_demo_reruns_only_what_depends_on_a_changed_n_or_variant_knees(tmp_path, monkeypatch):
    """Changing ``variant_knees`` (the knees on which the registration variants are compared, which no later stage
    reads) reran the registration from an empty folder (every knee registered again) and every stage after it;
    changing ``n`` generated every knee again, although knee i does not depend on n. Now ``variant_knees`` reruns the
    registration alone, which keeps its finished registrations, and ``n`` reruns the phantom stage in its folder
    (it keeps the knees it has), keeps the synthesis model (trained on the first knees), reruns the registration
    and the dataset in their folders (they keep each knee's finished work) and every later stage from empty
    folders."""
    from ctsma.demo import DemoSettings, run_demo, stages
    from ctsma.demo import run as demo_run

    seen = []
    names = ("phantom", "synthesis", "registration", "dataset", "training", "evaluation", "diagnosis", "inference")

    def fake(name):
        def run(ctx, d):
            seen.append((name, sorted(p.name for p in d.iterdir())))
            (d / "piece.txt").write_text("done")
            return {}
        return run

    for name in names:
        monkeypatch.setattr(stages, name, fake(name))
    monkeypatch.setattr(demo_run, "report", lambda ctx, d, timings: {})

    def run(**kw):
        seen.clear()
        run_demo(tmp_path / "out", DemoSettings(**kw))
        return seen

    assert run(n=12) == [(name, []) for name in names]
    assert run(n=12, variant_knees=2) == [("registration", ["piece.txt"])]
    assert run(n=12, variant_knees=2) == []
    # n: the synthesis (trained on the first knees) is kept; registration and dataset rerun in their folders, whose
    # registrations and shards are per knee and checked before they are reused
    assert run(n=14, variant_knees=2) == [(name, ["piece.txt"]) for name in ("phantom", "registration", "dataset")] \
        + [(name, []) for name in names[4:]]
    assert run(n=14, variant_knees=2, seed=1) == [(name, []) for name in names]


def test_demo_retrains_only_for_a_training_setting_of_its_config(tmp_path, monkeypatch):
    """The training stage was keyed by the config file's text: a new ``evaluate.n_boot`` (read by the evaluation
    alone), or a comment, retrained the nine CNNs (10 minutes). Now a training setting reruns the training and all
    after it, an ``evaluate`` setting the evaluation and all after it, and a comment or another layout nothing."""
    from ctsma.demo import DemoSettings, run_demo, stages
    from ctsma.demo import run as demo_run
    from ctsma.demo.stages import train_config_path

    seen = []
    names = ("phantom", "synthesis", "registration", "dataset", "training", "evaluation", "diagnosis", "inference")
    for name in names:
        monkeypatch.setattr(stages, name, lambda ctx, d, name=name: seen.append(name) or {})
    monkeypatch.setattr(demo_run, "report", lambda ctx, d, timings: {})
    text = train_config_path(DemoSettings()).read_text(encoding="utf-8")
    config = tmp_path / "mine.yaml"

    def run(yaml_text):
        config.write_text(yaml_text, encoding="utf-8")
        seen.clear()
        run_demo(tmp_path / "out", DemoSettings(n=12, train_config=str(config)))
        return seen

    assert run(text) == list(names)
    assert run("# my copy of the demo's settings\n" + text.replace(": ", ":   ")) == []
    assert "n_boot: 1000" in text
    assert run(text.replace("n_boot: 1000", "n_boot: 200")) == list(names[5:])
    assert run(text.replace("n_boot: 1000", "n_boot: 200").replace("max_epochs: 40", "max_epochs: 39")) \
        == list(names[4:])


def test_demo_training_config_by_name_or_path(tmp_path):
    from ctsma.demo.settings import DemoSettings
    from ctsma.demo.stages import train_config_path
    from ctsma.errors import ConfigError
    from ctsma.models import load_train_config

    demo = load_train_config(train_config_path(DemoSettings()))
    gpu = load_train_config(train_config_path(DemoSettings(train_config="gpu")))
    assert demo.student_net.widths == [16, 16, 32, 48] and demo.trainer.accelerator == "cpu"
    # the measured GPU configuration: the demo's schedule, the larger networks, the GPU when there is one
    assert gpu.student_net.widths == [32, 64, 128, 256] and gpu.student_net.blocks == 2
    assert gpu.trainer.accelerator == "auto" and gpu.optim.max_epochs == demo.optim.max_epochs
    assert gpu.optim.select == "last" and gpu.data.batch_size == demo.data.batch_size
    own = tmp_path / "mine.yaml"
    own.write_text("optim: {max_epochs: 3}\n")
    assert load_train_config(train_config_path(DemoSettings(train_config=str(own)))).optim.max_epochs == 3
    with pytest.raises(ConfigError, match="no such file"):
        train_config_path(DemoSettings(train_config=str(tmp_path / "missing.yaml")))


def test_demo_with_a_missing_training_config_stops_before_its_first_stage(tmp_path):
    from ctsma.demo import DemoSettings, run_demo
    from ctsma.errors import ConfigError

    with pytest.raises(ConfigError, match="no such file"):
        run_demo(tmp_path / "out", DemoSettings(train_config=str(tmp_path / "missing.yaml")))
    assert not (tmp_path / "out" / "phantom").exists()


@pytest.mark.parametrize("settings, message", [
    ({"registration_preset": "demoo"}, "unknown registration preset 'demoo'"),
    ({"registration_preset": "missing.json"}, "not found"),
    ({"aggregators": ["logistc"]}, "aggregators: unknown 'logistc'"),
    ({"aggregators": []}, "aggregators: none given"),
    ({"n": 8, "synthesis_knees": 8}, "leaves none of the n = 8 knees"),   # was an IndexError after registration
    ({"n": 8, "folds": 9}, "folds = 9 is more than the n = 8 knees"),
])
def test_demo_settings_that_a_later_stage_would_refuse_stop_it_before_its_first_stage(tmp_path, monkeypatch,
                                                                                       settings, message):
    """A typo in a setting read only by a later stage failed there, after minutes of work, and after that stage's
    earlier results (made with the good setting) had been cleared."""
    from ctsma.demo import DemoSettings, run_demo, stages
    from ctsma.errors import ConfigError

    def started(ctx, d):
        raise AssertionError("the phantom stage started")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(stages, "phantom", started)
    with pytest.raises(ConfigError, match=message):
        run_demo(tmp_path / "out", DemoSettings(**settings))
    assert not (tmp_path / "out" / "phantom").exists()


def test_demo_command_names_the_options_in_its_setting_errors(tmp_path, monkeypatch, capsys):
    from ctsma.cli.main import main
    from ctsma.demo import stages

    monkeypatch.setattr(stages, "phantom", lambda ctx, d: pytest.fail("the phantom stage started"))
    assert main(["demo", "--out", str(tmp_path / "out"), "--n", "8", "--folds", "9"]) == 2
    assert "--folds 9 is more than the --n 8 knees" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_demo_registers_like_for_new_patients(tmp_path, monkeypatch):
    """The demo's registration gets the two images and no ground truth of the phantom (no CT or MR bone labels,
    transforms or ROIs): it segments the CT and the pseudo-CT itself, for its masks and its QA."""
    import pandas as pd

    from ctsma.demo.settings import DemoSettings
    from ctsma.demo.stages import Context, _registration_manifest
    from ctsma.registration.cohort import read_manifest

    (tmp_path / "phantom").mkdir()
    pd.DataFrame({"subject": ["P0", "P1"], "side": ["L", "R"], "oa": [0, 1], "mr": ["P0/mr.nii.gz", "P1/mr.nii.gz"],
                  "ct": ["P0/ct.nii.gz", "P1/ct.nii.gz"], "ct_bones": ["P0/cb.nii.gz", "P1/cb.nii.gz"],
                  "mr_bones": ["P0/mb.nii.gz", "P1/mb.nii.gz"], "ct_rois": ["P0/r.nii.gz", "P1/r.nii.gz"],
                  "transform_ct_to_mr": ["P0/t.h5", "P1/t.h5"], "landmarks": ["P0/l.csv", "P1/l.csv"]}
                 ).to_csv(tmp_path / "phantom" / "manifest.csv", index=False)
    ctx = Context(tmp_path, DemoSettings())
    man = read_manifest(_registration_manifest(ctx, ["P1"], tmp_path / "reg.csv"))
    assert list(man.columns) == ["subject", "mr", "ct"]
    assert man.subject.tolist() == ["P1"]
    assert man.ct[0] == str((tmp_path / "phantom" / "P1" / "ct.nii.gz").resolve())

    # and the registration stage registers the cohort from that manifest, not from the phantom's
    import ctsma.registration.cohort as cohort
    from ctsma.demo import stages

    class Seen(Exception):
        pass

    def fake_run_cohorts(cohorts, **kw):
        raise Seen(list(pd.read_csv(cohorts[0].manifest).columns))

    monkeypatch.setattr(cohort, "run_cohorts", fake_run_cohorts)
    (tmp_path / "registration").mkdir()
    with pytest.raises(Seen) as seen:
        stages.registration(ctx, tmp_path / "registration")
    assert seen.value.args[0] == ["subject", "mr", "ct"]


def test_small_cohorts_get_fewer_diagnosis_folds_and_too_few_knees_a_clear_error(tmp_path):
    import pandas as pd

    from ctsma.demo import stages
    from ctsma.demo.settings import DemoSettings
    from ctsma.errors import UserError

    ctx = stages.Context(tmp_path, DemoSettings(diagnosis_folds=5))
    labels = lambda n_oa, n_no: pd.DataFrame({"subject": [f"P{i}" for i in range(n_oa + n_no)],  # noqa: E731
                                              "oa": [1] * n_oa + [0] * n_no})
    assert stages.diagnosis_folds(ctx, labels(20, 16)) == 5
    assert stages.diagnosis_folds(ctx, labels(3, 5)) == 3      # the smallest demo cohort (n = 8, seed 5)
    assert stages.diagnosis_folds(ctx, labels(6, 2)) == 2
    with pytest.raises(UserError, match="at least 2 of each"):
        stages.diagnosis_folds(ctx, labels(1, 7))


def _fake_training(which, cfg, threads, started):
    """Stands in for one training in train_in_lanes's worker processes: records when it ran."""
    import json
    import time

    from ctsma.errors import UserError

    if [cfg["fold"], which] == cfg.get("fail"):
        raise UserError(f"training {which} of fold {cfg['fold']} failed")
    started()
    start = time.time()
    time.sleep(0.6 if which == "teacher" else 0.3)
    rec = {"start": start, "end": time.time(), "threads": threads}
    Path(cfg["log"], f"{cfg['fold']}_{which}.json").write_text(json.dumps(rec))
    return rec["end"] - start


def test_demo_trainings_run_in_lanes_wait_for_their_teacher_and_stop_on_an_error(tmp_path):
    """The demo's CPU trainings run as one lane per fold (teacher, student, baseline) in spawned processes, the three
    lanes at once with two workers (one torch thread each on two cores), so no core idles at the end; a fold's
    student starts only after its teacher has finished, and a failed training stops the stage with its error."""
    import json
    import os

    from ctsma.demo.stages import train_in_lanes
    from ctsma.errors import UserError

    cfgs = [{"fold": f, "log": str(tmp_path)} for f in range(3)]
    order = train_in_lanes(cfgs, 2, job=_fake_training)
    assert sorted(order) == sorted((f, w) for f in range(3) for w in ("teacher", "student", "baseline"))
    rec = {tuple(p.stem.split("_")): json.loads(p.read_text()) for p in tmp_path.glob("*.json")}
    assert len(rec) == 9
    for f in map(str, range(3)):
        assert rec[f, "teacher"]["end"] <= rec[f, "student"]["start"]
        assert rec[f, "student"]["end"] <= rec[f, "baseline"]["start"]
    first_end = min(r["end"] for r in rec.values())
    assert all(rec[str(f), "teacher"]["start"] < first_end for f in range(3))  # the three lanes ran at once
    for r in rec.values():
        assert sum(o["start"] <= r["start"] < o["end"] for o in rec.values()) <= 3
        assert r["threads"] == max(1, (os.cpu_count() or 1) // 3)
    two = [{"fold": f, "log": str(tmp_path / "one")} for f in range(3)]
    (tmp_path / "one").mkdir()
    train_in_lanes(two, 1, job=_fake_training)  # one worker: two lanes at a time, the third after
    rec = [json.loads(p.read_text()) for p in (tmp_path / "one").glob("*_teacher.json")]
    assert sum(r["start"] < min(o["end"] for o in rec) for r in rec) == 2

    bad = [{"fold": f, "log": str(tmp_path / "bad"), "fail": [1, "baseline"]} for f in range(3)]
    (tmp_path / "bad").mkdir()
    with pytest.raises(UserError, match="baseline of fold 1 failed"):
        train_in_lanes(bad, 2, job=_fake_training)


def _reusing_train(kept):
    """Stands in for ``models.train.train``: the models ``kept`` ((fold, which) pairs) are reused as
    ``train(reuse=True)`` reuses a model file that records the same run (tested in test_train.py), the others
    trained; records every call."""
    calls = []

    def train(which, cfg, *, reuse=False, started=None):
        calls.append((cfg.data.fold, which, reuse))
        if not (reuse and (cfg.data.fold, which) in kept):
            started()

    return train, calls


def test_killed_demo_training_stage_keeps_the_models_it_had_exported(tmp_path, monkeypatch):
    """'a rerun resumes': a training stage killed after some models were exported trained all of them again (the
    longest stage of the demo). A rerun now keeps each model whose file records the same run (train's reuse, the
    check that evaluate's ablations use too), announced as kept and not as started, and trains the others."""
    import importlib

    from ctsma import progress
    from ctsma.demo import stages
    from ctsma.demo.settings import DemoSettings

    mt = importlib.import_module("ctsma.models.train")  # (ctsma.models.train is also the name of a function)
    fake, calls = _reusing_train({(0, "teacher"), (0, "student")})
    monkeypatch.setattr(mt, "train", fake)
    shown = []
    monkeypatch.setattr(progress, "info", shown.append)
    stages.training(stages.Context(tmp_path, DemoSettings(workers=1, folds=2)), tmp_path / "training")
    assert calls == [(f, w, True) for f in (0, 1) for w in stages.LANE]
    assert shown == ["  fold 1/2: teacher " + stages.KEPT, "  fold 1/2: student " + stages.KEPT,
                     "  fold 1/2: baseline", "  fold 2/2: teacher", "  fold 2/2: student", "  fold 2/2: baseline"]

    # in a lane (workers > 1): the same check, at the lane's thread count
    cfg = stages.fold_config(stages.Context(tmp_path, DemoSettings(folds=2)), 0)
    started = []
    assert stages._train_job("teacher", cfg, 1, lambda: started.append(1)) is None and started == []
    assert cfg.trainer.threads == 1
    assert stages._train_job("baseline", cfg, 2, lambda: started.append(2)) is not None and started == [2]


def test_a_kept_model_in_a_training_lane_is_shown_kept_and_not_started(tmp_path, monkeypatch):
    """A lane (workers > 1) printed 'fold 1/1: teacher (started)' and then 'kept' for a model that an interrupted run
    had exported: it now says only that it is kept, and 'started' for the models it trains."""
    import importlib

    from ctsma import progress
    from ctsma.demo import stages
    from ctsma.demo.settings import DemoSettings

    mt = importlib.import_module("ctsma.models.train")
    cfg = stages.fold_config(stages.Context(tmp_path, DemoSettings(folds=2)), 0)
    monkeypatch.setattr(mt, "train", _reusing_train({(0, "teacher")})[0])
    shown = []
    monkeypatch.setattr(progress, "info", shown.append)
    stages.train_in_lanes([cfg], 2)  # one lane: in this process
    assert shown == ["  fold 1/1: teacher " + stages.KEPT,
                     "  fold 1/1: student (started)", "  fold 1/1: student finished in 0 s",
                     "  fold 1/1: baseline (started)", "  fold 1/1: baseline finished in 0 s"]


def test_demo_scene_of_an_earlier_run_is_not_left_beside_this_runs(tmp_path, monkeypatch):
    """scene/ is written by the report stage, outside any stage folder: a rerun with another seed (another held-out
    knee) left the earlier run's scene/<subject>.mrb beside the new one, and a rerun without slicer-core kept it as
    if it were this run's."""
    from ctsma.demo import outputs, stages
    from ctsma.demo.settings import DemoSettings

    (tmp_path / "scene").mkdir()
    (tmp_path / "scene" / "P0001.mrb").write_bytes(b"an earlier run's scene")
    monkeypatch.setattr(outputs, "_slicer_lib", lambda: False)
    with pytest.warns(UserWarning, match="slicer-core is not installed"):
        assert outputs.scene(stages.Context(tmp_path, DemoSettings())) is None
    assert not list((tmp_path / "scene").glob("*.mrb"))


def test_demo_rerun_with_other_settings_does_not_leave_the_earlier_results_as_its_own(tmp_path, monkeypatch):
    """metrics.json, report/ and scene/ are written by the last stage, outside the stages' folders: a rerun with
    another seed killed (or failed) before its report left the earlier seed's results there, beside the new seed's
    stages, as if they were this run's. They are now removed when a stage before the report is to run, and kept
    when every stage is cached."""
    import json

    from ctsma.demo import DemoSettings, run_demo, stages
    from ctsma.demo import run as demo_run

    for name in ("phantom", "synthesis", "registration", "dataset", "training", "evaluation", "diagnosis",
                 "inference"):
        monkeypatch.setattr(stages, name, lambda ctx, d: {})
    seen = []

    def report(ctx, d, timings):
        seen.append((ctx.out / "metrics.json").is_file())
        (ctx.out / "metrics.json").write_text(json.dumps({"seed": ctx.s.seed}))
        (d / "study.html").write_text("study")
        (ctx.out / "scene").mkdir(exist_ok=True)
        (ctx.out / "scene" / f"P{ctx.s.seed}.mrb").write_text("scene")
        return {}

    monkeypatch.setattr(demo_run, "report", report)
    out = tmp_path / "out"
    run_demo(out, DemoSettings(seed=0))
    run_demo(out, DemoSettings(seed=0))  # every stage cached: the report is rewritten over the earlier one
    assert seen == [False, True]

    def killed(ctx, d):
        raise KeyboardInterrupt

    monkeypatch.setattr(stages, "phantom", killed)
    with pytest.raises(KeyboardInterrupt):
        run_demo(out, DemoSettings(seed=1))
    assert not (out / "metrics.json").exists() and not (out / "report").exists()
    assert not list((out / "scene").glob("*.mrb"))


def test_demo_refuses_an_out_folder_with_another_commands_results(tmp_path, monkeypatch, capsys):
    """`ctsma demo --out` a folder of `ctsma evaluate` / `ctsma diagnose evaluate` deleted their shared metrics.json
    (and any report/) as 'earlier results' of a demo, then ran its stages there. A demo's own folder, a new one and
    one with unrelated files are accepted."""
    import json

    import ctsma.cli.main as climain
    from ctsma.demo import DemoSettings, run_demo, stages
    from ctsma.demo import run as demo_run
    from ctsma.errors import UserError

    for name in ("phantom", "synthesis", "registration", "dataset", "training", "evaluation", "diagnosis",
                 "inference"):
        monkeypatch.setattr(stages, name, lambda ctx, d: {})
    monkeypatch.setattr(demo_run, "report", lambda ctx, d, t: (ctx.out / "metrics.json").write_text("{}") and {})
    theirs = tmp_path / "evaluation_results"
    theirs.mkdir()
    mine = {"regression": {"teacher": {"mean_icc21": 0.8}}, "diagnosis": {"a/logistic": {"auc": 0.9}}}
    (theirs / "metrics.json").write_text(json.dumps(mine))
    with pytest.raises(UserError, match="holds metrics.json of another command, not of a demo"):
        run_demo(theirs, DemoSettings())
    assert json.loads((theirs / "metrics.json").read_text()) == mine and sorted(theirs.iterdir()) == [
        theirs / "metrics.json"]
    assert climain.main(["demo", "--out", str(theirs)]) == 2
    assert "--out" in capsys.readouterr().err
    other = tmp_path / "other"  # unrelated files only: accepted, and kept
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    run_demo(other, DemoSettings())
    assert (other / "notes.txt").read_text() == "mine" and (other / ".stages").is_dir()
    run_demo(other, DemoSettings(seed=1))  # a demo's folder, with its metrics.json: a rerun is accepted
    import shutil
    shutil.rmtree(other / ".stages")  # its stage records deleted (to rerun all): still a demo's folder
    run_demo(other, DemoSettings())


def test_demo_cohort_with_one_class_stops_after_its_phantom_stage(tmp_path, monkeypatch):
    """n = 8, seed 52 draws 8 knees with OA: the demo ran the synthesis, registration, dataset and training (many
    minutes) before its diagnosis stage refused the cohort. And the inference stage, whose diagnosis model leaves out
    the held-out knee, said 'the cohort has 1 knee(s) with OA' of a cohort with 2."""
    import pandas as pd

    import ctsma.phantom as phantom
    from ctsma.demo import stages
    from ctsma.demo.settings import DemoSettings
    from ctsma.errors import UserError

    def cohort(settings, n, seed, d, workers=1):
        pd.DataFrame({"subject": [f"P{i:04d}" for i in range(n)], "oa": [1] * n,
                      "kl_grade": [3] * n}).to_csv(Path(d) / "manifest.csv", index=False)

    monkeypatch.setattr(phantom, "generate_cohort", cohort)
    ctx = stages.Context(tmp_path, DemoSettings(n=8, seed=52))
    (tmp_path / "phantom").mkdir()
    with pytest.raises(UserError, match=r"the cohort \(n = 8, seed 52\) has 8 knee\(s\) with OA and 0 without: the "
                                        r"diagnosis needs at least 2 of each \(use another --seed or a larger --n\)"):
        stages.phantom(ctx, tmp_path / "phantom")
    labels = pd.DataFrame({"subject": ["A", "B", "C", "D"], "oa": [1, 0, 0, 0]})
    with pytest.raises(UserError, match="the cohort's analysable knees without the held-out knee P0001 has 1 knee"):
        stages.diagnosis_folds(ctx, labels, "the cohort's analysable knees without the held-out knee P0001")

"""Training with Lightning on a tiny synthetic store: learning happens, outputs, errors, kill + resume, evaluation."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from ctsma import PARAMETERS
from ctsma.dataset.synthetic import make_synthetic_store
from ctsma.errors import ConfigError, UserError
from ctsma.modelfile import load_model, save_model
from ctsma.models import load_student, load_train_config, train

pytestmark = pytest.mark.slow


def tiny(store, run, **over) -> dict:
    cfg = {"data": {"store": str(store), "batch_size": 16},
           "teacher_net": {"widths": [4, 8, 8, 12], "head_hidden": 16},
           "student_net": {"widths": [4, 8, 8, 12], "head_hidden": 16},
           "optim": {"max_epochs": 5, "lr": 0.01, "patience": 0},
           "trainer": {"progress_bar": False, "threads": 1, "seed": 0}, "output": {"dir": str(run)},
           "evaluate": {"n_boot": 50, "plots": True}}
    for k, v in over.items():
        cfg.setdefault(k, {}).update(v)
    return cfg


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return make_synthetic_store(tmp_path_factory.mktemp("syn") / "store", n_subjects=10, patches_per_subject=12)


@pytest.fixture(scope="module")
def trained(store, tmp_path_factory):
    run = tmp_path_factory.mktemp("run")
    cfg = load_train_config(tiny(store.dir, run))
    files = {w: train(w, cfg) for w in ("teacher", "student", "baseline")}
    return cfg, run, files


def _epochs(run, role):
    return [json.loads(line) for line in (run / role / "progress.jsonl").read_text().splitlines()
            if json.loads(line)["event"] == "epoch"]


def test_learning_happens_and_outputs_are_written(trained, store):
    cfg, run, files = trained
    for role in ("teacher", "student_distilled", "student_baseline"):
        ep = _epochs(run, role)
        assert [e["epoch"] for e in ep] == list(range(1, 6))
        assert ep[-1]["train_loss"] < 0.7 * ep[0]["train_loss"], role  # the loss falls
        d = run / role
        assert (d / "checkpoints" / "best.ckpt").is_file() and (d / "checkpoints" / "last.ckpt").is_file()
        assert "val_loss" in pd.read_csv(d / "logs" / "metrics.csv").columns
        assert any((d / "tb").rglob("events.out.tfevents*"))
    # a simple signal is recovered: BV/TV from CT on the validation patients
    model, meta = load_student(files["baseline"])
    assert meta["metrics"]["val_r"]["BV/TV"] > 0.7
    val = np.isin(store.table["subject"], meta["training"]["split"]["val"])
    pred = model.predict(store.read("ct", np.flatnonzero(val)))
    ref = store.targets("mr")[val]
    assert np.corrcoef(pred[:, 0], ref[:, 0])[0, 1] > 0.7
    assert np.mean(np.abs(pred[:, 0] - ref[:, 0])) == pytest.approx(meta["metrics"]["val_mae"]["BV/TV"], rel=1e-3)
    # the distilled student's log has the distillation terms and they fall
    log = pd.read_csv(run / "student_distilled" / "logs" / "metrics.csv").dropna(subset=["train_distill"])
    assert log["train_distill"].iloc[-1] < log["train_distill"].iloc[0]
    dmeta = load_student(files["student"])[1]
    assert dmeta["role"] == "student_distilled" and dmeta["training"]["teacher"]["sha256"]
    # the students record their training knees' bone intensity (the teacher, an MR model, does not)
    from ctsma.inference.intensity import patch_means, training_intensity
    train_knees = dmeta["training"]["split"]["train"]
    rows = np.flatnonzero(np.isin(store.table["subject"], train_knees))
    expected = training_intensity(patch_means(store.read("ct", rows)), store.table["subject"].to_numpy()[rows],
                                  train_knees)
    assert dmeta["input"]["ct_intensity"] == expected and expected["n_knees"] == len(train_knees)  # JSON keeps floats
    assert "ct_intensity" not in load_model(files["teacher"])[1]["input"]
    assert set(dmeta["training"]["split"]["test"]).isdisjoint(dmeta["training"]["split"]["train"])
    # where it was trained: the resolved device and precision, not the config's "auto"
    assert dmeta["training"]["hardware"] == {"device": "cpu", "processes": 1, "precision": "32-true",
                                             "torch": torch.__version__}


def test_evaluate_writes_contract_metrics(trained, tmp_path):
    from ctsma.evaluation.regression import evaluate

    cfg, run, _ = trained
    (tmp_path / "metrics.json").write_text(json.dumps({"diagnosis": {"x": 1.0}, "timing": {"x": 1.0}}))
    res = evaluate(cfg, tmp_path)
    m = json.loads((tmp_path / "metrics.json").read_text())
    assert m["diagnosis"] == {"x": 1.0}  # other commands' keys are kept
    # the contract's timing block: seconds of evaluate's own stages (an earlier one replaced, not merged), and the
    # whole run, which holds them; metrics.json is the returned result, timing included, and nothing else changed
    t = m["timing"]
    assert list(t) == ["prediction", "ct_direct", "agreement", "bootstrap", "writing", "total"]  # no ablations here
    assert all(isinstance(v, float) and v > 0 for v in t.values())
    assert sum(v for k, v in t.items() if k != "total") <= t["total"]
    assert {k: v for k, v in m.items() if k != "diagnosis"} == json.loads(json.dumps(res))
    for block in ("regression", "regression_vs_truth"):
        assert set(m[block]) >= {"teacher", "student_distilled", "student_baseline", "ct_direct"}
        for p in PARAMETERS:
            b = m[block]["student_distilled"][p]
            assert set(b) >= {"icc21", "icc21_ci", "icc31", "icc31_ci", "pearson_r", "mae", "ba_bias", "ba_loa",
                              "n_patients", "n_patches"}
            assert b["icc21_ci"][0] <= b["icc21"] <= b["icc21_ci"][1]
            assert b["n_patients"] == len(res["regression_info"]["test_subjects"])
        assert "mean_icc21" in m[block]["teacher"]
    g = m["distillation_gain"]
    assert g["ci"][0] <= g["mean_icc21_diff"] <= g["ci"][1]
    assert g["mean_icc21_diff"] == pytest.approx(m["regression"]["student_distilled"]["mean_icc21"]
                                                 - m["regression"]["student_baseline"]["mean_icc21"], abs=1e-9)
    assert m["regression_info"]["level"] == "patch" and m["regression_info"]["flips"] == 4
    # the predictions scored are those of `ctsma infer`: the mean over the four flipped copies of each patch
    from ctsma.models.export import FLIPS_DEFAULT, load_parameter_model
    from ctsma.models.train import run_paths
    from ctsma.dataset.store import PatchStore

    st, c = PatchStore(cfg.data.store), cfg.data
    idx = st.patient_split(c.test_fraction, c.val_fraction, seed=c.split_seed, use_stored=c.use_stored_split).test
    pred = pd.read_csv(tmp_path / "regression_predictions.csv", dtype={"subject": str})
    assert len(pred) == len(idx)
    # each row names its patch (store row, subject, ROI, position), so the file is also a diagnosis patch table
    assert pred["index"].tolist() == list(idx)
    rows = st.table.iloc[idx]
    assert pred["roi"].tolist() == rows["roi"].astype(str).tolist()
    np.testing.assert_array_equal(pred[["rel_x", "rel_y", "rel_z"]].to_numpy(), rows[["rel_x", "rel_y", "rel_z"]])
    from ctsma.diagnosis.data import use_parameter_columns

    table = use_parameter_columns(tmp_path / "regression_predictions.csv", "student_distilled_")
    np.testing.assert_allclose(table[list(PARAMETERS)].to_numpy(float),
                               pred[[f"student_distilled_{p}" for p in PARAMETERS]].to_numpy())
    model, _ = load_parameter_model(run_paths(cfg, "student_distilled")[1])
    mean, _ = model.predict_flips(st.read("ct", idx), None, FLIPS_DEFAULT)
    np.testing.assert_allclose(pred[[f"student_distilled_{p}" for p in PARAMETERS]].to_numpy(), mean, rtol=1e-6)
    assert (tmp_path / "regression_table.csv").is_file() and (tmp_path / "plots" / "scatter.png").is_file()
    assert (tmp_path / "plots" / "bland_altman_vs_truth.png").stat().st_size > 1000


def test_a_rerun_of_evaluate_leaves_nothing_of_the_earlier_run(trained, tmp_path):
    """A rerun with fewer models (no baseline: no gain) and no plots must not keep the earlier run's gain or plots,
    which described other models; other commands' blocks stay."""
    import dataclasses
    import shutil

    from ctsma.evaluation.regression import evaluate

    cfg, run, _ = trained
    out = tmp_path / "eval"
    evaluate(cfg, out)
    assert "distillation_gain" in json.loads((out / "metrics.json").read_text())
    m = json.loads((out / "metrics.json").read_text())
    m["diagnosis"] = {"kept": True}
    (out / "metrics.json").write_text(json.dumps(m))
    fewer = tmp_path / "fewer"
    fewer.mkdir()
    for role in ("teacher", "student_distilled"):
        shutil.copy(run / f"{role}.safetensors", fewer)
    cfg2 = dataclasses.replace(cfg, output=dataclasses.replace(cfg.output, dir=str(fewer)),
                               evaluate=dataclasses.replace(cfg.evaluate, plots=False))
    evaluate(cfg2, out)
    m = json.loads((out / "metrics.json").read_text())
    assert "distillation_gain" not in m and "distillation_gain_vs_truth" not in m
    assert set(m["regression"]) == {"teacher", "student_distilled", "ct_direct"}
    assert m["diagnosis"] == {"kept": True}
    assert not list((out / "plots").glob("*.png"))


def test_no_validation_patients_is_a_clear_error(store, tmp_path):
    cfg = load_train_config(tiny(store.dir, tmp_path, data={"val_fraction": 0.0}))
    with pytest.raises(UserError, match="no validation patients"):
        train("baseline", cfg)
    assert not any(tmp_path.iterdir())  # nothing written: no empty run folder left behind


def test_conv_stem_teacher_trains_and_a_stem_that_cannot_fit_is_a_config_error(store, tmp_path):
    from ctsma.dataset.store import PatchStore
    from ctsma.models import load_teacher

    cfg = load_train_config(tiny(store.dir, tmp_path / "ok", teacher_net={"stem": "conv"}, optim={"max_epochs": 2}))
    model, meta = load_teacher(train("teacher", cfg))
    assert meta["arch"]["stem"] == "conv" and len([m for m in model.net.stem if isinstance(m, torch.nn.Conv3d)]) == 2
    student, smeta = load_student(train("student", cfg))    # distillation matches the conv teacher's feature maps
    assert smeta["role"] == "student_distilled" and np.isfinite(student.predict(store.read("ct", [0, 1]))).all()
    # resuming that teacher with the other stem is refused before anything changes, not a Lightning traceback
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "ok").rglob("*") if p.is_file()}
    other = load_train_config(tiny(store.dir, tmp_path / "ok", optim={"max_epochs": 2}))
    with pytest.raises(ConfigError, match="--resume: .* holds another network"):
        train("teacher", other, resume=True)
    assert before == {p: p.stat().st_mtime_ns for p in (tmp_path / "ok").rglob("*") if p.is_file()}
    odd = PatchStore(store.dir)
    odd.mr_shape = (24, 24, 24)                              # MR patches of 24³ cannot be halved down to 8³
    bad = tmp_path / "bad"
    with pytest.raises(ConfigError, match="teacher_net: a 'conv' stem needs an input size"):
        train("teacher", load_train_config(tiny(store.dir, bad, teacher_net={"stem": "conv"})), store=odd)
    assert not bad.exists() or not any(bad.iterdir())


def test_student_without_teacher_is_a_clear_error(store, tmp_path):
    with pytest.raises(UserError, match="needs a trained teacher"):
        train("student", load_train_config(tiny(store.dir, tmp_path)))
    assert not any(tmp_path.iterdir())


def test_a_user_error_keeps_the_previous_run(store, tmp_path):
    # an earlier run's checkpoints and logs survive a rerun that stops on a user error before training
    old = tmp_path / "student_baseline"
    (old / "checkpoints").mkdir(parents=True)
    (old / "checkpoints" / "last.ckpt").write_bytes(b"earlier run")
    for bad in ({"data": {"val_fraction": 0.0}}, {"data": {"store": str(tmp_path / "no_store")}}):
        with pytest.raises(UserError):
            train("baseline", load_train_config(tiny(store.dir, tmp_path, **bad)))
        assert (old / "checkpoints" / "last.ckpt").read_bytes() == b"earlier run"


def test_nan_loss_stops_with_its_cause(store, tmp_path, monkeypatch):
    import torch

    from ctsma.models import lightning as L
    from ctsma.models.lightning import TrainingDivergedError

    monkeypatch.setattr(L, "regression_loss", lambda p, y, k="mse": (p * torch.tensor(float("nan"))).mean())
    with pytest.raises(TrainingDivergedError, match=r"became nan at epoch 0, batch 0.*diverged"):
        train("baseline", load_train_config(tiny(store.dir, tmp_path)))


def test_ctrl_c_in_training_reaches_the_caller_as_an_interrupt(store, tmp_path):
    """Lightning answers Ctrl-C with its clean-up and a silent sys.exit(1); `train` gives the caller the
    KeyboardInterrupt instead (the command line then says it was interrupted and exits with 130), with Ctrl-C
    working again, and the last checkpoint is there to resume from."""
    import signal

    import pytorch_lightning as pl

    class CtrlC(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 1:
                raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train("baseline", load_train_config(tiny(store.dir, tmp_path)), callbacks=[CtrlC()])
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    assert list(tmp_path.rglob("last.ckpt"))


def test_an_interrupted_training_says_to_resume_with_the_flag(store, tmp_path, monkeypatch, capsys):
    """A plain rerun of 'ctsma train' starts again and deletes the run: the interrupt message must name --resume
    (it said "a rerun resumes", as for the commands that do)."""
    import importlib

    from ctsma.cli.main import main

    T = importlib.import_module("ctsma.models.train")

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(T, "train", interrupted)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  max_epochs: 2\n")
    assert main(["train", "baseline", "--config", str(cfg), "--store", str(store.dir), "--out",
                 str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert "--resume" in err and "a rerun resumes" not in err


KILL = """
import json, os, signal, sys
import pytorch_lightning as pl
from ctsma.models import load_train_config, train

class Kill(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.current_epoch == 2 and batch_idx == 1:
            os.kill(os.getpid(), signal.SIGKILL)  # killed mid-epoch, no clean-up

train("baseline", load_train_config(json.loads(sys.argv[1])), callbacks=[Kill()])
"""


@pytest.mark.parametrize("how", ["resume", "reuse"])
def test_killed_run_resumes_to_the_uninterrupted_result(store, tmp_path, how, capsys):
    """``--resume``, and ``train(reuse=True)`` (the demo's training stage, evaluate's ablations), which found no
    model file and started the run anew, go on from the killed run's last checkpoint."""
    killed = tiny(store.dir, tmp_path / "killed", optim={"max_epochs": 4})
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", KILL, json.dumps(killed)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == -9, proc.stderr[-2000:]
    run = tmp_path / "killed" / "student_baseline"
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert not (tmp_path / "killed" / "student_baseline.safetensors").exists()
    assert [e["epoch"] for e in _epochs(tmp_path / "killed", "student_baseline")] == [1, 2]
    import torch
    # last.ckpt holds the last finished epoch (the second, index 1) whether or not it improved the validation loss
    assert torch.load(run / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["epoch"] == 1
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = train("baseline", load_train_config(killed), **{how: True})
    assert not [w for w in caught if "exists and is not empty" in str(w.message)]  # Lightning's, expected here
    # both say where they go on from (--resume said nothing: a resumed run looked like one started anew)
    assert f"student_baseline: resumed from {run / 'checkpoints' / 'last.ckpt'} (2 of 4 epochs were done)" in \
        capsys.readouterr().err
    straight = train("baseline", load_train_config(tiny(store.dir, tmp_path / "straight", optim={"max_epochs": 4})))
    a, ma = load_model(resumed)
    b, mb = load_model(straight)
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_allclose(a[k].numpy(), b[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)
    for p in PARAMETERS:
        assert ma["metrics"]["val_mae"][p] == pytest.approx(mb["metrics"]["val_mae"][p], rel=1e-5)
    la = pd.read_csv(run / "logs" / "metrics.csv").dropna(subset=["val_loss"])
    lb = pd.read_csv(tmp_path / "straight" / "student_baseline" / "logs" / "metrics.csv").dropna(subset=["val_loss"])
    np.testing.assert_allclose(la.groupby("epoch")["val_loss"].last().to_numpy(), lb["val_loss"].to_numpy(), rtol=1e-5)


def test_resume_of_a_finished_run_keeps_its_log(store, tmp_path):
    """--resume after the last epoch keeps the run's model file as it is, or, killed while it was written, trains
    nothing and exports again; the epoch log and the best epoch recorded from it stay (Lightning's logger removed the
    file)."""
    cfg = load_train_config(tiny(store.dir, tmp_path, optim={"max_epochs": 2}))
    first = load_model(train("baseline", cfg))[1]
    log = tmp_path / "student_baseline" / "logs" / "metrics.csv"
    before = pd.read_csv(log)
    model_file = tmp_path / "student_baseline.safetensors"
    model_bytes = model_file.read_bytes()
    assert load_model(train("baseline", cfg, resume=True))[1] == first
    assert model_file.read_bytes() == model_bytes  # kept: exported again it got new bytes, a new checksum
    model_file.unlink()  # killed while the model file was written: exported again from the last checkpoint
    again = load_model(train("baseline", cfg, resume=True))[1]
    pd.testing.assert_frame_equal(pd.read_csv(log), before)
    assert again["metrics"]["best_epoch"] == first["metrics"]["best_epoch"] is not None


def test_resume_with_other_settings_or_another_split_is_refused(store, tmp_path):
    """--resume went on silently with another fold, learning rate or epoch count: the model then held epochs of two
    runs under the metadata of the second (another fold's test patients in its weights, undetectable by evaluate),
    and fewer epochs than the checkpoint's was a Lightning traceback."""
    from ctsma.errors import ConfigError

    train("baseline", load_train_config(tiny(store.dir, tmp_path, optim={"max_epochs": 2})))
    ckpt = tmp_path / "student_baseline" / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    for over, said in (({"data": {"k_folds": 3, "fold": 1}}, r"\(the patient split [^;]*\)"),
                       ({"optim": {"max_epochs": 2, "lr": 0.1}}, r"\(optim.lr 0.01 -> 0.1\)"),
                       ({"optim": {"max_epochs": 1}}, r"\(optim.max_epochs 2 -> 1\)"),
                       ({"trainer": {"seed": 3}}, r"\(trainer.seed 0 -> 3\)")):
        over = {"optim": {"max_epochs": 2}, **over}
        with pytest.raises(ConfigError, match=said):
            train("baseline", load_train_config(tiny(store.dir, tmp_path, **over)), resume=True)
    assert ckpt.read_bytes() == before  # refused before anything was written


def test_a_store_rebuilt_in_its_folder_is_another_run(store, tmp_path, capsys):
    """A store rebuilt in its folder with the same patients and patch counts (e.g. other builder settings) passed as
    the same run: --resume went on from its checkpoint and evaluate reused its ablation models. The run record now
    holds the store's fingerprint; a record of an earlier version, without it, is compared without it."""
    import shutil

    from ctsma.dataset.store import CSV_NAME, PatchStore

    copy = tmp_path / "store"
    shutil.copytree(store.dir, copy)
    cfg = load_train_config(tiny(copy, tmp_path / "run", optim={"max_epochs": 2}))
    model = train("baseline", cfg)
    fingerprint = PatchStore(copy).fingerprint()
    assert load_model(model)[1]["training"]["run"]["store"] == fingerprint
    capsys.readouterr()
    assert train("baseline", cfg, reuse=True) == model
    assert "reused" in capsys.readouterr().err
    table = pd.read_csv(copy / CSV_NAME, dtype={"subject": str})
    table.loc[0, "mr_Tb.Th"] *= 1.1  # "rebuilt": one reference differs, same patients and counts
    table.to_csv(copy / CSV_NAME, index=False)
    assert PatchStore(copy).fingerprint() != fingerprint
    ckpt = tmp_path / "run" / "student_baseline" / "checkpoints" / "last.ckpt"
    before = ckpt.read_bytes()
    with pytest.raises(ConfigError, match=r"\(the store's contents \(another store, or one rebuilt in its folder\)\)"):
        train("baseline", cfg, resume=True)
    assert ckpt.read_bytes() == before
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved["ctsma_run"].pop("store")  # a checkpoint of the previous version: no fingerprint to compare
    torch.save(saved, ckpt)
    assert load_model(train("baseline", cfg, resume=True))[1]["metrics"]["epochs_run"] == 2
    capsys.readouterr()
    train("baseline", cfg, reuse=True)  # the model file now records the rebuilt store's fingerprint: reused
    assert "reused" in capsys.readouterr().err
    table.loc[1, "mr_Tb.Sp"] *= 1.1
    table.to_csv(copy / CSV_NAME, index=False)
    train("baseline", cfg, reuse=True)
    err = capsys.readouterr().err
    assert "trained again (the store's contents" in err and "resumed" not in err, err


def test_reuse_resumes_only_a_checkpoint_of_the_same_run(store, tmp_path, capsys):
    """Without a model file, ``train(reuse=True)`` goes on from ``last.ckpt`` when the checkpoint records this very
    run; one of another run, or of an earlier CT-SMA (no record), is not resumed: the run starts anew."""
    cfg = load_train_config(tiny(store.dir, tmp_path, optim={"max_epochs": 2}))
    model = train("baseline", cfg)
    weights = load_model(model)[0]
    model.unlink()  # e.g. killed while the model file was written: every epoch done
    capsys.readouterr()
    assert train("baseline", cfg, reuse=True) == model
    err = capsys.readouterr().err
    assert f"resumed from {tmp_path / 'student_baseline' / 'checkpoints' / 'last.ckpt'} (2 of 2 epochs" in err, err
    for k, v in load_model(model)[0].items():
        np.testing.assert_array_equal(v.numpy(), weights[k].numpy(), err_msg=k)
    tensors, meta = load_model(model)  # a model file that is not this run's, beside this run's checkpoint
    del meta["training"]["run"]
    save_model(model, tensors, {k: v for k, v in meta.items() if not k.startswith("_")}, kind="student")
    train("baseline", cfg, reuse=True)
    assert ("student_baseline.safetensors not kept (its file records no run: written by an earlier CT-SMA); resumed "
            "from") in capsys.readouterr().err
    assert "run" in load_model(model)[1]["training"]
    ckpt = tmp_path / "student_baseline" / "checkpoints" / "last.ckpt"
    other = load_train_config(tiny(store.dir, tmp_path, optim={"max_epochs": 2, "lr": 0.02}))
    model.unlink()
    train("baseline", other, reuse=True)
    assert "resumed" not in capsys.readouterr().err
    assert torch.load(ckpt, map_location="cpu", weights_only=True)["ctsma_run"]["optim"]["lr"] == 0.02  # anew
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    saved["ctsma_run"].pop("store")  # a checkpoint of the previous CT-SMA: its record is not the whole run
    torch.save(saved, ckpt)
    model.unlink()
    train("baseline", other, reuse=True)
    assert "resumed" not in capsys.readouterr().err
    assert "store" in torch.load(ckpt, map_location="cpu", weights_only=True)["ctsma_run"]  # the new run's


def test_resume_of_a_checkpoint_past_the_configured_epochs_is_one_line(store, tmp_path, capsys):
    """A checkpoint of an earlier CT-SMA (no run record), resumed with fewer optim.max_epochs than it had run, was
    Lightning's traceback (two epochs over) or, one epoch over, exported a model of more epochs than its metadata
    says. Now one line, the checkpoint kept; at its own epoch count it exports again, as one with a record does."""
    import yaml

    from ctsma.cli.main import main

    conf = tmp_path / "c.yaml"
    conf.write_text(yaml.safe_dump(tiny(store.dir, tmp_path / "run", optim={"max_epochs": 3})))
    train("baseline", load_train_config(conf))
    ckpt = tmp_path / "run" / "student_baseline" / "checkpoints" / "last.ckpt"
    with_record = torch.load(ckpt, map_location="cpu", weights_only=True)
    legacy = {k: v for k, v in with_record.items() if k != "ctsma_run"}
    for saved, fewer, said in ((with_record, 2, r"\(optim.max_epochs 3 -> 2\)"),
                               (legacy, 2, r"has finished 3 epochs, more than optim.max_epochs 2;"),
                               (legacy, 1, r"has finished 3 epochs, more than optim.max_epochs 1;")):
        torch.save(saved, ckpt)
        before = ckpt.read_bytes()
        capsys.readouterr()
        assert main(["--quiet", "train", "baseline", "--config", str(conf), "--resume",
                     "--set", f"optim.max_epochs={fewer}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ctsma train: error: --resume: ") and len(err.splitlines()) == 1, err
        assert re.search(said, err), err
        assert ckpt.read_bytes() == before
    for saved in (legacy, with_record):  # at the configured epochs: nothing left to train, the model is exported
        torch.save(saved, ckpt)
        meta = load_model(train("baseline", load_train_config(conf), resume=True))[1]
        assert meta["metrics"]["epochs_run"] == 3


def test_resume_without_checkpoint_and_cli_errors(store, tmp_path, capsys):
    from ctsma.cli.main import main

    with pytest.raises(UserError, match="no checkpoint"):
        train("baseline", load_train_config(tiny(store.dir, tmp_path)), resume=True)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  max_epochs: 0\n")
    assert main(["train", "baseline", "--config", str(cfg), "--store", str(store.dir)]) == 2
    assert "max_epochs" in capsys.readouterr().err
    assert main(["evaluate", "--config", str(cfg), "--out", str(tmp_path / "e"), "--set", "optim.max_epochs=2",
                 "--store", str(store.dir), "--models", str(tmp_path / "none")]) == 2
    assert "no trained models" in capsys.readouterr().err
    # the shipped configs leave data.store (and output.dir) for --store and --out: the messages named neither
    cfg.write_text("optim:\n  max_epochs: 2\n")
    assert main(["train", "baseline", "--config", str(cfg)]) == 2
    assert "data.store is empty: give the patch store folder with --store" in capsys.readouterr().err
    assert main(["train", "baseline", "--config", str(cfg), "--resume"]) == 2
    said = capsys.readouterr().err
    assert "(resume with the run's own --out; the checkpoint is <out>/<role>/checkpoints/last.ckpt)" in said


def test_every_ddp_process_gets_a_batch_or_the_run_is_refused(store, tmp_path, monkeypatch):
    """Under DDP each process takes every world_size-th batch. The validation patches (24) made one batch of up to
    128, so with trainer.devices=2 the second process had none: Lightning's traceback there, a connection error in
    the first. Validation batches are now split so that every process gets one (one process: as before); a training
    set of fewer batches than processes is refused before any process starts."""
    from ctsma.models.lightning import DataSetupError, PatchDataModule

    dm = PatchDataModule(store, load_train_config(tiny(store.dir, tmp_path)).data, 0)
    for rank, world, batches in ((0, 1, 1), (0, 2, 1), (1, 2, 1)):
        monkeypatch.setattr(dm, "_rank", lambda: (rank, world))
        assert len(dm.val_dataloader()) == batches and len(dm.train_dataloader()) == 4 // world
    dm.check_processes(4)
    with pytest.raises(DataSetupError, match=r"the training patches \(72\) make fewer batches than the 5 processes"):
        dm.check_processes(5)


def _no_launcher(monkeypatch):
    """An environment that no launcher of several nodes started (as on a plain machine)."""
    from lightning_fabric.plugins.environments import MPIEnvironment

    from ctsma.models.launch import LAUNCH_VARIABLES

    for k in ("TORCHELASTIC_RUN_ID", "SLURM_NTASKS", "SLURM_NTASKS_PER_NODE", "SLURM_NNODES", "SLURM_JOB_NAME",
              "LSB_JOBID", "LSB_DJOB_RANKFILE", "JSM_NAMESPACE_LOCAL_RANK", "JSM_NAMESPACE_SIZE", *LAUNCH_VARIABLES):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(MPIEnvironment, "detect", staticmethod(lambda: False))  # were the tests run by mpirun


def test_several_nodes_without_a_launcher_are_refused(store, tmp_path, monkeypatch, capsys):
    """trainer.num_nodes: 2 on a plain machine made Lightning wait for the other node for ever (killed after 11
    minutes; it ignored SIGTERM), after it had replaced the run folder. Now one line, and nothing written; a launch
    that Lightning recognises (srun as docs/training.md shows, torchrun, variables set by hand) goes on."""
    from ctsma.cli.main import main
    from ctsma.models.launch import check_nodes

    _no_launcher(monkeypatch)
    check_nodes(1)
    with pytest.raises(ConfigError, match="trainer.num_nodes is 2, but no launcher of several nodes"):
        check_nodes(2)
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  max_epochs: 1\n")
    assert main(["train", "baseline", "--config", str(cfg), "--store", str(store.dir), "--out", str(tmp_path / "o"),
                 "--set", "trainer.num_nodes=2"]) == 2
    err = capsys.readouterr().err
    assert "no launcher of several nodes" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
    # srun in an sbatch job of 2 nodes x 4 tasks (docs/training.md): Lightning's SLURM environment
    for k, v in {"SLURM_NTASKS": "8", "SLURM_NTASKS_PER_NODE": "4", "SLURM_NNODES": "2", "SLURM_JOB_NAME": "job.sh",
                 "SLURM_PROCID": "5", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}.items():
        monkeypatch.setenv(k, v)
    check_nodes(2)
    monkeypatch.setenv("SLURM_JOB_NAME", "bash")  # an interactive shell in an allocation: Lightning ignores SLURM
    with pytest.raises(ConfigError, match="no launcher"):
        check_nodes(2)
    for k, v in (("TORCHELASTIC_RUN_ID", "1"), ("NODE_RANK", "1"), ("MASTER_ADDR", "node0")):
        _no_launcher(monkeypatch)
        monkeypatch.setenv(k, v)
        check_nodes(2)


def test_only_the_first_process_of_a_run_replaces_its_folder(monkeypatch):
    """Every process of a DDP run executes train(): each removed the run folder of a fresh run, so srun's tasks
    removed one folder at once (rmtree fails on the files another removed) and Lightning's second process, started
    by the first, removed what the first had begun. Only the process that its launcher made rank 0 does now."""
    from ctsma.models.launch import RANK_VARIABLES, launched_as_rank_zero

    for k in RANK_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    assert launched_as_rank_zero()  # no launcher: the one process
    for k, v in (("SLURM_PROCID", "3"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("NODE_RANK", "1"),
                 ("JSM_NAMESPACE_RANK", "2"), ("OMPI_COMM_WORLD_RANK", "1"), ("PMI_RANK", "5")):
        monkeypatch.setenv(k, "0")
        assert launched_as_rank_zero()
        monkeypatch.setenv(k, v)
        assert not launched_as_rank_zero(), k
        monkeypatch.delenv(k)
    # torchrun's rank 0 on node 0, under SLURM too
    for k, v in {**TORCHRUN, "SLURM_PROCID": "0", "NODE_RANK": "0"}.items():
        monkeypatch.setenv(k, v)
    assert launched_as_rank_zero()


SLURM_TASK = {"SLURM_JOB_NAME": "job.sh", "SLURM_JOB_ID": "1234", "SLURM_PROCID": "0", "SLURM_LOCALID": "0",
              "SLURM_NODEID": "0"}
TORCHRUN = {"TORCHELASTIC_RUN_ID": "x", "RANK": "0", "LOCAL_RANK": "0", "GROUP_RANK": "0"}
LSF = {"LSB_JOBID": "4321", "LSB_DJOB_RANKFILE": "/nonexistent", "JSM_NAMESPACE_SIZE": "2", "JSM_NAMESPACE_RANK": "1"}


def _srun(ntasks, nnodes, per_node=None, **more):
    env = {**SLURM_TASK, "SLURM_NTASKS": str(ntasks), "SLURM_NNODES": str(nnodes), **more}
    return env if per_node is None else {**env, "SLURM_NTASKS_PER_NODE": str(per_node)}


# (launcher's environment, trainer.devices, num_nodes, strategy, what ctsma refuses (None: goes on), what Lightning
# does: "validate" its validate_settings refuses / accepts in fit, "init" its SLURM environment refuses when the
# Trainer is made, "index" an IndexError in fit, None: it checks nothing, as there is no DDP launcher)
LAUNCHES = [
    (_srun(4, 1, 4), 2, 1, "auto", r"#SBATCH --ntasks-per-node=4 but trainer.devices is 2: set them equal", "validate"),
    (_srun(4, 2, 2), 2, 1, "auto", r"#SBATCH --nodes=2 but trainer.num_nodes is 1: set them equal", "validate"),
    (_srun(2, 1, 2), 1, 1, "ddp", r"--ntasks-per-node=2 but trainer.devices is 1", "validate"),
    (_srun(4, 1), 1, 1, "auto", r"SLURM runs 4 tasks \(--ntasks=4\) without --ntasks-per-node.*--ntasks-per-node=4",
     "init"),
    ({**TORCHRUN, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}, 2, 1, "auto",
     r"torchrun started 4 processes .* is 2 x 1 = 2: set them equal", "validate"),
    ({**TORCHRUN, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 1, 2, "auto",
     r"torchrun started 2 processes on this node .* trainer.devices is 1", "index"),
    ({**LSF, "JSM_NAMESPACE_LOCAL_RANK": "1"}, 1, 2, "ddp", r"local rank 1 of its node, but trainer.devices is 1",
     "index"),
    # what Lightning accepts goes on
    (_srun(8, 2, 4), 4, 2, "ddp", None, "validate"),  # docs/training.md's job
    ({**TORCHRUN, "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2"}, 2, 2, "auto", None, "validate"),
    ({**TORCHRUN, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "1"}, 2, 1, "auto", None, "validate"),  # 2 nodes of 1
    ({**TORCHRUN, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", **_srun(1, 1, 1)}, 2, 1, "ddp", None,
     "validate"),  # torchrun inside a SLURM job: Lightning takes torchrun's numbers
    (_srun(2, 1, 2), 1, 1, "auto", None, None),  # one process per task: Lightning's single-device strategy
    (_srun(4, 1, 4), 2, 1, "ddp_spawn", None, None),
    (_srun(4, 1, 4, SLURM_JOB_NAME="interactive"), 2, 1, "auto", None, None),  # Lightning: no SLURM
    ({**TORCHRUN, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2"}, 1, 1, "auto", None, None),
    ({**LSF, "JSM_NAMESPACE_LOCAL_RANK": "1"}, 2, 1, "ddp", None, None),
]


def _launched(monkeypatch, env):
    _no_launcher(monkeypatch)
    for k in ("LOCAL_WORLD_SIZE", "RANK", "SLURM_JOB_ID", "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID",
              "JSM_NAMESPACE_RANK"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)


@pytest.mark.parametrize("env, devices, nodes, strategy, refused, lightning", LAUNCHES)
def test_a_launcher_that_disagrees_with_the_config_is_refused(monkeypatch, env, devices, nodes, strategy, refused,
                                                             lightning):
    """srun, torchrun or jsrun whose numbers of tasks or nodes were not trainer.devices / num_nodes: Lightning
    refused them (or failed) only in fit, with a traceback, after the run folder had been replaced. Now one line
    first, for exactly what Lightning refuses; its own validate_settings agrees where it checks."""
    from types import SimpleNamespace

    from lightning_fabric.plugins.environments import SLURMEnvironment, TorchElasticEnvironment

    from ctsma.models.launch import check_cluster

    _launched(monkeypatch, env)
    t = SimpleNamespace(devices=devices, num_nodes=nodes, strategy=strategy)
    if refused is None:
        check_cluster(t)
    else:
        with pytest.raises(ConfigError, match=refused):
            check_cluster(t)
    cls = TorchElasticEnvironment if "TORCHELASTIC_RUN_ID" in env else SLURMEnvironment
    if lightning == "validate":
        if refused is None:
            cls().validate_settings(devices, nodes)
        else:
            with pytest.raises(ValueError):
                cls().validate_settings(devices, nodes)
    elif lightning == "init":
        with pytest.raises(RuntimeError, match="--ntasks"):
            cls()


def test_a_launcher_that_disagrees_is_one_line_and_keeps_the_run(store, tmp_path, monkeypatch, capsys):
    """srun with 4 tasks per node and trainer.devices=2: Lightning's traceback in fit, the earlier run's folder
    already replaced (left empty). Now one line, and the folder as it was."""
    from ctsma.cli.main import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  max_epochs: 1\n")
    args = ["train", "baseline", "--config", str(cfg), "--store", str(store.dir), "--out", str(tmp_path / "o")]
    _no_launcher(monkeypatch)
    assert main(args) == 0
    run = tmp_path / "o" / "student_baseline"
    before = {p: p.stat().st_mtime_ns for p in run.rglob("*")}
    capsys.readouterr()
    _launched(monkeypatch, _srun(4, 1, 4))
    assert main([*args, "--set", "trainer.devices=2"]) == 2
    err = capsys.readouterr().err
    assert "--ntasks-per-node=4 but trainer.devices is 2" in err and len(err.strip().splitlines()) == 1
    assert {p: p.stat().st_mtime_ns for p in run.rglob("*")} == before and len(before) > 3


def test_ddp_validation_counts_every_patch_once(store, tmp_path):
    """The validation batches were cut to a multiple of the processes as the training batches are: with 5 processes
    the 24 validation patches made 6 batches of 4, and the sixth, 4 patches, was never validated (val_loss, val_mae,
    the best checkpoint and early stopping saw 20). Now every validation patch is in exactly one process's batches;
    training still gives every process the same number of batches, leaving out other patches every epoch."""
    from ctsma.models.lightning import PatchDataModule

    dm = PatchDataModule(store, load_train_config(tiny(store.dir, tmp_path)).data, 0)
    for world in (1, 2, 3, 5, 7):
        seen = [i for rank in range(world) for b in dm.val_dataloader((rank, world)) for i in b["index"].tolist()]
        assert sorted(seen) == sorted(dm.split.val.tolist()), world
    for world in (2, 3):
        left_out = []
        for epoch in (0, 1):
            loaders = [dm.train_dataloader((rank, world)) for rank in range(world)]
            for ld in loaders:
                ld.sampler.set_epoch(epoch)
            batches = [[b.tolist() for b, _ in ld.sampler] for ld in loaders]
            assert len({len(b) for b in batches}) == 1  # the same number of steps on every process
            seen = [i for bs in batches for b in bs for i in b]
            assert len(seen) == len(set(seen))
            left_out.append(set(range(len(dm.train_ds))) - set(seen))
        assert left_out[0] != left_out[1]


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch without torch.distributed")
def test_ddp_validation_loss_is_the_mean_over_every_validation_patch(tmp_path):
    """A real DDP run of 3 CPU processes: its last logged val_loss and MAE are those that the exported model's file
    records, computed in one process over all 26 validation patches. Before, the processes validated 24 (the
    sampler cut the fourth batch), and after that fix Lightning still divided by 24: it averages the processes'
    integer patch counts (26 / 3 -> 8) unless the batch size it is given is a float."""
    store = make_synthetic_store(tmp_path / "store", n_subjects=10, patches_per_subject=13)
    cfg = tiny(store.dir, tmp_path / "run", optim={"max_epochs": 2, "select": "last"},
               trainer={"accelerator": "cpu", "devices": 3, "strategy": "ddp"})
    (tmp_path / "c.yaml").write_text(json.dumps(cfg))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "TORCHELASTIC_", "LSB_", "JSM_"))
           and k not in ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "LOCAL_RANK")}
    proc = subprocess.run([sys.executable, "-m", "ctsma.cli.main", "train", "baseline", "--config",
                           str(tmp_path / "c.yaml")], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    meta = load_model(tmp_path / "run" / "student_baseline.safetensors")[1]
    assert meta["training"]["hardware"]["processes"] == 3 and meta["training"]["n_val_patches"] == 26
    last = pd.read_csv(tmp_path / "run" / "student_baseline" / "logs" / "metrics.csv").dropna(subset=["val_loss"])
    last = last.iloc[-1]
    assert last["val_loss"] == pytest.approx(meta["metrics"]["val_loss"], rel=1e-5)
    for p in PARAMETERS:
        assert last[f"val_mae_{p}"] == pytest.approx(meta["metrics"]["val_mae"][p], rel=1e-5)


@pytest.mark.parametrize("sets", [["optim=5", "optim.lr=0.1"], ["optim.lr=0.1", "optim.lr.x=1"]])
def test_a_set_below_a_value_set_before_is_one_line(store, tmp_path, capsys, sets):
    """--set optim=5 --set optim.lr=0.1 was a TypeError traceback."""
    from ctsma.cli.main import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  max_epochs: 1\n")
    args = [a for s in sets for a in ("--set", s)]
    assert main(["train", "baseline", "--config", str(cfg), "--store", str(store.dir), *args]) == 2
    assert "is set to" in capsys.readouterr().err and not (tmp_path / "ctsma_models").exists()


def test_precise_batchnorm_sets_the_statistics_of_the_current_weights(store):
    """After recalibration over every training patch in one batch, each BatchNorm's running mean and variance
    are exactly the (unbiased) statistics of its input over those patches, whatever stale values it held."""
    import torch

    from ctsma.dataset.loader import PatchDataset, make_loader
    from ctsma.models.lightning import PreciseBatchNorm

    idx = np.arange(len(store.table))
    ds = PatchDataset(store, idx, augment=False, target="mr", target_mean=np.zeros(4), target_sd=np.ones(4))
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(1, 3, 3, padding=1, bias=False)
    bn = torch.nn.BatchNorm3d(3)
    net = torch.nn.Sequential(conv, bn, torch.nn.ReLU(), torch.nn.Conv3d(3, 2, 1), torch.nn.BatchNorm3d(2))
    for m in (bn, net[4]):
        m.running_mean.fill_(7.0)
        m.running_var.fill_(0.01)
    net.eval()
    PreciseBatchNorm(ds, "ct", max_patches=len(ds), batch_size=len(ds)).recalibrate(net, torch.device("cpu"))
    assert not net.training and bn.momentum == 0.1          # the mode and the momentum are restored
    with torch.no_grad():
        h = conv(next(iter(make_loader(ds, len(ds), shuffle=False)))["ct"])
    mean = h.mean(dim=(0, 2, 3, 4))
    var = h.var(dim=(0, 2, 3, 4), unbiased=True)
    assert torch.allclose(bn.running_mean, mean, rtol=1e-4, atol=1e-5)
    assert torch.allclose(bn.running_var, var, rtol=1e-4, atol=1e-6)


def test_last_checkpoint_is_the_last_epoch_even_when_it_did_not_improve(store, tmp_path):
    """--resume restarts from the last finished epoch, not from the best one: with a validation loss that only
    gets worse, best.ckpt stays at the first epoch and last.ckpt follows every epoch."""
    import pytorch_lightning as pl
    import torch

    class Worse(pl.Callback):                 # the monitored value rises every epoch
        def on_validation_end(self, trainer, pl_module):      # runs before the checkpoint callbacks
            trainer.callback_metrics["val_loss"] = torch.tensor(float(trainer.current_epoch))

    for select in ("best", "last"):
        run = tmp_path / select
        cfg = load_train_config(tiny(store.dir, run, optim={"max_epochs": 3, "select": select}))
        model_file = train("baseline", cfg, callbacks=[Worse()])
        ck = run / "student_baseline" / "checkpoints"
        state = {w: torch.load(ck / f"{w}.ckpt", map_location="cpu", weights_only=True) for w in ("best", "last")}
        assert state["best"]["epoch"] == 0 and state["last"]["epoch"] == 2
        # optim.select picks the exported weights: the best validation epoch, or the last one
        weights, meta = load_model(model_file)
        for w in ("best", "last"):
            same = all(torch.equal(torch.as_tensor(weights[k]), state[w]["state_dict"][f"net.{k}"]) for k in weights)
            assert same == (w == select), (select, w)
        assert meta["metrics"]["exported"] == ("last epoch" if select == "last" else "best validation epoch")


def test_a_run_folder_moved_before_resume_keeps_its_best_epoch(store, tmp_path):
    """A run folder moved (or copied) between the interrupt and --resume: Lightning forgot the best validation score,
    so the first validation after the resume became the "best" (the wrong epoch exported with select: best), and it
    kept the best checkpoint's path in the old folder (a traceback once that folder is gone)."""
    import shutil

    import pytorch_lightning as pl
    import torch

    class Worse(pl.Callback):                 # the monitored value rises every epoch: epoch 0 stays the best
        def on_validation_end(self, trainer, pl_module):
            trainer.callback_metrics["val_loss"] = torch.tensor(float(trainer.current_epoch))

    class CtrlC(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            if trainer.current_epoch == 2:
                raise KeyboardInterrupt

    over = {"optim": {"max_epochs": 4, "select": "best"}}
    with pytest.raises(KeyboardInterrupt):
        train("baseline", load_train_config(tiny(store.dir, tmp_path / "a", **over)), callbacks=[Worse(), CtrlC()])
    best = torch.load(tmp_path / "a" / "student_baseline" / "checkpoints" / "best.ckpt", map_location="cpu",
                      weights_only=True)
    assert best["epoch"] == 0
    shutil.move(tmp_path / "a", tmp_path / "b")
    model_file = train("baseline", load_train_config(tiny(store.dir, tmp_path / "b", **over)), resume=True,
                       callbacks=[Worse()])
    weights, meta = load_model(model_file)
    assert all(torch.equal(torch.as_tensor(weights[k]), best["state_dict"][f"net.{k}"]) for k in weights)
    assert meta["metrics"]["exported"] == "best validation epoch"


def test_validating_every_n_epochs_exports_the_same_model(store, tmp_path):
    """optim.val_every only skips monitoring: the training steps never read the BatchNorm running statistics nor
    the validation, and the last epoch is always validated (precise BatchNorm recomputed from scratch), so with
    ``select: last`` and no early stopping (the shipped configs) the exported model is the every-epoch run's bit for
    bit. Skipped epochs log no validation figures."""
    import torch

    files = {}
    for every in (1, 2):
        run = tmp_path / f"every{every}"
        cfg = load_train_config(tiny(store.dir, run, optim={"val_every": every, "select": "last", "patience": 0}))
        files[every] = [train(w, cfg) for w in ("teacher", "student", "baseline")]  # the student reads its teacher
        for role in ("teacher", "student_distilled", "student_baseline"):
            ep = _epochs(run, role)
            assert [e["epoch"] for e in ep] == [1, 2, 3, 4, 5]
            validated = [e["epoch"] for e in ep if e["val_loss"] is not None]
            assert validated == ([1, 2, 3, 4, 5] if every == 1 else [2, 4, 5])
            assert all(all(v is None for v in e["val_mae"].values()) for e in ep if e["val_loss"] is None)
            log = pd.read_csv(run / role / "logs" / "metrics.csv").dropna(subset=["val_loss"])
            assert sorted(log["epoch"] + 1) == validated
            last = torch.load(run / role / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
            assert last["epoch"] == 4
    for f1, f2 in zip(files[1], files[2]):
        a, ma = load_model(f1)
        b, mb = load_model(f2)
        assert a.keys() == b.keys() and all(torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])) for k in a)
        assert ma["metrics"]["val_mae"] == mb["metrics"]["val_mae"]


@pytest.mark.parametrize("has_gpu,major,accelerator,precision,expected", [
    (False, 0, "cpu", "auto", "32-true"),
    (False, 0, "auto", "auto", "32-true"),
    (True, 8, "auto", "auto", "bf16-mixed"),   # Ampere (8.0)
    (True, 9, "gpu", "auto", "bf16-mixed"),    # Hopper
    (True, 7, "gpu", "auto", "16-mixed"),      # V100/T4 (7.x): bf16 only emulated, so fp16 with loss scaling
    (True, 9, "gpu", "32", "32-true"),
    (True, 9, "cpu", "auto", "32-true"),
    (True, 7, "gpu", "bf16-mixed", "bf16-mixed"),  # asked for explicitly
])
def test_precision_follows_the_hardware(monkeypatch, has_gpu, major, accelerator, precision, expected):
    import torch

    from ctsma.models.train import _precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: has_gpu)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda *a, **k: (major, 0))
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)  # as torch says on a V100 (emulated)
    cfg = load_train_config(None, {"trainer": {"accelerator": accelerator, "precision": precision}})
    assert _precision(cfg) == expected


def test_gpu_or_half_precision_without_a_gpu_is_a_clear_error(monkeypatch):
    import torch

    from ctsma.errors import ConfigError
    from ctsma.models.train import _precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ConfigError, match="no CUDA GPU"):
        _precision(load_train_config(None, {"trainer": {"accelerator": "gpu"}}))
    with pytest.raises(ConfigError, match="needs a GPU"):
        _precision(load_train_config(None, {"trainer": {"accelerator": "cpu", "precision": "16-mixed"}}))


def test_a_model_trained_on_a_test_patient_is_refused():
    from ctsma.evaluation.regression import check_held_out

    meta = {"training": {"split": {"train": ["P1", "P2"], "val": ["P3"], "test": ["P4"]}}}
    check_held_out("m.safetensors", meta, ["P4", "P5"])
    for seen in ("P2", "P3"):  # training and validation patients are both refused
        with pytest.raises(UserError, match="m.safetensors was trained on 1 of the test patients"):
            check_held_out("m.safetensors", meta, ["P4", seen])
    with pytest.warns(UserWarning, match="records no training patients"):  # another tool's file: cannot tell
        check_held_out("m.safetensors", {"training": {}}, ["P4"])


def test_a_teacher_that_learnt_from_the_test_patients_is_refused(trained, store, tmp_path):
    """distill.teacher naming another fold's teacher: the student learnt from the test patients through it, and
    neither train nor evaluate (whose run folder may not hold that teacher) said so."""
    from ctsma.errors import ModelFileError
    from ctsma.evaluation.regression import check_held_out

    _, run, _ = trained
    folds = {"k_folds": 3, "fold": 1}
    cfg = load_train_config(tiny(store.dir, tmp_path, data=folds,
                                 distill={"teacher": str(run / "teacher.safetensors")}))
    with pytest.raises(ModelFileError, match="teacher.safetensors was trained on .* of this run's test patients"):
        train("student", cfg)
    assert not any(tmp_path.iterdir())
    meta = load_model(run / "student_distilled.safetensors")[1]  # its teacher's patients are recorded
    teacher_meta = load_model(run / "teacher.safetensors")[1]
    learnt = sorted(teacher_meta["training"]["split"]["train"] + teacher_meta["training"]["split"]["val"])
    assert meta["training"]["teacher"]["learnt_from"] == learnt
    meta["training"]["split"] = {"train": ["P_other"], "val": []}  # the student's own split is clean: its teacher's is not
    with pytest.raises(UserError, match="distilled from a teacher trained on 1 of the test patients"):
        check_held_out("s.safetensors", meta, [learnt[0]])


def test_the_student_reads_the_teacher_of_its_own_output_name(store, tmp_path):
    """output.name=_v2 wrote teacher_v2.safetensors, but the student of the same settings looked for (and silently
    used, when an earlier run had left one) teacher.safetensors; an ablation still reads its base run's teacher."""
    from ctsma.models.config import variant
    from ctsma.models.train import teacher_path

    cfg = load_train_config(tiny(store.dir, tmp_path, output={"name": "_v2"}))
    assert teacher_path(cfg) == tmp_path / "teacher_v2.safetensors"
    base = load_train_config(tiny(store.dir, tmp_path))
    for c, teacher in ((base, "teacher.safetensors"), (cfg, "teacher_v2.safetensors")):
        ablation = {"name": "w3", "distill": {"weights": [3.0, 3.0, 3.0]}}
        v = variant(c, ablation)
        assert teacher_path(v) == tmp_path / teacher and v.output.name == "_w3"
        assert ablation == {"name": "w3", "distill": {"weights": [3.0, 3.0, 3.0]}}  # reported as written
    own = variant(base, {"name": "other", "distill": {"teacher": str(tmp_path / "x.safetensors")}})
    assert teacher_path(own) == tmp_path / "x.safetensors"


def test_demo_trainings_in_lanes_write_every_model(store, tmp_path):
    """The demo's lanes with real trainings: two folds' teacher, student and baseline, one worker process per fold
    (so each worker trains three models), every model file written and loadable, each student distilled from its
    own fold's teacher."""
    from ctsma.demo.stages import train_in_lanes
    from ctsma.modelfile import read_metadata

    cfgs = [load_train_config(tiny(store.dir, tmp_path / f"fold{f}", optim={"max_epochs": 1},
                                   data={"k_folds": 2, "fold": f, "use_stored_split": False})) for f in range(2)]
    order = train_in_lanes(cfgs, 2)
    assert sorted(order) == sorted((f, w) for f in range(2) for w in ("teacher", "student", "baseline"))
    for f in range(2):
        for name in ("teacher", "student_distilled", "student_baseline"):
            assert (tmp_path / f"fold{f}" / f"{name}.safetensors").is_file()
        load_student(tmp_path / f"fold{f}" / "student_distilled.safetensors")
        teacher = tmp_path / f"fold{f}" / "teacher.safetensors"
        used = read_metadata(tmp_path / f"fold{f}" / "student_distilled.safetensors")["training"]["teacher"]
        assert used["file"] == str(teacher) and used["sha256"] == read_metadata(teacher)["_sha256"]


def test_an_ablation_named_as_the_run_is_refused_before_it_replaces_the_runs_student(store, tmp_path):
    """variant() names an ablation's files _<name>: with output.name _w3, an ablation 'w3' trained into
    student_distilled_w3 (deleting the run's checkpoints) and overwrote the run's own distilled student."""
    from ctsma.evaluation.regression import evaluate

    ablation = {"name": "w3", "distill": {"weights": [3.0, 3.0, 3.0]}}
    cfg = load_train_config(tiny(store.dir, tmp_path / "run", output={"name": "_w3"},
                                 evaluate={"ablations": [ablation]}))
    (tmp_path / "run").mkdir()
    own = tmp_path / "run" / "student_distilled_w3.safetensors"
    own.write_bytes(b"the run's own student")
    with pytest.raises(ConfigError, match="ablations: the name 'w3' is this run's output.name"):
        evaluate(cfg, tmp_path / "eval")
    assert own.read_bytes() == b"the run's own student" and not (tmp_path / "eval").exists()


@pytest.mark.parametrize("ablation,match", [
    ({"name": "a", "distill": 5}, r"ablations\[0\] \(a\): distill must be a mapping"),
    ({"name": "a", "distill": {"stagez": ["stage3"]}}, r"ablations\[0\] \(a\): unknown setting distill.stagez"),
    ({"name": "a", "distill": {"stages": ["stage3"]}}, r"ablations\[0\] \(a\): distill.weights needs one weight"),
])
def test_an_ablations_overrides_are_checked_when_the_config_is_loaded(store, tmp_path, ablation, match):
    """An ablation's overrides were checked only when evaluate came to train it, after scoring every other model;
    a distill or optim that was no mapping was an AttributeError traceback."""
    with pytest.raises(ConfigError, match=match):
        load_train_config(tiny(store.dir, tmp_path, evaluate={"ablations": [ablation]}))


def test_a_rerun_of_evaluate_reuses_the_ablations_whose_run_is_unchanged(trained, tmp_path, capsys):
    """Each run of evaluate trained every ablation again. A rerun now reuses an ablation's model file when it records
    the same run (settings, split, teacher: the record that --resume checks) and says so; an ablation whose
    definition changed, or all of them after the teacher changed, are trained again, with the change named."""
    import shutil

    from ctsma.evaluation.regression import evaluate

    cfg0, run0, _ = trained
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(run0 / "teacher.safetensors", run)
    ablations = [{"name": "w3", "distill": {"weights": [3.0, 3.0, 3.0]}},
                 {"name": "s3", "distill": {"stages": ["stage3"], "weights": [1.0]}}]
    files = {n: run / f"student_distilled_{n}.safetensors" for n in ("w3", "s3")}

    def evaluated():
        cfg = load_train_config(tiny(cfg0.data.store, run, optim={"max_epochs": 2},
                                     evaluate={"ablations": ablations, "plots": False}))
        capsys.readouterr()
        return evaluate(cfg, tmp_path / "eval")["ablations"], capsys.readouterr().err

    def stamps():  # a model file trained again is a new file (written under a temporary name, renamed into place)
        return {n: (f.stat().st_ino, f.stat().st_mtime_ns) for n, f in files.items()}

    first, err = evaluated()
    assert "reused" not in err
    timing = json.loads((tmp_path / "eval" / "metrics.json").read_text())["timing"]  # a run of teacher alone: no gain
    assert list(timing) == ["prediction", "ct_direct", "agreement", "ablations", "writing", "total"]
    assert timing["ablations"] <= timing["total"]
    assert {n: (a["model"], a["reused"]) for n, a in first.items()} == {n: (str(f), False) for n, f in files.items()}
    before = stamps()
    again, err = evaluated()
    assert all(again[n].pop("reused") and not first[n].pop("reused") for n in files)  # metrics.json says so
    assert stamps() == before and again == first
    assert all(f"student_distilled_{n}: reused {files[n]}" in err for n in files), err
    ablations[0]["distill"]["weights"] = [2.0, 2.0, 2.0]  # w3's own definition changes: only w3 is trained again
    _, err = evaluated()
    now = stamps()
    assert now["w3"] != before["w3"] and now["s3"] == before["s3"]
    assert "student_distilled_w3: trained again (distill.weights [3.0, 3.0, 3.0] -> [2.0, 2.0, 2.0])" in err, err
    tensors, meta = load_model(run / "teacher.safetensors")  # a retrained teacher: every ablation is trained again
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name] + 1e-3
    save_model(run / "teacher.safetensors", tensors, {k: v for k, v in meta.items() if not k.startswith("_")},
               kind="teacher")
    _, err = evaluated()
    assert all(stamps()[n] != now[n] for n in files)
    assert err.count("trained again (the teacher (its file changed: retrained or replaced))") == 2, err
    now = stamps()
    tensors, meta = load_model(files["w3"])  # a file of an earlier version records no run: trained again
    del meta["training"]["run"]
    save_model(files["w3"], tensors, {k: v for k, v in meta.items() if not k.startswith("_")}, kind="student")
    ckpt = run / "student_distilled_w3" / "checkpoints" / "last.ckpt"
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    del saved["ctsma_run"]["store"]  # and its checkpoint's record, that of the previous version: not resumed
    torch.save(saved, ckpt)
    older = stamps()
    _, err = evaluated()
    assert stamps()["w3"] != older["w3"] and stamps()["s3"] == now["s3"]
    assert "student_distilled_s3: reused" in err and "student_distilled_w3: reused" not in err
    assert "student_distilled_w3: trained again (its file records no run: written by an earlier CT-SMA)" in err, err


def test_crossfit_predicts_every_patient_with_the_models_that_held_it_out(store, tmp_path, capsys):
    """`ctsma crossfit` runs the demo's cross-fitting on a store of one's own (it took a loop of nine trainings and
    three evaluations, and gluing their predictions, or a benchmark script): every patch of every patient is
    predicted once, by its fold's models, which never saw that patient; a rerun keeps the nine models."""
    import pandas as pd

    from ctsma.cli.main import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(store.dir, tmp_path / "unused", optim={"max_epochs": 2})))
    out = tmp_path / "cv"
    argv = ["crossfit", "--config", str(config), "--store", str(store.dir), "--out", str(out), "--folds", "3",
            "--workers", "1"]
    assert main(argv) == 0
    pred = pd.read_csv(out / "evaluation" / "regression_predictions.csv")
    assert len(pred) == len(store.table) and sorted(pred["index"]) == list(range(len(store.table)))
    held = {}
    for f in range(3):
        for role in ("teacher", "student_distilled", "student_baseline"):
            _, meta = load_model(out / "training" / f"fold{f}" / f"{role}.safetensors")
            seen = set(meta["training"]["split"]["train"]) | set(meta["training"]["split"]["val"])
            held.setdefault(f, set(meta["training"]["split"]["test"]))
            assert not seen & held[f] and held[f] == set(meta["training"]["split"]["test"])
    assert sorted(s for f in held for s in held[f]) == sorted(store.subjects)  # each patient held out once
    metrics = json.loads((out / "evaluation" / "metrics.json").read_text())
    assert set(metrics["regression"]) >= {"teacher", "student_distilled", "student_baseline", "ct_direct"}
    assert "ci" in metrics["distillation_gain"] and (out / "config.yaml").is_file()
    capsys.readouterr()
    assert main(argv) == 0  # a rerun keeps the nine models and gives the same predictions
    assert capsys.readouterr().err.count(": reused ") == 9
    assert pd.read_csv(out / "evaluation" / "regression_predictions.csv").equals(pred)
    (out / ".DS_Store").write_text("")  # a file browser's: not a foreign output
    assert main(argv[:-4] + ["--folds", "2", "--workers", "1"]) == 0  # fewer folds: the third fold's models go
    assert sorted(p.name for p in (out / "training").iterdir()) == ["fold0", "fold1"]


def test_crossfit_refuses_more_folds_than_patients_and_a_foreign_out_folder(store, tmp_path, capsys):
    from ctsma.cli.main import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(store.dir, tmp_path / "unused", optim={"max_epochs": 2})))
    base = ["crossfit", "--config", str(config), "--store", str(store.dir)]
    assert main(base + ["--out", str(tmp_path / "a"), "--folds", "11"]) == 2
    assert "more than the 10 patients" in capsys.readouterr().err and not (tmp_path / "a").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("my notes")
    assert main(base + ["--out", str(tmp_path / "mine")]) == 2
    assert "holds notes.txt" in capsys.readouterr().err and sorted(p.name for p in (tmp_path / "mine").iterdir()) \
        == ["notes.txt"]
    assert main(base + ["--out", str(tmp_path / "b"), "--folds", "1"]) == 2
    assert "--folds must be 2 to 20" in capsys.readouterr().err
    assert main(base + ["--out", str(tmp_path / "b"), "--seed", "-1"]) == 2
    assert "--seed must be 0 to" in capsys.readouterr().err
    assert main(["crossfit", "--config", "dmeo", "--store", str(store.dir), "--out", str(tmp_path / "b")]) == 2
    assert "config file not found: dmeo (or name a shipped config: demo, gpu)" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_a_shipped_training_config_is_named_by_its_name(tmp_path, capsys):
    """`--config demo` was 'config file not found: demo' in train, evaluate and crossfit, although the demo takes
    the name: a user had to find Resources/Configs/demo.yaml in the installed package (whose relative output.dir
    then put the run folder there)."""
    from ctsma.cli.main import main
    from ctsma.models.config import SHIPPED_TRAIN_CONFIGS
    from ctsma.resources import resource_path

    from dataclasses import replace

    from ctsma.models.config import resolve

    for name in SHIPPED_TRAIN_CONFIGS:
        path = resource_path("Configs", f"{name}.yaml")
        named = load_train_config(name)
        assert replace(named, base_dir="") == replace(load_train_config(path), base_dir="")
        # relative paths (output.dir: ctsma_models) from the current folder, not inside the installed package
        assert resolve(named, named.output.dir) == Path.cwd() / named.output.dir
    assert load_train_config("gpu").student_net.widths != load_train_config("demo").student_net.widths
    assert main(["train", "baseline", "--config", "demo", "--out", str(tmp_path / "run")]) == 2
    assert "data.store is empty" in capsys.readouterr().err  # the config was found; the store was not given


def test_a_file_or_folder_in_the_way_of_the_run_is_refused_before_training(store, tmp_path, capsys):
    """A file named as the role's run folder (``<out>/teacher``) was shutil.rmtree's NotADirectoryError traceback;
    a folder named as the model file was refused only after the whole training."""
    from ctsma.cli.main import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(store.dir, tmp_path / "run", optim={"max_epochs": 1})))
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "teacher").write_text("my notes")
    assert main(["train", "teacher", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "teacher is a file, not a folder" in err and "Traceback" not in err
    assert (tmp_path / "run" / "teacher").read_text() == "my notes"
    (tmp_path / "run" / "student_baseline.safetensors").mkdir()
    assert main(["train", "baseline", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "student_baseline.safetensors: a folder of that name is in the way" in err
    assert not (tmp_path / "run" / "student_baseline").exists()  # refused before the training wrote anything


def test_a_model_that_predicts_one_value_is_named_in_words(store):
    """A training that collapsed (e.g. optim.lr 1: every ReLU dead) predicts one value for every patch; the only sign
    of it was numpy's 'invalid value encountered in divide', twice, from the validation r."""
    import warnings
    from types import SimpleNamespace

    from ctsma.models.lightning import PatchDataModule
    from ctsma.models.train import validation_metrics

    dm = PatchDataModule(store, load_train_config(tiny(store.dir, "unused")).data, 0)
    flat = SimpleNamespace(net=lambda x: torch.zeros(len(x), 4), modality="ct", role="student_baseline")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = validation_metrics(flat, dm)
    said = [str(w.message) for w in caught]
    assert not [s for s in said if "invalid value" in s], said
    assert [s for s in said if "student_baseline: the model predicts the same BV/TV, Tb.Th, Tb.Sp, Tb.N for every "
            "validation patch" in s], said
    assert metrics["val_r"] == dict.fromkeys(PARAMETERS) and np.isfinite(list(metrics["val_mae"].values())).all()


@pytest.mark.parametrize("setting,hint", [("data.k_folds=5", "--folds"), ("data.fold=1", "--folds"),
                                          ("data.use_stored_split=true", "--folds"), ("trainer.seed=3", "--seed"),
                                          ("data.split_seed=3", "--seed"), ("data={k_folds: 5}", "--folds"),
                                          ("output.dir=elsewhere", "--out"), ("data.store=other", "--store")])
def test_crossfit_refuses_a_set_that_each_fold_would_replace(store, tmp_path, capsys, setting, hint):
    """`ctsma crossfit --set data.k_folds=5` trained 3 folds (--folds' default), and `--set trainer.seed=3` seed 0,
    silently, while cv/config.yaml recorded the value given."""
    from ctsma.cli.main import main

    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(store.dir, tmp_path / "unused", optim={"max_epochs": 1})))
    out = tmp_path / "cv"
    assert main(["crossfit", "--config", str(config), "--store", str(store.dir), "--out", str(out),
                 "--set", setting]) == 2
    err = capsys.readouterr().err
    assert f"--set {setting.split('=')[0].split('{')[0]}" in err and "'ctsma crossfit' sets it" in err and hint in err
    assert not out.exists()


def test_an_output_name_in_the_way_is_refused_before_evaluating_or_training(trained, store, tmp_path, capsys):
    """A folder named as one of evaluate's files (plots/scatter.png) was refused only after the predictions (and
    the ablations' training), with metrics.json already replaced; in crossfit after every fold's training, and a file
    named `evaluation` was a FileExistsError traceback there."""
    from ctsma.cli.main import main
    from ctsma.evaluation.regression import evaluate

    cfg, run, _ = trained
    out = tmp_path / "eval"
    (out / "plots" / "scatter.png").mkdir(parents=True)
    with pytest.raises(UserError, match="scatter.png: a folder of that name is in the way"):
        evaluate(cfg, out)
    assert sorted(p.name for p in out.rglob("*")) == ["plots", "scatter.png"]  # nothing written
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(tiny(store.dir, tmp_path / "unused", optim={"max_epochs": 1})))
    cv = tmp_path / "cv"
    cv.mkdir()
    (cv / "evaluation").write_text("not a folder")
    assert main(["crossfit", "--config", str(config), "--store", str(store.dir), "--out", str(cv)]) == 2
    err = capsys.readouterr().err
    assert "evaluation is a file, not a folder" in err and "Traceback" not in err
    assert sorted(p.name for p in cv.iterdir()) == ["evaluation"]  # refused before any training


@pytest.mark.parametrize("setting", ["data=5", "output=dir", "trainer=seed"])
def test_crossfit_set_of_a_whole_section_is_a_config_error(tmp_path, capsys, setting):
    """`--set data=5` (a section given a value) is the config's one-line 'must be a mapping'; the check of the settings
    that crossfit sets looked a key up in the value itself: a TypeError traceback for a number, and for a text
    ('output=dir', 'trainer=seed') a substring match that blamed '--set output.dir'."""
    from ctsma.cli.main import main

    rc = main(["crossfit", "--config", "demo", "--store", str(tmp_path / "none"), "--out", str(tmp_path / "cv"),
               "--set", setting])
    err = capsys.readouterr().err
    assert rc == 2 and "must be a mapping" in err and "sets it for every fold" not in err, err
    assert not (tmp_path / "cv").exists()


def test_folds_train_side_by_side_wherever_lightning_trains_on_the_cpu(monkeypatch):
    """gpu.yaml's accelerator 'auto' on a CPU-only machine trained the folds one after the other, while the docs
    said that on a CPU they train side by side (as demo.yaml's 'cpu' does)."""
    from ctsma.demo import stages

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    if getattr(torch.backends, "mps", None) is not None:
        monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert stages._on_cpu("cpu") and stages._on_cpu("auto") and not stages._on_cpu("gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert stages._on_cpu("cpu") and not stages._on_cpu("auto")

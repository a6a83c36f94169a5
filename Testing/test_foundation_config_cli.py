"""Foundation: typed configs, safe model files and the command-line contract."""

import subprocess
import sys
from dataclasses import dataclass, field

import pytest
import torch
from hypothesis import given, settings, strategies as st

from ctsma import __version__
from ctsma.cli.main import SUBCOMMANDS, main
from ctsma.config import load_config, setting
from ctsma.errors import ConfigError, ModelFileError, UserError
from ctsma.modelfile import load_model, read_metadata, save_model


@dataclass
class Optim:
    lr: float = setting(1e-3, lo=1e-7, hi=1.0)


@dataclass
class Train:
    epochs: int = setting(10, lo=1, hi=1000)
    loss: str = setting("l1", choices=("l1", "mse"))
    amp: bool = setting(False)
    stages: list[int] = setting([1, 2])
    flips: int = setting(4, choices=(1, 4, 8))
    optim: Optim = field(default_factory=Optim)


def test_config_defaults_and_nested(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 5\noptim:\n  lr: 0.01\nstages: [3]\n")
    cfg = load_config(p, Train)
    assert (cfg.epochs, cfg.optim.lr, cfg.stages, cfg.loss) == (5, 0.01, [3], "l1")
    assert load_config(None, Train).epochs == 10



def test_config_reads_numbers_in_exponent_notation(tmp_path):
    """PyYAML (YAML 1.1) reads `lr: 1e-3`, without a dot, as the text '1e-3': it was refused as 'optim.lr must be a
    number, not '1e-3'', in a config file and in `--set optim.lr=1e-4` alike."""
    from types import SimpleNamespace

    from ctsma.cli.train import overrides_from

    p = tmp_path / "c.yaml"
    p.write_text("epochs: 2E2\noptim:\n  lr: 1e-3\n")
    cfg = load_config(p, Train)
    assert (cfg.epochs, cfg.optim.lr) == (200, 1e-3) and type(cfg.epochs) is int
    over = overrides_from(SimpleNamespace(set=["optim.lr=5e-4", "epochs=+1.5e1"]))
    cfg = load_config(None, Train, overrides=over)
    assert (cfg.epochs, cfg.optim.lr) == (15, 5e-4)
    with pytest.raises(ConfigError, match="whole number"):
        load_config({"epochs": "1.5e0"}, Train)
    with pytest.raises(ConfigError, match="out of range"):
        load_config({"optim": {"lr": "1e3"}}, Train)
    with pytest.raises(ConfigError, match="must be a number, not 'e3'"):
        load_config({"epochs": "e3"}, Train)


@pytest.mark.parametrize("data,match", [
    ({"epoch": 3}, "unknown setting epoch"),
    ({"optim": {"learning_rate": 1}}, "unknown setting optim.learning_rate"),
    ({"epochs": 0}, "epochs = 0 is out of range"),
    ({"epochs": 2.5}, "whole number"),
    ({"epochs": "ten"}, "must be a number"),
    ({"loss": "huber"}, "not one of l1, mse"),
    ({"amp": "yes"}, "true or false"),
    ({"optim": {"lr": float("nan")}}, "finite"),
    ({"epochs": float("inf")}, "finite"),
    ({"stages": 3}, "must be a list"),
    ({"flips": 2}, "flips = 2 is not one of 1, 4, 8"),
])
def test_config_refuses_bad_values_naming_the_key(data, match):
    with pytest.raises(ConfigError, match=match):
        load_config(data, Train)


def test_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml", Train)
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="cannot parse"):
        load_config(bad, Train)
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(lst, Train)


@settings(max_examples=150, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
                    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=4),
                    max_leaves=10))
def test_config_loader_fuzz_only_raises_config_errors(data):
    try:
        cfg = load_config({"optim": data} if isinstance(data, dict) else {"epochs": data}, Train)
    except ConfigError:
        return
    assert 1 <= cfg.epochs <= 1000 and 1e-7 <= cfg.optim.lr <= 1.0


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=0, max_size=600), st.sampled_from([".nii", ".nii.gz", ".nrrd", ".mha"]))
def test_image_reader_fuzz_only_raises_user_errors(tmp_path_factory, blob, suffix):
    from ctsma.io import read_image
    p = tmp_path_factory.mktemp("fuzz") / f"f{suffix}"
    p.write_bytes(blob)
    try:
        read_image(p)
    except UserError:
        pass


def test_model_file_round_trip_and_rejections(tmp_path):
    p = tmp_path / "m.safetensors"
    w = {"conv.weight": torch.randn(2, 3), "bias": torch.zeros(2)}
    save_model(p, w, {"architecture": {"width": 8}, "units": {"Tb.Th": "mm"}}, kind="student")
    tensors, meta = load_model(p, kind="student")
    assert torch.equal(tensors["conv.weight"], w["conv.weight"])
    assert meta["architecture"] == {"width": 8} and meta["kind"] == "student"
    assert read_metadata(p)["units"] == {"Tb.Th": "mm"}
    with pytest.raises(ModelFileError, match="'teacher' model is needed"):
        load_model(p, kind="teacher")
    # tamper with one weight byte: the checksum must catch it
    data = bytearray(p.read_bytes())
    data[-3] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ModelFileError, match="checksum"):
        load_model(p)
    # a pickled torch checkpoint is not accepted (and never unpickled)
    q = tmp_path / "pickle.safetensors"
    torch.save({"w": torch.zeros(1)}, q)
    with pytest.raises(ModelFileError, match="not a CT-SMA model file"):
        load_model(q)
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "none.safetensors")


def test_a_run_folder_given_as_the_model_file_names_its_model_files(tmp_path):
    """'ctsma evaluate --models RUN' takes the training run's folder; the same folder given to 'ctsma infer --model'
    was 'model file not found: RUN', a folder that is there. The message now says it is a folder and names its model
    files of the kind needed."""
    run = tmp_path / "run"
    run.mkdir()
    for role, kind in (("teacher", "teacher"), ("student_distilled", "student"), ("student_baseline", "student")):
        save_model(run / f"{role}.safetensors", {"w": torch.zeros(1)}, {}, kind=kind)
    (run / "notes.safetensors").write_bytes(b"not a model")
    with pytest.raises(ModelFileError) as err:
        load_model(run, kind="student")
    assert str(err.value) == (f"{run} is a folder, not a model file: give one of its 'student' model files: "
                              f"{run / 'student_baseline.safetensors'}, {run / 'student_distilled.safetensors'}")
    with pytest.raises(ModelFileError, match=r"is a folder, not a model file: it holds no 'diagnosis' model file$"):
        load_model(run, kind="diagnosis")


def test_cli_version_and_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and __version__ in capsys.readouterr().out
    assert main([]) == 0


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_every_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert "usage: ctsma " + name in capsys.readouterr().out


def test_global_options_work_after_the_command(tmp_path, capsys):
    from ctsma.cli.main import hoist_global_options

    assert hoist_global_options(["infer", "ct.nii", "--debug", "--progress-jsonl", "p.jsonl", "--out", "o"]) == \
        ["--debug", "--progress-jsonl", "p.jsonl", "infer", "ct.nii", "--out", "o"]
    assert hoist_global_options(["dataset", "build", "--progress-jsonl=p", "--quiet", "--", "--debug"]) == \
        ["--progress-jsonl=p", "--quiet", "dataset", "build", "--", "--debug"]
    # a user mistake with --debug after the command: the traceback instead of the one-line error
    log = tmp_path / "events.jsonl"
    from ctsma.errors import InputImageError
    with pytest.raises(InputImageError, match="not found"):
        main(["morphometry", str(tmp_path / "none.nii.gz"), "--out", str(tmp_path / "o"), "--debug"])
    assert main(["morphometry", str(tmp_path / "none.nii.gz"), "--out", str(tmp_path / "o"),
                 "--progress-jsonl", str(log)]) == 2
    assert "not found" in capsys.readouterr().err and log.is_file()


def test_installed_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "ctsma.cli.main", "--version"], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == f"ctsma {__version__}"


def test_a_failed_command_removes_the_output_folders_it_created(tmp_path, capsys):
    from pathlib import Path

    config = Path(__file__).resolve().parents[1] / "Resources" / "Configs" / "demo.yaml"
    argv = ["--quiet", "evaluate", "--config", str(config), "--store", str(tmp_path / "no_store"), "--out"]
    assert main([*argv, str(tmp_path / "new" / "deeper" / "out")]) == 2  # fails after creating the folders
    assert "patch store folder not found" in capsys.readouterr().err
    assert not (tmp_path / "new").exists()
    kept = tmp_path / "kept"  # a folder that existed before the run is the user's: it stays, and so does its content
    (kept / "sub").mkdir(parents=True)
    assert main([*argv, str(kept)]) == 2
    assert (kept / "sub").is_dir()


def test_config_key_lists_name_what_a_config_file_may_hold(tmp_path, capsys):
    """An unknown key's list of allowed keys is the config file's: not rewritten as flags (--threads), and without
    the phantom's preset, which only --preset sets."""
    from ctsma.cli.main import main
    from ctsma.cli.options import named_as_options
    from ctsma.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        with named_as_options({"threads": "--threads"}):
            raise ConfigError("threads = 0 is out of range; unknown setting bogus (allowed: seed, threads)")
    assert str(info.value) == "--threads 0 is out of range; unknown setting bogus (allowed: seed, threads)"
    (tmp_path / "bad.json").write_text('{"bogus": 1}')
    assert main(["phantom", "--n", "1", "--config", str(tmp_path / "bad.json"), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "unknown setting bogus (allowed: bvtv," in err and "preset" not in err


def test_sigterm_caught_and_rethrown_by_a_library_still_exits_143(monkeypatch, capsys):
    """Lightning turns the signal's exception into a plain KeyboardInterrupt of its own: main() still reports a
    SIGTERM (exit 143), not a Ctrl-C, and restores the previous handler."""
    import os
    import signal

    import ctsma.cli.phantom as phantom_cli
    from ctsma.cli.main import Terminated, main

    def swallowing(args):
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            signal.pause() if hasattr(signal, "pause") else None
        except Terminated:
            raise KeyboardInterrupt from None
    before = signal.getsignal(signal.SIGTERM)
    monkeypatch.setattr(phantom_cli, "_run", swallowing)
    assert main(["phantom", "--n", "1", "--out", "unused"]) == 143
    assert "terminated (SIGTERM)" in capsys.readouterr().err and signal.getsignal(signal.SIGTERM) is before

"""The demo's patient-level cross-fitting on any patch store (``ctsma crossfit``): its training and evaluation stages,
with the run folder's layout that the CLI documents."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from .. import progress
from ..errors import UserError
from . import stages
from .settings import DemoSettings

RUN_ENTRIES = ("config.yaml", "training", "evaluation")  # what a crossfit run folder holds


def check_run_folder(out: Path) -> None:
    """Refuse an ``out`` that holds files no crossfit run wrote (hidden files, such as a file browser's, aside)."""
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in RUN_ENTRIES and not p.name.startswith("."))
        if foreign:
            raise UserError(f"--out {out} holds {', '.join(foreign[:3])}, which no 'ctsma crossfit' run wrote: "
                            "choose an empty or new folder")


def crossfit(cfg, store_dir: Path, out_dir: Path, *, folds: int = 3, seed: int = 0, workers: int = 2) -> dict:
    """Train fold ``f``'s teacher, distilled and baseline students on the other folds' patients of the store, then
    evaluate every patient with its fold's models; ``cfg``: a loaded training config (its ``trainer.seed`` gives way
    to ``seed``, as in the demo). Writes ``out_dir/config.yaml``, ``training/fold<f>/`` and ``evaluation/``; returns
    the evaluation stage's summary (mean ICC(2,1) per source, the distillation gain and its CI)."""
    import yaml

    from ..config import to_dict
    from ..dataset.store import PatchStore
    from ..evaluation.regression import check_outputs
    from ..io import ensure_writable_dir, write_text

    store_dir = Path(store_dir).resolve()
    patients = len(PatchStore(store_dir).subjects)
    if folds > patients:
        raise UserError(f"--folds {folds} is more than the {patients} patients of the store: each fold holds out at "
                        "least one patient")
    if cfg.evaluate.ablations:
        warnings.warn("the config's evaluate.ablations are not run by 'ctsma crossfit' (it evaluates the teacher and "
                      "both students); run 'ctsma evaluate' on a fold's models for them", stacklevel=2)
    check_run_folder(Path(out_dir))
    check_outputs(Path(out_dir), under="evaluation")
    out = ensure_writable_dir(out_dir).resolve()
    config = out / "config.yaml"  # the settings as loaded; relative paths still resolve against the given config
    write_text(config, yaml.safe_dump(to_dict(cfg), sort_keys=False))
    ctx = stages.Context(out, DemoSettings(folds=folds, seed=seed, workers=workers, train_config=str(config)),
                         store=store_dir)
    progress.info(f"training teacher, distilled and baseline students of {folds} patient folds ({patients} "
                  "patients; models kept from an earlier run of the same settings are reused)")
    stages.training(ctx, out / "training")
    for stale in (out / "training").glob("fold*"):  # an earlier run's folds beyond this run's
        if stale.is_dir() and stale.name[4:].isdigit() and int(stale.name[4:]) >= folds:
            shutil.rmtree(stale)
    progress.info("evaluating every patient with the models of the fold that held it out")
    (out / "evaluation").mkdir(exist_ok=True)
    return stages.evaluation(ctx, out / "evaluation")

"""Training launcher of the CTSMA module (mixed into :class:`CTSMALib.analysis_logic.CTSMALogic`).

Starts ``ctsma train`` as a separate process, with Slicer's Python, a user-configured Python or a
cluster/remote command template (see :mod:`CTSMALib.training`); a cohort manifest is first turned
into a patch store with ``ctsma dataset build``. Live epochs and losses come from the training's
own log ``RUN/<role>/progress.jsonl``. **Stop** cancels the local process; for a cluster job it
stops following the job, which must then be cancelled on the cluster (the launcher does not know
the job's ID). When the training ends, :meth:`TrainingMixin.trainedModel` gives the model file
that the Analysis can use.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

from . import cli_args
from .logic_base import Run
from .parameters import AnalysisParameters
from .process import CANCELLED, DONE, FAILED, RUNNING, RunStatus
from .training import (CT_MODEL_KINDS, ROLE_OF_KIND, TrainingLog, check_training_manifest, data_kind,
                       find_run_dir, wrap_command)


class TrainingMixin:
    """Training methods of the CTSMA Logic (needs :class:`CTSMALib.logic_base.CliLogic`)."""

    def startTraining(self, kind: str, configPath: Path, outDir: Path, params: AnalysisParameters | None = None,
                      data: Path | None = None, python: str = "", clusterTemplate: str = "") -> Run:
        """Train ``kind`` (student, teacher, baseline) with ``configPath`` into ``outDir``.

        ``data``: a patch-store folder (``--store``) or a cohort manifest .csv (a patch store is
        built first in ``outDir/store``); None uses the config's ``data.store``. ``python``: the
        interpreter to use ('' = Slicer's). ``clusterTemplate``: e.g. ``sbatch --wrap "{cmd}"``.
        """
        from ctsma.errors import ConfigError, UserError

        from .settings import check_cluster_template

        params = params or AnalysisParameters()
        if not Path(configPath).is_file():
            raise ConfigError(f"training configuration not found: {configPath}")
        if kind not in cli_args.TRAINING_KINDS:
            raise ConfigError(f"training kind must be one of {', '.join(cli_args.TRAINING_KINDS)}")
        if python and not (Path(python).is_file() and os.access(python, os.X_OK)):
            raise ConfigError(f"the training Python '{python}' is not an executable file")
        wrapper = None
        if clusterTemplate:
            check_cluster_template(clusterTemplate)
            wrapper = lambda cmd: wrap_command(clusterTemplate, cmd)  # noqa: E731
        kindOfData = data_kind(data) if data else None
        if kindOfData == "manifest" and clusterTemplate:
            raise UserError("with a cluster command, give a patch store: build it first on the cluster with "
                            "'ctsma dataset build --manifest M --out STORE'")
        if kindOfData == "manifest":
            check_training_manifest(data)
        outDir = Path(outDir)
        self._checkIdle()
        try:
            outDir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # a file in the way, no permission: the user's choice of folder
            raise UserError(f"cannot create the training output folder {outDir}: {exc.strerror or exc}") from None
        role = ROLE_OF_KIND[kind]
        info = {"kind": kind, "since": time.time(), "remote": bool(clusterTemplate),
                "offsets": {str(p): p.stat().st_size for p in outDir.glob(f"{role}*/progress.jsonl")}}
        common = {"env": params.env(), "python": python or None, "wrapper": wrapper}

        def train_step(store: Path | None, previous: Run | None = None) -> Run:
            if previous is not None:  # the dataset step's outputs live in outDir/store
                shutil.rmtree(previous.work_dir, ignore_errors=True)
            args = cli_args.train(kind, Path(configPath).resolve(), outDir.resolve(), store)
            run = self.startCli("training", args, self.newWorkDir("train"), outDir, loader=None, **common)
            run.info.update(info)
            return run

        if kindOfData == "manifest":
            store = outDir / "store"
            run = self.startCli("training dataset", cli_args.dataset_build(Path(data).resolve(), store.resolve()),
                                self.newWorkDir("dataset"), store, loader=None,
                                then=lambda r: train_step(store, r), **common)
            run.info.update(info)
            return run
        return train_step(Path(data) if data else None)

    # -- following -----------------------------------------------------------------------------
    def trainingProgress(self):
        """Epochs and losses of the current training so far (None before its log appears)."""
        run = self.run
        if run is None or run.label != "training" or "kind" not in run.info:
            return None
        log = run.info.get("log")
        if log is None:
            run_dir = find_run_dir(run.out_dir, run.info["kind"], since=run.info["since"] - 1.0)
            if run_dir is None:
                return None
            log = run.info["log"] = TrainingLog(run_dir)
            log._offset = run.info["offsets"].get(str(log.path), 0)  # a rerun appends to an old log
        return log.read()

    def poll(self) -> RunStatus | None:
        status = super().poll()
        run = self.run
        if status is None or run is None or run.label != "training" or run.info.get("stopped"):
            return status
        progress = self.trainingProgress()
        if progress is not None:
            status.stage = f"training {progress.role or run.info['kind']}"
            status.message = progress.message()
            if progress.fraction is not None:
                status.fraction = progress.fraction
        if not run.info.get("remote") and status.state == DONE and progress is None:
            # the process ended well but never trained (a 'Python' that is not one, a wrapper that did nothing)
            status.state = FAILED
            status.last_error = ("the training process ended without writing a training log: check the training "
                                 "Python in the module's settings")
            run.status = status
            return status
        if run.info.get("remote") and status.state == DONE and not (progress and progress.ended):
            # the submission returned; the job goes on elsewhere: keep following its log
            status.state = RUNNING
            status.message = status.message or "submitted; waiting for the job to start"
            run.status = None
        return status

    def cancel(self) -> RunStatus | None:
        run = self.run
        if (run is not None and run.label == "training" and run.info.get("remote")
                and not run.runner.is_running() and (run.status is None or not run.status.finished)):
            run.info["stopped"] = True
            run.status = RunStatus(state=CANCELLED, stage="training",
                                   message="stopped following the cluster job: cancel the job itself on the "
                                           "cluster (for example with scancel)")
            return run.status
        return super().cancel()

    def trainedModel(self) -> Path | None:
        """The CT model file of a finished student/baseline training (selectable in the Analysis)."""
        run = self.run
        progress = self.trainingProgress()
        if (run is None or progress is None or not progress.ended or run.info.get("kind") not in CT_MODEL_KINDS
                or run.status is None or run.status.state != DONE):
            return None
        return progress.model_file if progress.model_file.is_file() else None

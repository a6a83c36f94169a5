"""Training launcher helpers: where the run goes, how the command is wrapped, how far it got.

``ctsma train KIND --config C --out DIR`` writes its run folder ``DIR/<role><name>/`` with
``progress.jsonl`` (one JSON object per line: ``{event: start|epoch|end, role, epoch, max_epochs,
train_loss, val_loss, val_mae, seconds}``) and, at the end, the model file
``DIR/<role><name>.safetensors`` (see ``ctsma.models.train``). The Slicer module follows that
log to show live epochs and losses, whichever computer runs the training.

Training may run with Slicer's Python, with a user-configured Python environment, or through a
**cluster command template** such as ``sbatch --wrap "{cmd}"`` or ``ssh gpu-host {cmd}``. The
template becomes an argument list (never a shell string run locally): it is split with
:func:`shlex.split`; a bare ``{cmd}`` word is replaced by the command's words, and a ``{cmd}``
that was quoted or sits inside a word (``--wrap={cmd}``) becomes one shell-quoted word, which
is what ``sbatch --wrap`` and a remote shell expect.
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass, field
from pathlib import Path

#: ``ctsma train`` kind -> the role that names its run folder and model file.
ROLE_OF_KIND = {"teacher": "teacher", "student": "student_distilled", "baseline": "student_baseline"}
#: kinds whose model the Analysis can use (the teacher reads MR, not CT).
CT_MODEL_KINDS = ("student", "baseline")

_LIST, _WORD = "\x00CTSMA_CMD_LIST\x00", "\x00CTSMA_CMD_WORD\x00"


def wrap_command(template: str, command: list[str]) -> list[str]:
    """The argument list that runs ``command`` through a cluster/remote template (see module doc)."""
    from .settings import check_cluster_template

    if isinstance(command, str):
        raise TypeError("pass the command as an argument list, not a shell string")
    check_cluster_template(template)
    marked = template.replace('"{cmd}"', _WORD).replace("'{cmd}'", _WORD).replace("{cmd}", _LIST)
    joined = shlex.join(map(str, command))
    out: list[str] = []
    for word in shlex.split(marked):
        if word == _LIST:
            out.extend(map(str, command))
        else:
            out.append(word.replace(_WORD, joined).replace(_LIST, joined))
    return out


def data_kind(path) -> str:
    """``store`` for a patch-store folder, ``manifest`` for a cohort manifest (.csv)."""
    from ctsma.errors import UserError

    p = Path(path)
    if p.is_dir():
        return "store"
    if p.is_file() and p.suffix.lower() == ".csv":
        return "manifest"
    raise UserError(f"training data must be a patch-store folder ('ctsma dataset build' output) or a cohort "
                    f"manifest .csv; '{path}' is neither")


def check_training_manifest(path) -> None:
    """A cohort manifest that the module turns into a patch store must say where each knee's registration is.

    ``ctsma dataset build`` cuts the MR patch at the registered position, and the module passes it no other
    source of transforms, so without a ``registration`` column every knee would be excluded after the build had
    started. The manifest is read as the build reads it (:func:`ctsma.io.tables.read_table`), so that a row the
    build would refuse (one with more cells than the header) is refused here, before anything starts."""
    from ctsma.errors import UserError
    from ctsma.io.tables import read_table

    header = read_table(path, "cohort manifest").columns
    if "registration" not in header:
        raise UserError(f"the cohort manifest {Path(path).name} has no 'registration' column: add one naming each "
                        "knee's 'ctsma register' output folder (relative to the manifest), or build a patch store "
                        "with 'ctsma dataset build --manifest M --registrations REGDIR --out STORE' and choose "
                        "that folder")


@dataclass
class EpochRecord:
    epoch: int
    max_epochs: int
    train_loss: float | None = None
    val_loss: float | None = None
    val_mae: dict = field(default_factory=dict)
    seconds: float | None = None


@dataclass
class TrainingProgress:
    """What ``RUN/<role>/progress.jsonl`` says so far."""

    run_dir: Path
    role: str = ""
    started: bool = False
    ended: bool = False
    stopped_early: bool = False
    max_epochs: int = 0
    epochs: list[EpochRecord] = field(default_factory=list)
    seconds: float | None = None

    @property
    def last(self) -> EpochRecord | None:
        return self.epochs[-1] if self.epochs else None

    @property
    def fraction(self) -> float | None:
        if self.ended:
            return 1.0
        if self.max_epochs <= 0:
            return None
        return min(1.0, (self.last.epoch if self.last else 0) / self.max_epochs)

    @property
    def model_file(self) -> Path:
        """``DIR/<role><name>.safetensors`` beside the run folder ``DIR/<role><name>/``."""
        return self.run_dir.parent / f"{self.run_dir.name}.safetensors"

    def message(self) -> str:
        if self.ended:
            text = f"{self.role}: finished after {self.last.epoch if self.last else 0} epochs"
            return text + (" (stopped early)" if self.stopped_early else "")
        e = self.last
        if e is None:
            return f"{self.role}: starting" if self.started else "waiting for the training to start"
        parts = [f"epoch {e.epoch}/{e.max_epochs or self.max_epochs}"]
        for label, value in (("train loss", e.train_loss), ("val loss", e.val_loss)):
            if value is not None:
                parts.append(f"{label} {value:.4g}")
        maes = [f"{k} {v:.3g}" for k, v in (e.val_mae or {}).items() if v is not None]
        if maes:
            parts.append("val MAE " + ", ".join(maes))
        if e.seconds is not None:
            parts.append(f"{e.seconds:.0f} s")
        return "  ".join(parts)


class TrainingLog:
    """Follows one ``progress.jsonl`` incrementally (a half-written last line waits for the next read)."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / "progress.jsonl"
        self.progress = TrainingProgress(run_dir=self.run_dir)
        self._offset = 0
        self._partial = ""

    def read(self) -> TrainingProgress:
        if not self.path.exists():
            return self.progress
        with open(self.path, encoding="utf-8", errors="replace") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
            self._offset = fh.tell()
        lines = (self._partial + chunk).split("\n")
        self._partial = lines.pop()
        for line in lines:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                self._apply(rec)
        return self.progress

    def _apply(self, rec: dict) -> None:
        p = self.progress
        event = rec.get("event")
        p.role = str(rec.get("role") or p.role)
        if rec.get("max_epochs"):
            p.max_epochs = int(rec["max_epochs"])
        if event == "start":
            p.started = True
        elif event == "epoch":
            p.started = True
            mae = rec.get("val_mae") if isinstance(rec.get("val_mae"), dict) else {}
            p.epochs.append(EpochRecord(int(rec.get("epoch", len(p.epochs) + 1)), int(rec.get("max_epochs") or 0),
                                        _num(rec.get("train_loss")), _num(rec.get("val_loss")),
                                        {k: _num(v) for k, v in mae.items()}, _num(rec.get("seconds"))))
        elif event == "end":
            p.ended = True
            p.stopped_early = bool(rec.get("stopped_early"))
            p.seconds = _num(rec.get("seconds"))


def _num(v):
    try:
        return None if v is None else float(v)
    except (TypeError, ValueError):
        return None


def find_run_dir(out_dir, kind: str, since: float = 0.0) -> Path | None:
    """The newest run folder of ``kind`` under ``out_dir`` whose log was written after ``since``."""
    role = ROLE_OF_KIND[kind]
    best = None
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return None
    for log in out_dir.glob(f"{role}*/progress.jsonl"):
        name = log.parent.name
        if kind == "student" and name.startswith("student_baseline"):
            continue
        mtime = log.stat().st_mtime
        if mtime >= since and (best is None or mtime > best[0]):
            best = (mtime, log.parent)
    return best[1] if best else None

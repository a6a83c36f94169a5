"""Training entry: ``train("teacher" | "student" | "baseline", config)`` → exported model file.

Run folder ``<output.dir>/<role><name>/``::

    checkpoints/best.ckpt, checkpoints/last.ckpt   Lightning checkpoints (for --resume; not model files)
    logs/metrics.csv                               CSV log (per epoch)
    tb/                                            TensorBoard log
    progress.jsonl                                 one JSON object per epoch (start/epoch/end events)

and the model file ``<output.dir>/<role><name>.safetensors`` (see :mod:`ctsma.models.export`).
"""

from __future__ import annotations

import logging
import pickle
import shutil
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import PARAMETERS, progress
from ..config import to_dict
from ..dataset.loader import CT_OFFSET_HU, CT_SCALE_HU, PatchDataset, make_loader
from ..dataset.store import PatchStore
from ..errors import ConfigError, ModelFileError, UserError
from ..harmonise import training_reference
from ..inference.intensity import store_patch_means, training_intensity
from ..io import ensure_writable_dir
from ..io.atomic import check_no_obstacle
from .config import TrainConfig, resolve
from .export import build_meta, export_model, load_teacher
from .launch import check_cluster, check_nodes, launched_as_rank_zero
from .networks import PatchRegressor

ROLE_OF = {"teacher": "teacher", "student": "student_distilled", "baseline": "student_baseline",
           "student_distilled": "student_distilled", "student_baseline": "student_baseline"}


def run_paths(cfg: TrainConfig, role: str) -> tuple[Path, Path]:
    out = resolve(cfg, cfg.output.dir)
    return out / f"{role}{cfg.output.name}", out / f"{role}{cfg.output.name}.safetensors"


def teacher_path(cfg: TrainConfig) -> Path:
    """``distill.teacher``, else the run's own teacher: ``<output.dir>/teacher<output.name>.safetensors``, the file
    that ``ctsma train teacher`` writes with the same settings (an ablation names its base run's teacher)."""
    if cfg.distill.teacher:
        return resolve(cfg, cfg.distill.teacher)
    return run_paths(cfg, "teacher")[1]


def open_store(cfg: TrainConfig, store: PatchStore | None = None) -> PatchStore:
    if store is not None:
        return store
    if not cfg.data.store:
        raise ConfigError("data.store is empty: give the patch store folder with --store (ctsma train, ctsma "
                          "evaluate) or as data.store in the config")
    return PatchStore(resolve(cfg, cfg.data.store))


def _precision(cfg) -> str:
    t = cfg.trainer
    gpu = t.accelerator == "gpu" or (t.accelerator == "auto" and torch.cuda.is_available())
    if t.accelerator == "gpu" and not torch.cuda.is_available():
        raise ConfigError("trainer.accelerator is 'gpu' but no CUDA GPU is available; use 'cpu' or 'auto'")
    if t.precision == "auto":  # bf16 needs no loss scaling; GPUs before Ampere fall back to fp16
        return ("bf16-mixed" if _native_bf16() else "16-mixed") if gpu else "32-true"
    if t.precision != "32" and not gpu:
        raise ConfigError(f"trainer.precision {t.precision} needs a GPU; use 32 or auto on a CPU")
    return "32-true" if t.precision == "32" else t.precision


def _hardware(trainer, precision: str) -> dict:
    """Where the model was trained, for its file: device (with the GPU's name), processes, precision, torch."""
    dev = trainer.strategy.root_device
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else None
    return {"device": dev.type if name is None else f"{dev.type} ({name})", "processes": int(trainer.world_size),
            "precision": precision, "torch": torch.__version__}


def _native_bf16() -> bool:
    """Whether the GPU computes bf16 natively (compute capability 8.0, Ampere, and later). torch's own
    ``is_bf16_supported`` also says yes for older cards that only emulate it."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


def train(which: str, cfg: TrainConfig, *, resume: bool = False, store: PatchStore | None = None,
          max_epochs: int | None = None, callbacks: list | None = None, reuse: bool = False,
          started: Callable[[], None] | None = None) -> Path:
    """Train one model and export it; returns the model file path.

    ``max_epochs`` overrides the config's; ``callbacks`` are extra Lightning callbacks (e.g. a GUI's). ``reuse``:
    a model file that records the run this one would be (:func:`_run_record`) is returned as it is, untrained
    (``ctsma evaluate``'s ablations, the demo's models of an interrupted training stage), and without one, a
    ``last.ckpt`` of this very run resumes (as ``resume`` would) rather than starting anew. ``started()`` is called
    when the training itself starts, after every check (not for a reused model).
    """
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import EarlyStopping, TQDMProgressBar
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger

    from .lightning import (JsonlProgress, PatchDataModule, PreciseBatchNorm, RegressionModule, RunCheckpoint,
                            ValidateLastEpoch)

    if which not in ROLE_OF:
        raise UserError(f"unknown model '{which}'; train teacher, student or baseline")
    role = ROLE_OF[which]
    t0 = time.time()
    run_dir, model_file = run_paths(cfg, role)
    ckpt_dir = run_dir / "checkpoints"
    last = ckpt_dir / "last.ckpt"
    if resume and not last.is_file():
        raise UserError(f"--resume: no checkpoint to resume from at {last} (resume with the run's own --out; "
                        "the checkpoint is <out>/<role>/checkpoints/last.ckpt)")
    if cfg.trainer.threads:
        torch.set_num_threads(cfg.trainer.threads)
    if not logging.getLogger().isEnabledFor(logging.DEBUG):
        for name in ("pytorch_lightning", "lightning_fabric", "lightning"):
            logging.getLogger(name).setLevel(logging.WARNING)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*The number of training batches.*")
        warnings.filterwarnings("ignore", message=".*module\\(s\\) in eval mode.*")  # the frozen teacher
        # Lightning's own use of a torch API that torch deprecated: nothing a user can act on
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*")
    pl.seed_everything(cfg.trainer.seed, workers=True, verbose=False)

    store = open_store(cfg, store)
    dm = PatchDataModule(store, cfg.data, cfg.trainer.seed)
    dm.check_processes(cfg.trainer.devices * cfg.trainer.num_nodes)
    in_ch = 2 if cfg.data.masks else 1
    net_cfg = cfg.teacher_net if role == "teacher" else cfg.student_net
    size = store.mr_shape[0] if role == "teacher" else store.ct_shape[0]
    try:
        arch = PatchRegressor(in_ch, size, net_cfg.widths, net_cfg.blocks, net_cfg.head_hidden, norm=net_cfg.norm,
                              stem=net_cfg.stem, input_pool=net_cfg.input_pool).arch
    except ValueError as exc:  # e.g. a conv stem for a patch size it cannot bring to 8³
        raise ConfigError(f"{'teacher_net' if role == 'teacher' else 'student_net'}: {exc}") from None
    teacher_arch, teacher_tensors, teacher_meta = None, None, None
    if role == "student_distilled":
        teacher_arch, teacher_tensors, teacher_meta = _frozen_teacher(cfg, store, in_ch, dm.split.subjects["test"])
    optim = to_dict(cfg.optim)
    if max_epochs is not None:
        optim["max_epochs"] = max_epochs
    module = RegressionModule(role, arch, optim, to_dict(cfg.distill), teacher_arch, dm.y_sd.tolist())
    if teacher_tensors is not None:
        module.teacher.load_state_dict(teacher_tensors)
    module.run_record = _run_record(cfg, role, dm, optim, teacher_meta)
    checked = False  # whether last.ckpt has been found resumable
    if reuse and not resume:
        changes = _changes_since(model_file, module.run_record)
        if changes == []:
            same = "settings, split, store and teacher" if role == "student_distilled" else "settings, split and store"
            progress.info(f"{role}{cfg.output.name}: reused {model_file} (trained with the same {same})")
            return model_file
        why = changes and f"{'; '.join(changes[:3])}{'; ...' if len(changes) > 3 else ''}"
        done = _interrupted_epochs(last, module)
        if done is not None:  # this very run was interrupted (killed, or stopped before its file was written)
            progress.info(f"{role}{cfg.output.name}: " + (f"{model_file.name} not kept ({why}); " if why else "")
                          + f"resumed from {last} ({done} of {optim['max_epochs']} epochs were done)")
            resume = checked = True
        elif why:
            progress.info(f"{role}{cfg.output.name}: trained again ({why})")
    if resume and not checked:
        done = int(_check_resumable(last, module).get("epoch", -1)) + 1
        if done >= optim["max_epochs"] and _changes_since(model_file, module.run_record) == []:
            # finished, its file written and whole: exporting again gave it new bytes (a new checksum), so that a
            # student distilled from this teacher counted as one of another teacher
            progress.info(f"{role}{cfg.output.name}: {model_file} is this run's, finished; kept as it is")
            return model_file
        # say where --resume goes on from, as the demo's reuse does: nothing told a run resumed from one started anew
        progress.info(f"{role}{cfg.output.name}: resumed from {last} ({done} of {optim['max_epochs']} epochs were "
                      "done)")
    if resume and not logging.getLogger().isEnabledFor(logging.DEBUG):  # its folder holds the run's logs: expected
        warnings.filterwarnings("ignore", message=".*exists and is not empty.*")
    check_nodes(cfg.trainer.num_nodes)
    check_cluster(cfg.trainer)
    precision = _precision(cfg)
    # a file where the run folder goes (it was rmtree's traceback), a folder where the model file goes (it was
    # refused only after the training)
    check_no_obstacle(run_dir.parent, f"{run_dir.name}/checkpoints/last.ckpt", model_file.name)
    # only now, with the store, split, teacher and device checked: a user error leaves the folder as it was
    if launched_as_rank_zero():  # the other processes of a DDP run leave the folder to this one
        if not resume and run_dir.exists():
            shutil.rmtree(run_dir)  # a fresh run replaces this role's previous checkpoints and logs
        ensure_writable_dir(run_dir)  # a clear error for an unusable output folder

    ckpt_cb = RunCheckpoint(dirpath=ckpt_dir, filename="best", monitor="val_loss", mode="min", save_top_k=1,
                              enable_version_counter=False)
    # the state after every epoch, for --resume. (Lightning's save_last=True writes last.ckpt only when the best
    # checkpoint changes, so a run killed after an epoch that did not improve would resume from an older state.)
    last_cb = RunCheckpoint(dirpath=ckpt_dir, filename="last", save_top_k=1, enable_version_counter=False,
                              save_on_train_epoch_end=True)  # also after the epochs that optim.val_every skips
    extra = list(callbacks or [])
    callbacks = [ckpt_cb, last_cb, JsonlProgress(run_dir / "progress.jsonl", role, optim["max_epochs"])] + extra
    if optim["val_every"] > 1:
        callbacks.append(ValidateLastEpoch())
    if cfg.optim.precise_bn:
        callbacks.insert(0, PreciseBatchNorm(dm.bn_dataset(), module.modality, cfg.optim.precise_bn,
                                             seed=cfg.trainer.seed))
    if cfg.optim.patience:
        callbacks.append(EarlyStopping(monitor="val_loss", mode="min", patience=cfg.optim.patience))
    show_bar = cfg.trainer.progress_bar and not getattr(progress, "_quiet", False)  # `ctsma --quiet` hides it
    if show_bar:
        callbacks.append(TQDMProgressBar(leave=False))
    loggers = [CSVLogger(run_dir, name="logs", version=""), TensorBoardLogger(run_dir, name="tb", version="")]
    trainer = pl.Trainer(
        max_epochs=optim["max_epochs"], accelerator=cfg.trainer.accelerator, devices=cfg.trainer.devices,
        num_nodes=cfg.trainer.num_nodes, strategy=cfg.trainer.strategy, precision=precision,
        callbacks=callbacks, logger=loggers, deterministic=cfg.trainer.deterministic,
        enable_progress_bar=show_bar, enable_model_summary=False, num_sanity_val_steps=0,
        gradient_clip_val=cfg.optim.grad_clip or None, use_distributed_sampler=False, log_every_n_steps=1,
        check_val_every_n_epoch=optim["val_every"],
        default_root_dir=run_dir)
    if started is not None:
        started()
    progress.info(f"training {role} on {len(dm.split.train)} patches of {len(dm.split.subjects['train'])} patients "
                  f"(validation: {len(dm.split.subjects['val'])} patients)")
    csv_log = run_dir / "logs" / "metrics.csv"
    before = _read_csv(csv_log) if resume else None  # Lightning's CSV logger rewrites the file on resume
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(last) if resume else None, weights_only=True)
    except SystemExit:
        if trainer.interrupted:  # Lightning turns Ctrl-C into a silent sys.exit(1) after its clean-up, and ignores
            import signal        # SIGINT from then on: give the caller its KeyboardInterrupt and Ctrl-C back

            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt from None
        raise
    if before is not None and trainer.is_global_zero:
        _prepend_log(csv_log, before)
    if not trainer.is_global_zero:
        return model_file

    best = Path(ckpt_cb.best_model_path) if ckpt_cb.best_model_path and cfg.optim.select == "best" else last
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    module.cpu().eval()
    metrics = validation_metrics(module, dm)
    metrics["best_epoch"] = _best_epoch(run_dir)
    metrics["exported"] = "last epoch" if best == last else "best validation epoch"
    metrics["epochs_run"] = int(trainer.current_epoch)
    store_sum = store.summary()
    training = {"store": str(store.dir), "store_summary": {k: store_sum.get(k) for k in
                                                          ("n_patches", "n_subjects", "parameters", "attrs")},
                "split": dm.split.subjects, "n_train_patches": int(len(dm.split.train)),
                "n_val_patches": int(len(dm.split.val)), "config": to_dict(cfg), "seed": cfg.trainer.seed,
                "seconds": round(time.time() - t0, 1), "hardware": _hardware(trainer, precision),
                "run": module.run_record,  # what defines the run, as its checkpoints record it
                "teacher": (None if teacher_meta is None else {"file": str(teacher_path(cfg)),
                                                              "sha256": teacher_meta.get("_sha256"),
                                                              "learnt_from": learnt_from(teacher_meta)})}
    meta = _model_meta(role, module.net, store, cfg, dm, training, metrics)
    export_model(model_file, module.net, meta)
    progress.info(f"{role}: wrote {model_file} (validation MAE "
                  + ", ".join(f"{p} {metrics['val_mae'][p]:.4g}" for p in PARAMETERS) + ")")
    return model_file


def _model_meta(role: str, net, store: PatchStore, cfg: TrainConfig, dm, training: dict, metrics: dict) -> dict:
    """The model file's metadata: the input it takes (MR for the teacher, CT in HU for the students, with the
    training knees' CT reference and intensity), the target's normalisation, the training record and metrics."""
    if role == "teacher":
        return build_meta(role, net, modality="mr", spacing_mm=store.attrs.get("mr_spacing_mm", 0.25),
                          extent_mm=store.attrs.get("extent_mm", 8.0), masks=cfg.data.masks, intensity_offset=0.0,
                          intensity_scale=1.0, target=cfg.data.target, y_mean=dm.y_mean, y_sd=dm.y_sd,
                          training=training, metrics=metrics)
    else:
        return build_meta(role, net, modality="ct", spacing_mm=store.attrs.get("ct_spacing_mm", 0.5),
                          extent_mm=store.attrs.get("extent_mm", 8.0), masks=cfg.data.masks,
                          intensity_offset=CT_OFFSET_HU, intensity_scale=CT_SCALE_HU, target=cfg.data.target,
                          y_mean=dm.y_mean, y_sd=dm.y_sd, training=training, metrics=metrics,
                          ct_reference=training_reference(store.attrs.get("subject_info"), dm.split.subjects["train"]),
                          ct_intensity=training_intensity(store_patch_means(store, dm.split.train),
                                                          store.table["subject"].to_numpy()[dm.split.train],
                                                          dm.split.subjects["train"]))


def _frozen_teacher(cfg: TrainConfig, store: PatchStore, in_ch: int, test_subjects) -> tuple[dict, dict, dict]:
    """The distilled student's teacher (architecture, tensors, metadata), checked against this store and config
    and against the student's held-out patients."""
    tpath = teacher_path(cfg)
    if not tpath.is_file():
        raise UserError(f"the distilled student needs a trained teacher at {tpath}: run 'ctsma train teacher' "
                        "first or set distill.teacher")
    teacher_model, teacher_meta = load_teacher(tpath)
    if teacher_meta["input"]["patch_size"] != store.mr_shape[0] or teacher_meta["arch"]["in_channels"] != in_ch:
        raise ModelFileError(f"teacher {tpath.name} takes {teacher_meta['input']['patch_size']}³ patches with "
                             f"{teacher_meta['arch']['in_channels']} channel(s); this store/config needs "
                             f"{store.mr_shape[0]}³ with {in_ch}")
    if teacher_meta.get("target") != cfg.data.target:
        raise ModelFileError(f"teacher {tpath.name} was trained on target '{teacher_meta.get('target')}', "
                             f"this run uses '{cfg.data.target}'")
    _check_teacher_held_out(tpath, teacher_meta, test_subjects)
    return teacher_meta["arch"], teacher_model.net.state_dict(), teacher_meta


def learnt_from(meta: dict) -> list[str]:
    """The patients a model file was trained or validated on (its metadata's split)."""
    split = (meta.get("training") or {}).get("split") or {}
    return sorted({str(s) for part in ("train", "val") for s in split.get(part) or []})


def _check_teacher_held_out(path: Path, meta: dict, test_subjects) -> None:
    """Refuse a teacher that learnt from this run's test patients (e.g. ``distill.teacher`` of another fold): the
    distilled student would carry what it learnt from them into its own evaluation."""
    leak = set(learnt_from(meta)) & {str(s) for s in test_subjects}
    if leak:
        raise ModelFileError(f"teacher {path.name} was trained on {len(leak)} of this run's test patients (e.g. "
                             f"{sorted(leak)[0]}): a student distilled from it would learn from them; train the "
                             "teacher with this run's split (data.k_folds/data.fold)")


def _run_record(cfg: TrainConfig, role: str, dm, optim: dict, teacher_meta: dict | None) -> dict:
    """The settings and data that define a run (not its paths, hardware or logging): ``--resume`` goes on only when
    the checkpoint's record is the same, so that a model never holds epochs of two runs (another split's patients,
    another schedule) under the metadata of one."""
    c = to_dict(cfg)
    net = "teacher_net" if role == "teacher" else "student_net"
    rec = {"data": {k: c["data"][k] for k in ("target", "masks", "augment", "batch_size")}, net: c[net],
           "optim": dict(optim), "trainer": {"seed": cfg.trainer.seed},
           "split": {k: [str(s) for s in v] for k, v in dm.split.subjects.items()},
           "patches": {"train": int(len(dm.split.train)), "val": int(len(dm.split.val))},
           "store": dm.store.fingerprint()}
    if role == "student_distilled":
        rec["distill"] = {k: v for k, v in c["distill"].items() if k != "teacher"}
        rec["teacher_sha256"] = teacher_meta.get("_sha256") if teacher_meta else None
    return rec


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and k not in ("split", "patches"):
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def _record_changes(old: dict, new: dict) -> list[str]:
    """What differs between a checkpoint's run record and this run's, in words."""
    a, b = _flat(old), _flat(new)
    if "store" not in a:  # a record of an earlier version, which did not fingerprint the store
        b.pop("store", None)
    keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    # say the cause once: another split has other patches, another store's contents other patch counts
    effects = ("patches", "store") if "split" in keys else ("patches",) if "store" in keys else ()
    keys = [k for k in keys if k not in effects]
    words = {"split": "the patient split (another store, or data.k_folds/fold/split settings)",
             "patches": "the store's patches (another store)",
             "store": "the store's contents (another store, or one rebuilt in its folder)",
             "teacher_sha256": "the teacher (its file changed: retrained or replaced)"}
    return [words.get(k) or f"{k} {a.get(k)!r} -> {b.get(k)!r}" for k in keys]


def _changes_since(model_file: Path, record: dict) -> list[str] | None:
    """What differs between the run a model file records (``training.run``) and ``record``, in words (empty: the
    same run; a damaged file, or one of an earlier version that records no run, is named as such); None when there
    is no file."""
    from ..io.atomic import to_jsonable
    from ..modelfile import load_model

    if not model_file.is_file():
        return None
    try:
        old = (load_model(model_file)[1].get("training") or {}).get("run")  # checksum verified: a damaged file
    except ModelFileError as exc:                                         # is trained again
        return [f"its file is unreadable: {exc}"]
    if not isinstance(old, dict):
        return ["its file records no run: written by an earlier CT-SMA"]
    return _record_changes(old, to_jsonable(record))


def _interrupted_epochs(ckpt: Path, module) -> int | None:
    """For ``train(reuse=True)``: the epochs that ``ckpt`` (a run folder's ``last.ckpt``) has finished when it is a
    checkpoint of this very run (its record equal to ``module.run_record``, its network and epochs fitting), which
    then resumes to the result of an uninterrupted run; None otherwise (no checkpoint, a damaged one, one of another
    run or of an earlier CT-SMA, which records no run): the run starts anew."""
    if not ckpt.is_file():
        return None
    try:
        saved = _check_resumable(ckpt, module)
    except (ConfigError, ModelFileError):
        return None
    if "store" not in (saved.get("ctsma_run") or {}):  # an earlier CT-SMA's, whose record (if any) is not the whole
        return None                                      # run: which run it was cannot be told
    return int(saved.get("epoch", -1)) + 1


def _check_resumable(ckpt: Path, module) -> dict:
    """The checkpoint ``ckpt``, loaded (weights only). Refuse, before anything is written, a checkpoint whose weights
    do not fit the network this config builds (e.g. ``--resume`` after changing ``widths`` or ``stem``), which
    Lightning would report as a traceback, one of a run with other settings, split or teacher (see
    :func:`_run_record`; checkpoints of earlier versions have no record), and one that has run more epochs than
    ``optim.max_epochs``."""
    try:
        saved = torch.load(ckpt, map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, pickle.UnpicklingError) as exc:  # truncated or damaged
        raise ModelFileError(f"--resume: checkpoint {ckpt} is damaged ({str(exc).splitlines()[0][:120]}); train "
                             "anew without --resume") from None
    state = saved.get("state_dict", {})
    mine = module.state_dict()
    if set(state) != set(mine) or any(tuple(state[k].shape) != tuple(v.shape) for k, v in mine.items()):
        raise ConfigError(f"--resume: {ckpt} holds another network than this config describes (were teacher_net, "
                          "student_net or distill changed?); resume with the run's own settings, or train anew "
                          "without --resume")
    old = saved.get("ctsma_run")
    changes = _record_changes(old, module.run_record) if isinstance(old, dict) and module.run_record else []
    if changes:
        raise ConfigError(f"--resume: this run was started with other settings or data ({'; '.join(changes[:5])}"
                          f"{'; ...' if len(changes) > 5 else ''}); resume with the run's own settings, or train "
                          "anew without --resume")
    done, planned = int(saved.get("epoch", -1)) + 1, module.optim_cfg["max_epochs"]  # last.ckpt: at an epoch's end
    if done > planned:  # a checkpoint without a record (an earlier CT-SMA's) and fewer epochs: Lightning's traceback,
        # or, one epoch over, a model of more epochs than its metadata says
        raise ConfigError(f"--resume: {ckpt} has finished {done} epochs, more than optim.max_epochs {planned}; "
                          "resume with the run's own optim.max_epochs, or train anew without --resume")
    return saved


def _read_csv(path: Path):
    import pandas as pd

    return pd.read_csv(path) if path.is_file() and path.stat().st_size else None


def _prepend_log(path: Path, before) -> None:
    """Keep the epochs logged before a resume in front of the resumed run's rows."""
    import pandas as pd

    from ..io.atomic import atomic_path

    after = _read_csv(path)
    if after is None:  # nothing logged (a resume of a finished run): Lightning's logger has removed the file
        merged = before
    elif "epoch" not in after or "epoch" not in before:
        return
    else:
        first = after["epoch"].min()
        merged = pd.concat([before[before["epoch"] < first], after], ignore_index=True)
    with atomic_path(path) as tmp:
        merged.to_csv(tmp, index=False)


def _best_epoch(run_dir: Path) -> int | None:
    import pandas as pd

    p = run_dir / "logs" / "metrics.csv"
    if not p.is_file():
        return None
    df = pd.read_csv(p)
    if "val_loss" not in df or df["val_loss"].dropna().empty:
        return None
    v = df.dropna(subset=["val_loss"])
    return int(v.loc[v["val_loss"].idxmin(), "epoch"]) + 1


@torch.no_grad()
def validation_metrics(module, dm) -> dict:
    """Per-parameter MAE and Pearson r on the validation patients, physical units."""
    pred, y = predict_dataset(module, dm.val_ds)
    pred = pred * dm.y_sd + dm.y_mean
    y = y * dm.y_sd + dm.y_mean
    out = {"val_mae": {}, "val_r": {}, "val_loss": float(np.mean(((pred - y) / dm.y_sd) ** 2))}
    constant = []
    for j, p in enumerate(PARAMETERS):
        out["val_mae"][p] = float(np.mean(np.abs(pred[:, j] - y[:, j])))
        flat = np.ptp(pred[:, j]) == 0  # no r (it was numpy's 'invalid value encountered in divide', twice)
        if flat and len(y) > 2:
            constant.append(p)
        ok = len(y) > 2 and not flat and np.ptp(y[:, j]) > 0
        out["val_r"][p] = float(np.corrcoef(pred[:, j], y[:, j])[0, 1]) if ok else None
    if constant:
        warnings.warn(f"{module.role}: the model predicts the same {', '.join(constant)} for every validation patch "
                      "(its output does not depend on the patch; the training may have diverged: try a lower "
                      "optim.lr)", stacklevel=2)
    return out


@torch.no_grad()
def predict_dataset(module, ds: PatchDataset) -> tuple[np.ndarray, np.ndarray]:
    """Normalised predictions and targets over a dataset, in its index order."""
    loader = make_loader(ds, 256, shuffle=False)
    ps, ys = [], []
    for b in loader:
        ps.append(module.net(b[module.modality]).numpy())
        ys.append(b["y"].numpy())
    return np.concatenate(ps), np.concatenate(ys)

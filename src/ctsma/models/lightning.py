"""PyTorch Lightning pieces: the patch datamodule, the regression/distillation module and training callbacks."""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from .. import PARAMETERS, progress
from ..dataset.loader import PatchDataset, make_loader
from ..dataset.store import PatchStore
from ..errors import UserError
from .config import ROLES
from .distill import FeatureDistillation, regression_loss
from .networks import PatchRegressor, build_network



class TrainingDivergedError(UserError):
    """The loss became NaN or infinite."""


class DataSetupError(UserError):
    """The patch store cannot be used for training as configured."""


class PatchDataModule(pl.LightningDataModule):
    """Train/val/test patient split of a store, target normalisation from the TRAINING patients."""

    def __init__(self, store: PatchStore, data_cfg, seed: int):
        super().__init__()
        self.store, self.cfg, self.seed = store, data_cfg, seed
        c = data_cfg
        self.split = store.patient_split(c.test_fraction, c.val_fraction, k=c.k_folds or None,
                                         fold=c.fold if c.k_folds else None, seed=c.split_seed,
                                         use_stored=c.use_stored_split)
        if len(self.split.train) == 0:
            raise DataSetupError(f"the patch store {store.dir} has no training patients with this split")
        if len(self.split.val) == 0:
            raise DataSetupError(f"the patch store {store.dir} has no validation patients "
                                 f"({len(store.subjects)} subjects); set data.val_fraction > 0 or add patients")
        if len(self.split.subjects["test"]) < 2:  # training needs none, but its evaluation will
            warnings.warn(f"the split in use holds {len(self.split.subjects['test'])} test patient(s): 'ctsma "
                          "evaluate' will need at least 2 (use data.k_folds and data.fold, or "
                          "data.use_stored_split: false and a larger data.test_fraction)", stacklevel=2)
        y = store.targets(c.target)[self.split.train]
        if not np.all(np.isfinite(y)):
            bad = [p for p, ok in zip(PARAMETERS, np.isfinite(y).all(axis=0)) if not ok]
            raise DataSetupError(f"training targets '{c.target}_' are missing or not finite for {', '.join(bad)} "
                                 f"({'use data.target: mr for real data' if c.target == 'true' else 'check the store'})")
        self.y_mean = y.mean(axis=0)
        self.y_sd = np.maximum(y.std(axis=0), 1e-6)
        kw = dict(target=c.target, target_mean=self.y_mean, target_sd=self.y_sd, masks=c.masks,
                  ram_budget_bytes=c.ram_budget_gb * 1e9)
        self.train_ds = PatchDataset(store, self.split.train, augment=c.augment, **kw)
        self.val_ds = PatchDataset(store, self.split.val, augment=False, **kw)
        self._kw = kw

    def bn_dataset(self) -> PatchDataset:
        """The training patches without augmentation (for :class:`PreciseBatchNorm`)."""
        return PatchDataset(self.store, self.split.train, augment=False, **self._kw)

    def _rank(self):
        t = getattr(self, "trainer", None)
        return (t.global_rank, t.world_size) if t is not None else (0, 1)

    def train_dataloader(self, rank_world=None):
        rank, world = rank_world or self._rank()
        return make_loader(self.train_ds, self.cfg.batch_size, shuffle=True, seed=self.seed, drop_last=True,
                           rank=rank, world_size=world, num_workers=self.cfg.num_workers)

    def val_dataloader(self, rank_world=None):
        rank, world = rank_world or self._rank()
        size = max(self.cfg.batch_size, 128)
        if world > 1:  # a batch for every process, as each takes every world-th batch
            size = min(size, max(1, len(self.val_ds) // world))
        return make_loader(self.val_ds, size, shuffle=False, rank=rank, world_size=world)

    def check_processes(self, world: int) -> None:
        """Refuse a run of ``world`` processes (DDP) in which one would get no batch, as each takes every
        ``world``-th batch: Lightning stopped that process with a traceback and the others with a connection error."""
        for part, ds, loader in (("training", self.train_ds, self.train_dataloader),
                                 ("validation", self.val_ds, self.val_dataloader)):
            if world > 1 and len(loader((world - 1, world))) == 0:
                raise DataSetupError(f"the {part} patches ({len(ds)}) make fewer "
                                     f"batches than the {world} processes of trainer.devices x trainer.num_nodes: "
                                     "use fewer devices (or, for training, a smaller data.batch_size)")


class RegressionModule(pl.LightningModule):
    """Teacher (MR), distilled student (CT + frozen teacher features) or baseline student (CT)."""

    def __init__(self, role: str, net_arch: dict, optim: dict, distill: dict | None = None,
                 teacher_arch: dict | None = None, y_sd: list | None = None):
        super().__init__()
        if role not in ROLES:
            raise ValueError(role)
        self.save_hyperparameters()
        self.role = role
        self.net = build_network(net_arch)
        self.optim_cfg = optim
        self.modality = "mr" if role == "teacher" else "ct"
        self.teacher: PatchRegressor | None = None
        self.distill: FeatureDistillation | None = None
        self.register_buffer("y_sd", torch.tensor(y_sd if y_sd is not None else [1.0] * 4, dtype=torch.float32))
        if role == "student_distilled":
            self.teacher = build_network(teacher_arch)
            self.teacher.requires_grad_(False)
            self.teacher.eval()
            self.distill = FeatureDistillation(self.net.feature_shapes(), self.teacher.feature_shapes(),
                                               distill["stages"], distill["weights"], distill["loss"])
        self.run_record: dict | None = None  # what defines the run (models/train.py), kept in every checkpoint

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        if self.run_record is not None:
            checkpoint["ctsma_run"] = self.run_record

    def train(self, mode: bool = True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()  # frozen: BatchNorm statistics stay the teacher's
        return self

    def forward(self, x):
        return self.net(x)

    def _losses(self, batch):
        x, y = batch[self.modality], batch["y"]
        need_feats = self.distill is not None
        out = self.net(x, return_features=need_feats)
        pred, feats = out if need_feats else (out, None)
        reg = regression_loss(pred, y, self.optim_cfg["loss"])
        parts = {"reg": reg.detach()}
        loss = reg
        if self.distill is not None:
            d = self.hparams.distill
            with torch.no_grad():
                t_pred, t_feats = self.teacher(batch["mr"], return_features=True)
            dl, dparts = self.distill(feats, t_feats)
            loss = d["regression_weight"] * reg + dl
            if d["output_weight"] > 0:
                loss = loss + d["output_weight"] * torch.nn.functional.mse_loss(pred, t_pred)
            parts["distill"] = dl.detach()
            parts.update({f"distill_{k}": v for k, v in dparts.items()})
        return loss, pred, parts

    def training_step(self, batch, batch_idx):
        loss, _, parts = self._losses(batch)
        if not torch.isfinite(loss):
            what = ", ".join(f"{k}={float(v):.4g}" for k, v in parts.items())
            cause = ("the input patches hold NaN/inf" if not torch.isfinite(batch[self.modality]).all() else
                     "the targets hold NaN/inf" if not torch.isfinite(batch["y"]).all() else
                     "the optimisation diverged (try a lower optim.lr or a gradient clip)")
            raise TrainingDivergedError(f"{self.role}: the training loss became {float(loss.detach())} at epoch "
                                        f"{self.current_epoch}, batch {batch_idx} ({what}): {cause}")
        bs = batch["y"].shape[0]
        self.log("train_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        for k, v in parts.items():
            self.log(f"train_{k}", v, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch[self.modality], batch["y"]
        pred = self.net(x)
        loss = regression_loss(pred, y, "mse")
        # a float: under DDP Lightning divides the processes' summed patch counts by their number, which for an
        # integer count is rounded down (26 patches on 3 processes: 8, not 8.67, so val_loss came out 26/24 too
        # large); the processes' validation patches need not divide evenly (EpochBatchSampler, no drop_last)
        bs = float(y.shape[0])
        self.log("val_loss", loss, on_step=False, on_epoch=True, prog_bar=True, batch_size=bs, sync_dist=True)
        mae = (pred - y).abs().mean(dim=0) * self.y_sd  # physical units
        for p, v in zip(PARAMETERS, mae):
            self.log(f"val_mae_{p}", v, on_step=False, on_epoch=True, batch_size=bs, sync_dist=True)

    def configure_optimizers(self):
        o = self.optim_cfg
        params = list(self.net.parameters()) + (list(self.distill.parameters()) if self.distill is not None else [])
        opt = torch.optim.AdamW(params, lr=o["lr"], weight_decay=o["weight_decay"])
        if o["scheduler"] == "cosine":
            sch = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=o["max_epochs"], eta_min=o["lr"] * 0.02)
        elif o["scheduler"] == "step":
            sch = torch.optim.lr_scheduler.StepLR(opt, step_size=o["step_size"], gamma=o["gamma"])
        else:
            return opt
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sch, "interval": "epoch"}}


class PreciseBatchNorm(pl.Callback):
    """Before every validation, the BatchNorm running statistics are recomputed with the current weights over up
    to ``max_patches`` training patches (a fixed, seeded subset, without augmentation).

    The running averages that BatchNorm keeps during training mix statistics from many earlier weights; with the
    demo's short epochs (about 25 steps) and a high learning rate they lag far behind the weights, so the
    validation loss in eval mode jumped by 10-100x from epoch to epoch, early stopping and the best-checkpoint
    choice followed that noise, and the frozen teacher handed the distilled student features normalised with
    stale statistics. Recomputing the statistics ("precise BN", Wu & Johnson 2021, "Rethinking 'Batch' in
    BatchNorm") makes the validation loss, the checkpoint and the exported model use the statistics of the
    weights they hold. Training steps are unaffected (they normalise with batch statistics).
    """

    def __init__(self, dataset: PatchDataset, modality: str, max_patches: int, batch_size: int = 128, seed: int = 0):
        self.dataset, self.modality = dataset, modality
        self.max_patches, self.batch_size, self.seed = int(max_patches), int(batch_size), int(seed)

    @torch.no_grad()
    def recalibrate(self, net: torch.nn.Module, device) -> None:
        bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        if not bns or self.max_patches <= 0 or len(self.dataset) == 0:
            return
        was_training = net.training
        momenta = [m.momentum for m in bns]
        for m in bns:
            m.reset_running_stats()
            m.momentum = None              # a cumulative average over the batches below
        net.train()
        seen = 0
        for b in make_loader(self.dataset, self.batch_size, shuffle=True, seed=self.seed):
            net(b[self.modality].to(device))
            seen += int(b[self.modality].shape[0])
            if seen >= self.max_patches:
                break
        for m, mom in zip(bns, momenta):
            m.momentum = mom
        net.train(was_training)

    def on_validation_epoch_start(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.recalibrate(pl_module.net, pl_module.device)


class RunCheckpoint(pl.callbacks.ModelCheckpoint):
    """Lightning's checkpoint callback, for a run folder that was moved or copied between a kill and ``--resume``:
    Lightning then forgot the best validation score (so the first validation after the resume became the "best") and
    kept the best checkpoint's path in the old folder (a traceback when that folder was gone, its file when not).
    Here the recorded paths are moved into this run's checkpoint folder first."""

    @property
    def state_key(self) -> str:  # Lightning's own key, so that checkpoints of either class resume with the other
        return "ModelCheckpoint" + super().state_key[len(type(self).__qualname__):]

    def load_state_dict(self, state_dict: dict) -> None:
        old, new = state_dict.get("dirpath"), self.dirpath
        if old and new and old != new:
            def moved(v):
                return new + v[len(old):] if isinstance(v, str) and (v == old or v.startswith(old + "/")
                                                                     or v.startswith(old + "\\")) else v
            state_dict = {k: ({moved(a): b for a, b in v.items()} if isinstance(v, dict) else moved(v))
                          for k, v in state_dict.items()}
        super().load_state_dict(state_dict)


class ValidateLastEpoch(pl.Callback):
    """With validation every N epochs (``optim.val_every``), also validate after the last epoch: the exported model
    then always has the precise BatchNorm statistics of its own weights, and its validation loss is logged."""

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.max_epochs is not None and trainer.current_epoch + 1 >= trainer.max_epochs:
            trainer.check_val_every_n_epoch = 1


class JsonlProgress(pl.Callback):
    """One JSON line per epoch in ``path`` (for the Slicer launcher), plus ``ctsma.progress`` events."""

    def __init__(self, path: Path, role: str, max_epochs: int):
        self.path, self.role, self.max_epochs = Path(path), role, max_epochs
        self.t0 = time.time()
        self.validated = -1  # the last epoch (0-based) whose validation ran

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            self.validated = trainer.current_epoch

    def _write(self, rec: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(rec) + "\n")

    def on_train_start(self, trainer, pl_module):
        if trainer.is_global_zero:
            self._write({"event": "start", "role": self.role, "epoch": trainer.current_epoch,
                         "max_epochs": self.max_epochs, "time": time.time()})

    def on_train_epoch_end(self, trainer, pl_module):
        if not trainer.is_global_zero or trainer.sanity_checking:
            return
        m = {k: float(v) for k, v in trainer.callback_metrics.items() if torch.as_tensor(v).numel() == 1}
        if self.validated != trainer.current_epoch:  # not validated this epoch (optim.val_every): no stale values
            m = {k: v for k, v in m.items() if not k.startswith("val_")}
        rec = {"event": "epoch", "role": self.role, "epoch": trainer.current_epoch + 1, "max_epochs": self.max_epochs,
               "train_loss": m.get("train_loss"), "val_loss": m.get("val_loss"),
               "val_mae": {p: m.get(f"val_mae_{p}") for p in PARAMETERS},
               "seconds": round(time.time() - self.t0, 2), "time": time.time()}
        self._write(rec)
        progress.emit(f"train {self.role}", trainer.current_epoch + 1, self.max_epochs,
                      f"val_loss={rec['val_loss']:.4f}" if rec["val_loss"] is not None else "")

    def on_train_end(self, trainer, pl_module):
        if trainer.is_global_zero:
            self._write({"event": "end", "role": self.role, "epoch": trainer.current_epoch,
                         "stopped_early": bool(trainer.should_stop and trainer.current_epoch < self.max_epochs),
                         "seconds": round(time.time() - self.t0, 2), "time": time.time()})

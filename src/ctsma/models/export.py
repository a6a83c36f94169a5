"""Exported model files of the teacher and the students, and inference in physical units.

A model file is written with :func:`ctsma.modelfile.save_model` (safetensors + JSON metadata + checksum; loading
unpickles nothing). ``kind`` is ``teacher`` (MR input) or ``student`` (CT input); the metadata holds::

    role          teacher | student_distilled | student_baseline
    arch          network settings (see networks.PatchRegressor.arch)
    input         modality, patch_size, spacing_mm, extent_mm, channels, intensity normalisation
    parameters    ["BV/TV", "Tb.Th", "Tb.Sp", "Tb.N"];  units {param: unit}
    target        "mr" (MR morphometry reference) or "true" (phantom truth)
    target_normalisation  {"mean": [4], "sd": [4]} of the TRAINING patients (outputs = z·sd + mean)
    training      store summary, subjects per split, config, epochs, seed
    metrics       validation metrics at the exported (best) checkpoint
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from .. import PARAMETER_UNITS, PARAMETERS
from ..errors import ModelFileError, UserError
from ..modelfile import load_model, save_model
from .networks import PatchRegressor, build_network

META_VERSION = 1
# Flipped copies of a patch for test-time augmentation (axes of the (D, H, W) patch). The parameters are invariant
# under flips, so the mean over copies is the estimate and their SD a measure of the network's instability.
FLIPS_DEFAULT = ((), (0,), (1,), (2,))     # `ctsma infer` and the evaluation
FLIPS_TTA = ((), (0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2))  # `ctsma infer --tta`
FLIPS_BY_COUNT = {1: ((),), 4: FLIPS_DEFAULT, 8: FLIPS_TTA}


class ParameterModel(nn.Module):
    """A trained network with its input/output normalisation: raw patches in, parameters in physical units out."""

    def __init__(self, net: PatchRegressor, meta: dict):
        super().__init__()
        self.net = net
        self.meta = meta
        norm = meta["target_normalisation"]
        self.register_buffer("y_mean", torch.tensor(norm["mean"], dtype=torch.float32))
        self.register_buffer("y_sd", torch.tensor(norm["sd"], dtype=torch.float32))
        inp = meta["input"]
        self.offset = float(inp["intensity_offset"])
        self.scale = float(inp["intensity_scale"])
        self.use_mask = "mask" in inp["channels"]
        self.patch_size = int(inp["patch_size"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: (n, C, D, D, D) raw intensities (+ mask channel); returns (n, 4) in physical units."""
        x = x.clone()
        x[:, 0] = (x[:, 0] - self.offset) / self.scale
        return self.net(x) * self.y_sd + self.y_mean

    @torch.no_grad()
    def predict(self, patches, masks=None, batch_size: int = 256) -> np.ndarray:
        """(N,1,D,D,D) or (N,D,D,D) raw patches (HU for CT) → (N,4) float64 in physical units (order PARAMETERS)."""
        x = np.asarray(patches, dtype=np.float32)
        if x.ndim == 4:
            x = x[:, None]
        d = self.patch_size
        if x.ndim != 5 or x.shape[1] != 1 or x.shape[2:] != (d, d, d):
            raise UserError(f"patches have shape {x.shape}; this model needs (N, 1, {d}, {d}, {d}) "
                            f"{self.meta['input']['modality'].upper()} patches at {self.meta['input']['spacing_mm']} mm")
        if self.use_mask:
            m = np.ones_like(x) if masks is None else np.asarray(masks, dtype=np.float32).reshape(x.shape)
            x = np.concatenate([x, m], axis=1)
        self.eval()
        dev = self.y_mean.device
        out = [self(torch.from_numpy(x[i:i + batch_size]).to(dev)).float().cpu().numpy()
               for i in range(0, len(x), batch_size)]
        return np.concatenate(out).astype(np.float64) if out else np.zeros((0, 4))

    def predict_flips(self, patches, masks=None, flips=FLIPS_DEFAULT, batch_size: int = 256,
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Mean and SD (ddof 1; zeros for one copy) of :meth:`predict` over flipped copies of each patch."""
        x = np.asarray(patches)
        m = None if masks is None else np.asarray(masks)
        preds = []
        for axes in flips:   # the last three axes of each array are the patch's (either may have a channel axis)
            xf = np.ascontiguousarray(np.flip(x, axis=tuple(a + x.ndim - 3 for a in axes))) if axes else x
            mf = m if m is None or not axes else np.ascontiguousarray(np.flip(m, axis=tuple(a + m.ndim - 3
                                                                                            for a in axes)))
            preds.append(self.predict(xf, mf, batch_size=batch_size))
        p = np.stack(preds)
        return p.mean(0), (p.std(0, ddof=1) if len(preds) > 1 else np.zeros_like(p[0]))


def build_meta(role: str, net: PatchRegressor, *, modality: str, spacing_mm: float, extent_mm: float, masks: bool,
               intensity_offset: float, intensity_scale: float, target: str, y_mean, y_sd,
               training: dict, metrics: dict, ct_reference: dict | None = None,
               ct_intensity: dict | None = None) -> dict:
    """``ct_reference``: the training CTs' resolution (:func:`ctsma.harmonise.training_reference`), which CT-only
    inference matches a sharper CT to; ``ct_intensity``: the training knees' bone intensity
    (:func:`ctsma.inference.intensity.training_intensity`), which CT-only inference compares a CT with; students
    only."""
    inp = {"modality": modality, "patch_size": net.arch["input_size"], "spacing_mm": float(spacing_mm),
           "extent_mm": float(extent_mm), "channels": ["image", "mask"] if masks else ["image"],
           "intensity_offset": float(intensity_offset), "intensity_scale": float(intensity_scale),
           "intensity_units": "HU" if modality == "ct" else "normalised MR"}
    if modality == "ct" and ct_reference:
        inp["ct_reference"] = ct_reference
    if modality == "ct" and ct_intensity:
        inp["ct_intensity"] = ct_intensity
    return {"meta_version": META_VERSION, "role": role, "arch": net.arch, "input": inp,
            "parameters": list(PARAMETERS), "units": {p: PARAMETER_UNITS[p] for p in PARAMETERS},
            "target": target, "target_normalisation": {"mean": [float(v) for v in y_mean],
                                                       "sd": [float(v) for v in y_sd]},
            "training": training, "metrics": metrics}


def export_model(path: str | Path, net: PatchRegressor, meta: dict) -> Path:
    kind = "teacher" if meta["role"] == "teacher" else "student"
    tensors = {k: v for k, v in net.state_dict().items()}
    return save_model(path, tensors, meta, kind=kind)


def load_parameter_model(path: str | Path, kind: str | None = None) -> tuple[ParameterModel, dict]:
    tensors, meta = load_model(path, kind=kind)
    name = Path(path).name
    try:
        if meta.get("kind") not in (None, "teacher", "student"):  # a diagnosis or synthesis model under another name
            raise ModelFileError(f"{name} is a '{meta.get('kind')}' model, not a teacher or student (parameter "
                                 "regression) model")
        if meta.get("meta_version") != META_VERSION:
            raise ModelFileError(f"{name} has regression-model metadata version {meta.get('meta_version')}; "
                                 f"this CT-SMA reads {META_VERSION}")
        if list(meta["parameters"]) != list(PARAMETERS):
            raise ModelFileError(f"{name} predicts {meta['parameters']}, not {list(PARAMETERS)}")
        try:
            net = build_network(meta["arch"])
        except (ValueError, TypeError) as exc:  # an architecture this CT-SMA does not know or a malformed record
            raise ModelFileError(f"{name} declares an architecture this CT-SMA cannot build: {exc}") from None
        missing, unexpected = net.load_state_dict(tensors, strict=False)
        if missing or unexpected:
            raise ModelFileError(f"{name} does not match its declared architecture "
                                 f"(missing {len(missing)}, unexpected {len(unexpected)} weights)")
        model = ParameterModel(net, meta)
    except KeyError as exc:
        raise ModelFileError(f"{name} lacks metadata field {exc}; it is not a CT-SMA regression model") from None
    except RuntimeError as exc:
        raise ModelFileError(f"{name} weights do not fit its architecture: {str(exc).splitlines()[0]}") from None
    model.eval()
    return model, meta


def load_student(path: str | Path) -> tuple[ParameterModel, dict]:
    """Load a CT student model file → (module taking raw HU patches, metadata). Use ``module.predict(patches)``."""
    return load_parameter_model(path, kind="student")


def load_teacher(path: str | Path) -> tuple[ParameterModel, dict]:
    """Load an MR teacher model file → (module, metadata)."""
    return load_parameter_model(path, kind="teacher")


def predict(model: ParameterModel, ct_patches, masks=None, batch_size: int = 256) -> np.ndarray:
    """(N,1,16,16,16) HU patches → (N,4) parameters in physical units (columns in ``PARAMETERS`` order)."""
    return model.predict(ct_patches, masks, batch_size)


def trained_on_phantom(meta: dict) -> bool:
    """Whether the model learnt from the digital phantom: its training store measured the phantom's truth."""
    info = (((meta.get("training") or {}).get("store_summary") or {}).get("attrs") or {}).get("subject_info") or {}
    return any(isinstance(v, dict) and str(v.get("true_source", "")).startswith("phantom") for v in info.values())


def describe(meta: dict) -> dict[str, Any]:
    """A short provenance record of a model (for reports and summary.json)."""
    training = meta.get("training") or {}
    split = training.get("split") or {}
    learnt = len(split.get("train") or []) + len(split.get("val") or [])  # the knees it learnt from (not its test)
    return {"role": meta.get("role"), "ctsma_version": meta.get("ctsma_version"), "target": meta.get("target"),
            "input": meta.get("input"), "metrics": meta.get("metrics"),
            "trained_on": learnt or (training.get("store_summary") or {}).get("n_subjects"),
            "trained_on_phantom": trained_on_phantom(meta)}

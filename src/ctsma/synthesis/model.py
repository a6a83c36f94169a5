"""The MR→pseudo-CT model: network + intensity normalisation + working grid, saved as one model file.

Model files are ``ctsma.modelfile`` files of kind ``"synthesis"`` (safetensors weights, JSON
metadata, checksum; no pickled code). The metadata holds everything needed to rebuild and apply
the model: ``architecture``, ``normalisation``, ``working_spacing_mm``, ``planes``, plus the
training summary and quality figures.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import ModelFileError
from ..modelfile import load_model, save_model
from .network import build_network

KIND = "synthesis"
PLANES = {"axial": 0, "coronal": 1, "sagittal": 2}  # numpy axis of the (z, y, x) array sliced along


def mr_scale(arr: np.ndarray) -> float:
    """Robust MR scale: the 99th percentile of the voxels above 5 % of the maximum (the body)."""
    sample = arr[:: max(1, arr.shape[0] // 64), ::2, ::2].ravel()
    fg = sample[sample > 0.05 * float(sample.max())]
    return float(np.percentile(fg, 99)) if fg.size else 1.0


def normalise_mr(arr: np.ndarray, norm: dict) -> np.ndarray:
    return np.clip(arr / max(mr_scale(arr), 1e-6), 0.0, norm.get("mr_clip", 2.0)).astype(np.float32)


def ct_to_target(hu: np.ndarray, norm: dict) -> np.ndarray:
    lo, hi = norm["ct_clip_hu"]
    return ((np.clip(hu, lo, hi) - norm["ct_offset_hu"]) / norm["ct_scale_hu"]).astype(np.float32)


def target_to_ct(y: np.ndarray, norm: dict) -> np.ndarray:
    lo, hi = norm["ct_clip_hu"]
    return np.clip(y * norm["ct_scale_hu"] + norm["ct_offset_hu"], lo, hi).astype(np.float32)


DEFAULT_NORMALISATION = {"mr": "divide by the 99th percentile of the body (voxels > 5% of max), clip to [0, 2]",
                         "mr_clip": 2.0, "ct_offset_hu": 0.0, "ct_scale_hu": 1000.0, "ct_clip_hu": [-1000.0, 2000.0]}


def resample_isotropic(img: sitk.Image, spacing: float, default: float = 0.0) -> sitk.Image:
    """``img`` on an isotropic grid of ``spacing`` mm in its own orientation and extent."""
    sp = np.asarray(img.GetSpacing())
    size = np.maximum(np.round(np.asarray(img.GetSize()) * sp / spacing).astype(int), 1)
    ref = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    ref.SetSpacing([float(spacing)] * 3)
    ref.SetDirection(img.GetDirection())
    # Keep the physical centre of the first voxel's extent.
    start = np.asarray(img.TransformContinuousIndexToPhysicalPoint([-0.5] * 3))
    d = np.asarray(img.GetDirection()).reshape(3, 3)
    ref.SetOrigin((start + d @ np.full(3, spacing / 2)).tolist())
    return sitk.Resample(img, ref, sitk.Transform(), sitk.sitkLinear, default, sitk.sitkFloat32)


def _check_metadata(meta: dict, name: str) -> None:
    """Refuse metadata :meth:`SynthesisModel.apply` cannot use (planes, working grid, normalisation)."""
    def bad(key: str, value) -> ModelFileError:
        return ModelFileError(f"synthesis model {name} has a damaged '{key}' in its metadata: {value!r}")

    planes = meta["planes"]
    if not isinstance(planes, list) or not planes or not all(isinstance(p, str) and p in PLANES for p in planes):
        raise bad("planes", planes)
    sp = meta["working_spacing_mm"]
    if isinstance(sp, bool) or not isinstance(sp, (int, float)) or not np.isfinite(sp) or sp <= 0:
        raise bad("working_spacing_mm", sp)
    norm = meta["normalisation"]
    try:
        lo, hi = (float(v) for v in norm["ct_clip_hu"])
        ok = (lo < hi and all(np.isfinite([float(norm["ct_offset_hu"]), float(norm["ct_scale_hu"])]))
              and float(norm["ct_scale_hu"]) != 0 and float(norm.get("mr_clip", 2.0)) > 0)
    except (TypeError, ValueError, KeyError):
        ok = False
    if not ok:
        raise bad("normalisation", norm)


class SynthesisModel:
    """A loaded synthesis model; call :meth:`apply` on an MR image to get its pseudo-CT (HU, MR frame)."""

    def __init__(self, net: torch.nn.Module, meta: dict):
        self.net = net.eval()
        self.meta = meta

    @property
    def architecture(self) -> dict:
        return self.meta["architecture"]

    @classmethod
    def load(cls, path: str | Path) -> "SynthesisModel":
        tensors, meta = load_model(path, kind=KIND)
        for key in ("architecture", "normalisation", "working_spacing_mm", "planes"):
            if key not in meta:
                raise ModelFileError(f"synthesis model {Path(path).name} lacks '{key}' in its metadata")
        _check_metadata(meta, Path(path).name)  # the checksum covers the weights only: a bad value gave a traceback
        try:
            net = build_network(meta["architecture"])
            net.load_state_dict(tensors)
        except (ValueError, RuntimeError, KeyError) as exc:
            raise ModelFileError(f"synthesis model {Path(path).name} does not match its architecture: "
                                 f"{str(exc).splitlines()[0]}") from None
        return cls(net, meta)

    def save(self, path: str | Path) -> Path:
        meta = {k: v for k, v in self.meta.items() if not k.startswith("_") and k not in ("kind", "ctsma_version")}
        return save_model(path, self.net.state_dict(), meta, kind=KIND)

    @torch.no_grad()
    def predict_array(self, mr_norm: np.ndarray, planes=None, batch: int = 8) -> np.ndarray:
        """Network output (normalised CT) for a normalised MR array (z, y, x), averaged over planes."""
        k = int(self.architecture["in_slices"]) // 2
        mult = 2 ** (int(self.architecture["depth"]) - 1)
        planes = planes or self.meta["planes"]
        acc = np.zeros(mr_norm.shape, np.float32)
        for plane in planes:
            ax = PLANES[plane]
            vol = np.moveaxis(mr_norm, ax, 0)
            pad_hw = [(0, (-s) % mult) for s in vol.shape[1:]]
            vol = np.pad(vol, [(k, k)] + pad_hw, mode="edge")
            out = np.empty((vol.shape[0] - 2 * k,) + vol.shape[1:], np.float32)
            for s0 in range(0, out.shape[0], batch):
                idx = range(s0, min(out.shape[0], s0 + batch))
                x = np.stack([vol[i:i + 2 * k + 1] for i in idx])
                out[s0:s0 + len(idx)] = self.net(torch.from_numpy(x))[:, 0].numpy()
            out = out[:, : out.shape[1] - pad_hw[0][1] or None, : out.shape[2] - pad_hw[1][1] or None]
            acc += np.moveaxis(out, 0, ax)
        return acc / len(planes)

    def apply(self, mr: sitk.Image, *, planes=None) -> sitk.Image:
        """Pseudo-CT (HU) of ``mr``, on an isotropic grid of the model's working spacing in the MR's frame."""
        work = resample_isotropic(mr, float(self.meta["working_spacing_mm"]))
        arr = normalise_mr(sitk.GetArrayFromImage(work), self.meta["normalisation"])
        threads = torch.get_num_threads()
        y = self.predict_array(arr, planes)
        torch.set_num_threads(threads)
        out = sitk.GetImageFromArray(target_to_ct(y, self.meta["normalisation"]))
        out.CopyInformation(work)
        return out

    __call__ = apply

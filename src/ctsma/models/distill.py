"""Feature distillation from a frozen teacher (MR) to a student (CT).

At each configured stage the student's feature map goes through an adapter (1×1×1 convolution to the teacher's
channel count, and trilinear resizing when the spatial sizes differ) and is compared with the teacher's map:

* ``l1`` / ``mse``: on per-sample normalised features (each map divided by its RMS over channels and voxels, so
  the loss is scale free and cannot be lowered by shrinking the features);
* ``attention``: attention transfer (Zagoruyko & Komodakis 2017): the channel-mean of squared activations,
  flattened and L2-normalised, compared by mean squared difference (no channel adapter needed).
* ``similarity``: similarity-preserving distillation (Tung & Mori 2019): each map's batch Gram matrix (the dot
  products of every pair of the batch's flattened feature maps), rows L2-normalised, compared by mean squared
  difference. It transfers how the teacher relates the patches of a batch to one another, not the features
  themselves (no adapter needed).

Total loss = ``regression_weight`` · regression + Σ γ_i · distill_i (+ ``output_weight`` · ‖ŷ_s − ŷ_t‖²).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _normalise(f: torch.Tensor) -> torch.Tensor:
    rms = f.pow(2).mean(dim=tuple(range(1, f.ndim)), keepdim=True).clamp_min(1e-12).sqrt()
    return f / rms


def similarity_matrix(f: torch.Tensor) -> torch.Tensor:
    """(batch, batch) Gram matrix of the flattened feature maps, rows L2-normalised; in float32 whatever the
    autocast (sums over thousands of products overflow float16). A batch of one has nothing to relate: 0 loss."""
    q = f.flatten(1).float()
    with torch.autocast(device_type=f.device.type, enabled=False):
        return F.normalize(q @ q.t(), dim=1)


def attention_map(f: torch.Tensor) -> torch.Tensor:
    a = f.pow(2).mean(dim=1).flatten(1)
    return F.normalize(a, dim=1)


class Adapter(nn.Module):
    """Student feature → teacher feature shape."""

    def __init__(self, cin: int, cout: int, size_in: int, size_out: int, channels: bool = True):
        super().__init__()
        self.proj = nn.Conv3d(cin, cout, 1) if channels else nn.Identity()
        self.size_out = size_out if size_out != size_in else None

    def forward(self, x):
        x = self.proj(x)
        if self.size_out is not None:
            x = F.interpolate(x, size=(self.size_out,) * 3, mode="trilinear", align_corners=False)
        return x


class FeatureDistillation(nn.Module):
    """Adapters and the weighted feature loss over the configured stages."""

    def __init__(self, student_shapes: dict, teacher_shapes: dict, stages, weights, loss: str = "l1"):
        super().__init__()
        self.stages = list(stages)
        self.weights = [float(w) for w in weights]
        self.loss = loss
        self.adapters = nn.ModuleDict({
            s: Adapter(student_shapes[s][0], teacher_shapes[s][0], student_shapes[s][1], teacher_shapes[s][1],
                       channels=(loss != "attention"))
            for s in self.stages if loss != "similarity"})

    def forward(self, student_feats: dict, teacher_feats: dict) -> tuple[torch.Tensor, dict]:
        total = None
        parts = {}
        for s, w in zip(self.stages, self.weights):
            ft = teacher_feats[s].detach()
            if self.loss == "similarity":  # the batch's relations: any channel count and size, no adapter
                d = (similarity_matrix(student_feats[s]) - similarity_matrix(ft)).pow(2).mean()
            elif self.loss == "attention":
                fs = self.adapters[s](student_feats[s])
                if fs.shape[2:] != ft.shape[2:]:
                    fs = F.interpolate(fs, size=ft.shape[2:], mode="trilinear", align_corners=False)
                d = (attention_map(fs) - attention_map(ft)).pow(2).mean()
            else:
                fs = self.adapters[s](student_feats[s])
                d = (F.mse_loss if self.loss == "mse" else F.l1_loss)(_normalise(fs), _normalise(ft))
            parts[s] = d.detach()
            total = w * d if total is None else total + w * d
        if total is None:
            total = torch.zeros(())
        return total, parts


def regression_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "mse") -> torch.Tensor:
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "huber":
        return F.smooth_l1_loss(pred, target)
    return F.mse_loss(pred, target)

"""3D CNNs that regress the four trabecular parameters from a patch (teacher: MR, student: CT).

Both are the same small residual network: a stem at the input resolution, three residual stages, global average
pooling and a small head. The stem brings any input to 8³ (the student's CT 16³: 3³ convolution, stride 2; the
teacher's MR 32³: non-overlapping 4³ patches, stride 4, so the first layer still sees every fine voxel; or, with
``stem="conv"``, 3³ convolutions of stride 2 until 8³, which read the fine structure better at about twice the
cost: docs/training.md, *A stronger teacher*), then
stages of stride 1, 2, 2 give 8³, 4³, 2³. Teacher and student feature maps therefore have the same spatial size
at every stage (stem, stage1..3) and distillation only needs a channel adapter. All compute runs at 8³ and
below, which is what lets the demo train on a 2-core CPU (3D convolutions over 16³-32³ maps with few channels
are memory-bound there: this design is ~2× faster than a 16³ stem); widths and blocks scale up for GPUs.
"""

from __future__ import annotations

from torch import nn

from .config import STAGES


def make_norm(kind: str, channels: int) -> nn.Module:
    """``batch`` (BatchNorm) or ``group`` (GroupNorm, 4 channels per group: no running statistics, so
    validation/inference behave exactly like training whatever the batch)."""
    if kind == "group":
        return nn.GroupNorm(max(1, channels // 4), channels)
    return nn.BatchNorm3d(channels)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, norm: str = "batch"):
        super().__init__()
        self.conv1 = nn.Conv3d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = make_norm(norm, cout)
        self.conv2 = nn.Conv3d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = make_norm(norm, cout)
        self.skip = (nn.Identity() if cin == cout and stride == 1 else
                     nn.Sequential(nn.Conv3d(cin, cout, 1, stride, bias=False), make_norm(norm, cout)))
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        y = self.act(self.bn1(self.conv1(x)))
        return self.act(self.bn2(self.conv2(y)) + self.skip(x))


STEM_SIZE = 8


def stem_stride(input_size: int) -> int:
    """Stride of the stem that brings the input to 8³ (2 for CT 16³, 4 for MR 32³)."""
    return max(1, input_size // STEM_SIZE)


def stem_kernel(stride: int) -> tuple[int, int]:
    """(kernel, padding): overlapping 3³ up to stride 2, non-overlapping ``stride``³ patches beyond."""
    return (3, 1) if stride <= 2 else (stride, 0)


STEMS = ("patchify", "conv")


def make_stem(in_channels: int, width: int, input_size: int, kind: str, norm: str) -> nn.Sequential:
    """The layers that bring a patch of ``input_size``³ to 8³ with ``width`` channels.

    ``patchify``: one convolution (:func:`stem_kernel`); ``conv``: 3³ convolutions of stride 2 (with norm and ReLU
    after each) until 8³, the same as ``patchify`` when one step is enough (CT 16³)."""
    if kind not in STEMS:
        raise ValueError(f"unknown stem {kind!r}; use one of {STEMS}")
    s0 = stem_stride(input_size)
    if kind == "patchify" or s0 <= 2:
        k, pad = stem_kernel(s0)
        return nn.Sequential(nn.Conv3d(in_channels, width, k, s0, pad, bias=False), make_norm(norm, width),
                             nn.ReLU(inplace=True))
    if input_size % STEM_SIZE or s0 & (s0 - 1):
        raise ValueError(f"a 'conv' stem needs an input size of 8 times a power of two, got {input_size}")
    layers, cin = [], in_channels
    while s0 > 1:
        layers += [nn.Conv3d(cin, width, 3, 2, 1, bias=False), make_norm(norm, width), nn.ReLU(inplace=True)]
        cin, s0 = width, s0 // 2
    return nn.Sequential(*layers)


def strides_for(input_size: int) -> tuple[int, int, int]:  # noqa: ARG001 - same for all inputs after the stem
    return (1, 2, 2)


class PatchRegressor(nn.Module):
    """Patch → (n, 4) normalised parameters; ``forward(x, return_features=True)`` also returns stage features."""

    def __init__(self, in_channels: int, input_size: int, widths=(16, 16, 32, 48), blocks: int = 1,
                 head_hidden: int = 32, n_outputs: int = 4, norm: str = "batch", stem: str = "patchify",
                 input_pool: int = 1):
        super().__init__()
        self.arch = {"in_channels": int(in_channels), "input_size": int(input_size), "widths": [int(w) for w in widths],
                     "blocks": int(blocks), "head_hidden": int(head_hidden), "n_outputs": int(n_outputs),
                     "norm": norm}
        if stem != "patchify":  # recorded only when not the default, so older model files read the same
            self.arch["stem"] = stem
        if input_pool != 1:  # the teacher reads its MR at a coarser voxel: docs/training.md, "Distillation settings"
            if input_pool < 1 or input_size % input_pool:
                raise ValueError(f"input_pool {input_pool} does not divide the patch size {input_size}")
            self.arch["input_pool"] = int(input_pool)
        self.pre = nn.AvgPool3d(input_pool) if input_pool > 1 else nn.Identity()
        w0, w1, w2, w3 = widths
        self.stem = make_stem(in_channels, w0, input_size // input_pool, stem, norm)
        stages = []
        cin = w0
        for cout, s in zip((w1, w2, w3), strides_for(input_size)):
            layers = [ResBlock(cin, cout, s, norm)] + [ResBlock(cout, cout, 1, norm) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stage1, self.stage2, self.stage3 = stages
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = (nn.Sequential(nn.Flatten(), nn.Linear(w3, head_hidden), nn.ReLU(inplace=True),
                                   nn.Linear(head_hidden, n_outputs)) if head_hidden
                     else nn.Sequential(nn.Flatten(), nn.Linear(w3, n_outputs)))

    def feature_shapes(self) -> dict[str, tuple[int, int]]:
        """Stage name → (channels, spatial size)."""
        n = self.arch["input_size"] // self.arch.get("input_pool", 1)
        for conv in (m for m in self.stem if isinstance(m, nn.Conv3d)):  # the stem as built, whatever its kind
            n = (n + 2 * conv.padding[0] - conv.kernel_size[0]) // conv.stride[0] + 1
        out = {"stem": (self.arch["widths"][0], n)}
        for name, w, s in zip(STAGES[1:], self.arch["widths"][1:], strides_for(n)):
            n = (n + s - 1) // s  # padding 1, kernel 3
            out[name] = (w, n)
        return out

    def forward(self, x, return_features: bool = False):
        feats = {}
        x = self.stem(self.pre(x))
        feats["stem"] = x
        for name in STAGES[1:]:
            x = getattr(self, name)(x)
            feats[name] = x
        y = self.head(self.pool(x))
        return (y, feats) if return_features else y


def build_network(arch: dict) -> PatchRegressor:
    """A network from its ``arch`` record (as stored in the model file)."""
    return PatchRegressor(arch["in_channels"], arch["input_size"], arch["widths"], arch["blocks"],
                          arch["head_hidden"], arch.get("n_outputs", 4), arch.get("norm", "batch"),
                          arch.get("stem", "patchify"), arch.get("input_pool", 1))

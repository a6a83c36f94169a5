"""A small 2.5D U-Net: a stack of neighbouring MR slices in, the centre slice's pseudo-CT out.

2.5D (slices as channels, 2D convolutions) is several times cheaper than 3D on a CPU while still
giving through-plane context; training samples slices along all three axes so that the network
can be applied along each axis and the three predictions averaged (a tri-planar ensemble).
The receptive field (about 70 voxels at depth 3) sees the body outline, which is what tells
dark bone from dark air in BFFE.
"""

from __future__ import annotations

import torch
from torch import nn


def _block(cin: int, cout: int) -> nn.Sequential:
    # Batch norm (running statistics at inference), not instance norm: training patches and whole
    # inference slices differ in content, and per-image statistics would shift the output HU.
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout),
                         nn.LeakyReLU(0.1, inplace=True), nn.Conv2d(cout, cout, 3, padding=1),
                         nn.BatchNorm2d(cout), nn.LeakyReLU(0.1, inplace=True))


class UNet25D(nn.Module):
    """U-Net on (batch, slices, H, W) → (batch, 1, H, W); H and W must be multiples of 2**(depth-1)."""

    def __init__(self, in_slices: int = 5, base: int = 16, depth: int = 3):
        super().__init__()
        self.depth = depth
        chans = [base * 2 ** i for i in range(depth)]
        self.down = nn.ModuleList()
        cin = in_slices
        for c in chans:
            self.down.append(_block(cin, c))
            cin = c
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up.append(nn.ConvTranspose2d(cin, c, 2, stride=2))
            self.dec.append(_block(2 * c, c))
            cin = c
        self.head = nn.Conv2d(cin, 1, 1)
        self.pool = nn.MaxPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, blk in enumerate(self.down):
            x = blk(x)
            if i < self.depth - 1:
                skips.append(x)
                x = self.pool(x)
        for up, dec in zip(self.up, self.dec):
            x = dec(torch.cat([up(x), skips.pop()], 1))
        return self.head(x)


def build_network(arch: dict) -> UNet25D:
    """The network described by a model file's ``architecture`` metadata."""
    if arch.get("type") != "unet25d":
        raise ValueError(f"unknown synthesis architecture {arch.get('type')!r}")
    return UNet25D(int(arch["in_slices"]), int(arch["base"]), int(arch["depth"]))

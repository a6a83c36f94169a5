"""MR→pseudo-CT synthesis: a small 2.5D U-Net trained by weak pairing (no ground-truth transforms).

``train(pairs, cfg) -> SynthesisModel``, ``SynthesisModel.load(path).apply(mr) -> pseudo-CT``,
``quality(pseudo_ct, ct, true_transform, bones)``. See docs/registration.md.
"""

from .model import SynthesisModel
from .training import TrainConfig, load_train_config, train

__all__ = ["SynthesisModel", "TrainConfig", "load_train_config", "train"]

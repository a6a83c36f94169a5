"""Teacher (MR) and student (CT) CNNs, feature distillation, Lightning training and model files.

Public API for other parts of CT-SMA:

* :func:`load_student` → ``(module, meta)``; ``module.predict(ct_patches_hu)`` → (N, 4) in physical units;
* :func:`predict` (same, as a function); :func:`load_teacher`;
* :func:`train` (``"teacher" | "student" | "baseline"``) with a :class:`TrainConfig` from :func:`load_train_config`.

Heavy imports (Lightning) happen only when training.
"""

from .config import TrainConfig, load_train_config
from .export import ParameterModel, load_student, load_teacher, predict
# The function and its submodule share the name ``train``. Imported here, once, the package's ``train`` is the
# function for good: a lazy wrapper that imported the submodule on its first call was replaced by the submodule
# itself, so a second ``ctsma.models.train(...)`` in the same process failed (found by the demo's training workers).
from .train import train

__all__ = ["TrainConfig", "load_train_config", "ParameterModel", "load_student", "load_teacher", "predict", "train"]

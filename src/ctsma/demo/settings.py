"""Settings of the end-to-end demo (sized for a 2-core CPU and a 20-minute budget)."""

from __future__ import annotations

from dataclasses import dataclass

from ..config import setting


@dataclass
class DemoSettings:
    n: int = setting(36, lo=8, hi=10_000, help="knees in the phantom cohort")
    seed: int = setting(0, lo=0, hi=2**31 - 1,
                        help="seed of the cohort, the patch sampling, the folds, the training, the bootstrap and the "
                             "diagnosis; the synthesis and registration use fixed seeds of their own")
    workers: int = setting(2, lo=1, hi=256,
                           help="parallel processes (phantom, registration, dataset, CPU training, diagnosis)")
    phantom_preset: str = setting("demo", choices=("demo", "full"))
    synthesis_knees: int = setting(6, lo=2, hi=10_000,
                                   help="knees used to train the MR->pseudo-CT model; TRE is reported on the others")
    registration_preset: str = setting("demo", help="registration preset for the cohort")
    variant_knees: int = setting(3, lo=0, hi=10_000,
                                 help="unseen knees on which the registration variants are compared")
    folds: int = setting(3, lo=2, hi=20, help="patient-level cross-fitting folds for teacher/students")
    train_config: str = setting("demo", help="training config: 'demo' (Resources/Configs/demo.yaml, CPU-sized), "
                                "'gpu' (gpu.yaml: 50x larger networks, for a GPU) or a YAML path")
    diagnosis_folds: int = setting(5, lo=2, hi=20)
    aggregators: list[str] = setting(["transformer", "mlp", "logistic"])

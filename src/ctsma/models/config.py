"""Training configuration (YAML → dataclasses via :func:`ctsma.config.load_config`).

One file drives the teacher, the distilled student and the baseline student, so the three share data, split
and schedule. Paths in the file are relative to the file's folder.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ..config import load_config, setting, to_dict

STAGES = ("stem", "stage1", "stage2", "stage3")
ROLES = ("teacher", "student_distilled", "student_baseline")  # what a trained model file is (its metadata's role)


@dataclass
class DataConfig:
    store: str = setting("", help="patch store folder (patches.h5 + patches.csv)")
    target: str = setting("mr", choices=("mr", "true"), help="regress the MR reference or the phantom truth")
    test_fraction: float = setting(0.25, lo=0.0, hi=0.9, help="fraction of PATIENTS held out for testing")
    val_fraction: float = setting(0.2, lo=0.0, hi=0.9, help="fraction of the other patients used for validation")
    k_folds: int = setting(0, lo=0, hi=100, help="0: fraction split; k>=2: patient k-fold, test = fold `fold`")
    fold: int = setting(0, lo=0, hi=99)
    split_seed: int = setting(0, lo=0, hi=2**31 - 1)
    use_stored_split: bool = setting(True, help="use the store's split column when it is complete")
    masks: bool = setting(False, help="add the ROI mask as a second input channel")
    augment: bool = setting(True, help="random flips/axis permutations (same for CT and MR)")
    batch_size: int = setting(32, lo=1, hi=4096)
    ram_budget_gb: float = setting(4.0, lo=0.0, hi=1024.0, help="cache the store in RAM when it fits")
    num_workers: int = setting(0, lo=0, hi=64)


@dataclass
class NetConfig:
    widths: list[int] = setting([16, 16, 32, 48], help="channels of stem, stage1, stage2, stage3")
    blocks: int = setting(1, lo=1, hi=8, help="residual blocks per stage")
    head_hidden: int = setting(32, lo=0, hi=4096, help="hidden units of the regression head (0: linear)")
    norm: str = setting("batch", choices=("batch", "group"),
                        help="BatchNorm (default: better validation loss on the phantom store) or GroupNorm")
    stem: str = setting("patchify", choices=("patchify", "conv"),
                        help="how a 32³ MR patch is brought to 8³: one 4³ convolution of stride 4, or two 3³ "
                             "convolutions of stride 2 (a better teacher at about twice its training time; the same "
                             "for the CT student's 16³); docs/training.md")
    input_pool: int = setting(1, lo=1, hi=4, help="average-pool the input patch by this factor first (2: the "
                                                  "teacher reads its MR at the CT's 0.5 mm voxel; measured, not "
                                                  "the default: docs/training.md)")


@dataclass
class DistillConfig:
    stages: list[str] = setting(["stage1", "stage2", "stage3"], help=f"teacher/student stages to match, of {STAGES}")
    weights: list[float] = setting([1.0, 1.0, 1.0], help="weight per distilled stage (γ_i)")
    loss: str = setting("l1", choices=("l1", "mse", "attention", "similarity"),
                        help="l1/mse on per-sample normalised features (after an adapter), attention transfer, or "
                             "similarity preservation (the batch's patch-to-patch relations)")
    regression_weight: float = setting(1.0, lo=0.0, hi=1e6)
    output_weight: float = setting(0.0, lo=0.0, hi=1e6, help="weight of matching the teacher's predictions")
    teacher: str = setting("", help="teacher model file; empty: <output.dir>/teacher<output.name>.safetensors")


@dataclass
class OptimConfig:
    lr: float = setting(3e-3, lo=1e-7, hi=1.0)
    weight_decay: float = setting(1e-4, lo=0.0, hi=1.0)
    max_epochs: int = setting(30, lo=1, hi=100_000)
    patience: int = setting(8, lo=0, hi=100_000, help="early stopping on validation loss; 0 disables")
    scheduler: str = setting("cosine", choices=("cosine", "step", "none"))
    step_size: int = setting(10, lo=1, hi=100_000)
    gamma: float = setting(0.5, lo=0.0, hi=1.0)
    loss: str = setting("mse", choices=("mse", "l1", "huber"), help="regression loss on normalised targets")
    grad_clip: float = setting(5.0, lo=0.0, hi=1e6, help="gradient norm clip; 0 disables")
    select: str = setting("best", choices=("best", "last"),
                          help="exported weights: the epoch with the lowest validation loss, or the last epoch")
    precise_bn: int = setting(2048, lo=0, hi=10_000_000,
                              help="before each validation, recompute BatchNorm statistics over this many training "
                                   "patches (no augmentation) with the current weights; 0: keep the running averages")
    val_every: int = setting(1, lo=1, hi=100_000,
                             help="validate (and recompute precise BatchNorm) every N epochs and after the last one; "
                                  "early stopping's patience counts validations, and select=best picks among the "
                                  "validated epochs (with select=last and patience 0 the model does not change)")


@dataclass
class TrainerConfig:
    seed: int = setting(0, lo=0, hi=2**31 - 1)
    accelerator: str = setting("cpu", choices=("cpu", "gpu", "auto"), help="auto: GPU when present")
    devices: int = setting(1, lo=1, hi=1024, help="GPUs (or CPU processes) per node")
    num_nodes: int = setting(1, lo=1, hi=4096)
    strategy: str = setting("auto", choices=("auto", "ddp", "ddp_spawn", "ddp_find_unused_parameters_true"))
    precision: str = setting("auto", choices=("auto", "32", "16-mixed", "bf16-mixed"),
                             help="auto: bf16-mixed on a GPU that has it, else 16-mixed; 32 on CPU")
    threads: int = setting(0, lo=0, hi=1024, help="torch CPU threads; 0 leaves the default")
    progress_bar: bool = setting(True)
    deterministic: bool = setting(False, help="torch deterministic algorithms: on a CPU this disables oneDNN "
                                  "3D convolutions (~100x slower); seeded CPU runs repeat exactly without it")


@dataclass
class OutputConfig:
    dir: str = setting("ctsma_models", help="run folder: checkpoints, logs, model files")
    name: str = setting("", help="model file stem suffix, e.g. for ablations (teacher{name}.safetensors; the "
                                 "distilled student reads the teacher of the same suffix)")


@dataclass
class EvaluateConfig:
    n_boot: int = setting(1000, lo=10, hi=100_000, help="patient bootstrap replicates for the distillation gain")
    ct_threshold_hu: float = setting(0.0, lo=-2000.0, hi=5000.0,
                                     help="'ct_direct' bone threshold in HU; 0: Otsu over the test patches")
    plots: bool = setting(True)
    flips: int = setting(4, choices=(1, 4, 8), help="flipped copies averaged per patch: 4 as `ctsma infer` does "
                         "(8 as `infer --tta`; 1: none)")
    ablations: list[dict] = setting([], help="student variants: [{name: s1, distill: {stages: [...], weights: [...]}}]")


@dataclass
class TrainConfig:
    data: DataConfig = field(default_factory=DataConfig)
    teacher_net: NetConfig = field(default_factory=NetConfig)
    student_net: NetConfig = field(default_factory=NetConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    base_dir: str = setting("", help="(internal) folder that relative paths are resolved against")


def _check(cfg: TrainConfig, variants: bool = True) -> TrainConfig:
    from ..errors import ConfigError

    for net in ("teacher_net", "student_net"):
        w = getattr(cfg, net).widths
        if len(w) != 4 or min(w) < 1 or max(w) > 2048:
            raise ConfigError(f"{net}.widths needs four channel counts in [1, 2048], not {w}")
    bad = [s for s in cfg.distill.stages if s not in STAGES]
    if bad:
        raise ConfigError(f"distill.stages: unknown stage(s) {bad}; choose from {', '.join(STAGES)}")
    if len(set(cfg.distill.stages)) != len(cfg.distill.stages):
        raise ConfigError("distill.stages lists a stage twice")
    if len(cfg.distill.weights) != len(cfg.distill.stages):
        raise ConfigError(f"distill.weights needs one weight per stage ({len(cfg.distill.stages)}), "
                          f"not {len(cfg.distill.weights)}")
    if any(w < 0 for w in cfg.distill.weights):
        raise ConfigError("distill.weights must not be negative")
    if cfg.data.k_folds and not (2 <= cfg.data.k_folds and cfg.data.fold < cfg.data.k_folds):
        raise ConfigError(f"data.k_folds={cfg.data.k_folds} needs k>=2 and fold < k (fold={cfg.data.fold})")
    for i, a in enumerate(cfg.evaluate.ablations):
        if not isinstance(a, dict) or not isinstance(a.get("name"), str) or not a["name"].isidentifier():
            raise ConfigError(f"evaluate.ablations[{i}] needs a 'name' (letters, digits, _) and overrides")
        unknown = sorted(set(a) - {"name", "distill", "optim"})
        if unknown:
            raise ConfigError(f"evaluate.ablations[{i}]: unknown key(s) {unknown} (allowed: name, distill, optim)")
        if a["name"] in [b.get("name") for b in cfg.evaluate.ablations[:i] if isinstance(b, dict)]:
            raise ConfigError(f"evaluate.ablations[{i}]: the name '{a['name']}' is used twice (each variant's model "
                              "file and result are named by it)")
        try:  # its overrides checked now, not after the evaluation of the other models (or as a traceback)
            if variants:  # (not in a variant's own config: the overrides apply to the base run's)
                _check(load_config(to_dict(cfg), TrainConfig, overrides={k: v for k, v in a.items() if k != "name"}),
                       variants=False)
        except ConfigError as exc:
            raise ConfigError(f"evaluate.ablations[{i}] ({a['name']}): {exc}") from None
    return cfg


def variant(cfg: TrainConfig, ablation: dict) -> TrainConfig:
    """The config of one ablation variant (its overrides applied; model files named with its suffix)."""
    import dataclasses

    from .train import teacher_path

    base = to_dict(cfg)
    over = {k: v for k, v in ablation.items() if k != "name"}
    over["output"] = {"name": f"_{ablation['name']}"}
    if not (over.get("distill") or {}).get("teacher"):  # the base run's teacher, not one of the variant's name
        over["distill"] = {**(over.get("distill") or {}), "teacher": str(teacher_path(cfg))}  # a copy: the
        # ablation's own overrides are reported as written
    new = _check(load_config(base, TrainConfig, overrides=over), variants=False)  # the base run's ablations are
    # checked against the base run's settings, not this variant's
    return dataclasses.replace(new, base_dir=cfg.base_dir)


SHIPPED_TRAIN_CONFIGS = ("demo", "gpu")
"""Training configs shipped in ``Resources/Configs/`` that a name gives: ``demo`` (CPU-sized), ``gpu`` (wider)."""


def shipped_or_path(config):
    """``config`` itself, or the shipped config it names (``demo``, ``gpu``: ``Resources/Configs/<name>.yaml``)."""
    if isinstance(config, (str, Path)) and str(config) in SHIPPED_TRAIN_CONFIGS:
        from ..resources import resource_path

        return resource_path("Configs", f"{config}.yaml")
    return config


def load_train_config(path=None, overrides=None) -> TrainConfig:
    """Load and check a training config (a file, a mapping, or a shipped config's name: :data:`SHIPPED_TRAIN_CONFIGS`);
    relative paths resolve against the file's folder, or for a config given by name against the current folder (its
    ``output.dir``, ``ctsma_models``, went into the installed package's Resources/Configs)."""
    named = shipped_or_path(path)
    if isinstance(named, (str, Path)) and not Path(named).exists():
        from ..errors import ConfigError
        raise ConfigError(f"config file not found: {named} (or name a shipped config: "
                          f"{', '.join(SHIPPED_TRAIN_CONFIGS)})")
    cfg = _check(load_config(named, TrainConfig, overrides=overrides))
    if named is not None and not isinstance(named, dict) and not cfg.base_dir:
        cfg.base_dir = str(Path.cwd() if named is not path else Path(named).resolve().parent)
    return cfg


def resolve(cfg: TrainConfig, p: str) -> Path:
    q = Path(p).expanduser()
    return q if q.is_absolute() or not cfg.base_dir else Path(cfg.base_dir) / q

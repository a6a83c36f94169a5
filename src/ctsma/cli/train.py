"""``ctsma train teacher|student|baseline --config FILE``: train a regression model (see docs/training.md)."""

from __future__ import annotations

import yaml


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train the MR teacher, the distilled CT student or the CT baseline")
    p.add_argument("model", choices=("teacher", "student", "baseline"),
                   help="teacher (MR), student (CT, distilled from the teacher) or baseline (CT, no distillation)")
    p.add_argument("--config", required=True, help="training YAML, or a shipped config by name: demo "
                   "(CPU-sized, Resources/Configs/demo.yaml), gpu (wider networks)")
    p.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    p.add_argument("--store", default=None, help="patch store folder (overrides data.store)")
    p.add_argument("--out", default=None, help="run folder (overrides output.dir)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting, e.g. --set optim.max_epochs=5 --set distill.stages=[stage2]")
    p.set_defaults(func=run)


def overrides_from(args) -> dict:
    from ..errors import ConfigError

    over: dict = {}
    for item in args.set:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ConfigError(f"--set expects KEY=VALUE, not {item!r}")
        node = over
        parts = key.split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is set to {node!r} by an earlier --set")
        try:
            node[parts[-1]] = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ConfigError(f"--set {key}: {value!r} is not a YAML value "
                              f"({str(exc).splitlines()[0]}; a list is written [a, b])") from None
    if getattr(args, "store", None):
        over.setdefault("data", {})["store"] = str(_abs(args.store))
    if getattr(args, "out", None):
        over.setdefault("output", {})["dir"] = str(_abs(args.out))
    return over


def _abs(p):
    from pathlib import Path
    return Path(p).resolve()


def run(args) -> int:
    from ..models.config import load_train_config
    from ..models.train import train

    cfg = load_train_config(args.config, overrides_from(args))
    train(args.model, cfg, resume=args.resume)
    return 0

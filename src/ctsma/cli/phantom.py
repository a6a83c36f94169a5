"""``ctsma phantom``: generate a digital knee phantom cohort (MR, CT, labels, transforms, truth)."""

from __future__ import annotations

import argparse


def _run(args: argparse.Namespace) -> int:
    from ..config import read_mapping
    from ..phantom import generate_cohort, make_settings
    from .. import progress
    overrides = read_mapping(args.config) if args.config else {}
    if "preset" in overrides:
        from ..errors import ConfigError
        raise ConfigError("set the preset with --preset, not in the config file")
    from dataclasses import fields

    from ..phantom.settings import PhantomSettings
    allowed = sorted(f.name for f in fields(PhantomSettings) if f.name != "preset")
    unknown = sorted(set(map(str, overrides)) - set(allowed))
    if unknown:  # the generic message would offer 'preset', which a config file may not set
        from ..errors import ConfigError
        raise ConfigError(f"unknown setting{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                          f"(allowed: {', '.join(allowed)})")
    settings = make_settings(args.preset, overrides)  # every setting checked before any work
    manifest = generate_cohort(settings, args.n, args.seed, args.out, workers=args.workers)
    progress.info(f"phantom: {args.n} knees ready; manifest: {manifest}")
    return 0


def _int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    return v


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "phantom", help="generate a digital knee phantom cohort",
        description="Generate N synthetic knees (BFFE MR, clinical CT, bone/cartilage/ROI labels, the true "
                    "CT->MR transform, landmarks and true microstructure parameters) and a manifest.csv. "
                    "Deterministic for a seed; an interrupted run resumes without redoing finished knees.")
    p.add_argument("--n", type=_int, required=True, help="number of knees")
    p.add_argument("--seed", type=_int, default=0, help="cohort seed (default 0)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--workers", type=_int, default=1, help="parallel processes (default 1)")
    p.add_argument("--preset", default="demo", help="demo (fast, default) or full (finer, larger images)")
    p.add_argument("--config", default=None, help="YAML/JSON file overriding individual settings")
    p.set_defaults(func=_run)

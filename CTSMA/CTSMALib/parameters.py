"""Plain parameter dataclasses of the two modules (no Qt, no MRML).

The Widgets keep GUI state in a ``parameterNodeWrapper`` parameter node (saved with the
scene); when the user presses Apply they build one of these and hand it to the Logic, so the
Logic can also be driven from scripts and tests.
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass

DEVICES = ("auto", "cpu", "cuda")
SIDES = ("auto", "L", "R")


def _thread_env(threads: int) -> dict[str, str]:
    if threads <= 0:
        return {}
    n = str(int(threads))
    return {"OMP_NUM_THREADS": n, "NUMBA_NUM_THREADS": n, "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": n,
            "MKL_NUM_THREADS": n}


# options of 'ctsma register' that the module sets, or that belong to cohort mode: refused in the extra options
MODULE_OPTIONS = ("--out", "--ct-bones", "--preset", "--threads", "--manifest", "--shard", "--jobs", "--limit")


@dataclass
class RegistrationParameters:
    """Options of a CTSMARegistration run. ``preset`` "" means the command line's default."""

    preset: str = ""
    threads: int = 0  # 0 = let the command decide
    extraArgs: str = ""  # advanced: extra 'ctsma register' options, e.g. "--model synth.safetensors"
    keepWorkDir: bool = False
    resampleMr: bool = True  # load "MR in CT"; False: put the MR volume under the transform instead

    def env(self) -> dict[str, str]:
        return _thread_env(self.threads)

    def extra(self) -> list[str]:
        """The extra options as arguments; a line that does not split, or an option the module sets itself, is a
        :class:`ConfigError` (a second ``--out`` would send the results where the module does not look)."""
        from ctsma.errors import ConfigError

        try:
            args = shlex.split(self.extraArgs) if self.extraArgs.strip() else []
        except ValueError as exc:
            raise ConfigError(f"extra options {self.extraArgs!r}: {exc}") from None
        owned = [a.split("=")[0] for a in args if a.split("=")[0] in MODULE_OPTIONS]
        if owned:
            raise ConfigError(f"extra options: {owned[0]} is set by the module itself (use its own field, or the "
                              "command line for cohort options)")
        return args


@dataclass
class AnalysisParameters:
    """Options of a CTSMA analysis run."""

    modelPath: str = ""  # "" = the model shipped with the extension
    device: str = "auto"
    side: str = "auto"  # knee side; "auto": from anatomy (the fibula is lateral)
    matchSharpness: bool = True  # blur a CT sharper than the model's training CTs to them (ctsma infer's default)
    threads: int = 0
    keepWorkDir: bool = False

    def __post_init__(self):
        from ctsma.errors import ConfigError

        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)} (got '{self.device}')")
        if self.side not in SIDES:
            raise ConfigError(f"knee side must be one of {', '.join(SIDES)} (got '{self.side}')")

    def env(self) -> dict[str, str]:
        return _thread_env(self.threads)

"""Entry point of the ``ctsma`` command.

Each subcommand lives in its own module of this package and exposes
``add_parser(subparsers)``, which registers the subparser and sets ``func``.
A user error (:class:`ctsma.errors.UserError`) prints one line and exits with code 2;
``--debug`` shows the traceback instead. The global options (``--debug``, ``--quiet``, ``--progress-jsonl``) may
stand before or after the command.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import warnings
from pathlib import Path

from .. import __version__, progress
from ..errors import UserError

# Subcommand modules, in the order shown by --help. Only working subcommands are listed.
SUBCOMMANDS: list[str] = ["phantom", "morphometry", "synthesis", "register", "segment", "dataset", "train",
                           "evaluate", "crossfit", "diagnose", "infer", "report", "demo"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ctsma",
        description="CT-SMA: subchondral trabecular bone microstructure analysis and knee OA "
                    "diagnosis from clinical CT, distilled from high-resolution MR.")
    parser.add_argument("--version", action="version", version=f"ctsma {__version__}")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks for errors")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    parser.add_argument("--progress-jsonl", metavar="FILE", default=None,
                        help="append machine-readable progress events (JSON lines) to FILE")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"{__package__}.{name}").add_parser(sub)
    return parser


def _format_warning(message, category, filename, lineno, line=None):  # noqa: ARG001
    return f"warning: {message}\n"


def _new_output_root(args) -> Path | None:
    """The topmost folder that ``--out`` would create (None when it exists already)."""
    out = getattr(args, "out", None)
    if not isinstance(out, (str, Path)) or not str(out):
        return None
    path = Path(out).absolute()
    if path.exists():
        return None
    while not path.parent.exists() and path.parent != path:
        path = path.parent
    return path


def _remove_if_empty(root: Path | None) -> None:
    """Remove ``root`` when the failed command left nothing but empty folders in it (never a file)."""
    if root is None or not root.is_dir() or any(p.is_file() or p.is_symlink() for p in root.rglob("*")):
        return
    for d in sorted((p for p in root.rglob("*") if p.is_dir()), key=lambda p: len(p.parts), reverse=True):
        d.rmdir()
    root.rmdir()


PATH_OPTIONS = ("--config", "--model", "--models", "--manifest", "--store", "--patches", "--labels", "--rois",
                "--segmentation", "--registrations", "--reference", "--predictions", "--metrics", "--roc", "--mask",
                "--bones", "--ct-bones", "--mr-bones", "--diagnosis-model", "--figures",
                "--readme-snippet")
"""Options that name a file or folder (besides ``--out``): an empty one is refused before any work."""


def _check_common(args, argv: list[str]) -> None:
    """Refuse, before any work, an empty ``--out`` (it would write into the current folder; read from the command
    line itself, since a path-typed option turns "" into ".") or other path option (:data:`PATH_OPTIONS`; ``--store
    ""`` fell back to the config's store) and a ``--progress-jsonl`` file that cannot be
    appended to."""
    for flag in ("--out", *PATH_OPTIONS):  # an unset shell variable: "" fell back to the config's path or became "."
        given = [v for k, v in zip(argv, argv[1:]) if k == flag] + [a.partition("=")[2] for a in argv
                                                                     if a.startswith(flag + "=")]
        if any(not v.strip() for v in given):
            raise UserError("--out is empty; name an output path" if flag == "--out" else
                            f"{flag} is empty (an unset variable?); name a path, or leave {flag} out")
    out = getattr(args, "out", None)
    if isinstance(out, (str, Path)) and str(out):
        target = Path(out).resolve()
        for key, value in vars(args).items():
            values = value if isinstance(value, (list, tuple)) else [value]
            for v in values:
                if key != "out" and isinstance(v, (str, Path)) and str(v) and Path(v).is_file() \
                        and Path(v).resolve() == target:
                    raise UserError(f"--out {out} is also an input of this command; choose another output path")
    path = args.progress_jsonl
    if path:
        p = Path(path)
        if p.is_dir():
            raise UserError(f"--progress-jsonl {path} is a folder; name a file")
        if not p.parent.is_dir():
            raise UserError(f"--progress-jsonl {path}: folder {p.parent} does not exist")
        try:
            with open(p, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            raise UserError(f"--progress-jsonl {path} cannot be written: {exc.strerror or exc}") from None


GLOBAL_FLAGS = ("--debug", "--quiet")
GLOBAL_VALUED = ("--progress-jsonl",)


def hoist_global_options(argv: list[str]) -> list[str]:
    """``argv`` with the global options moved to the front, so that ``ctsma infer CT --out D --debug`` works as
    ``ctsma --debug infer CT --out D`` does (argparse reads them only before the command). A literal ``--`` ends
    the search."""
    front, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == "--":
            rest += argv[i:]
            break
        if a in GLOBAL_FLAGS or any(a.startswith(f"{g}=") for g in GLOBAL_VALUED):
            front.append(a)
        elif a in GLOBAL_VALUED and i + 1 < len(argv):
            front += argv[i:i + 2]
            i += 1
        else:
            rest.append(a)
        i += 1
    return front + rest


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = hoist_global_options(sys.argv[1:] if argv is None else list(argv))
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s: %(message)s")
    if not args.debug:
        warnings.formatwarning = _format_warning
    try:
        _check_common(args, argv)
    except UserError as exc:
        print(f"ctsma {args.command}: error: {exc}", file=sys.stderr)
        return 2
    progress.configure(jsonl_path=args.progress_jsonl, quiet=args.quiet)
    new_root = _new_output_root(args)
    previous = _on_sigterm_interrupt()
    try:
        rc = args.func(args)
    except UserError as exc:
        _remove_if_empty(new_root)  # an output folder this run created for nothing is not left behind
        if args.debug:
            raise
        print(f"ctsma {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except Exception:
        _remove_if_empty(new_root)  # a defect: its traceback is shown, but no empty folder is left
        raise
    except KeyboardInterrupt:
        _remove_if_empty(new_root)
        # the handler's flag, not the exception: Lightning turns the signal's exception into its own interrupt
        terminated = _SIGTERM_SEEN[0]
        how = "terminated (SIGTERM)" if terminated else "interrupted"
        rest = RESUMING.get(args.command, "a rerun starts again")
        print(f"ctsma {args.command}: {how}; nothing half-written is left, outputs finished before are kept, and "
              f"{rest}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return int(rc or 0)


# commands whose rerun goes on from there, and how
RESUMING = {**dict.fromkeys(("phantom", "register", "dataset", "infer", "demo"), "a rerun resumes"),
            "train": "'ctsma train ... --resume' goes on from the last finished epoch (a rerun without --resume "
                     "starts again and replaces this run)"}


class Terminated(KeyboardInterrupt):
    """SIGTERM (a cluster's scancel or time limit, Slicer's Cancel, kill): handled as Ctrl-C is, so that worker
    pools are stopped and staged outputs removed instead of the process dying where it stands."""


_SIGTERM_SEEN = [False]


def _on_sigterm_interrupt():
    """Raise :class:`Terminated` on SIGTERM from now on; returns the previous handler (None off the main thread,
    where Python cannot install one)."""
    _SIGTERM_SEEN[0] = False

    def handler(signum, frame):  # noqa: ARG001
        _SIGTERM_SEEN[0] = True
        raise Terminated()
    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

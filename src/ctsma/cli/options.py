"""Command-line options that set config values: errors name the option the user typed, not the config key."""

from __future__ import annotations

import re
from contextlib import contextmanager

from ..errors import ConfigError


def given(pairs) -> tuple[dict, dict]:
    """``(overrides, names)`` from ``(key, flag, value)`` triples: the values that were given (not None), as config
    overrides, and the flag each key came from."""
    over, names = {}, {}
    for key, flag, value in pairs:
        if value is not None:
            over[key], names[key] = value, flag
    return over, names


@contextmanager
def named_as_options(names: dict):
    """Re-raise a :class:`ConfigError` raised inside with each config key of ``names`` (key -> flag) written as its
    command-line flag: ``end_mm = -3 is out of range`` becomes ``--end-mm -3 is out of range``. Only the keys that
    came from options belong in ``names``: a value read from a config file keeps its key."""
    try:
        yield
    except ConfigError as exc:
        msg, sep, allowed = str(exc).partition(" (allowed: ")  # the list of config keys stays in config keys
        for key, flag in names.items():
            msg = re.sub(rf"(?<![\w.\-]){re.escape(key)} = ", f"{flag} ", msg)
            msg = re.sub(rf"(?<![\w.\-]){re.escape(key)}(?![\w])", flag, msg)
        if msg + sep + allowed == str(exc):
            raise
        raise ConfigError(msg + sep + allowed) from None

"""Errors that mean "the user gave something wrong", as opposed to a bug.

The command line prints a :class:`UserError` as one line and exits with code 2;
any other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, settings or environment, explained in plain words."""


class InputImageError(UserError):
    """An input image is missing, unreadable or unsuitable."""


class ConfigError(UserError):
    """A configuration file or value is invalid."""


class ModelFileError(UserError):
    """A model file is missing, incompatible or has been tampered with."""


class MemoryBudgetError(UserError):
    """The work would need more memory than the configured budget."""

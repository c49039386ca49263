"""Errors a user can cause. The CLI prints them as one sentence and exits non-zero, no traceback."""


class UserError(Exception):
    """Base class: a problem in the user's config, data, model folder or output folder."""


class ConfigError(UserError):
    """A config key is unknown, missing, or has a bad value."""


class DataError(UserError):
    """A data file is missing or malformed, or a task ends up empty."""


class ModelError(UserError):
    """The model folder is missing, unreadable, or unsuitable."""


class OutputError(UserError):
    """The output folder cannot be used (a file, not writable, or holds a finished run)."""

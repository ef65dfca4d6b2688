"""Errors a user can cause. The CLI prints them without a traceback and exits with status 2."""


class UserError(Exception):
    """Something the user can fix: the message says what to change."""


class ConfigError(UserError):
    """A configuration key or value is wrong."""


class DataError(UserError):
    """Input data is malformed or missing."""


class CheckpointError(UserError):
    """A checkpoint or model folder cannot be used."""

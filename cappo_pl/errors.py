"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class CappoError(Exception):
    """An error in user input (data file, config, reward function, checkpoint)."""


class DataError(CappoError):
    """A malformed data file; the message names file:line and the field."""


class RewardError(CappoError):
    """A reward function raised or returned something unusable; the message names it and the sample."""


class ConfigError(CappoError, ValueError):
    """A configuration value that cannot work; the message names the config key."""


class CheckpointError(CappoError):
    """A checkpoint that cannot be loaded safely (missing, truncated, tampered); the message names the file."""


class Interrupted(CappoError):
    """A run stopped by Ctrl-C or SIGTERM; the message says where the last good checkpoint is."""

    exit_code = 130  # the shell's convention for a process ended by SIGINT

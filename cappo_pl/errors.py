"""User-facing errors: the CLI prints them as one line and exits non-zero."""


class CappoError(Exception):
    """An error in user input (data file, config, reward function, checkpoint)."""


class DataError(CappoError):
    """A malformed data file; the message names file:line and the field."""


class RewardError(CappoError):
    """A reward function raised or returned something unusable; the message names it and the sample."""


class ConfigError(CappoError, ValueError):
    """A configuration value that cannot work; the message names the config key."""

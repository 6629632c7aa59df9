"""User-facing errors: the CLI prints their message as one line and exits non-zero, without a traceback."""


class DsmdError(Exception):
    """A problem the user can fix (bad input, wrong setting, missing file). Say which file/row/key and how."""


class ConfigError(DsmdError, ValueError):
    """A configuration value or key is wrong; the message names the key."""

"""The error every layer of mpff may raise for bad input, below every module that raises it."""


class ConfigError(ValueError):
    """A problem with the user's configuration or input; printed as one line, exit code 2."""

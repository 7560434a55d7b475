"""Errors the user can act on.  The CLI prints them as one line; everything else is a bug."""


class PortableDGError(Exception):
    """Base class: a problem with the user's input, files or options."""


class ConfigError(PortableDGError):
    """A config.json / generation_config.json / option value is missing or invalid."""


class CheckpointError(PortableDGError):
    """A weight file is missing, truncated, or holds a tensor of the wrong name, shape or dtype."""


class FormatError(PortableDGError):
    """A converted file (GGUF, MLX directory, ...) does not follow its layout."""


class BackendUnavailable(PortableDGError):
    """A backend was requested whose packages or device are not present."""


class OutputError(PortableDGError):
    """An output cannot be written (read-only directory, full disk, ...); nothing was left behind."""

"""User-facing errors.

Everything a user can get wrong (a config key, a data folder, a checkpoint) raises a
subclass of :class:`Byol3dError` with a one-line message that names the key or the file.
The command line prints it as ``byol3d: error: <message>`` and exits with status 2,
without a traceback; library callers can catch it like any other exception.
"""

from __future__ import annotations


class Byol3dError(Exception):
    """Base class of every error caused by the user's input, not by a bug."""


class ConfigError(Byol3dError, ValueError):
    """An unknown config key, a value of the wrong type, or a value out of range."""


class DataError(Byol3dError, ValueError):
    """A missing or empty data folder, or an image that cannot be used for training."""


class CheckpointError(Byol3dError, ValueError):
    """A checkpoint or weight file that is missing, truncated or of another architecture."""


class NonFiniteLossError(Byol3dError):
    """The loss became NaN or Inf; the last checkpoint written before it is intact."""

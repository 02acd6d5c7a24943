"""Exceptions that carry a sentence meant for the user.

Every stage raises :class:`DistillError` (or a subclass) for bad input; the CLI
turns it into one line on stderr and exit code 1. Anything else is a bug and
keeps its traceback.
"""


class DistillError(Exception):
    """A user-facing error whose message is one complete sentence."""


class DataError(DistillError, ValueError):
    """The input data cannot be read or does not make sense."""


class FormatError(DistillError, ValueError):
    """A file on disk does not follow its documented schema."""


class DivergenceError(DistillError, RuntimeError):
    """Optimisation produced NaN or Inf; the last good state was kept."""

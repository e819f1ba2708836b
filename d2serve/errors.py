"""The one exception hierarchy of d2serve.

Every error that d2serve raises on purpose derives from :class:`D2ServeError`.
The CLI has one boundary that maps :class:`InputError` to exit code 2 (bad
usage or bad input: the message names the file, tensor or field and what was
expected) and :class:`CheckFailedError` to exit code 1 (a fidelity or parity
check ran and failed). Any other exception is a bug in d2serve and keeps its
traceback.

Subclasses keep a standard base as well (``ValueError``, ``FileNotFoundError``,
``RuntimeError``) so callers that catch the builtin keep working.
"""

from __future__ import annotations


class D2ServeError(Exception):
    """Base class of every error d2serve raises on purpose."""


class InputError(D2ServeError, ValueError):
    """Bad usage or bad input (CLI exit code 2). The message names the file, tensor or field."""


class MissingExtraError(InputError, ImportError):
    """A command needs an optional dependency group that is not installed (names the ``pip install`` to run)."""


class CheckFailedError(D2ServeError, RuntimeError):
    """A check ran and failed (fidelity, parity; CLI exit code 1)."""


class InputNotFoundError(InputError, FileNotFoundError):
    """A user-given file or directory does not exist (the message names the path and what it should hold)."""


class OutputExistsError(InputError, FileExistsError):
    """An output directory is not empty and ``overwrite`` was not given (or is a file, not a directory)."""


class CheckpointError(InputError):
    """A checkpoint or adapter file is missing, truncated, inconsistent or not safetensors."""


class AdapterError(InputError):
    """An adapter's tensors are missing, misshapen, non-finite, or do not fit the base model."""

"""Exceptions that tell the user what went wrong *and* what to do about it.

Every error raised on bad user input is one of these, so the CLI can print the message without a
traceback and a folder run can collect them per file instead of dying.
"""

from __future__ import annotations

import os


class CleanDIFTError(Exception):
    """Base class: a problem with the user's input, files or settings (not a bug in cleandift)."""


class BadImageError(CleanDIFTError, ValueError):
    """An image file that cannot be used (unreadable, truncated, empty, too small, ...)."""

    def __init__(self, path: object, reason: str, fix: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        message = f"{printable(self.path)}: {reason}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class UnknownTapError(CleanDIFTError, KeyError):
    """A requested tap name that the U-Net does not have."""

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return str(self.args[0])


class TimestepError(CleanDIFTError, ValueError):
    """A timestep outside the training range [0, T-1]."""


class CheckpointError(CleanDIFTError, ValueError):
    """A checkpoint that cannot be used (base class of the checkpoint errors below)."""


class CheckpointMismatchError(CheckpointError):
    """A checkpoint whose keys or shapes do not fit the chosen backbone, or that is not a checkpoint at all."""


class DamagedCheckpointError(CheckpointMismatchError):
    """A checkpoint file that is truncated, corrupt or holds non-finite (NaN/inf) weights.

    A subclass of :class:`CheckpointMismatchError` because both mean "this file cannot be the student";
    callers that fall back to an older intact checkpoint catch this one.
    """


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """A checkpoint path that does not exist (still a ``FileNotFoundError`` for API callers)."""


class BackboneNotFoundError(CleanDIFTError, OSError):
    """No source of a backbone could be loaded (offline, wrong path, deleted hub repo, ...)."""


class DatasetError(CleanDIFTError, OSError):
    """A dataset folder or annotation file that is missing or malformed."""


class ConfigError(CleanDIFTError, ValueError):
    """An unknown or ill-typed configuration key."""


class OutputError(CleanDIFTError, OSError):
    """An output location that cannot be written (checked before any work is done)."""


def printable(text: object) -> str:
    """``text`` (a path or message) as valid UTF-8: undecodable file-name bytes become ``\\xNN`` escapes.

    POSIX file names are bytes; Python smuggles undecodable ones through ``str`` as lone surrogates, which
    crash ``print`` and safetensors (both encode UTF-8 strictly). Escaping keeps names readable and unique.
    """
    text = os.fspath(text) if isinstance(text, os.PathLike) else str(text)
    try:
        return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # surrogates that did not come from a file name
        return text.encode("utf-8", "backslashreplace").decode("utf-8")

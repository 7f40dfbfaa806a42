"""Exceptions that tell the user what went wrong *and* what to do about it.

Every error raised on bad user input is one of these, so the CLI can print the message without a
traceback and a folder run can collect them per file instead of dying.
"""

from __future__ import annotations


class CleanDIFTError(Exception):
    """Base class: a problem with the user's input, files or settings (not a bug in cleandift)."""


class BadImageError(CleanDIFTError, ValueError):
    """An image file that cannot be used (unreadable, truncated, empty, too small, ...)."""

    def __init__(self, path: object, reason: str, fix: str = "") -> None:
        self.path = str(path)
        self.reason = reason
        message = f"{self.path}: {reason}"
        if fix:
            message += f" ({fix})"
        super().__init__(message)


class UnknownTapError(CleanDIFTError, KeyError):
    """A requested tap name that the U-Net does not have."""

    def __str__(self) -> str:  # KeyError would add quotes around the message
        return str(self.args[0])


class TimestepError(CleanDIFTError, ValueError):
    """A timestep outside the training range [0, T-1]."""


class CheckpointMismatchError(CleanDIFTError, ValueError):
    """A checkpoint whose keys or shapes do not fit the chosen backbone."""


class BackboneNotFoundError(CleanDIFTError, OSError):
    """No source of a backbone could be loaded (offline, wrong path, deleted hub repo, ...)."""


class DatasetError(CleanDIFTError, OSError):
    """A dataset folder or annotation file that is missing or malformed."""


class ConfigError(CleanDIFTError, ValueError):
    """An unknown or ill-typed configuration key."""

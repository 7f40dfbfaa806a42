"""Logging helpers shared by the trainer, the demo and the CLI."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator


@contextlib.contextmanager
def quiet_logger(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise logger ``name`` (and its children) to ``level`` for the block: keeps chatty libraries or our own
    detailed logs out of a short console report without touching the global configuration."""
    logger = logging.getLogger(name)
    previous = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(previous)

"""Hugging Face hub state, asked once and quickly: offline mode, reachability, what the cache holds.

Without a network, ``from_pretrained`` / ``hf_hub_download`` retry every file with exponential backoff
(about 25 s per hub id, 75 s for the three ``sd15`` mirrors) before failing with a misleading
"does not appear to have a file named config.json". Callers here look in the cache first and, only
when that is not enough, ask :func:`hub_unreachable_reason` once (a bounded HEAD request) so an
unreachable hub is reported in about a second, with its real cause.
"""

from __future__ import annotations

import os
import threading
import time

#: seconds a reachability check may take before the hub counts as unreachable
HUB_CHECK_TIMEOUT = 1.5
_CHECK_TTL = 30.0  # seconds an answer is reused (one command asks once, a long session re-asks)
_checked: dict[str, tuple[float, str | None]] = {}


def offline_mode() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) is set: never touch the network."""
    return any(os.environ.get(var, "0").strip().lower() in {"1", "true", "yes", "on"}
               for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_endpoint() -> str:
    from huggingface_hub import constants  # noqa: PLC0415

    return str(constants.ENDPOINT).rstrip("/")


def hub_cache_dir() -> str:
    from huggingface_hub import constants  # noqa: PLC0415

    return str(constants.HF_HUB_CACHE)


def in_hub_cache(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """Path of ``filename`` of hub repo ``repo_id`` in the local cache, or ``None`` (no network used)."""
    from huggingface_hub import try_to_load_from_cache  # noqa: PLC0415

    try:
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:  # noqa: BLE001 - a malformed id is simply not cached
        return None
    return found if isinstance(found, str) else None


def hub_unreachable_reason(timeout: float = HUB_CHECK_TIMEOUT) -> str | None:
    """``None`` if the hub answers a HEAD request within ``timeout`` s, else why not (one line).

    Uses huggingface_hub's own HTTP session (its proxy / SSL / endpoint settings), without retries,
    in a daemon thread so a hanging DNS lookup cannot hold the caller longer than ``timeout``.
    """
    if offline_mode():
        return "HF_HUB_OFFLINE is set"
    endpoint = hub_endpoint()
    cached = _checked.get(endpoint)
    if cached is not None and time.monotonic() - cached[0] < _CHECK_TTL:
        return cached[1]
    answer: list[str | None] = []
    thread = threading.Thread(target=lambda: answer.append(_head(endpoint, timeout)), daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    reason = answer[0] if answer else f"no answer within {timeout:g} s"
    _checked[endpoint] = (time.monotonic(), reason)
    return reason


def _head(url: str, timeout: float) -> str | None:
    from huggingface_hub import get_session  # noqa: PLC0415

    try:
        response = get_session().head(url, timeout=timeout)
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "unreachable", with its reason
        text = str(exc).strip().splitlines()
        return f"{type(exc).__name__}: {text[0][:200]}" if text else type(exc).__name__
    if response.status_code >= 500:
        return f"HTTP {response.status_code} from {url}"
    return None

"""Per-image feature cache: extract each image once, resume interrupted runs, never reuse stale features.

Layout::

    <root>/<hash16>/settings.json                 # the full settings that produced the features
    <root>/<hash16>/<image id>.safetensors        # tensor "features" (C, h, w) + metadata

``hash16`` is the first 16 hex digits of the SHA-256 of the settings (canonical JSON, sorted keys),
so runs with different settings use different folders and can share one ``--cache`` root. Every
file also records the full settings hash and its image id in its safetensors metadata; a file whose
record does not match what is asked for (copied between folders, hand-edited settings, a hash-prefix
collision) is refused with :class:`CacheMismatchError` naming the file -- it is never silently used.
Files are written to a temporary name in the same folder and moved into place with ``os.replace``,
so an interrupted run leaves either a complete file or none.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from pathlib import Path

import torch
from torch import nn

from ..errors import CleanDIFTError

CACHE_FORMAT = "cleandift-feature-cache/1"
_SAFE = re.compile(r"[^A-Za-z0-9._@+=-]")


class CacheMismatchError(CleanDIFTError, ValueError):
    """A cache file or folder that belongs to other settings (or is unreadable)."""


def canonical_json(settings: dict) -> str:
    """Deterministic JSON of a settings dict (sorted keys, no whitespace; non-JSON values via ``str``)."""
    return json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)


def settings_hash(settings: dict) -> str:
    """SHA-256 hex digest of :func:`canonical_json` -- the identity of a set of features."""
    return hashlib.sha256(canonical_json(settings).encode("utf-8")).hexdigest()


def weights_fingerprint(module: nn.Module, n: int = 256) -> str:
    """Cheap identity of a module's weights: hash of names, shapes and the first/last ``n`` values.

    Hashing all 865 M parameters of SD 2.1 would take seconds; a fine-tuned student differs from its
    base in essentially every tensor, so the ends of each tensor are enough to tell them apart.
    """
    digest = hashlib.sha1()
    for name, tensor in module.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        ends = torch.cat([flat[:n], flat[-n:]]).float().cpu().contiguous()
        digest.update(ends.numpy().tobytes())
    return digest.hexdigest()[:16]


class FeatureCache:
    """Safetensors feature files keyed by image id and settings hash.

    Args:
        root: cache root folder (created if missing).
        settings: JSON-able dict of everything that determines the features (e.g.
            ``descriptor.describe()`` plus dataset frame settings).
        dtype: storage precision; part of the key because it changes the loaded values.

    >>> cache = FeatureCache(tmp, {"model": "x"})            # doctest: +SKIP
    >>> cache.get("cat/001") is None or ...                   # doctest: +SKIP
    """

    def __init__(self, root: str | os.PathLike, settings: dict, dtype: torch.dtype = torch.float32) -> None:
        self.dtype = dtype
        self.settings = {"format": CACHE_FORMAT, "storage_dtype": str(dtype).replace("torch.", ""),
                         "features": settings}
        self.hash = settings_hash(self.settings)
        self.folder = Path(root).expanduser() / self.hash[:16]
        self.folder.mkdir(parents=True, exist_ok=True)
        self._check_or_write_settings()

    # ------------------------------------------------------------------ public
    def path(self, image_id: str) -> Path:
        """File of ``image_id`` (``/`` in ids become sub-folders; other unsafe characters become ``_``)."""
        parts = [p for p in str(image_id).replace("\\", "/").split("/") if p not in ("", ".", "..")]
        if not parts:
            raise ValueError(f"invalid image id {image_id!r}")
        return self.folder.joinpath(*[_SAFE.sub("_", p) for p in parts[:-1]],
                                    _SAFE.sub("_", parts[-1]) + ".safetensors")

    def __contains__(self, image_id: str) -> bool:
        return self.path(image_id).is_file()

    def get(self, image_id: str) -> torch.Tensor | None:
        """Cached features of ``image_id`` (float32), ``None`` when not cached yet."""
        path = self.path(image_id)
        if not path.is_file():
            return None
        from safetensors import safe_open  # noqa: PLC0415

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensor = f.get_tensor("features")
        except Exception as exc:  # noqa: BLE001
            raise CacheMismatchError(f"{path}: unreadable cache file ({type(exc).__name__}: {exc}); "
                                     "delete it to recompute") from exc
        if meta.get("settings_hash") != self.hash:
            raise CacheMismatchError(
                f"{path}: cached features were computed with other settings (hash "
                f"{meta.get('settings_hash', '<none>')[:16]}, expected {self.hash[:16]}); "
                "refusing to reuse them. Delete the file or use another --cache folder")
        if meta.get("image_id") != str(image_id):
            raise CacheMismatchError(f"{path}: holds features of image {meta.get('image_id')!r}, "
                                     f"not {image_id!r}; delete the file")
        return tensor.float()

    def put(self, image_id: str, features: torch.Tensor) -> Path:
        """Write features ``(C, h, w)`` of one image atomically (temp file + ``os.replace``)."""
        from safetensors.torch import save_file  # noqa: PLC0415

        path = self.path(image_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensor = features.detach().to("cpu", self.dtype).contiguous()
        meta = {"settings_hash": self.hash, "image_id": str(image_id), "format": CACHE_FORMAT}
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=path.parent)
        os.close(fd)
        try:
            save_file({"features": tensor}, tmp, metadata=meta)
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return path

    def get_or_compute(self, image_id: str, compute) -> torch.Tensor:
        """Cached features, or ``compute()`` them, store and return them."""
        cached = self.get(image_id)
        if cached is not None:
            return cached
        features = compute()
        self.put(image_id, features)
        return features.float()

    # ------------------------------------------------------------------ internals
    def _check_or_write_settings(self) -> None:
        path = self.folder / "settings.json"
        if path.is_file():
            try:
                stored = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                raise CacheMismatchError(f"{path}: unreadable cache settings ({exc}); "
                                         "delete the folder") from exc
            if canonical_json(stored) != canonical_json(self.settings):
                diff = _first_difference(stored, self.settings)
                raise CacheMismatchError(
                    f"{path}: this cache folder holds features of other settings ({diff}); "
                    "refusing to reuse it. Delete the folder or use another --cache root")
            return
        text = json.dumps(self.settings, indent=2, sort_keys=True, default=str)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".json", dir=self.folder)
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)


def _first_difference(a: object, b: object, prefix: str = "") -> str:
    """Human-readable first differing key between two JSON-like values."""
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(set(a) | set(b), key=str):
            if key not in a or key not in b:
                return f"key {prefix}{key} only in {'the cache' if key in a else 'the current run'}"
            if canonical_json({"v": a[key]}) != canonical_json({"v": b[key]}):
                return _first_difference(a[key], b[key], f"{prefix}{key}.")
        return "no difference"
    return f"{prefix.rstrip('.') or 'value'}: cache has {a!r}, current run has {b!r}"

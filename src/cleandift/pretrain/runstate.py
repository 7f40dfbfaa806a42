"""Run-state files of ``pretrain-mini`` that never unpickle: safetensors tensors + JSON metadata.

A checkpoint is one ``.safetensors`` file (one file, so ``os.replace`` keeps it atomic): every tensor
(model, EMA, optimizer moments, RNG states) is a safetensors tensor, and everything else (format,
config, step, optimizer hyper-parameters, LR-schedule counters, EMA decay) is JSON in the header's
metadata under :data:`META_KEY`. Reading one parses a JSON header and raw tensor bytes -- no code
can run. Checkpoints of older versions (``last.pt``, ``step_*.pt``, written with ``torch.save``) are
read with ``torch.load(weights_only=True)`` only; a file that needs more is refused.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointMismatchError

META_KEY = "cleandift"
SUFFIX = ".safetensors"
LEGACY_SUFFIX = ".pt"


# ---------------------------------------------------------------------------------------------- encode
def encode_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """Split a trainer / snapshot state into ``(tensors, json_metadata)``.

    Known layout: ``model`` (tensors), ``ema`` (``decay`` + ``shadow`` tensors), ``optimizer``
    (torch's ``state`` / ``param_groups``), ``generator`` / ``torch_rng`` (byte tensors); every other
    entry must be JSON data.
    """
    tensors: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    for key, value in state.items():
        if key == "model":
            tensors.update({f"model/{k}": v for k, v in value.items()})
        elif key == "ema":
            tensors.update({f"ema/{k}": v for k, v in value["shadow"].items()})
            meta["ema_decay"] = value["decay"]
        elif key == "optimizer":
            meta["optimizer"] = {"param_groups": _jsonable(value["param_groups"]), "scalars": {},
                                 "order": {str(pid): list(entries) for pid, entries in value["state"].items()}}
            for pid, entries in value["state"].items():
                for name, v in entries.items():
                    if isinstance(v, torch.Tensor):
                        tensors[f"optimizer/{pid}/{name}"] = v
                    else:
                        meta["optimizer"]["scalars"].setdefault(str(pid), {})[name] = _jsonable(v)
        elif isinstance(value, torch.Tensor):
            tensors[f"rng/{key}"] = value
        else:
            meta[key] = _jsonable(value)
    return {k: v.detach().contiguous() for k, v in tensors.items()}, meta


def decode_state(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    """Inverse of :func:`encode_state` (optimizer hyper-parameters come back as JSON types)."""
    state: dict[str, Any] = {k: v for k, v in meta.items() if k not in ("optimizer", "ema_decay")}
    model = _prefixed(tensors, "model/")
    if model:
        state["model"] = model
    if "ema_decay" in meta:
        state["ema"] = {"decay": meta["ema_decay"], "shadow": _prefixed(tensors, "ema/")}
    if "optimizer" in meta:
        opt_state: dict[int, dict] = {}
        for name, v in _prefixed(tensors, "optimizer/").items():
            pid, _, entry = name.partition("/")
            opt_state.setdefault(int(pid), {})[entry] = v
        for pid, entries in meta["optimizer"].get("scalars", {}).items():
            opt_state.setdefault(int(pid), {}).update(entries)
        order = meta["optimizer"].get("order", {})  # torch's own entry order (step, exp_avg, ...)
        opt_state = {pid: {k: entries[k] for k in order.get(str(pid), entries) if k in entries} | entries
                     for pid, entries in sorted(opt_state.items())}
        state["optimizer"] = {"state": opt_state,
                              "param_groups": meta["optimizer"]["param_groups"]}
    state.update(_prefixed(tensors, "rng/"))
    return state


def _prefixed(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _jsonable(value: Any) -> Any:
    """Plain JSON data (tuples become lists); anything else is a bug in what is being saved."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(f"cannot store {type(value).__name__} in a run-state file's JSON metadata")


# ---------------------------------------------------------------------------------------------- files
def save_state_file(state: dict, path: Path) -> Path:
    """Write ``state`` as one safetensors file via ``path.tmp`` + fsync + ``os.replace`` (never half-written)."""
    from safetensors.torch import save  # noqa: PLC0415

    tensors, meta = encode_state(state)
    data = save(tensors, metadata={META_KEY: json.dumps(meta, allow_nan=True)})
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_state_file(path: Path) -> dict:
    """Read a run-state file: safetensors (current) or a weights-only ``torch.save`` file (older runs).

    Raises :class:`~cleandift.errors.CheckpointMismatchError` naming the file for anything that is
    not such a file (damaged, truncated, a foreign format, or a pickle that needs more than tensors).
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointMismatchError(f"{path}: no such pretraining checkpoint")
    if path.suffix == LEGACY_SUFFIX:
        return _load_legacy(path)
    from safetensors import SafetensorError, safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            header = (fh.metadata() or {}).get(META_KEY)
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise CheckpointMismatchError(f"{path}: not a readable safetensors file ({type(exc).__name__}: {exc}); "
                                      "it is damaged or not a pretrain-mini checkpoint") from exc
    if header is None:
        raise CheckpointMismatchError(f"{path}: a safetensors file without cleandift run metadata (not a "
                                      "pretrain-mini checkpoint; an exported model folder is loaded with --model)")
    try:
        meta = json.loads(header)
    except json.JSONDecodeError as exc:
        raise CheckpointMismatchError(f"{path}: damaged run metadata ({exc})") from exc
    if not isinstance(meta, dict):
        raise CheckpointMismatchError(f"{path}: damaged run metadata (not a JSON object)")
    return decode_state(tensors, meta)


def _load_legacy(path: Path) -> dict:
    """A ``torch.save`` checkpoint of an older version, loaded with ``weights_only=True`` or refused."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001  -- any failure means: not safely loadable
        raise CheckpointMismatchError(
            f"{path}: cannot be read as plain tensors (torch.load(weights_only=True) refused it: "
            f"{type(exc).__name__}); cleandift never unpickles code. A checkpoint written by an older "
            "pretrain-mini holds only tensors and numbers and loads this way, so this file is damaged or not "
            "one of them: remove it (runs now write .safetensors)") from exc
    if not isinstance(state, dict):
        raise CheckpointMismatchError(f"{path}: not a pretrain-mini checkpoint (a {type(state).__name__})")
    return state

"""Resumable training state on disk: safetensors + JSON only, checksummed, written atomically.

Why not ``accelerator.save_state``: it stores custom objects, RNG states, the optimizer and the LR
schedule with pickle, and ``load_state`` unpickles them -- a planted ``custom_checkpoint_0.pkl``
runs code on ``--resume``. Everything here is read with ``safetensors`` or ``json``; a file the
manifest does not list is never opened. One checkpoint folder (``checkpoints/step-NNNNNNN``)::

    model.safetensors      student + heads + timestep (the FeatureAligner state dict)
    optimizer.safetensors  optimizer tensors (Adam moments, step counts)
    optimizer.json         the rest of optimizer.state_dict() (param groups), tensors by name
    scheduler.json         LR schedule state
    trainer.json           step / data position / images seen / skipped files, the run's config, history
    scaler.json            fp16 loss-scaler state (--dtype fp16 only)
    rng-R.safetensors      per process R: torch CPU and CUDA generator states
    rng-R.json             per process R: python ``random`` and numpy generator states
    manifest.json          size + sha256 of every file above; written last

The folder is written as ``.tmp-step-NNNNNNN``, fsynced, then renamed into place, so a kill at any
moment leaves either the complete folder or none; a manifest that does not match (bit flip,
truncation, lost file) marks the folder damaged and ``--resume`` falls back to the newest intact one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..errors import CleanDIFTError, ConfigError, DamagedCheckpointError

log = logging.getLogger(__name__)

FORMAT = "cleandift-train-state"
VERSION = 1
MANIFEST = "manifest.json"
MODEL_FILE = "model.safetensors"
OPTIMIZER_TENSORS = "optimizer.safetensors"
OPTIMIZER_JSON = "optimizer.json"
SCHEDULER_JSON = "scheduler.json"
TRAINER_JSON = "trainer.json"
SCALER_JSON = "scaler.json"
REQUIRED = (MODEL_FILE, OPTIMIZER_TENSORS, OPTIMIZER_JSON, SCHEDULER_JSON, TRAINER_JSON)
#: What ``accelerator.save_state`` wrote (cleandift <= 0.x): recognised only to say why it is refused.
LEGACY_FILES = ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin")
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


class DamagedRunStateError(DamagedCheckpointError):
    """A training checkpoint folder that cannot be trusted: incomplete, changed after writing, or another format."""

    def __init__(self, folder: Path, problem: str) -> None:
        self.folder = Path(folder)
        self.problem = problem
        super().__init__(f"{folder}: {problem}")


class CheckpointWriteError(CleanDIFTError, OSError):
    """Writing a checkpoint failed (disk full, permissions); the partial folder was removed."""


def rng_files(rank: int) -> tuple[str, str]:
    return f"rng-{rank}.safetensors", f"rng-{rank}.json"


# ---------------------------------------------------------------------------------------------- JSON trees
def encode_tree(obj: Any, tensors: dict[str, torch.Tensor], path: str = "") -> Any:
    """A JSON-able copy of a state dict: tensors go to ``tensors`` (by path), tuples and non-string
    keys are tagged so :func:`decode_tree` restores exactly the same structure."""
    if isinstance(obj, torch.Tensor):
        key = path.lstrip("/") or "tensor"
        tensors[key] = obj.detach().to("cpu").contiguous()
        return {"__tensor__": key}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_tree(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [encode_tree(v, tensors, f"{path}/{i}") for i, v in enumerate(obj)]
    if isinstance(obj, Mapping):
        if all(isinstance(k, str) and not k.startswith("__") for k in obj):
            return {k: encode_tree(v, tensors, f"{path}/{k}") for k, v in obj.items()}
        return {"__items__": [[encode_tree(k, tensors, f"{path}/key{i}"), encode_tree(v, tensors, f"{path}/{k}")]
                              for i, (k, v) in enumerate(obj.items())]}
    raise TypeError(f"cannot store {type(obj).__name__} at {path or '/'} in a run state (tensors and JSON only)")


def decode_tree(obj: Any, tensors: Mapping[str, torch.Tensor]) -> Any:
    """Inverse of :func:`encode_tree`."""
    if isinstance(obj, list):
        return [decode_tree(v, tensors) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if len(obj) == 1:
        (tag, value), = obj.items()
        if tag == "__tensor__":
            return tensors[value]
        if tag == "__tuple__":
            return tuple(decode_tree(v, tensors) for v in value)
        if tag == "__items__":
            return {decode_tree(k, tensors): decode_tree(v, tensors) for k, v in value}
    return {k: decode_tree(v, tensors) for k, v in obj.items()}


# ---------------------------------------------------------------------------------------------- files
def write_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    """Write a safetensors file and flush it to disk (a crash after the rename must not find it empty)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path))
    _fsync(path)


def write_json(path: Path, obj: Any) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())


def read_json(folder: Path, name: str) -> Any:
    try:
        return json.loads((folder / name).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DamagedRunStateError(folder, f"{name} is not readable JSON ({exc})") from exc


def read_tensors(folder: Path, name: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # noqa: PLC0415

    try:
        return load_file(str(folder / name))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
        raise DamagedRunStateError(folder, f"{name} is not a readable safetensors file ({exc})") from exc


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot sync a directory; the files themselves were synced
        pass
    finally:
        os.close(fd)


def write_manifest(folder: Path, step: int) -> None:
    """Size and sha256 of every file in ``folder``: the last file written, the first one checked."""
    files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
             for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    write_json(folder / MANIFEST, {"format": FORMAT, "version": VERSION, "step": step, "files": files})


def verify(folder: Path) -> dict:
    """Check ``folder`` against its manifest; returns the manifest or raises :class:`DamagedRunStateError`."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        legacy = [name for name in LEGACY_FILES if (folder / name).exists()]
        if legacy:
            raise DamagedRunStateError(folder, f"written by an older cleandift with accelerate's pickle-based "
                                                 f"save_state ({legacy[0]}); pickle files can run code, so it is "
                                                 "never loaded")
        raise DamagedRunStateError(folder, f"{MANIFEST} is missing (the checkpoint was not completely written, "
                                             "or this is not a `cleandift train` checkpoint)")
    manifest = read_json(folder, MANIFEST)
    files = manifest.get("files") if isinstance(manifest, dict) else None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(files, dict):
        raise DamagedRunStateError(folder, f"{MANIFEST} is not a {FORMAT} manifest")
    if not isinstance(manifest.get("version"), int) or manifest["version"] > VERSION:
        raise DamagedRunStateError(folder, f"written by a newer cleandift (format version "
                                             f"{manifest.get('version')}); update cleandift to resume it")
    for name in REQUIRED:
        if name not in files:
            raise DamagedRunStateError(folder, f"{MANIFEST} does not list {name}")
    for name, entry in files.items():
        _verify_file(folder, name, entry)
    return manifest


def _verify_file(folder: Path, name: str, entry: Any) -> None:
    if not isinstance(name, str) or not _SAFE_NAME.match(name) or name in (".", ".."):
        raise DamagedRunStateError(folder, f"{MANIFEST} names an invalid file {name!r}")
    if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) or not isinstance(entry.get("sha256"), str):
        raise DamagedRunStateError(folder, f"{MANIFEST}: malformed entry for {name}")
    path = folder / name
    if not path.is_file():
        raise DamagedRunStateError(folder, f"{name} is missing")
    size = path.stat().st_size
    if size != entry["bytes"]:
        what = "empty (0 bytes)" if size == 0 else f"{size} bytes"
        raise DamagedRunStateError(folder, f"{name} is {what} but {entry['bytes']} bytes were written "
                                             "(truncated or overwritten)")
    if sha256_file(path) != entry["sha256"]:
        raise DamagedRunStateError(folder, f"{name} fails its sha256 checksum (it changed after it was written: "
                                             "a disk, copy or transfer error)")


# ---------------------------------------------------------------------------------------------- RNG
def capture_rng() -> tuple[dict[str, torch.Tensor], dict]:
    """This process's generator states: torch CPU (+ every CUDA device) as tensors, python and numpy as JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, state in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"cuda.{i}"] = state
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    return tensors, {"python": [version, list(internal), gauss],
                     "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)]}


def restore_rng(tensors: Mapping[str, torch.Tensor], states: dict) -> None:
    torch.set_rng_state(tensors["torch_cpu"])
    cuda = sorted((int(k.split(".")[1]), v) for k, v in tensors.items() if k.startswith("cuda."))
    if cuda and torch.cuda.is_available():
        for i, state in cuda[:torch.cuda.device_count()]:
            torch.cuda.set_rng_state(state, i)
    version, internal, gauss = states["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    kind, keys, pos, has_gauss, cached = states["numpy"]
    np.random.set_state((str(kind), np.asarray(keys, dtype=np.uint32), int(pos), int(has_gauss), float(cached)))


# ---------------------------------------------------------------------------------------------- save / load
def save_state(folder: Path, accelerator, model, optimizer, scheduler, trainer: dict) -> None:
    """Write this process's part of a run state into ``folder`` (collective: call on every process).

    The main process writes the model, optimizer, schedule and counters (DDP keeps them identical on
    every process); each process writes its own RNG states.
    """
    state_dict = accelerator.get_state_dict(model)  # collective under sharded setups
    if accelerator.is_main_process:
        write_tensors(folder / MODEL_FILE, state_dict)
        tensors: dict[str, torch.Tensor] = {}
        tree = encode_tree(optimizer.state_dict(), tensors)
        write_tensors(folder / OPTIMIZER_TENSORS, tensors)
        write_json(folder / OPTIMIZER_JSON, tree)
        write_json(folder / SCHEDULER_JSON, encode_tree(scheduler.state_dict(), {}))
        if accelerator.scaler is not None:
            write_json(folder / SCALER_JSON, encode_tree(accelerator.scaler.state_dict(), {}))
        write_json(folder / TRAINER_JSON, trainer)
    del state_dict
    rng_tensors, rng_json = capture_rng()
    tensor_file, json_file = rng_files(accelerator.process_index)
    write_tensors(folder / tensor_file, rng_tensors)
    write_json(folder / json_file, rng_json)


def read_trainer(folder: Path) -> dict:
    """``trainer.json`` of a verified checkpoint (counters, config, history)."""
    trainer = read_json(folder, TRAINER_JSON)
    state = trainer.get("state") if isinstance(trainer, dict) else None
    ok = (isinstance(state, dict) and isinstance(trainer.get("config"), dict)
          and all(isinstance(state.get(k), int) and state[k] >= 0 for k in ("step", "batches", "images_seen"))
          and all(isinstance(x, str) for x in state.get("skipped", []))
          and all(isinstance(h, dict) for h in state.get("history", [])))
    if not ok:
        raise DamagedRunStateError(folder, f"{TRAINER_JSON} lacks the run's counters or config")
    return trainer


def load_state(folder: Path, manifest: dict, accelerator, model, optimizer, scheduler) -> dict:
    """Load a verified checkpoint into the prepared objects; returns ``trainer.json``.

    Only files listed in ``manifest`` are opened, with safetensors or json.
    """
    listed = manifest["files"]
    try:
        accelerator.unwrap_model(model).load_state_dict(read_tensors(folder, MODEL_FILE), strict=True)
        optimizer.load_state_dict(decode_tree(read_json(folder, OPTIMIZER_JSON),
                                              read_tensors(folder, OPTIMIZER_TENSORS)))
        scheduler.load_state_dict(decode_tree(read_json(folder, SCHEDULER_JSON), {}))
        if accelerator.scaler is not None and SCALER_JSON in listed:
            accelerator.scaler.load_state_dict(decode_tree(read_json(folder, SCALER_JSON), {}))
        tensor_file, json_file = rng_files(accelerator.process_index)
        if tensor_file in listed and json_file in listed:
            restore_rng(read_tensors(folder, tensor_file), read_json(folder, json_file))
        else:
            log.warning("%s has no RNG state for process %d (it was written by fewer processes); the global "
                        "generators keep their seeds (every training draw is seeded per step anyway)",
                        folder, accelerator.process_index)
    except DamagedRunStateError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
        raise DamagedRunStateError(folder, f"does not fit this run ({type(exc).__name__}: "
                                             f"{str(exc).splitlines()[0] if str(exc) else ''})") from exc
    return read_trainer(folder)


# ---------------------------------------------------------------------------------------------- folders
def step_of(folder: Path) -> int | None:
    match = _STEP_DIR.match(Path(folder).name)
    return int(match.group(1)) if match else None


class CheckpointManager:
    """``checkpoints/step-NNNNNNN`` folders: atomic, checksummed writes, newest-intact selection, pruning."""

    def __init__(self, root: Path, keep: int = 1) -> None:
        self.root = Path(root)
        self.keep = max(1, int(keep))
        self.last_saved: Path | None = None

    def folders(self) -> list[Path]:
        """Checkpoint folders, oldest first (by step number)."""
        if not self.root.is_dir():
            return []
        found = [p for p in self.root.iterdir() if p.is_dir() and step_of(p) is not None]
        return sorted(found, key=step_of)

    def remove_stale(self) -> list[Path]:
        """Delete what a killed or failed save left behind (``.tmp-step-*``, ``latest.tmp``)."""
        if not self.root.is_dir():
            return []
        stale = [p for p in self.root.iterdir() if p.name.startswith(".tmp-step-") or p.name == LATEST + ".tmp"]
        for path in stale:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
            log.info("removed %s, left by an interrupted checkpoint write", path)
        return stale

    def select(self, warn: bool = True) -> tuple[Path, dict] | None:
        """The newest intact checkpoint and its manifest; damaged newer ones are reported (``warn``).

        Raises :class:`~cleandift.errors.ConfigError` if checkpoints exist but none is intact.
        """
        problems: list[DamagedRunStateError] = []
        for folder in reversed(self.folders()):
            try:
                manifest = verify(folder)
            except DamagedRunStateError as exc:
                problems.append(exc)
                continue
            if problems and warn:
                for exc in problems:
                    log.warning("checkpoint %s is damaged: %s", exc.folder.name, exc.problem)
                log.warning("resuming from %s, the newest intact checkpoint", folder.name)
            return folder, manifest
        if problems:
            details = "; ".join(f"{exc.folder.name}: {exc.problem}" for exc in problems)
            raise ConfigError(f"--resume: no intact checkpoint in {self.root} ({details}); restore the files or "
                              "start a new run (another --out)")
        return None

    def set_aside_newer(self, resumed: Path) -> list[Path]:
        """Rename checkpoints newer than ``resumed`` (damaged, or of a timeline being redone) to
        ``damaged-step-N`` / ``superseded-step-N``: never resumed or pruned, kept for the user to inspect."""
        step = step_of(resumed)
        moved = []
        for folder in self.folders():
            if step is None or step_of(folder) <= step:
                continue
            try:
                verify(folder)
                prefix = "superseded"
            except DamagedRunStateError:
                prefix = "damaged"
            target = _free_name(self.root / f"{prefix}-{folder.name}")
            os.replace(folder, target)
            moved.append(target)
            log.warning("moved %s aside to %s (newer than the resumed %s; delete it when no longer needed)",
                        folder.name, target.name, resumed.name)
        if moved and resumed.parent == self.root:
            _atomic_write(self.root / LATEST, resumed.name)
        return moved

    def save(self, accelerator, step: int, write: Callable[[Path], None]) -> Path:
        """Write a checkpoint for ``step`` with ``write(tmp_folder)`` (collective), checksum it, rename it
        into place, point ``latest`` at it and prune older ones.

        Any failure (e.g. disk full) removes the partial folder and raises :class:`CheckpointWriteError`
        on every process; the previous checkpoints are untouched.
        """
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".tmp-step-{step:07d}"
        main = accelerator.is_main_process
        error = _agree(accelerator, _attempt(lambda: self._fresh(tmp)) if main else None)
        if error is None:
            error = _agree(accelerator, _attempt(lambda: write(tmp)))
        if error is None and main:
            error = _attempt(lambda: self._publish(tmp, final, step))
        error = _agree(accelerator, error if main else None)
        if error is not None:
            if main:
                shutil.rmtree(tmp, ignore_errors=True)
            good = self.last_saved.name if self.last_saved is not None else None
            raise CheckpointWriteError(
                f"step {step}: could not write the checkpoint to {tmp} ({error}); the partial folder was removed"
                + (f" and the last good checkpoint {good} is intact" if good else "")
                + "; free disk space (or fix the folder) and continue with --resume")
        self.last_saved = final
        if main:
            self._prune(step)
            log.info("step %d: saved resumable state to %s", step, final)
        accelerator.wait_for_everyone()
        return final

    def _fresh(self, tmp: Path) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()

    def _publish(self, tmp: Path, final: Path, step: int) -> None:
        write_manifest(tmp, step)
        _fsync_dir(tmp)
        if final.exists():  # the same step written before (a redone step after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(self.root)
        _atomic_write(self.root / LATEST, final.name)

    def _prune(self, step: int) -> None:
        older = [f for f in self.folders() if step_of(f) <= step]
        for old in older[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)


def _attempt(fn: Callable[[], Any]) -> OSError | None:
    try:
        fn()
    except OSError as exc:
        return exc
    return None


def _agree(accelerator, error: OSError | None) -> OSError | None:
    """Share a failure with every process, so no process waits forever for one that gave up."""
    if accelerator.num_processes == 1:
        return error
    flag = torch.tensor([0.0 if error is None else 1.0], device=accelerator.device)
    if accelerator.reduce(flag, reduction="sum").item() > 0 and error is None:
        return OSError(errno.EIO, "another process failed to write its part")
    return error


def _free_name(path: Path) -> Path:
    candidate, n = path, 1
    while candidate.exists():
        candidate = path.with_name(f"{path.name}.{n}")
        n += 1
    return candidate


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)

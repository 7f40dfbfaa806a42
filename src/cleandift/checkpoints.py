"""Loading student weights: the authors' released files and our own exports.

Formats understood (detected from the keys, never from the file name):

* ``cleandift_sd{15,21}_unet.safetensors`` -- a plain diffusers ``UNet2DConditionModel`` state dict.
* ``cleandift_sd{15,21}_full.safetensors`` -- the whole reference training module: keys
  ``unet_feature_extractor_cleandift.*`` (student), ``unet_feature_extractor_base.*`` (teacher),
  ``adapters.*`` / ``mapping.*`` / ``time_in_proj.*`` / ``time_emb.weight`` (projection heads and
  their timestep network), ``timestep`` (the student's learned timestep input) and ``ae.*`` (VAE).
* an original-layout (LDM) U-Net file with only ``model.diffusion_model.*`` keys (what ODISE-based
  pipelines such as SD-DINO / GeoAware-SC load; ``cleandift convert --to ldm-unet`` writes one).
* a folder written by ``cleandift train`` export (``unet/`` + ``heads.safetensors`` + ``cleandift.json``)
  or any diffusers U-Net folder. ``unet/`` holds the denoiser of any family (a LoRA run: merged weights).
* a LoRA student (format ``"lora"``): a diffusers LoRA file (``pytorch_lora_weights.safetensors``, keys
  ``unet.*`` / ``transformer.*``), a peft-keyed state dict, or the ``lora/`` folder of a LoRA export.

Only safetensors or ``torch.load(weights_only=True)`` is used: a checkpoint never runs code.
A checkpoint that does not fit the backbone raises :class:`CheckpointMismatchError` naming the
missing / unexpected keys and the likely fix. A truncated, empty or corrupt file, a partial export
folder, bad JSON, or student / head weights holding NaN/inf raise :class:`DamagedCheckpointError`
naming the file; a missing path raises :class:`CheckpointNotFoundError`.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointMismatchError, CheckpointNotFoundError, DamagedCheckpointError
from .lora import LORA_FILE, LoraFile, attach_lora_file, is_lora_state, lora_from_state, read_lora_file

STUDENT_PREFIX = "unet_feature_extractor_cleandift."
TEACHER_PREFIX = "unet_feature_extractor_base."
HEAD_PREFIXES = ("adapters.", "mapping.", "time_in_proj.", "time_emb.")
VAE_PREFIX = "ae."
EXPORT_META = "cleandift.json"
EXPORT_HEADS = "heads.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")
_REEXPORT = "re-export it (`cleandift train ... --export-only`) or copy it again"


@dataclass
class StudentCheckpoint:
    """The parts of a checkpoint, split by role (keys relative to each part)."""

    source: str
    format: str  # "unet" | "full" | "ldm-unet" | "export" | "lora"
    student: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher: dict[str, torch.Tensor] | None = None
    timestep: float | None = None
    meta: dict = field(default_factory=dict)
    lora: LoraFile | None = None  # format "lora": adapter weights + settings (``student`` is then empty)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from ``.safetensors`` or (weights only) ``.pt/.pth/.bin/.ckpt``."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointNotFoundError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        return _load_safetensors(path, "re-download or copy it again")
    if path.stat().st_size == 0:
        raise DamagedCheckpointError(f"{path}: checkpoint file is empty (0 bytes); re-download or copy it again")
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointMismatchError(
            f"{path}: could not be read with torch.load(weights_only=True) ({type(exc).__name__}); "
            "cleandift never unpickles arbitrary objects -- convert the file to .safetensors"
        ) from exc
    except Exception as exc:  # noqa: BLE001
        raise DamagedCheckpointError(f"{path}: not a readable torch checkpoint, truncated or damaged "
                                     f"({type(exc).__name__}: {_first_line(exc)}); re-download or copy it again") from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{path}: expected a flat dict of tensors")
    return state


def check_checkpoint_path(spec: str | Path) -> None:
    """Refuse a ``--checkpoint`` that names a missing file or folder, before any model is loaded.

    Only specs that look like paths (a folder part, ``~``, or a weights suffix) are checked here; a bare
    name is left to :func:`read_checkpoint`, which reports it the same way when it is read.
    """
    text = str(spec)
    path = Path(text).expanduser()
    looks_like_path = "/" in text or os.sep in text or text.startswith(("~", ".")) or path.suffix in WEIGHT_SUFFIXES
    if looks_like_path and not path.exists():
        raise CheckpointNotFoundError(
            f"--checkpoint {text}: no such file or folder; pass a cleandift_*_unet/_full.safetensors file, "
            "a diffusers U-Net folder or a `cleandift train` export")


def check_finite(ckpt: StudentCheckpoint) -> None:
    """Refuse a checkpoint whose student or head weights (or timestep) hold NaN/inf.

    One float64 sum per tensor (no large temporaries); NaN and inf both survive a sum.
    """
    parts = {**{f"student {k}": v for k, v in ckpt.student.items()}, **{f"heads {k}": v for k, v in ckpt.heads.items()}}
    if ckpt.lora is not None:
        parts.update({f"lora {k}": v for k, v in ckpt.lora.state.items()})
    bad = [name for name, t in parts.items()
           if t.is_floating_point() and t.numel() and not bool(torch.isfinite(t.sum(dtype=torch.float64)))]
    if ckpt.timestep is not None and not _finite_number(ckpt.timestep):
        bad.append(f"timestep ({ckpt.timestep!r})")
    if bad:
        raise DamagedCheckpointError(
            f"{ckpt.source}: {len(bad)} of {len(parts)} weight tensor(s) hold NaN/inf values (e.g. {', '.join(bad[:3])}); "
            "the weights are unusable (a diverged training run?) -- use an earlier checkpoint")


def _finite_number(value: object) -> bool:
    try:
        return math.isfinite(float(value))
    except (TypeError, ValueError):
        return False


def _load_safetensors(path: Path, fix: str) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file  # noqa: PLC0415

    if path.stat().st_size == 0:
        raise DamagedCheckpointError(f"{path}: not a readable safetensors file (empty, 0 bytes); {fix}")
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001
        raise DamagedCheckpointError(f"{path}: not a readable safetensors file, truncated or damaged "
                                     f"({_first_line(exc)}); {fix}") from exc


def _read_json(path: Path, fix: str) -> object:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DamagedCheckpointError(f"{path}: not valid JSON ({_first_line(exc)}); {fix}") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def split_checkpoint(state: dict[str, torch.Tensor], source: str = "<state dict>") -> StudentCheckpoint:
    """Detect the format of a state dict and split it into student / heads / teacher / timestep.

    A U-Net-only file in the original LDM layout (``model.diffusion_model.*``, as ODISE-based
    pipelines use) is converted back to diffusers keys (format ``"ldm-unet"``).
    """
    if any(k.startswith(STUDENT_PREFIX) for k in state):
        student = {k[len(STUDENT_PREFIX):]: v for k, v in state.items() if k.startswith(STUDENT_PREFIX)}
        teacher = {k[len(TEACHER_PREFIX):]: v for k, v in state.items() if k.startswith(TEACHER_PREFIX)} or None
        heads = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
        timestep = float(state["timestep"].float().item()) if "timestep" in state else None
        return StudentCheckpoint(source, "full", student, heads, teacher, timestep)
    if any(k.startswith("model.diffusion_model.") for k in state):
        # A U-Net in the original (LDM) layout, e.g. a student converted for ODISE-based pipelines.
        from .ldm_format import LDM_OTHER_MODEL_PREFIXES, LDM_UNET_PREFIX, unet_from_ldm  # noqa: PLC0415

        others = sorted(k for k in state if not k.startswith(LDM_UNET_PREFIX))
        if any(k.startswith(LDM_OTHER_MODEL_PREFIXES) for k in others):
            raise CheckpointMismatchError(
                f"{source}: an original (LDM) Stable Diffusion checkpoint with VAE / text-encoder weights, i.e. a "
                "whole backbone, not a student U-Net; pass it as --model (a single-file backbone)"
            )
        if others:
            raise CheckpointMismatchError(
                f"{source}: an original (LDM) U-Net checkpoint with {len(others)} unexpected non-U-Net key(s), "
                f"e.g. {', '.join(others[:3])}; keep only the model.diffusion_model.* keys"
            )
        try:
            student = unet_from_ldm(state)
        except ValueError as exc:
            raise CheckpointMismatchError(f"{source}: not an SD 1.x / 2.x U-Net in the LDM layout ({exc})") from exc
        return StudentCheckpoint(source, "ldm-unet", student)
    heads = {k: v for k, v in state.items() if k.startswith(HEAD_PREFIXES)}
    student = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIXES) and k != "timestep"}
    timestep = float(state["timestep"].float().item()) if "timestep" in state else None
    if is_lora_state(student):
        return StudentCheckpoint(source, "lora", {}, heads, None, timestep, lora=lora_from_state(student, source))
    return StudentCheckpoint(source, "unet", student, heads, None, timestep)


def read_checkpoint(path: str | Path) -> StudentCheckpoint:
    """Read a checkpoint file or export folder and split it (see module docstring for formats).

    A released student's name (``cleandift-sd21``, see :mod:`cleandift.released`) reads its cached hub file.
    """
    from .released import resolve_checkpoint  # noqa: PLC0415

    path = resolve_checkpoint(path)
    if path.is_dir() and (path / LORA_FILE).is_file() and not (path / "unet").is_dir():
        ckpt = _read_lora_folder(path)
    elif path.is_dir():
        ckpt = _read_export_folder(path)
    elif path.suffix == ".safetensors" and _has_lora_keys(path):
        ckpt = _lora_checkpoint(read_lora_file(path), path.parent)
    else:
        ckpt = split_checkpoint(read_state_dict(path), str(path))
    check_finite(ckpt)
    return ckpt


def _has_lora_keys(path: Path) -> bool:
    from safetensors import safe_open  # noqa: PLC0415

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    except Exception:  # noqa: BLE001 -- unreadable: the normal reader reports it with the file name
        return False
    return is_lora_state(keys)


def _read_lora_folder(path: Path) -> StudentCheckpoint:
    return _lora_checkpoint(read_lora_file(path / LORA_FILE), path)


def _lora_checkpoint(lora: LoraFile, folder: Path) -> StudentCheckpoint:
    """A LoRA student; ``cleandift.json`` next to the file (a LoRA export's ``lora/``) gives its timestep,
    and ``heads.safetensors`` there or one level up its heads."""
    meta = _read_json(folder / EXPORT_META, _REEXPORT) if (folder / EXPORT_META).is_file() else {}
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(f"{folder / EXPORT_META}: expected a JSON object; {_REEXPORT}")
    heads_file = next((f for f in (folder / EXPORT_HEADS, folder.parent / EXPORT_HEADS) if f.is_file()), None)
    heads = _load_safetensors(heads_file, _REEXPORT) if heads_file is not None and meta else {}
    timestep = meta.get("timestep")
    if timestep is None and "timestep" in heads:
        timestep = float(heads["timestep"].float().item())
    heads.pop("timestep", None)
    return StudentCheckpoint(lora.source, "lora", {}, heads, None, timestep, meta, lora=lora)


def _read_export_folder(path: Path) -> StudentCheckpoint:
    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    config = unet_dir / "config.json"
    weights = sorted(unet_dir.glob("diffusion_pytorch_model*.safetensors"))
    if not config.is_file() and not weights:
        raise CheckpointMismatchError(
            f"{path}: not a student export (expected unet/config.json and unet/diffusion_pytorch_model.safetensors, "
            "as written by `cleandift train` or UNet2DConditionModel.save_pretrained)"
        )
    if not weights:
        raise DamagedCheckpointError(f"{unet_dir / 'diffusion_pytorch_model.safetensors'}: missing from the export "
                                     f"(its config.json is there); {_REEXPORT}")
    if not config.is_file():
        raise DamagedCheckpointError(f"{config}: missing from the export (its weights are there); {_REEXPORT}")
    _read_json(config, _REEXPORT)
    student: dict[str, torch.Tensor] = {}
    for file in weights:
        student.update(_load_safetensors(file, _REEXPORT))
    meta = _read_json(path / EXPORT_META, _REEXPORT) if (path / EXPORT_META).is_file() else {}
    if not isinstance(meta, dict):
        raise DamagedCheckpointError(f"{path / EXPORT_META}: expected a JSON object, got {type(meta).__name__}; "
                                     f"{_REEXPORT}")
    heads = _load_safetensors(path / EXPORT_HEADS, _REEXPORT) if (path / EXPORT_HEADS).is_file() else {}
    timestep = meta.get("timestep")
    if timestep is None and "timestep" in heads:
        timestep = float(heads["timestep"].float().item())
    heads.pop("timestep", None)
    return StudentCheckpoint(str(path), "export", student, heads, None, timestep, meta)


def load_student(base_unet: nn.Module, checkpoint: str | Path | StudentCheckpoint, *,
                 inplace: bool = False) -> tuple[nn.Module, StudentCheckpoint]:
    """A copy of ``base_unet`` with the student weights of ``checkpoint`` (strict).

    The copy keeps the base U-Net's device and dtype (released files are bf16; they are cast).
    ``inplace=True`` loads into ``base_unet`` itself instead of a copy -- for callers that no longer need the
    frozen base (``cleandift extract`` in clean mode): a Flux-size denoiser is then never held twice.
    Returns the student and the parsed checkpoint (for its heads and learned timestep).
    """
    if isinstance(checkpoint, StudentCheckpoint):
        ckpt = checkpoint
        check_finite(ckpt)  # read_checkpoint checks what it reads; a hand-built one is checked here
    else:
        ckpt = read_checkpoint(checkpoint)
    if ckpt.lora is not None:  # the base weights plus the adapters (unmerged: exactly the trained forward)
        _check_lora_base(base_unet, ckpt)
        student = base_unet if inplace else copy.deepcopy(base_unet)
        attach_lora_file(student, ckpt.lora)
        student.cleandift_timestep = ckpt.timestep
        return student, ckpt
    check_fits(base_unet, ckpt.student, ckpt.source)
    student = base_unet if inplace else copy.deepcopy(base_unet)
    ref = next(base_unet.parameters())
    student.load_state_dict({k: v.to(dtype=ref.dtype) for k, v in ckpt.student.items()}, strict=True)
    student.cleandift_timestep = ckpt.timestep  # CleanExtractor's default timestep follows the checkpoint
    return student, ckpt


def _check_lora_base(base: nn.Module, ckpt: StudentCheckpoint) -> None:
    from .lora import has_lora  # noqa: PLC0415

    if has_lora(base):
        raise CheckpointMismatchError(f"{ckpt.source}: the backbone's denoiser already carries a cleandift LoRA "
                                      "adapter (a training run's?); load a fresh backbone to apply this one")


@dataclass
class StateDiff:
    """How a state dict differs from a module's: the basis of every "does not fit" message."""

    missing: list[str]
    unexpected: list[str]
    wrong_shape: list[tuple[str, tuple, tuple]]  # (key, checkpoint shape, model shape)

    @classmethod
    def between(cls, expected: dict[str, torch.Tensor], state: dict[str, torch.Tensor]) -> "StateDiff":
        common = sorted(set(expected) & set(state))
        return cls(sorted(set(expected) - set(state)), sorted(set(state) - set(expected)),
                   [(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in common
                    if tuple(state[k].shape) != tuple(expected[k].shape)])

    def __bool__(self) -> bool:
        return bool(self.missing or self.unexpected or self.wrong_shape)

    def lines(self) -> list[str]:
        out = []
        if self.missing:
            out.append(f"  {len(self.missing)} missing key(s), e.g. {', '.join(self.missing[:3])}")
        if self.unexpected:
            out.append(f"  {len(self.unexpected)} unexpected key(s), e.g. {', '.join(self.unexpected[:3])}")
        if self.wrong_shape:
            k, got, want = self.wrong_shape[0]
            out.append(f"  {len(self.wrong_shape)} shape mismatch(es), e.g. {k}: checkpoint {got} vs model {want}")
        return out


def check_fits(unet: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` has exactly ``unet``'s keys and shapes."""
    expected = unet.state_dict()
    diff = StateDiff.between(expected, state)
    if not diff:
        return
    lines = [f"{source}: the checkpoint does not fit this backbone's U-Net", *diff.lines()]
    hint = _family_hint(state, expected)
    if hint:
        lines.append(f"  likely fix: {hint}")
    raise CheckpointMismatchError("\n".join(lines))


_XATTN_KEY = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
_FAMILIES = {768: "sd15", 1024: "sd21"}


def _family_hint(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> str:
    if _XATTN_KEY in state and _XATTN_KEY in expected:
        got, want = state[_XATTN_KEY].shape[1], expected[_XATTN_KEY].shape[1]
        if got != want:
            family = _FAMILIES.get(got)
            model = f"--model {family}" if family else "the backbone this checkpoint was trained from"
            return (f"the checkpoint's cross-attention width is {got} but the backbone's is {want}; "
                    f"load it with {model}")
    if not any(k in expected for k in state):
        return "no key matches: is this a U-Net state dict (or a cleandift *_unet/_full file)?"
    return "load the checkpoint with the backbone it was trained from (see --model)"

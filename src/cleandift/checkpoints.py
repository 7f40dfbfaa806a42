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
  or any diffusers U-Net folder.

Only safetensors or ``torch.load(weights_only=True)`` is used: a checkpoint never runs code.
A checkpoint that does not fit the backbone raises :class:`CheckpointMismatchError` naming the
missing / unexpected keys and the likely fix.
"""

from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .errors import CheckpointMismatchError

STUDENT_PREFIX = "unet_feature_extractor_cleandift."
TEACHER_PREFIX = "unet_feature_extractor_base."
HEAD_PREFIXES = ("adapters.", "mapping.", "time_in_proj.", "time_emb.")
VAE_PREFIX = "ae."
EXPORT_META = "cleandift.json"
EXPORT_HEADS = "heads.safetensors"


@dataclass
class StudentCheckpoint:
    """The parts of a checkpoint, split by role (keys relative to each part)."""

    source: str
    format: str  # "unet" | "full" | "ldm-unet" | "export"
    student: dict[str, torch.Tensor]
    heads: dict[str, torch.Tensor] = field(default_factory=dict)
    teacher: dict[str, torch.Tensor] | None = None
    timestep: float | None = None
    meta: dict = field(default_factory=dict)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read tensors from ``.safetensors`` or (weights only) ``.pt/.pth/.bin/.ckpt``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint file not found")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # noqa: PLC0415

        try:
            return load_file(str(path))
        except Exception as exc:  # noqa: BLE001
            raise CheckpointMismatchError(f"{path}: not a readable safetensors file ({exc})") from exc
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        raise CheckpointMismatchError(
            f"{path}: could not be read with torch.load(weights_only=True) ({type(exc).__name__}); "
            "cleandift never unpickles arbitrary objects -- convert the file to .safetensors"
        ) from exc
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{path}: expected a flat dict of tensors")
    return state


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
    return StudentCheckpoint(source, "unet", student, heads, None, timestep)


def read_checkpoint(path: str | Path) -> StudentCheckpoint:
    """Read a checkpoint file or export folder and split it (see module docstring for formats)."""
    path = Path(path).expanduser()
    if path.is_dir():
        return _read_export_folder(path)
    return split_checkpoint(read_state_dict(path), str(path))


def _read_export_folder(path: Path) -> StudentCheckpoint:
    from safetensors.torch import load_file  # noqa: PLC0415

    unet_dir = path / "unet" if (path / "unet").is_dir() else path
    weights = sorted(unet_dir.glob("diffusion_pytorch_model*.safetensors"))
    if not (unet_dir / "config.json").is_file() or not weights:
        raise CheckpointMismatchError(
            f"{path}: not a student export (expected unet/config.json and unet/diffusion_pytorch_model.safetensors, "
            "as written by `cleandift train` or UNet2DConditionModel.save_pretrained)"
        )
    student: dict[str, torch.Tensor] = {}
    for file in weights:
        student.update(load_file(str(file)))
    meta = json.loads((path / EXPORT_META).read_text()) if (path / EXPORT_META).is_file() else {}
    heads = load_file(str(path / EXPORT_HEADS)) if (path / EXPORT_HEADS).is_file() else {}
    timestep = meta.get("timestep")
    if timestep is None and "timestep" in heads:
        timestep = float(heads["timestep"].float().item())
    heads.pop("timestep", None)
    return StudentCheckpoint(str(path), "export", student, heads, None, timestep, meta)


def load_student(base_unet: nn.Module, checkpoint: str | Path | StudentCheckpoint) -> tuple[nn.Module, StudentCheckpoint]:
    """A copy of ``base_unet`` with the student weights of ``checkpoint`` (strict).

    The copy keeps the base U-Net's device and dtype (released files are bf16; they are cast).
    Returns the student and the parsed checkpoint (for its heads and learned timestep).
    """
    ckpt = checkpoint if isinstance(checkpoint, StudentCheckpoint) else read_checkpoint(checkpoint)
    check_fits(base_unet, ckpt.student, ckpt.source)
    student = copy.deepcopy(base_unet)
    ref = next(base_unet.parameters())
    student.load_state_dict({k: v.to(dtype=ref.dtype) for k, v in ckpt.student.items()}, strict=True)
    return student, ckpt


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

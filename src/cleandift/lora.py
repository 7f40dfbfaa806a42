"""LoRA students: peft adapters inside the backbone's own denoiser.

Why: a full student is a second copy of the denoiser plus its Adam state (SD 1.5 distillation peaks at
~20 GB in fp32; SDXL or Flux do not fit at all). With a LoRA student the teacher *is* the base model with
the adapters switched off, so there is one set of base weights and gradients / optimiser state only for
the adapters (the paper's App. F: rank 64 on self-attention and feed-forward layers of SDXL, SDXL-Turbo
and Flux).

Pieces:

* :class:`LoraSettings` -- rank, alpha, dropout and the target modules (a per-family preset by default:
  :data:`TARGET_PRESETS`, keyed by the denoiser's class).
* :func:`add_lora` -- ``peft.inject_adapter_in_model`` with adapter name :data:`LORA_ADAPTER`; the base
  stays frozen (in whatever dtype it has), the adapter weights are float32 master weights.
* :func:`adapters_disabled` -- the teacher forward: peft's LoRA layers then return ``base_layer(x)``
  exactly, so the teacher equals the untouched base model bit for bit.
* :class:`LoraWeights` -- registers the adapter parameters (which live inside the denoiser) on the
  training module, with peft's key names (``<module>.lora_A.weight``) in ``state_dict()``.
* :func:`merged_state_dict` -- base + ``B @ A * scale`` under the base model's own key names.
* :func:`save_lora_file` / :func:`read_lora_file` -- the diffusers LoRA file
  (``pytorch_lora_weights.safetensors``, keys ``unet.*`` / ``transformer.*``, the ``LoraConfig`` in the
  safetensors metadata) that ``pipe.load_lora_weights`` reads.
"""

from __future__ import annotations

import json
import re
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .errors import CheckpointMismatchError, ConfigError, DamagedCheckpointError

#: peft adapter name of the student (kept out of the way of adapters a user loads themselves).
LORA_ADAPTER = "cleandift"
STUDENT_KINDS: tuple[str, ...] = ("full", "lora")
#: File name diffusers' ``save_lora_weights`` / ``load_lora_weights`` use.
LORA_FILE = "pytorch_lora_weights.safetensors"
#: safetensors metadata key holding the ``LoraConfig`` (diffusers' ``LORA_ADAPTER_METADATA_KEY``).
LORA_METADATA_KEY = "lora_adapter_metadata"

_UNET_TARGETS = r".*\.attn1\.(to_q|to_k|to_v|to_out\.0)|.*\.ff\.net\.(0\.proj|2)"
_MMDIT_TARGETS = (r".*transformer_blocks\.\d+\.attn\d?\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj"
                  r"|to_add_out)|.*transformer_blocks\.\d+\.(ff|ff_context)\.net\.(0\.proj|2)")
#: Self-attention and feed-forward projections per denoiser class (a peft ``target_modules`` regex, matched
#: against the whole module name). Cross-attention (U-Net/PixArt ``attn2``) is left out, as in the paper;
#: SD3/Flux joint attention is self-attention over text + image tokens, so both streams' projections are in;
#: Flux single blocks fuse attention and MLP (``proj_mlp`` / ``proj_out``).
TARGET_PRESETS: dict[str, str] = {
    "UNet2DConditionModel": _UNET_TARGETS,
    "PixArtTransformer2DModel": r".*transformer_blocks\.\d+\.attn1\.(to_q|to_k|to_v|to_out\.0)"
                                r"|.*transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)",
    "SD3Transformer2DModel": _MMDIT_TARGETS,
    "FluxTransformer2DModel": _MMDIT_TARGETS
    + r"|.*single_transformer_blocks\.\d+\.(attn\.(to_q|to_k|to_v)|proj_mlp|proj_out)",
}


@dataclass
class LoraSettings:
    """What a LoRA student adapts. Defaults: the paper's rank 64, ``alpha = rank`` (scale 1), no dropout.

    ``targets``: a regex matched against whole module names, or a comma list of module-name suffixes;
    ``None`` uses the family preset (:data:`TARGET_PRESETS`).
    """

    rank: int = 64
    alpha: float | None = None
    dropout: float = 0.0
    targets: str | None = None

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise ConfigError(f"lora_rank must be >= 1, got {self.rank}")
        if self.alpha is not None and not float(self.alpha) > 0:
            raise ConfigError(f"lora_alpha must be > 0, got {self.alpha}")
        if not 0.0 <= float(self.dropout) < 1.0:
            raise ConfigError(f"lora_dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return float(self.alpha if self.alpha is not None else self.rank) / int(self.rank)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def target_modules(denoiser: nn.Module, targets: str | None = None) -> str | list[str]:
    """peft ``target_modules`` for ``denoiser``: the family preset, a user regex, or a suffix list."""
    if targets is None:
        kind = type(denoiser).__name__
        if kind not in TARGET_PRESETS:
            raise ConfigError(f"no LoRA target preset for a {kind}; pass lora_targets (a regex over module names, "
                              f"or a comma list such as 'to_q,to_k,to_v,to_out.0')")
        return TARGET_PRESETS[kind]
    if "," in targets or re.fullmatch(r"[\w.]+", targets):
        return [t.strip() for t in targets.split(",") if t.strip()]
    return targets


def lora_config(settings: LoraSettings, targets: str | list[str]):
    """A peft ``LoraConfig``. ``init_lora_weights=True`` zeroes ``B``: the student starts as the teacher."""
    from peft import LoraConfig  # noqa: PLC0415

    return LoraConfig(r=int(settings.rank), lora_alpha=float(settings.alpha or settings.rank),
                      lora_dropout=float(settings.dropout), target_modules=targets, init_lora_weights=True)


def add_lora(denoiser: nn.Module, config, *, dtype: torch.dtype = torch.float32) -> dict[str, nn.Parameter]:
    """Inject the student adapter into ``denoiser`` (in place); returns its parameters by peft key.

    The base weights are frozen; the adapter weights are created in ``dtype`` (float32 master weights even
    when the base is bf16: peft casts the layer input to the adapter's dtype and the sum back).
    """
    from peft import inject_adapter_in_model  # noqa: PLC0415

    if has_lora(denoiser):
        raise ConfigError(f"the denoiser already carries a '{LORA_ADAPTER}' adapter; load a fresh backbone")
    denoiser.requires_grad_(False)
    try:
        inject_adapter_in_model(config, denoiser, adapter_name=LORA_ADAPTER)
    except ValueError as exc:
        raise ConfigError(f"LoRA targets {config.target_modules!r} match no layer of this "
                          f"{type(denoiser).__name__} ({_first_line(exc)}); check lora_targets") from exc
    params = lora_parameters(denoiser)
    for p in params.values():
        p.data = p.data.to(dtype)
        p.requires_grad_(True)
    return params


def has_lora(denoiser: nn.Module) -> bool:
    return any(_is_lora_layer(m) and LORA_ADAPTER in m.lora_A for m in denoiser.modules())


def lora_parameters(denoiser: nn.Module) -> dict[str, nn.Parameter]:
    """The student adapter's parameters keyed as peft / diffusers save them (adapter name removed)."""
    marker = f".{LORA_ADAPTER}."
    return {name.replace(marker, "."): p for name, p in denoiser.named_parameters()
            if ".lora_" in name and marker in name}


def lora_layers(denoiser: nn.Module) -> dict[str, nn.Module]:
    """Module path -> peft LoRA layer carrying the student adapter."""
    return {name: m for name, m in denoiser.named_modules() if _is_lora_layer(m) and LORA_ADAPTER in m.lora_A}


def _is_lora_layer(module: nn.Module) -> bool:
    from peft.tuners.lora import LoraLayer  # noqa: PLC0415

    return isinstance(module, LoraLayer)


@contextmanager
def adapters_disabled(denoiser: nn.Module) -> Iterator[None]:
    """Run ``denoiser`` as the frozen base model (the teacher): every LoRA layer returns ``base_layer(x)``."""
    layers = list(lora_layers(denoiser).values())
    before = [m.disable_adapters for m in layers]
    for m in layers:
        m.enable_adapters(False)
    try:
        yield
    finally:
        for m, was_disabled in zip(layers, before):
            m.enable_adapters(not was_disabled)


def lora_state_dict(denoiser: nn.Module) -> dict[str, torch.Tensor]:
    return {k: p.detach() for k, p in lora_parameters(denoiser).items()}


def load_lora_state(denoiser: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy adapter weights into ``denoiser``'s student adapter; keys and shapes must match exactly."""
    from .checkpoints import StateDiff  # noqa: PLC0415

    params = lora_parameters(denoiser)
    diff = StateDiff.between({k: p.detach() for k, p in params.items()}, dict(state))
    if diff:
        lines = [f"{source}: the LoRA weights do not fit this backbone's adapter", *diff.lines()]
        if diff.wrong_shape:
            lines.append(f"  likely fix: the file was trained with another rank (this adapter has rank "
                         f"{_rank_of(params)}); pass its --lora-rank or use the backbone it was trained from")
        else:
            lines.append("  likely fix: load it with the backbone (family) and LoRA targets it was trained with")
        raise CheckpointMismatchError("\n".join(lines))
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(state[k].to(device=p.device, dtype=p.dtype))


def _rank_of(params: Mapping[str, torch.Tensor]) -> int | None:
    for k, p in params.items():
        if k.endswith("lora_A.weight"):
            return int(p.shape[0])
    return None


def merged_state_dict(denoiser: nn.Module, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The denoiser's state dict with the adapter folded in: ``W + scale * B @ A`` under the base's key names.

    Computed tensor by tensor (float32, then the base dtype), so no second model is ever built.
    """
    layers = lora_layers(denoiser)
    state = {}
    for key, value in denoiser.state_dict().items():
        if ".lora_" in key:
            continue
        state[key.replace(".base_layer.", ".")] = value.detach()
    for name, layer in layers.items():
        key = f"{name}.weight"
        base = state[key]
        delta = layer.get_delta_weight(LORA_ADAPTER).detach().float()
        state[key] = (base.float() + delta.to(base.device)).to(base.dtype)
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    return {k: v.contiguous().cpu() for k, v in state.items()}


class LoraWeights(nn.Module):
    """The student adapter's parameters, registered on the training module (optimizer, DDP, checkpoints).

    The parameters stay inside the denoiser (they are the same tensors); this module only names them:
    ``state_dict()`` keys are peft's (``<module>.lora_A.weight``), independent of registration order.
    """

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        params = lora_parameters(denoiser)
        if not params:
            raise ConfigError("the denoiser carries no cleandift LoRA adapter (call add_lora first)")
        self._keys = list(params)
        for i, p in enumerate(params.values()):
            self.register_parameter(f"p{i}", p)

    def named_weights(self) -> Iterator[tuple[str, nn.Parameter]]:
        return zip(self._keys, self._parameters.values())

    def _save_to_state_dict(self, destination, prefix, keep_vars):  # noqa: D401 (torch hook)
        for key, p in self.named_weights():
            destination[prefix + key] = p if keep_vars else p.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        ours = set()
        for key, p in self.named_weights():
            full = prefix + key
            ours.add(full)
            if full not in state_dict:
                missing_keys.append(full)
                continue
            value = state_dict[full]
            if tuple(value.shape) != tuple(p.shape):
                error_msgs.append(f"size mismatch for {full}: checkpoint {tuple(value.shape)}, model {tuple(p.shape)}")
                continue
            with torch.no_grad():
                p.copy_(value)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in ours)


# ------------------------------------------------------------------------------------------- files
def pipeline_prefix(denoiser: nn.Module) -> str:
    """The pipeline attribute the adapter belongs to in diffusers' LoRA files: ``unet`` or ``transformer``."""
    return "unet" if type(denoiser).__name__.startswith("UNet") else "transformer"


def adapter_metadata(denoiser: nn.Module) -> dict[str, Any]:
    """``LoraConfig`` keyword arguments that rebuild the student adapter exactly.

    ``target_modules`` is the list of adapted module paths (not the preset regex): a loader then adapts
    exactly these layers, and a file for another architecture fails loudly instead of matching elsewhere.
    """
    config = denoiser.peft_config[LORA_ADAPTER]
    return {"r": int(config.r), "lora_alpha": float(config.lora_alpha), "lora_dropout": float(config.lora_dropout),
            "target_modules": sorted(lora_layers(denoiser)), "init_lora_weights": True}


def save_lora_file(folder: str | Path, state: Mapping[str, torch.Tensor], metadata: Mapping[str, Any], prefix: str,
                   dtype: torch.dtype | None = None) -> Path:
    """Write ``folder/pytorch_lora_weights.safetensors`` in diffusers' LoRA layout.

    Keys are ``{prefix}.{peft key}`` (``prefix`` = ``unet`` or ``transformer``, the pipeline attribute the
    adapter belongs to) and the ``LoraConfig`` kwargs (:func:`adapter_metadata`) go into the safetensors
    metadata under the same prefix, which is what ``pipe.load_lora_weights(folder)`` and
    ``denoiser.load_lora_adapter(file, prefix=...)`` read.
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for k, v in state.items():
        v = v.detach()
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        tensors[f"{prefix}.{k}"] = v.contiguous().cpu()
    packed = {f"{prefix}.{k}": v for k, v in metadata.items()}
    path = folder / LORA_FILE
    save_file(tensors, str(path), metadata={"format": "pt", LORA_METADATA_KEY: json.dumps(packed, sort_keys=True)})
    return path


@dataclass
class LoraFile:
    """A LoRA file read back: peft-keyed weights, the adapter's settings and the pipeline prefix."""

    state: dict[str, torch.Tensor]
    rank: int
    alpha: float
    target_modules: list[str]
    prefix: str | None
    source: str

    def config(self):
        from peft import LoraConfig  # noqa: PLC0415

        return LoraConfig(r=self.rank, lora_alpha=self.alpha, target_modules=self.target_modules,
                          init_lora_weights=True)


def is_lora_state(state: Mapping[str, torch.Tensor] | Iterable[str]) -> bool:
    """Whether every key (of a state dict, or a list of key names) is a LoRA ``lora_A`` / ``lora_B`` weight."""
    keys = list(state)
    return bool(keys) and all(".lora_A." in k or ".lora_B." in k for k in keys)


def read_lora_file(path: str | Path) -> LoraFile:
    """Read a diffusers / peft LoRA safetensors file (``unet.`` / ``transformer.`` / ``base_model.model.`` keys)."""
    from safetensors import safe_open  # noqa: PLC0415

    from .checkpoints import _load_safetensors  # noqa: PLC0415

    path = Path(path)
    state = _load_safetensors(path, "re-export it (`cleandift train ... --export-only`) or copy it again")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
    except Exception:  # noqa: BLE001 -- the tensors were readable; the metadata is optional
        metadata = {}
    return lora_from_state(state, str(path), metadata.get(LORA_METADATA_KEY))


def lora_from_state(state: Mapping[str, torch.Tensor], source: str, metadata: str | None = None) -> LoraFile:
    if not is_lora_state(state):
        raise CheckpointMismatchError(f"{source}: not a LoRA file (its keys hold no lora_A / lora_B weights)")
    prefix = _common_prefix(state)
    strip = len(prefix) + 1 if prefix else 0
    peft_state = {k[strip:]: v for k, v in state.items()}
    ranks = {int(v.shape[0]) for k, v in peft_state.items() if k.endswith("lora_A.weight")}
    if len(ranks) != 1:
        raise CheckpointMismatchError(f"{source}: LoRA layers of several ranks {sorted(ranks)} are not supported")
    rank = ranks.pop()
    alpha = float(rank)
    if metadata:
        try:
            meta = json.loads(metadata)
        except json.JSONDecodeError as exc:
            raise DamagedCheckpointError(f"{source}: its LoRA metadata is not valid JSON ({exc}); "
                                         "re-export it") from exc
        key = f"{prefix}.lora_alpha" if prefix else "lora_alpha"
        alpha = float(meta.get(key, meta.get("lora_alpha", alpha)))
    targets = sorted({k.split(".lora_")[0] for k in peft_state})
    return LoraFile(peft_state, rank, alpha, targets, prefix, source)


def _common_prefix(state: Mapping[str, torch.Tensor]) -> str | None:
    for prefix in ("base_model.model", "unet", "transformer"):
        if all(k.startswith(prefix + ".") for k in state):
            return prefix
    return None


def attach_lora_file(denoiser: nn.Module, lora: LoraFile) -> None:
    """Inject ``lora``'s adapter into ``denoiser`` (exact target modules from the file) and load its weights."""
    missing = [t for t in lora.target_modules if _submodule(denoiser, t) is None]
    if missing:
        raise CheckpointMismatchError(
            f"{lora.source}: {len(missing)} of its {len(lora.target_modules)} LoRA layer(s) do not exist in this "
            f"{type(denoiser).__name__} (e.g. {missing[0]}); load it with the backbone family it was trained for")
    base_dtype = next(denoiser.parameters()).dtype  # adapters in fp32, or fp64 next to an fp64 base
    add_lora(denoiser, lora.config(), dtype=torch.promote_types(base_dtype, torch.float32))
    load_lora_state(denoiser, lora.state, lora.source)
    denoiser.requires_grad_(False)


def _submodule(module: nn.Module, name: str) -> nn.Module | None:
    try:
        return module.get_submodule(name)
    except AttributeError:
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

"""Training configuration: one dataclass, two presets, a YAML file and CLI flags on top.

Precedence (later wins): dataclass defaults < preset < YAML file < command-line flags. Unknown or
ill-typed keys raise :class:`~cleandift.errors.ConfigError` naming the key, the file and the valid
choices. The resolved configuration is written to ``RUN_DIR/config.yaml`` so every run can be
repeated (and ``--resume`` re-reads it).

Presets (paper and reference code disagree; both are reproducible by name):

* ``paper`` (default) -- §4.1: Adam, lr 2e-6, linear warmup, 400 steps, batch 8, crop + resize.
  The paper does not give the warmup length; we use 40 steps (10 % of the run), then constant.
* ``code`` -- ``configs/sd*_feature_extractor.yaml``: Adam, lr 1e-5, ``constant_with_warmup`` with
  2000 warmup steps (so a 400-step run never leaves warmup and ends at lr 2e-6), batch 8, plain
  resize (aspect distorted). ``max_steps`` is null (unbounded) there; we keep 400.

Student kinds (``student``): ``full`` (the reference) or ``lora`` (App. F: rank 64 on self-attention and
FFN). Neither the paper nor the code gives a LoRA learning rate; a LoRA run whose ``lr`` was not set
explicitly uses :data:`LORA_LR` (1e-4, the usual LoRA fine-tuning rate, e.g. diffusers' LoRA scripts):
the presets' 2e-6 / 1e-5 are full-fine-tuning rates under which a zero-initialised adapter barely moves.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from ..errors import ConfigError
from ..heads import HEAD_NORMS, HeadConfig
from ..loss import LOSSES

PRESET_NAMES: tuple[str, ...] = ("paper", "code")
LR_SCHEDULES: tuple[str, ...] = ("constant_with_warmup", "constant")
OPTIMIZERS: tuple[str, ...] = ("adam", "adam-fused", "adam-foreach", "adam8bit")
PRECISIONS: tuple[str, ...] = ("fp32", "bf16", "fp16")
STUDENTS: tuple[str, ...] = ("full", "lora")
#: Learning rate of a LoRA student when ``lr`` is not given explicitly (see the module docstring).
LORA_LR = 1e-4
RESIZES: tuple[str, ...] = ("crop", "stretch")


@dataclass
class TrainConfig:
    """Everything a training run depends on (see ``cleandift train --help`` for the flags)."""

    # model and data
    model: str = "sd15"
    checkpoint: str | None = None  # initialise student (+heads, timestep) from a released file / export
    single_file_config: str | None = None
    data: str | None = None
    val_data: str | None = None  # held-out folder; default: hold out `val_images` images of `data`
    val_images: int = 8
    size: int | None = None  # image side; None = the backbone's resolution
    resize: str = "crop"
    captions: bool = True  # read sidecar .txt / .json captions; False = `prompt` for every image
    prompt: str = ""  # prompt for images without a caption
    workers: int = 2
    # run
    out: str = "runs/cleandift"
    preset: str = "paper"
    seed: int = 42
    device: str | None = None
    dtype: str = "fp32"  # compute precision: fp32, or bf16 / fp16 autocast (master weights stay fp32)
    teacher_dtype: str | None = None  # None = the backbone's dtype (fp32); bf16 halves the teacher
    max_steps: int = 400
    batch_size: int = 8
    grad_accum: int = 1
    # optimisation
    optimizer: str = "adam"
    lr: float = 2e-6
    lr_schedule: str = "constant_with_warmup"
    warmup_steps: int = 40
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0  # 0 = no clipping (the reference does not clip)
    gradient_checkpointing: bool = False
    cache_latents: bool = False  # encode each image's VAE posterior once, then free the VAE encoder
    # student
    student: str = "full"  # "full" (a trainable copy, the reference) or "lora" (peft adapters, App. F)
    lora_rank: int = 64
    lora_alpha: float | None = None  # None = rank (scale 1)
    lora_dropout: float = 0.0
    lora_targets: str | None = None  # None = the family preset (cleandift.lora.TARGET_PRESETS)
    # method
    taps: str | None = None  # None = the 11 reference taps
    num_timesteps: int = 3
    t_min: int = 1
    t_max: int = 999
    loss: str = "cosine"
    use_heads: bool = True
    head_norm: str = "adarms"
    head_depth: int = 3
    ffn_expansion: int = 1
    use_gating: bool = True
    mapping_width: int = 256
    mapping_depth: int = 2
    mapping_d_ff: int = 768
    student_timestep: str = "learned"
    timestep_init: float = 261.0
    sample_posterior: bool = True
    # bookkeeping
    checkpoint_every: int = 100
    keep_checkpoints: int = 1  # a full SD-1.5 state is ~11 GB (student + Adam); older ones are deleted
    val_every: int = 100
    log_every: int = 1
    export: bool = True

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> "TrainConfig":
        _choice("preset", self.preset, PRESET_NAMES)
        _choice("resize", self.resize, RESIZES)
        _choice("dtype", self.dtype, PRECISIONS)
        if self.teacher_dtype is not None:
            _choice("teacher_dtype", self.teacher_dtype, PRECISIONS)
        _choice("optimizer", self.optimizer, OPTIMIZERS)
        _choice("lr_schedule", self.lr_schedule, LR_SCHEDULES)
        _choice("loss", self.loss, LOSSES)
        _choice("head_norm", self.head_norm, HEAD_NORMS)
        _choice("student_timestep", self.student_timestep, ("learned", "fixed"))
        _choice("student", self.student, STUDENTS)
        self.lora_settings()  # rank / alpha / dropout ranges
        for name in ("max_steps", "batch_size", "grad_accum", "num_timesteps", "head_depth", "ffn_expansion",
                     "mapping_width", "mapping_d_ff", "log_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("val_images", "workers", "warmup_steps", "checkpoint_every", "val_every", "mapping_depth"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        _finite("lr", self.lr, low=0.0, low_open=True, fix="e.g. --lr 2e-6 (paper) or 1e-5 (code)")
        _finite("adam_beta1", self.adam_beta1, low=0.0, high=1.0)
        _finite("adam_beta2", self.adam_beta2, low=0.0, high=1.0)
        _finite("adam_eps", self.adam_eps, low=0.0, low_open=True)
        _finite("weight_decay", self.weight_decay, low=0.0)
        _finite("max_grad_norm", self.max_grad_norm, low=0.0, fix="0 = no clipping")
        _finite("timestep_init", self.timestep_init, low=0.0)
        if not 0 <= self.t_min < self.t_max <= 1000:
            raise ConfigError(f"need 0 <= t_min < t_max <= 1000, got t_min={self.t_min}, t_max={self.t_max}")
        if self.size is not None and self.size < 8:
            raise ConfigError(f"size must be a positive multiple of the model's cell (e.g. 512), got {self.size}")
        return self

    # ------------------------------------------------------------------ views
    def head_config(self) -> HeadConfig:
        return HeadConfig(depth=self.head_depth, ffn_expansion=self.ffn_expansion, head_norm=self.head_norm,
                          use_gating=self.use_gating, cond_dim=self.mapping_width, mapping_depth=self.mapping_depth,
                          mapping_d_ff=self.mapping_d_ff)

    def lora_settings(self):
        from ..lora import LoraSettings  # noqa: PLC0415

        return LoraSettings(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                            targets=self.lora_targets)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def save(self, path: str | Path, history: Sequence[Mapping[str, Any]] = ()) -> Path:
        """Write the resolved config as YAML (atomically: a crash never leaves half a file).

        ``history``: the settings a resumed run changed (``{"step": N, "changed": {key: [old, new]}}``),
        written as comments so the file never claims a value was used from step 0 when it was not.
        """
        import os  # noqa: PLC0415

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        notes = "".join(f"# resumed at step {h['step']}: "
                        + ", ".join(f"{k} {old} -> {new}" for k, (old, new) in h["changed"].items()) + "\n"
                        for h in history)
        tmp.write_text("# resolved cleandift train config (defaults < preset < YAML < flags)\n" + notes
                       + yaml.safe_dump(self.to_dict(), sort_keys=False), encoding="utf-8")
        os.replace(tmp, path)
        return path


#: Settings a resumed run may change: how long it runs, where, and its bookkeeping. Everything else
#: (learning rate, batch size, data, model, method, precision, ...) would make the resumed steps a
#: different run from the one checkpointed, so ``--resume`` refuses such changes.
RESUME_MAY_CHANGE: tuple[str, ...] = ("max_steps", "checkpoint_every", "keep_checkpoints", "log_every", "val_every",
                                      "workers", "export", "device", "out", "cache_latents")


def resume_changes(saved: Mapping[str, Any], config: TrainConfig) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """Compare a checkpoint's config with the resumed one: ``(refused, allowed)`` as ``{key: (old, new)}``.

    Keys missing from ``saved`` (written by an older version) are not compared.
    """
    old = coerce({k: v for k, v in saved.items() if k.replace("-", "_") in _FIELDS}, "checkpoint config")
    new = config.to_dict()
    changed = {k: (v, new[k]) for k, v in old.items() if v != new[k] and not _same_path(k, v, new[k])}
    refused = {k: v for k, v in changed.items() if k not in RESUME_MAY_CHANGE}
    allowed = {k: v for k, v in changed.items() if k in RESUME_MAY_CHANGE}
    return refused, allowed


def _same_path(key: str, old: Any, new: Any) -> bool:
    """``images/`` and ``./images`` (or its absolute path) name the same folder: not a change."""
    if key not in _PATH_KEYS or not isinstance(old, str) or not isinstance(new, str):
        return False
    return Path(old).expanduser().absolute().resolve() == Path(new).expanduser().absolute().resolve()


_PATH_KEYS = ("model", "checkpoint", "single_file_config", "data", "val_data")

#: Values each preset sets (everything else keeps the dataclass default).
PRESETS: dict[str, dict[str, Any]] = {
    "paper": dict(lr=2e-6, lr_schedule="constant_with_warmup", warmup_steps=40, max_steps=400, batch_size=8,
                  resize="crop", optimizer="adam"),
    "code": dict(lr=1e-5, lr_schedule="constant_with_warmup", warmup_steps=2000, max_steps=400, batch_size=8,
                 resize="stretch", optimizer="adam", checkpoint_every=100, val_every=100),
}

_FIELDS = {f.name: f for f in fields(TrainConfig)}


def _finite(name: str, value: float, low: float, high: float | None = None, low_open: bool = False,
            fix: str = "") -> None:
    """A float setting must be a finite number in its range (``--lr nan`` would train to NaN silently)."""
    ok = math.isfinite(value) and (value > low if low_open else value >= low) and (high is None or value < high)
    if not ok:
        bound = f"> {low:g}" if low_open else f">= {low:g}"
        bound += f" and < {high:g}" if high is not None else ""
        raise ConfigError(f"{name} must be a finite number {bound}, got {value}" + (f" ({fix})" if fix else ""))


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(choices)}")


def load_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping of config keys (unknown keys are reported by :func:`coerce`)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from exc
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of config keys at the top level, got {type(data).__name__}")
    return data


def coerce(values: Mapping[str, Any], source: str) -> dict[str, Any]:
    """Check keys against :class:`TrainConfig` and convert values to the field types.

    YAML reads ``2e-6`` as a string and ``1`` where a float is meant; both are converted. Anything
    that cannot be converted raises :class:`ConfigError` naming ``source``, the key and the value.
    """
    out: dict[str, Any] = {}
    for key, value in values.items():
        key = str(key).replace("-", "_")
        if key not in _FIELDS:
            close = difflib.get_close_matches(key, list(_FIELDS), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{source}: unknown config key {key!r}{hint}; valid keys: {', '.join(_FIELDS)}")
        out[key] = _convert(key, value, source)
    return out


def _convert(key: str, value: Any, source: str) -> Any:
    annotation = str(_FIELDS[key].type)
    optional = "None" in annotation
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{source}: {key} cannot be null")
    try:
        if annotation.startswith("bool"):
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in {"true", "yes", "1", "false", "no", "0"}:
                return value.lower() in {"true", "yes", "1"}
            raise ValueError
        if annotation.startswith("int"):
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(value)
        if annotation.startswith("float"):
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        kind = annotation.split(" ")[0]
        raise ConfigError(f"{source}: {key}={value!r} is not a valid {kind}") from None


def resolve_config(config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                   base: Mapping[str, Any] | None = None) -> TrainConfig:
    """Merge defaults < preset < ``base`` (e.g. a resumed run's config) < YAML < ``overrides``.

    ``overrides`` are explicitly given flags (``None`` values are ignored, so unset flags never
    clobber the file). The preset is the one named by the overrides, else the YAML, else ``paper``.
    """
    file_values = coerce(load_yaml(config_file), str(config_file)) if config_file else {}
    base_values = coerce(base or {}, "saved run config")
    flag_values = coerce({k: v for k, v in (overrides or {}).items() if v is not None}, "command line")
    preset = flag_values.get("preset") or file_values.get("preset") or base_values.get("preset") or "paper"
    _choice("preset", preset, PRESET_NAMES)
    merged: dict[str, Any] = {}
    merged.update(PRESETS[preset])
    merged.update(base_values)
    merged.update(file_values)
    merged.update(flag_values)
    merged["preset"] = preset
    lr_given = "lr" in base_values or "lr" in file_values or "lr" in flag_values
    if merged.get("student") == "lora" and not lr_given:
        merged["lr"] = LORA_LR
    return TrainConfig(**merged)


def replace(config: TrainConfig, **changes: Any) -> TrainConfig:
    """A validated copy of ``config`` with ``changes``."""
    return dataclasses.replace(config, **coerce(changes, "replace()"))

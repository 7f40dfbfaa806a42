"""Timestep-conditioned projection heads: map clean student features to the teacher's noisy ones.

One head per tap. Each is a stack of pointwise residual feed-forward blocks whose norm is modulated
by an embedding of the teacher timestep ``t``; all heads share one timestep network::

    t -> t / 999 -> FourierFeatures(1 -> 256) -> time_in_proj (256 -> 256) -> MappingNetwork -> cond (256)
    head(x, cond) = block_depth(... block_1(x, cond)),  block(x) = x + down(SwiGLU(up(norm(x, cond))))

Parameter names reproduce the reference ``StableFeatureAligner`` (``adapters.{tap}.layers.{i}.norm.linear``,
``mapping.blocks.{i}.up_proj``, ``time_in_proj``, ``time_emb.weight`` ...) so the heads stored in the
released ``cleandift_sd*_full.safetensors`` load with ``strict=True``. Every ``down_proj`` and every
norm's conditioning ``linear`` is zero-initialised, so each head is exactly the identity at init and
the first training step starts from the "no heads" loss.

At inference the heads are optional: :func:`project_features` gives the timestep-specific features
the paper's App. D probes (e.g. depth at ``t=499``); without them the student's raw features are used.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Literal, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoints import StateDiff
from .errors import CheckpointMismatchError, ConfigError

HeadNorm = Literal["adarms", "film"]
HEAD_NORMS: tuple[str, ...] = ("adarms", "film")
#: The reference normalises the teacher timestep by the model's largest training timestep.
T_MAX_MODEL = 999


@dataclass(frozen=True)
class HeadConfig:
    """Hyper-parameters of the heads; defaults are the shipped reference config (``configs/sd*.yaml``).

    Attributes:
        depth: residual blocks per head (reference 3).
        ffn_expansion: hidden width of each block as a multiple of the tap's channels (reference 1).
        head_norm: ``"adarms"`` -- the *shipped* code and released weights (scale only); ``"film"``
            -- the paper's main configuration (scale and shift). Paper App. E: AdaRMS costs
            0.1 PCK_bbox; we default to AdaRMS so the released heads load.
        use_gating: SwiGLU in every block (reference True); False uses ``Linear + SiLU``.
        cond_dim: width of the timestep embedding / mapping network (reference 256).
        mapping_depth, mapping_d_ff, mapping_dropout: mapping network (reference 2, 768, 0.0).
        dropout: dropout inside head blocks (reference 0.0).
        fourier_std: std of the random Fourier frequencies (reference 1.0).
        t_max_model: ``t`` is divided by this before the Fourier features (reference 999).
    """

    depth: int = 3
    ffn_expansion: int = 1
    head_norm: str = "adarms"
    use_gating: bool = True
    cond_dim: int = 256
    mapping_depth: int = 2
    mapping_d_ff: int = 768
    mapping_dropout: float = 0.0
    dropout: float = 0.0
    fourier_std: float = 1.0
    t_max_model: int = T_MAX_MODEL

    def __post_init__(self) -> None:
        if self.head_norm not in HEAD_NORMS:
            raise ConfigError(f"head_norm={self.head_norm!r} is not one of {', '.join(HEAD_NORMS)}")
        for name in ("depth", "ffn_expansion", "cond_dim", "mapping_d_ff", "t_max_model"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"head option {name} must be >= 1, got {getattr(self, name)}")
        if self.mapping_depth < 0:
            raise ConfigError(f"mapping_depth must be >= 0, got {self.mapping_depth}")
        if self.cond_dim % 2:
            raise ConfigError(f"cond_dim must be even (Fourier cos/sin halves), got {self.cond_dim}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping) -> "HeadConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown head option(s) {unknown}; valid: {sorted(known)}")
        return cls(**dict(data))


# ---------------------------------------------------------------------------------------------- layers
def rms_norm(x: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / rms(x) * scale`` over the last dim, computed in (at least) float32 for stability."""
    dtype = torch.promote_types(torch.promote_types(x.dtype, scale.dtype), torch.float32)
    mean_sq = x.to(dtype).pow(2).mean(dim=-1, keepdim=True)
    return x * (scale.to(dtype) * torch.rsqrt(mean_sq + eps)).to(x.dtype)


def zero_init(layer: nn.Linear) -> nn.Linear:
    nn.init.zeros_(layer.weight)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


class RMSNorm(nn.Module):
    """RMS norm with a learnable per-channel ``scale`` (the mapping network's norm)."""

    def __init__(self, features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.scale, self.eps)


class AdaRMSNorm(nn.Module):
    """``rms_norm(x) * (1 + linear(cond))``: no static scale; ``linear`` zero-init => plain RMS norm at init."""

    def __init__(self, features: int, cond_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.linear = zero_init(nn.Linear(cond_features, features, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.linear(cond)[:, None, :] + 1, self.eps)


class FiLMNorm(nn.Module):
    """``rms_norm(x) * (1 + scale(cond)) + shift(cond)``; ``linear`` gives ``[scale, shift]`` (2d).

    The reference ``FiLMNorm`` (never selected by its configs) has two bugs: it uses the scale as the
    shift (``shift = scale``) and it is not zero-initialised, so its heads are not the identity at
    init. Here scale and shift are separate halves of one zero-initialised ``Linear(cond -> 2d)``.
    """

    def __init__(self, features: int, cond_features: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.linear = zero_init(nn.Linear(cond_features, 2 * features, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(cond)[:, None, :].chunk(2, dim=-1)
        dtype = torch.promote_types(x.dtype, torch.float32)
        out = rms_norm(x.to(dtype), scale.to(dtype) + 1, self.eps) + shift.to(dtype)
        return out.to(x.dtype)


class LinearSwiGLU(nn.Linear):
    """``Linear(d_in -> 2 d_out)`` split into value ``a`` (first half) and gate ``g``: ``a * silu(g)``."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(in_features, 2 * out_features, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, gate = super().forward(x).chunk(2, dim=-1)
        return a * F.silu(gate)


class LinearSiLU(nn.Linear):
    """Ungated variant (paper ablation "no gating"): ``silu(Linear(x))``; same parameter name ``up_proj``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(super().forward(x))


class MappingFeedForwardBlock(nn.Module):
    """Pre-norm SwiGLU FFN with a residual; ``down_proj`` zero-init (k-diffusion ``FeedForwardBlock``)."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = RMSNorm(d_model)
        self.up_proj = LinearSwiGLU(d_model, d_ff)
        self.dropout = nn.Dropout(dropout)
        self.down_proj = zero_init(nn.Linear(d_ff, d_model, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(self.dropout(self.up_proj(self.norm(x))))


class MappingNetwork(nn.Module):
    """``out_norm(blocks(in_norm(x)))``: turns the projected Fourier features into the shared condition."""

    def __init__(self, width: int = 256, depth: int = 2, d_ff: int = 768, dropout: float = 0.0) -> None:
        super().__init__()
        self.in_norm = RMSNorm(width)
        self.blocks = nn.ModuleList([MappingFeedForwardBlock(width, d_ff, dropout) for _ in range(depth)])
        self.out_norm = RMSNorm(width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.in_norm(x)
        for block in self.blocks:
            x = block(x)
        return self.out_norm(x)


class FourierFeatures(nn.Module):
    """Random Fourier features ``[cos 2 pi x W^T, sin 2 pi x W^T]``; ``weight`` is a saved buffer."""

    def __init__(self, in_features: int = 1, out_features: int = 256, std: float = 1.0) -> None:
        super().__init__()
        if out_features % 2:
            raise ValueError(f"out_features must be even, got {out_features}")
        self.register_buffer("weight", torch.randn(out_features // 2, in_features) * std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = 2 * math.pi * x @ self.weight.T.to(x.dtype)
        return torch.cat([f.cos(), f.sin()], dim=-1)


class HeadBlock(nn.Module):
    """One residual block of a head: ``x + down_proj(dropout(up_proj(norm(x, cond))))``."""

    def __init__(self, dim: int, cond_dim: int, expansion: int = 1, head_norm: str = "adarms",
                 use_gating: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        hidden = dim * expansion
        self.norm = AdaRMSNorm(dim, cond_dim) if head_norm == "adarms" else FiLMNorm(dim, cond_dim)
        self.up_proj = LinearSwiGLU(dim, hidden) if use_gating else LinearSiLU(dim, hidden, bias=False)
        self.dropout = nn.Dropout(dropout)
        self.down_proj = zero_init(nn.Linear(hidden, dim, bias=False))

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return x + self.down_proj(self.dropout(self.up_proj(self.norm(x, cond))))


class FFNStack(nn.Module):
    """The head of one tap: ``depth`` :class:`HeadBlock` s on channels-last tokens ``(N, HW, d)``."""

    def __init__(self, dim: int, config: HeadConfig) -> None:
        super().__init__()
        self.layers = nn.ModuleList([
            HeadBlock(dim, config.cond_dim, config.ffn_expansion, config.head_norm, config.use_gating,
                      config.dropout)
            for _ in range(config.depth)
        ])

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x, cond)
        return x


# ---------------------------------------------------------------------------------------------- heads
class ProjectionHeads(nn.Module):
    """All heads plus the shared timestep network; state-dict keys equal the reference's head keys.

    Args:
        channels: ``{tap name: channels}`` -- one head per entry, e.g. ``{t.name: t.channels for t in taps}``.
        config: :class:`HeadConfig` (reference defaults).
    """

    def __init__(self, channels: Mapping[str, int], config: HeadConfig | None = None) -> None:
        super().__init__()
        self.config = config or HeadConfig()
        c = self.config
        self.time_emb = FourierFeatures(1, c.cond_dim, std=c.fourier_std)
        self.time_in_proj = nn.Linear(c.cond_dim, c.cond_dim, bias=False)
        self.mapping = MappingNetwork(c.cond_dim, c.mapping_depth, c.mapping_d_ff, c.mapping_dropout)
        self.adapters = nn.ModuleDict({name: FFNStack(int(dim), c) for name, dim in channels.items()})

    @property
    def taps(self) -> tuple[str, ...]:
        return tuple(self.adapters.keys())

    def condition(self, t: torch.Tensor) -> torch.Tensor:
        """Timestep condition ``(N, cond_dim)`` for teacher timesteps ``t`` ``(N,)`` (ints or floats)."""
        ref = self.time_in_proj.weight
        t_norm = t.to(device=ref.device, dtype=torch.float32).reshape(-1, 1) / self.config.t_max_model
        return self.mapping(self.time_in_proj(self.time_emb(t_norm).to(ref.dtype)))

    def project(self, name: str, tokens: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """Apply the head of tap ``name`` to channels-last tokens ``(N, HW, C)`` with condition ``(N, D)``."""
        if name not in self.adapters:
            raise KeyError(f"no head for tap {name!r}; heads exist for: {', '.join(self.taps)}")
        return self.adapters[name](tokens, cond)

    def forward(self, tokens: Mapping[str, torch.Tensor], t: torch.Tensor) -> dict[str, torch.Tensor]:
        """Project ``{tap: (N, HW, C)}`` conditioned on ``t`` ``(N,)``; returns the same layout."""
        cond = self.condition(t)
        return {name: self.project(name, x, cond) for name, x in tokens.items()}

    def load_reference_state(self, state: Mapping[str, torch.Tensor], source: str = "<state dict>") -> None:
        """Strictly load head weights with reference key names; a mismatch raises a readable error."""
        check_head_state(self, state, source)
        ref = self.time_in_proj.weight
        self.load_state_dict({k: v.to(dtype=ref.dtype) for k, v in state.items()}, strict=True)


def check_head_state(heads: nn.Module, state: Mapping[str, torch.Tensor], source: str) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``state`` has exactly the heads' keys and shapes."""
    diff = StateDiff.between(heads.state_dict(), dict(state))
    if not diff:
        return
    lines = [f"{source}: the projection heads in the checkpoint do not fit the configured heads", *diff.lines()]
    lines.append(f"  likely fix: {_head_hint(state, diff.missing, diff.unexpected, diff.wrong_shape)}")
    raise CheckpointMismatchError("\n".join(lines))


def _head_hint(state, missing, unexpected, wrong) -> str:
    if not state:
        return "the checkpoint has no heads (a *_unet file?); train heads or use a *_full file / export"
    norm_wrong = [w for w in wrong if w[0].endswith("norm.linear.weight")]
    if norm_wrong:
        k, got, want = norm_wrong[0]
        kind = "film" if got[0] == 2 * want[0] else "adarms" if 2 * got[0] == want[0] else None
        if kind:
            return f"the checkpoint's heads use head_norm={kind!r}; configure the heads with it"
    ckpt_taps = sorted({k.split(".")[1] for k in state if k.startswith("adapters.")})
    if any(k.startswith("adapters.") for k in missing + unexpected):
        return f"the checkpoint has heads for taps {ckpt_taps}; select the same taps"
    if any(k.endswith("up_proj.weight") for k, *_ in wrong):
        return "ffn_expansion / use_gating differ from the checkpoint's; use its head config"
    return "configure the heads as in the run that wrote the checkpoint (see its cleandift.json)"


# ---------------------------------------------------------------------------------------------- helpers
def infer_head_config(state: Mapping[str, torch.Tensor], base: HeadConfig | None = None) -> HeadConfig:
    """Recover the :class:`HeadConfig` from head weights (depth, expansion, norm, mapping sizes).

    ``use_gating`` cannot be told apart from ``ffn_expansion`` by shapes alone (a gated block with
    expansion 1 has the same ``up_proj`` as an ungated one with expansion 2); it is taken from ``base``.
    """
    base = base or HeadConfig()
    taps = sorted({k.split(".")[1] for k in state if k.startswith("adapters.")})
    if not taps:
        raise CheckpointMismatchError("no head weights (adapters.*) in the checkpoint")
    tap = taps[0]
    prefix = f"adapters.{tap}.layers."
    depth = 1 + max(int(k[len(prefix):].split(".")[0]) for k in state if k.startswith(prefix))
    norm_w = state[f"{prefix}0.norm.linear.weight"]
    up_w = state[f"{prefix}0.up_proj.weight"]
    dim = int(up_w.shape[1])
    head_norm = "film" if norm_w.shape[0] == 2 * dim else "adarms"
    hidden = int(up_w.shape[0]) // (2 if base.use_gating else 1)
    blocks = {int(k.split(".")[2]) for k in state if k.startswith("mapping.blocks.")}
    mapping_d_ff = base.mapping_d_ff
    if "mapping.blocks.0.down_proj.weight" in state:
        mapping_d_ff = int(state["mapping.blocks.0.down_proj.weight"].shape[1])
    cond_dim = int(norm_w.shape[1])
    data = base.to_dict()
    data.update(depth=depth, ffn_expansion=max(1, hidden // dim), head_norm=head_norm, cond_dim=cond_dim,
                mapping_depth=len(blocks), mapping_d_ff=mapping_d_ff)
    return HeadConfig(**data)


def head_channels(state: Mapping[str, torch.Tensor]) -> dict[str, int]:
    """``{tap: channels}`` of the heads stored in a state dict (in first-appearance order)."""
    out: dict[str, int] = {}
    for k, v in state.items():
        if k.startswith("adapters.") and k.endswith(".layers.0.up_proj.weight"):
            out[k.split(".")[1]] = int(v.shape[1])
    return out


def heads_from_state(state: Mapping[str, torch.Tensor], config: HeadConfig | None = None,
                     taps: Sequence[str] | None = None, source: str = "<state dict>") -> ProjectionHeads:
    """Build :class:`ProjectionHeads` matching ``state`` (config inferred unless given) and load it strictly."""
    config = config or infer_head_config(state)
    channels = head_channels(state)
    if taps is not None:
        missing = [t for t in taps if t not in channels]
        if missing:
            raise CheckpointMismatchError(f"{source}: no head for tap(s) {missing}; the checkpoint has heads for "
                                          f"{', '.join(channels)}")
        channels = {t: channels[t] for t in taps}
        keep = ("mapping.", "time_in_proj.", "time_emb.") + tuple(f"adapters.{t}." for t in taps)
        state = {k: v for k, v in state.items() if k.startswith(keep)}
    heads = ProjectionHeads(channels, config)
    heads.load_reference_state(state, source)
    return heads


def load_heads(checkpoint, taps: Sequence[str] | None = None) -> tuple[ProjectionHeads, float | None]:
    """Heads (and the learned student timestep) from a ``*_full`` file, an export folder or a state dict.

    Uses :func:`cleandift.checkpoints.read_checkpoint`; an export's ``cleandift.json`` supplies the
    head config (so non-default heads round-trip), otherwise it is inferred from the shapes.
    """
    from .checkpoints import StudentCheckpoint, read_checkpoint, split_checkpoint  # noqa: PLC0415

    if isinstance(checkpoint, StudentCheckpoint):
        ckpt = checkpoint
    elif isinstance(checkpoint, Mapping):
        ckpt = split_checkpoint(dict(checkpoint))
    else:
        ckpt = read_checkpoint(checkpoint)
    if not ckpt.heads:
        raise CheckpointMismatchError(f"{ckpt.source}: contains no projection heads (adapters.*); a *_unet file "
                                      "only has the student -- use the *_full file or a `cleandift train` export")
    config = None
    if ckpt.meta.get("head_config"):
        config = HeadConfig.from_dict(ckpt.meta["head_config"])
    heads = heads_from_state(ckpt.heads, config, taps, ckpt.source)
    return heads, ckpt.timestep


@torch.no_grad()
def project_features(heads: ProjectionHeads, feats: Mapping[str, torch.Tensor],
                     t: float | int | torch.Tensor) -> dict[str, torch.Tensor]:
    """Timestep-specific features: heads applied to student maps ``{tap: (B, C, h, w)}`` at teacher time ``t``.

    ``t`` is a training timestep in ``[0, 999]`` (scalar, or ``(B,)`` for one per image). Returns
    ``{tap: (B, C, h, w)}`` predictions of what the frozen model would give at noise level ``t``.
    (The reference ``get_features`` only handled ``B == 1`` here; any batch size works.)
    """
    from .features import flatten_hw  # noqa: PLC0415

    out: dict[str, torch.Tensor] = {}
    ref = heads.time_in_proj.weight
    for name, f in feats.items():
        b, c, h, w = f.shape
        cond = heads.condition(_timestep_vector(t, b, ref.device))
        tokens = flatten_hw(f.to(device=ref.device, dtype=ref.dtype))
        projected = heads.project(name, tokens, cond)
        out[name] = projected.transpose(1, 2).reshape(b, c, h, w)
    return out


def _timestep_vector(t: float | int | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    t_vec = torch.as_tensor(t, dtype=torch.float32).reshape(-1).to(device)
    if t_vec.numel() == 1:
        return t_vec.expand(batch)
    if t_vec.numel() != batch:
        raise ValueError(f"got {t_vec.numel()} timesteps for a batch of {batch} feature maps")
    return t_vec

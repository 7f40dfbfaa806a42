"""Where the features are: tap tables of diffusers denoisers (U-Nets and transformers) and the hooks that read them.

A *tap* is a named position in the U-Net whose output is a feature map. CleanDIFT reads 11 of them:
the mid block (``mid``) and the decoder sub-layers ``us1`` ... ``us10``. In the reference code each
up block yields one feature per layer (attention output if the block has attention, else resnet
output) and the *last* layer's entry is replaced by the block's upsampler output. For SD 1.5/2.1
this gives (module names of the stock diffusers U-Net):

====== ================================ ======== ===============
name   diffusers module                 channels stride (latent)
====== ================================ ======== ===============
mid    mid_block                        1280     8
us1    up_blocks.0.resnets.0            1280     8
us2    up_blocks.0.resnets.1            1280     8
us3    up_blocks.0.upsamplers.0         1280     4
us4    up_blocks.1.attentions.0         1280     4
us5    up_blocks.1.attentions.1         1280     4
us6    up_blocks.1.upsamplers.0         1280     2   (= DIFT ``up_ft_index=1``)
us7    up_blocks.2.attentions.0         640      2
us8    up_blocks.2.attentions.1         640      2
us9    up_blocks.2.upsamplers.0         640      1   (= DIFT ``up_ft_index=2``)
us10   up_blocks.3.attentions.0         320      1
====== ================================ ======== ===============

:func:`discover_taps` derives this table from any ``UNet2DConditionModel`` configuration (it also
names the two final layers ``us11``/``us12``, which the paper leaves out), so smaller or differently
configured U-Nets work without code changes. :func:`run_to_taps` runs the U-Net with forward hooks
and **stops the computation right after the last requested tap**: nothing past it is computed.

Diffusion transformers (SD3, PixArt, Flux) have one tap per transformer block, named ``block{i}`` in
execution order (Flux: its double blocks, then its single blocks). :func:`discover_block_taps` builds
that table; a block tap reads the block's *image-token* output -- the image stream of a joint block's
``(text, image)`` pair, the trailing image tokens of a block that runs on ``[text, image]`` -- and
returns it as a ``(B, C, h, w)`` map on the token grid (``layout="tokens"``).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterable, Iterator, Sequence

import torch
from torch import nn

from .errors import UnknownTapError

#: The 11 positions the reference CleanDIFT code aligns (paper Fig. 11).
REFERENCE_TAPS: tuple[str, ...] = ("mid",) + tuple(f"us{i}" for i in range(1, 11))


@dataclass(frozen=True)
class Tap:
    """One feature position.

    Attributes:
        name: ``mid`` or ``us{k}`` (k counts decoder sub-layers from 1, as in the paper).
        module: dotted name of the diffusers submodule whose output is the feature.
        channels: channels of the feature map.
        stride: downsampling of the feature map relative to the U-Net *input* (latent for SD).
        order: execution order (0 = first computed); stopping after a tap skips all later ones.
        layout: ``"map"`` -- the module returns a ``(B, C, h, w)`` map (or a tuple / output object
            holding one first); ``"tokens"`` -- it returns ``(B, N, C)`` tokens (or a tuple of streams),
            turned into a map on the token grid.
        stream: for modules returning a tuple of token streams, the index of the image stream.
    """

    name: str
    module: str
    channels: int
    stride: int
    order: int
    layout: str = "map"
    stream: int = 0


class TapTable:
    """Ordered collection of :class:`Tap` s with validation that names the valid choices."""

    def __init__(self, taps: Iterable[Tap], default: Sequence[str] | None = None) -> None:
        self._taps = {tap.name: tap for tap in sorted(taps, key=lambda t: t.order)}
        self.default: tuple[str, ...] = tuple(default) if default is not None else tuple(self._taps)
        self.select(self.default)  # validate

    def __iter__(self) -> Iterator[Tap]:
        return iter(self._taps.values())

    def __len__(self) -> int:
        return len(self._taps)

    def __contains__(self, name: object) -> bool:
        return name in self._taps

    def __getitem__(self, name: str) -> Tap:
        return self.select([name])[0]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._taps)

    def select(self, names: str | Iterable[str] | None) -> list[Tap]:
        """Resolve a tap request to :class:`Tap` s in execution order.

        ``names`` may be ``None`` (the default taps), ``"all"``, a comma-separated string or an
        iterable of names. Unknown names raise :class:`UnknownTapError` listing the valid ones.
        """
        if names is None:
            names = self.default
        elif isinstance(names, str):
            names = self.names if names.strip() == "all" else [n.strip() for n in names.split(",") if n.strip()]
        names = list(dict.fromkeys(names))
        if not names:
            raise UnknownTapError("no taps requested; choose from " + ", ".join(self.names))
        unknown = [n for n in names if n not in self._taps]
        if unknown:
            raise UnknownTapError(
                f"unknown tap(s) {', '.join(repr(n) for n in unknown)}; this U-Net has: {', '.join(self.names)}"
            )
        return sorted((self._taps[n] for n in names), key=lambda t: t.order)

    def __repr__(self) -> str:
        rows = ", ".join(f"{t.name}({t.channels}ch,/{t.stride})" for t in self)
        return f"TapTable[{rows}]"


def discover_taps(unet: nn.Module) -> TapTable:
    """Build the tap table of a diffusers ``UNet2DConditionModel`` from its modules.

    Naming follows the reference code: ``mid`` for the mid block, then ``us1, us2, ...`` over the
    layers of every up block, where a block with an upsampler reports the upsampler output in place
    of its last layer. The default selection drops the last two positions ("except the two final
    blocks", paper §4.1), which for SD gives exactly :data:`REFERENCE_TAPS`.
    """
    if not hasattr(unet, "up_blocks") or not hasattr(unet, "down_blocks"):
        raise TypeError(f"expected a diffusers UNet2DConditionModel, got {type(unet).__name__}")
    n_down = sum(1 for block in unet.down_blocks if getattr(block, "downsamplers", None) is not None)
    stride = 2**n_down
    taps: list[Tap] = []
    if getattr(unet, "mid_block", None) is not None:
        taps.append(Tap("mid", "mid_block", _out_channels(unet.mid_block.resnets[-1]), stride, 0))
    k = 0
    for i, block in enumerate(unet.up_blocks):
        attentions = getattr(block, "attentions", None)
        upsamplers = getattr(block, "upsamplers", None)
        n_layers = len(block.resnets)
        for j in range(n_layers):
            k += 1
            channels = _out_channels(block.resnets[j])
            if j == n_layers - 1 and upsamplers is not None:
                module, layer_stride = f"up_blocks.{i}.upsamplers.0", stride // 2
            elif attentions is not None and len(attentions) > j:
                module, layer_stride = f"up_blocks.{i}.attentions.{j}", stride
            else:
                module, layer_stride = f"up_blocks.{i}.resnets.{j}", stride
            taps.append(Tap(f"us{k}", module, channels, layer_stride, k))
        if upsamplers is not None:
            stride //= 2
    default = [t.name for t in taps[:-2]] if len(taps) > 3 else [t.name for t in taps]
    return TapTable(taps, default=default)


def discover_block_taps(model: nn.Module, blocks: Sequence[tuple[str, int]], channels: int, stride: int,
                        default: Sequence[str] | None = None) -> TapTable:
    """Tap table of a diffusion transformer: one ``block{i}`` tap per block, in execution order.

    Args:
        model: the transformer (e.g. ``SD3Transformer2DModel``, ``FluxTransformer2DModel``).
        blocks: ``(ModuleList attribute, image stream index)`` pairs in execution order, e.g.
            ``[("transformer_blocks", 1), ("single_transformer_blocks", 1)]`` for Flux, whose blocks
            return ``(text, image)``. A block returning one tensor is read whatever the index.
        channels: hidden width of the blocks (``inner_dim``).
        stride: latent cells per token side (the patch size; Flux: 2 for its 2x2 packing).
        default: default taps (``None``: the middle block, where DiT features peak).
    """
    taps: list[Tap] = []
    for attr, stream in blocks:
        for j in range(len(getattr(model, attr, None) or ())):
            taps.append(Tap(f"block{len(taps)}", f"{attr}.{j}", int(channels), int(stride), len(taps),
                            layout="tokens", stream=stream))
    if not taps:
        raise TypeError(f"{type(model).__name__} has none of the block lists {[a for a, _ in blocks]}")
    return TapTable(taps, default=default if default is not None else [taps[len(taps) // 2].name])


def _out_channels(resnet: nn.Module) -> int:
    if hasattr(resnet, "out_channels") and resnet.out_channels is not None:
        return int(resnet.out_channels)
    return int(resnet.conv2.out_channels)


class _StopForward(Exception):
    """Raised inside a hook once the last requested tap has been captured."""


def _as_tensor(output: object, stream: int = 0) -> torch.Tensor:
    """Hooks see a Tensor (resnets, samplers, mid block) or a tuple / output object (transformers)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[stream]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot read a feature map from a module output of type {type(output).__name__}")


def tokens_to_map(tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Image tokens ``(B, N, C)`` in row-major patch order -> ``(B, C, h, w)``.

    A block that runs on ``[text, image]`` (Flux single blocks in older diffusers) has more than
    ``h * w`` tokens: the image tokens are the trailing ones.
    """
    h, w = grid
    if tokens.ndim != 3 or tokens.shape[1] < h * w:
        raise RuntimeError(f"expected (B, >= {h * w}, C) image tokens for a {h}x{w} grid, got {tuple(tokens.shape)}")
    tokens = tokens[:, tokens.shape[1] - h * w:]
    return tokens.unflatten(1, (h, w)).permute(0, 3, 1, 2)


def read_tap(tap: Tap, output: object, grid: tuple[int, int] | None) -> torch.Tensor:
    """The ``(B, C, h, w)`` feature map of ``tap`` from its module's forward output."""
    value = _as_tensor(output, tap.stream)
    if tap.layout == "tokens":
        if grid is None:
            raise RuntimeError(f"tap {tap.name} holds tokens: the caller must give the token grid")
        return tokens_to_map(value, grid)
    return value


@contextlib.contextmanager
def capture_taps(unet: nn.Module, taps: Sequence[Tap], stop_early: bool = True,
                 grid: tuple[int, int] | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """Register hooks that store each tap's output in the yielded dict.

    With ``stop_early`` the hook of the last tap (in execution order) raises :class:`_StopForward`;
    wrap the denoiser call in :func:`run_to_taps` / :func:`stop_after_taps` so no layer after it runs.
    ``grid`` is the token grid ``(h, w)`` of token-layout taps (transformers). Hooks are removed on
    exit, so e.g. a later gradient-checkpointing recompute never sees them.
    """
    features: dict[str, torch.Tensor] = {}
    last = max(taps, key=lambda t: t.order).name if taps else None
    handles = []

    def make_hook(tap: Tap):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            features[tap.name] = read_tap(tap, output, grid)
            if stop_early and tap.name == last and len(features) == len(taps):
                raise _StopForward

        return hook

    try:
        for tap in taps:
            handles.append(unet.get_submodule(tap.module).register_forward_hook(make_hook(tap)))
        yield features
    finally:
        for handle in handles:
            handle.remove()


def run_to_taps(
    unet: nn.Module,
    sample: torch.Tensor,
    timestep: torch.Tensor | float,
    encoder_hidden_states: torch.Tensor,
    taps: Sequence[Tap],
    stop_early: bool = True,
) -> dict[str, torch.Tensor]:
    """Run an SD-style ``unet`` and return ``{tap name: (B, C, h, w)}``, stopping after the last tap.

    ``timestep`` may be a float (the student's learnable scalar) or a ``(B,)`` tensor, in the U-Net's
    own units. ``encoder_hidden_states`` may be a tensor or a :class:`~cleandift.backbones.conditioning.
    Conditioning` (its hidden states are used). Gradients flow through the returned features as usual
    (the partial graph is complete). Families with more conditioning go through
    :meth:`DiffusionBackbone.run_taps <cleandift.backbones.base.DiffusionBackbone.run_taps>`.
    """
    encoder_hidden_states = getattr(encoder_hidden_states, "hidden_states", encoder_hidden_states)
    if not isinstance(timestep, torch.Tensor):
        timestep = torch.tensor(float(timestep), device=sample.device)
    if timestep.ndim == 0:
        timestep = timestep.expand(sample.shape[0])
    return stop_after_taps(unet, taps, dict(sample=sample, timestep=timestep,
                                            encoder_hidden_states=encoder_hidden_states), stop_early=stop_early)


def stop_after_taps(denoiser: nn.Module, taps: Sequence[Tap], inputs: dict, stop_early: bool = True,
                    grid: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
    """Call ``denoiser(**inputs, return_dict=False)`` with tap hooks; ``{tap: (B, C, h, w)}``, in ``taps`` order.

    The family-agnostic core of every feature read: a family builds ``inputs`` (its conditioning,
    timestep units, packed latents) and this runs the forward only as far as the last tap.
    """
    with capture_taps(denoiser, taps, stop_early=stop_early, grid=grid) as features:
        try:
            denoiser(**inputs, return_dict=False)
        except _StopForward:
            pass
    missing = [t.name for t in taps if t.name not in features]
    if missing:  # pragma: no cover - would mean the forward skipped a module
        raise RuntimeError(f"the {type(denoiser).__name__} forward never reached tap(s) {missing}")
    return {t.name: features[t.name] for t in taps}

"""Where the features are: the tap table of a diffusers ``UNet2DConditionModel`` and the hooks that read it.

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
    """

    name: str
    module: str
    channels: int
    stride: int
    order: int


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


def _out_channels(resnet: nn.Module) -> int:
    if hasattr(resnet, "out_channels") and resnet.out_channels is not None:
        return int(resnet.out_channels)
    return int(resnet.conv2.out_channels)


class _StopForward(Exception):
    """Raised inside a hook once the last requested tap has been captured."""


def _as_tensor(output: object) -> torch.Tensor:
    """Hooks see a Tensor (resnets, samplers, mid block) or a tuple / output object (transformers)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    raise TypeError(f"cannot read a feature map from a module output of type {type(output).__name__}")


@contextlib.contextmanager
def capture_taps(unet: nn.Module, taps: Sequence[Tap], stop_early: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Register hooks that store each tap's output in the yielded dict.

    With ``stop_early`` the hook of the last tap (in execution order) raises :class:`_StopForward`;
    wrap the U-Net call in :func:`run_to_taps` (or catch it yourself) so no layer after it runs.
    Hooks are removed on exit, so e.g. a later gradient-checkpointing recompute never sees them.
    """
    features: dict[str, torch.Tensor] = {}
    last = max(taps, key=lambda t: t.order).name if taps else None
    handles = []

    def make_hook(name: str):
        def hook(_module: nn.Module, _inputs: object, output: object) -> None:
            features[name] = _as_tensor(output)
            if stop_early and name == last and len(features) == len(taps):
                raise _StopForward

        return hook

    try:
        for tap in taps:
            handles.append(unet.get_submodule(tap.module).register_forward_hook(make_hook(tap.name)))
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
    """Run ``unet`` and return ``{tap name: (B, C, h, w)}``, stopping after the last tap.

    ``timestep`` may be a float (the student's learnable scalar) or a ``(B,)`` tensor.
    Gradients flow through the returned features as usual (the partial graph is complete).
    """
    if not isinstance(timestep, torch.Tensor):
        timestep = torch.tensor(float(timestep), device=sample.device)
    if timestep.ndim == 0:
        timestep = timestep.expand(sample.shape[0])
    with capture_taps(unet, taps, stop_early=stop_early) as features:
        try:
            unet(sample, timestep, encoder_hidden_states=encoder_hidden_states, return_dict=False)
        except _StopForward:
            pass
    missing = [t.name for t in taps if t.name not in features]
    if missing:  # pragma: no cover - would mean the U-Net skipped a module
        raise RuntimeError(f"the U-Net forward never reached tap(s) {missing}")
    return {t.name: features[t.name] for t in taps}

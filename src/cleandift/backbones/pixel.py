"""Pixel-space, class-conditional diffusion backbones (the bundled offline ``mini`` model).

No Stable Diffusion weights exist offline, so the project trains its own small diffusion model on
Fashion-MNIST (``cleandift pretrain-mini``). It keeps SD's *interface* and *block pattern* so every
extractor, trainer and evaluation runs on it unchanged:

* the "VAE" is the identity (``latent_factor=1``): the U-Net sees pixels in ``[-1, 1]``;
* the "text encoder" is a :class:`LabelEncoder`: one learned token per class plus a null token, the
  analogue of the empty prompt. Prompts are class names; ``"a photo of a {class}"`` maps to the class
  token, ``""`` / ``None`` to the null token;
* the noise schedule is SD's (scaled-linear betas 0.00085-0.012, 1000 steps, epsilon prediction).

On disk a pixel backbone is a folder::

    unet/            UNet2DConditionModel.save_pretrained
    label_encoder/   LabelEncoder.save_pretrained
    scheduler/       DDPMScheduler.save_pretrained
    pixel_backbone.json   class names, resolution, channels (this module's own metadata)
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Sequence

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from ..errors import BackboneNotFoundError, CleanDIFTError
from .base import DiffusionBackbone

#: Fashion-MNIST label order (label id = index), as in the dataset's README.
FASHION_MNIST_CLASSES: tuple[str, ...] = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)

#: SD's training schedule. ``clip_sample`` is off as in SD even though pixels live in [-1, 1]: DDIM's x0
#: clipping broke classifier-free guidance on the mini model (agreement 25 % vs 93 % at w = 2, measured by
#: benchmarks/mini_guidance.py). Training and feature extraction never read it; only samplers do.
PIXEL_SCHEDULER: dict = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                             beta_schedule="scaled_linear", prediction_type="epsilon", clip_sample=False,
                             clip_sample_range=1.0, steps_offset=1)

#: Tap table of a 4-level :func:`mini_unet_config` U-Net: ``{tap: (module, level, stride)}`` where ``level``
#: indexes ``block_out_channels`` (channels = ``block_out_channels[level]``) and stride is relative to the
#: 32x32 input. Identical to SD's table except ``us10``: SD's last up block has attention
#: (``up_blocks.3.attentions.0``), this one is plain at full resolution, so ``us10`` is its first resnet.
#: ``mid`` ... ``us10`` are the default (reference) taps; ``us11``/``us12`` exist but are left out as in SD.
MINI_TAP_TABLE: dict[str, tuple[str, int, int]] = {
    "mid": ("mid_block", 3, 8),
    "us1": ("up_blocks.0.resnets.0", 3, 8),
    "us2": ("up_blocks.0.resnets.1", 3, 8),
    "us3": ("up_blocks.0.upsamplers.0", 3, 4),
    "us4": ("up_blocks.1.attentions.0", 2, 4),
    "us5": ("up_blocks.1.attentions.1", 2, 4),
    "us6": ("up_blocks.1.upsamplers.0", 2, 2),
    "us7": ("up_blocks.2.attentions.0", 1, 2),
    "us8": ("up_blocks.2.attentions.1", 1, 2),
    "us9": ("up_blocks.2.upsamplers.0", 1, 1),
    "us10": ("up_blocks.3.resnets.0", 0, 1),
    "us11": ("up_blocks.3.resnets.1", 0, 1),
    "us12": ("up_blocks.3.resnets.2", 0, 1),
}

METADATA_FILE = "pixel_backbone.json"
BUNDLED_MINI_DIR = Path(__file__).resolve().parent.parent / "assets" / "mini"
#: The CleanDIFT student of the bundled model (``unet/`` + ``cleandift.json``, as ``cleandift train`` exports).
BUNDLED_MINI_STUDENT_DIR = BUNDLED_MINI_DIR / "cleandift"

_PROMPT_PREFIX = re.compile(r"^(a|an)\s+(photo|picture|image)\s+of\s+(a|an|the)\s+")


class UnknownPromptError(CleanDIFTError, ValueError):
    """A prompt that names no class of a class-conditional pixel model."""


def mini_unet_config(block_out_channels: Sequence[int] = (16, 32, 64, 96), cross_attention_dim: int = 64,
                     attention_head_dim: int = 2, image_channels: int = 1, resolution: int = 32,
                     norm_num_groups: int = 8) -> dict:
    """``UNet2DConditionModel`` config with SD's block pattern, sized for CPU training.

    SD-1.5 uses ``[XDown, XDown, XDown, Down]`` / ``XMid`` / ``[Up, XUp, XUp, XUp]``. Here the
    full-resolution level (first down block, last up block) is plain because self-attention over
    32x32 = 1024 tokens took ~68% of a training step on CPU; the lower levels keep cross-attention, so
    the label conditioning enters exactly where SD's text does. ``layers_per_block=2`` keeps 3 layers
    per up block, hence SD's tap names ``mid, us1 ... us12`` (see :data:`MINI_TAP_TABLE`).

    Note diffusers' naming quirk: for this class ``attention_head_dim`` is the *number of heads* per
    transformer (head width = channels / heads). 2 heads keep heads 16-48 wide; 8 heads of width 4-8
    made CPU attention ~4x slower here for no benefit.
    """
    n = len(block_out_channels)
    if n < 2:
        raise ValueError("need at least 2 resolution levels")
    down = ("DownBlock2D",) + ("CrossAttnDownBlock2D",) * (n - 2) + ("DownBlock2D",)
    up = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (n - 2) + ("UpBlock2D",)
    return dict(sample_size=resolution, in_channels=image_channels, out_channels=image_channels,
                layers_per_block=2, block_out_channels=tuple(block_out_channels), down_block_types=down,
                up_block_types=up, mid_block_type="UNetMidBlock2DCrossAttn", cross_attention_dim=cross_attention_dim,
                attention_head_dim=attention_head_dim, norm_num_groups=norm_num_groups,
                flip_sin_to_cos=True, freq_shift=0)


class LabelEncoder(ModelMixin, ConfigMixin):
    """The "text encoder" of a class-conditional model: label ids -> encoder hidden states.

    Token ``i < num_classes`` is class ``i``; token ``num_classes`` is the null token (empty prompt,
    also what classifier-free label dropout trains). The context is ``[bos, label token]`` like a CLIP
    context starts with a BOS embedding: with two keys the U-Net's cross-attention weights vary over
    space, with one they would be constant.
    """

    @register_to_config
    def __init__(self, num_classes: int = 10, dim: int = 64) -> None:
        super().__init__()
        self.tokens = nn.Embedding(num_classes + 1, dim)
        self.bos = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.tokens.weight, std=1.0)
        nn.init.normal_(self.bos, std=1.0)

    @property
    def null_id(self) -> int:
        return int(self.config.num_classes)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        """``(B,)`` long label ids (``null_id`` = unconditional) -> ``(B, 2, dim)``."""
        tok = self.tokens(labels.long()).unsqueeze(1)
        return torch.cat([self.bos.expand(tok.shape[0], -1, -1).to(tok.dtype), tok], dim=1)


def normalise_prompt(prompt: str) -> str:
    """Lower-case, strip ``"a photo of a"`` and trailing punctuation: ``"A photo of a Coat."`` -> ``"coat"``."""
    text = " ".join(prompt.strip().lower().split()).rstrip(".!")
    return _PROMPT_PREFIX.sub("", text).strip()


def class_aliases(class_names: Sequence[str]) -> dict[str, int]:
    """Accepted spellings per class: the name, and for ``"a/b"`` names each part (``"t-shirt"``, ``"top"``)."""
    aliases: dict[str, int] = {}
    for i, name in enumerate(class_names):
        key = normalise_prompt(name)
        aliases[key] = i
        for part in key.split("/"):
            aliases.setdefault(part.strip(), i)
            aliases.setdefault(part.strip().replace("-", ""), i)
    return aliases


def prompt_to_label(prompt: str | None, class_names: Sequence[str]) -> int:
    """Label id of a prompt; ``None`` / ``""`` -> the null id ``len(class_names)``."""
    if prompt is None or not str(prompt).strip():
        return len(class_names)
    key = normalise_prompt(str(prompt))
    label = class_aliases(class_names).get(key)
    if label is None:
        raise UnknownPromptError(
            f"prompt {prompt!r} names no class of this model; use one of "
            + ", ".join(repr(c) for c in class_names) + " (optionally as 'a photo of a {class}'), or '' for none"
        )
    return label


class PixelDiffusionBackbone(DiffusionBackbone):
    """A pixel-space U-Net + label encoder + SD noise schedule, in the common backbone interface.

    Args:
        unet: ``UNet2DConditionModel`` on pixels (``in_channels == image_channels``).
        label_encoder: :class:`LabelEncoder` whose ``dim`` equals the U-Net's ``cross_attention_dim``.
        scheduler: DDPM scheduler with the training betas.
        class_names: class names in label order (prompts are matched against them).
        resolution: training image size.
    """

    name = "pixel"

    def __init__(self, unet: nn.Module, label_encoder: LabelEncoder, scheduler, class_names: Sequence[str],
                 resolution: int = 32, name: str | None = None) -> None:
        channels = int(unet.config.in_channels)
        super().__init__(unet, scheduler, resolution=resolution, latent_factor=1, image_channels=channels)
        if label_encoder.config.dim != unet.config.cross_attention_dim:
            raise ValueError(f"label encoder dim {label_encoder.config.dim} != U-Net cross_attention_dim "
                             f"{unet.config.cross_attention_dim}")
        if label_encoder.config.num_classes != len(class_names):
            raise ValueError(f"label encoder has {label_encoder.config.num_classes} classes, "
                             f"{len(class_names)} class names given")
        self.label_encoder = label_encoder
        self.class_names: tuple[str, ...] = tuple(class_names)
        if name:
            self.name = name
        for module in (self.unet, self.label_encoder):
            module.requires_grad_(False)
            module.eval()

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, sample_posterior: bool = False,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Identity "VAE": pixels in ``[-1, 1]`` are the U-Net input (deterministic, so no posterior).

        RGB batches are averaged to gray for a 1-channel model (what image folders give the trainer).
        """
        if images.shape[1] == 3 and self.image_channels == 1:
            images = images.mean(dim=1, keepdim=True)
        if images.shape[1] != self.image_channels:
            raise ValueError(f"images have {images.shape[1]} channels, the pixel model expects {self.image_channels}")
        return images.to(device=self.device, dtype=self.dtype)

    def labels_for(self, prompts: Sequence[str | None]) -> torch.Tensor:
        """Label ids of prompts (unknown names raise :class:`UnknownPromptError`)."""
        return torch.tensor([prompt_to_label(p, self.class_names) for p in prompts], dtype=torch.long)

    def _encode_prompt_batch(self, prompts: list[str]) -> torch.Tensor:
        device = next(self.label_encoder.parameters()).device
        return self.label_encoder(self.labels_for(prompts).to(device))

    def describe(self) -> dict:
        return {**super().describe(), "class_names": list(self.class_names)}

    # ------------------------------------------------------------------ persistence
    def save(self, folder: str | Path, dtype: torch.dtype | None = None, extra: dict | None = None) -> Path:
        """Write the folder layout described in the module docstring (weights in ``dtype`` if given)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for sub, module in (("unet", self.unet), ("label_encoder", self.label_encoder)):
            module.save_pretrained(str(folder / sub), safe_serialization=True)
            if dtype is not None:
                _cast_safetensors(folder / sub, dtype)
        self.scheduler.save_pretrained(str(folder / "scheduler"))
        meta = {"format": "cleandift-pixel-backbone", "version": 1, "name": self.name,
                "class_names": list(self.class_names), "resolution": self.resolution,
                "image_channels": self.image_channels, **(extra or {})}
        (folder / METADATA_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return folder


def _cast_safetensors(folder: Path, dtype: torch.dtype) -> None:
    """Rewrite the floating-point tensors of a ``save_pretrained`` folder in ``dtype`` (e.g. fp16 to ship).

    Casting the file rather than the live module leaves the caller's model untouched and avoids
    diffusers' warnings about casting loaded modules with ``.to()``.
    """
    from safetensors.torch import load_file, save_file  # noqa: PLC0415

    for path in folder.glob("*.safetensors"):
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in load_file(str(path)).items()}
        save_file(tensors, str(path), metadata={"format": "pt"})


def build_pixel_backbone(unet_config: dict | None = None, class_names: Sequence[str] = FASHION_MNIST_CLASSES,
                         seed: int = 0, name: str = "pixel") -> PixelDiffusionBackbone:
    """A randomly initialised pixel backbone (what pretraining starts from)."""
    config = dict(unet_config or mini_unet_config())
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**config)
    label_encoder = LabelEncoder(num_classes=len(class_names), dim=int(config["cross_attention_dim"]))
    scheduler = DDPMScheduler(**PIXEL_SCHEDULER)
    return PixelDiffusionBackbone(unet, label_encoder, scheduler, class_names, resolution=int(config["sample_size"]),
                                  name=name)


def load_pixel_backbone(folder: str | Path, device: torch.device | str | None = None,
                        dtype: torch.dtype = torch.float32, name: str | None = None) -> PixelDiffusionBackbone:
    """Load a folder written by :meth:`PixelDiffusionBackbone.save` onto ``device`` in ``dtype``."""
    folder = Path(folder)
    meta_path = folder / METADATA_FILE
    missing = [p for p in ("unet", "label_encoder", "scheduler") if not (folder / p).is_dir()]
    if not meta_path.is_file() or missing:
        what = ", ".join(missing + ([] if meta_path.is_file() else [METADATA_FILE]))
        raise BackboneNotFoundError(f"{folder}: not a pixel backbone folder (missing {what}); write one with "
                                    "`cleandift pretrain-mini --export DIR`")
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    unet = UNet2DConditionModel.from_pretrained(str(folder / "unet"), torch_dtype=dtype)
    label_encoder = LabelEncoder.from_pretrained(str(folder / "label_encoder"), torch_dtype=dtype)
    scheduler = DDPMScheduler.from_pretrained(str(folder / "scheduler"))
    backbone = PixelDiffusionBackbone(unet, label_encoder, scheduler, meta["class_names"],
                                      resolution=int(meta["resolution"]), name=name or meta.get("name", "pixel"))
    return backbone.to(device=device or "cpu", dtype=dtype)


def is_pixel_backbone_folder(folder: str | Path) -> bool:
    """True for a folder written by :meth:`PixelDiffusionBackbone.save` (it has ``pixel_backbone.json``)."""
    return (Path(folder) / METADATA_FILE).is_file()


def bundled_mini_available() -> bool:
    """Whether this install ships the trained ``mini`` model (and its student)."""
    return is_pixel_backbone_folder(BUNDLED_MINI_DIR) and (BUNDLED_MINI_STUDENT_DIR / "unet").is_dir()


def load_bundled_mini(device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
                      ) -> PixelDiffusionBackbone:
    """The Fashion-MNIST model shipped inside the package (``cleandift/assets/mini``)."""
    if not (BUNDLED_MINI_DIR / METADATA_FILE).is_file():
        raise BackboneNotFoundError(
            f"the bundled 'mini' model is not in this install ({BUNDLED_MINI_DIR} is missing or incomplete); "
            "train one with `cleandift pretrain-mini --data DIR --out RUN --export DIR` and pass --model DIR"
        )
    return load_pixel_backbone(BUNDLED_MINI_DIR, device=device, dtype=dtype, name="mini")


def feature_checksum(features: dict[str, torch.Tensor], decimals: int = 3) -> dict[str, float]:
    """Per-tap rounded means of ``|features|`` -- a stable fingerprint for "shipped weights reproduce" tests."""
    return {name: round(float(f.float().abs().mean()), decimals) for name, f in sorted(features.items())}


CHECKSUM_FILE = "checksum.json"


def reference_checksum(backbone: PixelDiffusionBackbone, taps: str = "mid,us6,us10", decimals: int = 4) -> dict:
    """Fingerprint of a backbone: clean (t=0) features of a fixed input, with a class and the empty prompt.

    The input is a deterministic pattern (no RNG, so it is the same on every platform and torch
    version). Export records this next to the weights; a test recomputes it from the shipped files.
    """
    from ..extract import CleanExtractor  # noqa: PLC0415 - extract imports the backbones package

    r = backbone.resolution
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, r), torch.linspace(-1, 1, r), indexing="ij")
    images = torch.stack([torch.sin(3 * xx) * torch.cos(2 * yy), (xx.abs() + yy.abs() < 0.8).float() * 2 - 1])
    images = images.unsqueeze(1).expand(-1, backbone.image_channels, -1, -1)
    extractor = CleanExtractor(backbone, timestep=0, taps=taps)
    out = {}
    for prompt in ("", backbone.class_names[0]):
        feats = extractor(images, prompts=prompt)
        out[prompt or "<empty>"] = feature_checksum(feats, decimals)
    return out

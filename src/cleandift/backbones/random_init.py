"""Stable-Diffusion-architecture backbones with random weights, built offline from configs.

Used by the tests (tiny models that keep SD's block layout), by the benchmarks (SD 1.5 / 2.1 and
the SDXL U-Net at real size) and by anyone who wants to check plumbing without downloading weights. The features of
a random model are meaningless; never report quality numbers from one.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .stable_diffusion import StableDiffusionBackbone

SD_SCHEDULER = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                    clip_sample=False, steps_offset=1)

# U-Net / VAE / text-encoder configs per architecture. "sd15"/"sd21" are the real sizes; the tiny ones
# keep SD's block structure (3 cross-attention down blocks + plain; cross-attention mid; plain up +
# 3 cross-attention up blocks; 2 layers per block) so all 11 taps exist at the same relative strides.
ARCHITECTURES: dict[str, dict] = {
    "sd15": dict(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=768, attention_head_dim=8,
                  sample_size=64),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        text=dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                  hidden_act="quick_gelu", vocab_size=49408),
        resolution=512,
    ),
    "sd21": dict(
        unet=dict(block_out_channels=(320, 640, 1280, 1280), cross_attention_dim=1024,
                  attention_head_dim=(5, 10, 20, 20), use_linear_projection=True, upcast_attention=True,
                  sample_size=96),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32),
        text=dict(hidden_size=1024, intermediate_size=4096, num_attention_heads=16, num_hidden_layers=23,
                  hidden_act="gelu", vocab_size=49408),
        resolution=768,
    ),
    "tiny-sd15": dict(
        unet=dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=32, attention_head_dim=8,
                  norm_num_groups=32, sample_size=16),
        vae=dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
        text=dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
                  hidden_act="quick_gelu", vocab_size=1000),
        resolution=128,
    ),
    "tiny-sd21": dict(
        unet=dict(block_out_channels=(32, 64, 64, 64), cross_attention_dim=48, attention_head_dim=(2, 4, 8, 8),
                  use_linear_projection=True, upcast_attention=True, norm_num_groups=32, sample_size=16),
        vae=dict(block_out_channels=(8, 8, 16, 16), layers_per_block=1, norm_num_groups=4),
        text=dict(hidden_size=48, intermediate_size=96, num_attention_heads=4, num_hidden_layers=2,
                  hidden_act="gelu", vocab_size=1000),
        resolution=128,
    ),
    # SDXL base at real size (U-Net ~2.57 B parameters, the real SDXL VAE). The two CLIP text encoders are
    # 2-layer stand-ins with SDXL's output widths (768 + 1280 = 2048 hidden, 1280 pooled): a distillation
    # encodes its prompt once and releases them, so their size does not enter a training step.
    "sdxl": dict(
        family="sdxl",
        unet=dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280),
                  down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
                  use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                  projection_class_embeddings_input_dim=2816),
        vae=dict(block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024,
                 scaling_factor=0.13025, force_upcast=True),
        text=dict(hidden_sizes=(768, 1280), projection_dim=1280, num_hidden_layers=2),
        resolution=1024,
    ),
}


def unet_config(arch: str) -> dict:
    """Full ``UNet2DConditionModel`` config of an architecture (SD's block types and layout)."""
    spec = ARCHITECTURES[arch]["unet"]
    if ARCHITECTURES[arch].get("family") == "sdxl":  # the spec is the complete SDXL config
        return dict(spec)
    return dict(
        in_channels=4, out_channels=4, layers_per_block=2,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        **spec,
    )


def build_unet(arch: str, seed: int = 0):
    from diffusers import UNet2DConditionModel  # noqa: PLC0415

    torch.manual_seed(seed)
    return UNet2DConditionModel(**unet_config(arch))


def write_char_tokenizer(folder: str | Path, model_max_length: int = 77) -> Path:
    """Write a CLIP tokenizer with a byte-level vocabulary and no merges (works fully offline)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_alphabet()
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": i + len(chars) for i, c in enumerate(chars)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "model_max_length": model_max_length, "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "tokenizer_class": "CLIPTokenizer",
    }), encoding="utf-8")
    return folder


def _byte_alphabet() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP convention)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD)) + list(range(0xAE, 0x100))
    extra = (b for b in range(256) if b not in printable)
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(extra)})
    return [mapping[b] for b in range(256)]


def build_random_backbone(arch: str = "tiny-sd15", seed: int = 0, dtype: torch.dtype = torch.float32,
                          tokenizer_dir: str | Path | None = None) -> StableDiffusionBackbone:
    """A complete SD-architecture backbone with random weights (VAE, CLIP text encoder, U-Net)."""
    import tempfile  # noqa: PLC0415

    from diffusers import AutoencoderKL, DDPMScheduler  # noqa: PLC0415
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer  # noqa: PLC0415

    spec = ARCHITECTURES[arch]
    if spec.get("family") == "sdxl":
        return build_random_sdxl_backbone(arch, seed=seed, dtype=dtype, tokenizer_dir=tokenizer_dir)
    unet = build_unet(arch, seed)
    torch.manual_seed(seed + 1)
    n = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, scaling_factor=0.18215,
                        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
                        sample_size=spec["resolution"], **spec["vae"])
    torch.manual_seed(seed + 2)
    text_cfg = CLIPTextConfig(max_position_embeddings=77, bos_token_id=512, eos_token_id=513, pad_token_id=513,
                              projection_dim=spec["text"]["hidden_size"], **spec["text"])
    text_encoder = CLIPTextModel(text_cfg)
    if tokenizer_dir is None:
        tokenizer_dir = tempfile.mkdtemp(prefix="cleandift-tokenizer-")
    tokenizer = CLIPTokenizer.from_pretrained(str(write_char_tokenizer(tokenizer_dir)))
    scheduler = DDPMScheduler(**SD_SCHEDULER)
    backbone = StableDiffusionBackbone(unet, vae, text_encoder, tokenizer, scheduler, resolution=spec["resolution"],
                                       name=f"random-{arch}")
    return backbone.to(dtype=dtype)


def build_random_sdxl_backbone(arch: str = "sdxl", seed: int = 0, dtype: torch.dtype = torch.float32,
                               tokenizer_dir: str | Path | None = None):
    """An SDXL-architecture backbone with random weights (``StableDiffusionXLBackbone`` over a real pipeline)."""
    import tempfile  # noqa: PLC0415

    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline  # noqa: PLC0415

    from ..testing import components  # noqa: PLC0415
    from ..testing.tiny_sdxl import SCHEDULER as SDXL_SCHEDULER  # noqa: PLC0415
    from .sdxl import StableDiffusionXLBackbone  # noqa: PLC0415

    spec = ARCHITECTURES[arch]
    unet = build_unet(arch, seed)
    torch.manual_seed(seed + 1)
    n = len(spec["vae"]["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, down_block_types=("DownEncoderBlock2D",) * n,
                        up_block_types=("UpDecoderBlock2D",) * n, **spec["vae"])
    text = spec["text"]
    width_1, width_2 = text["hidden_sizes"]
    text_encoder = components.clip_text_encoder(width_1, projection_dim=width_1, seed=seed + 2,
                                                layers=text["num_hidden_layers"])
    text_encoder_2 = components.clip_text_encoder(width_2, projection_dim=text["projection_dim"], with_projection=True,
                                                  seed=seed + 3, layers=text["num_hidden_layers"])
    folder = Path(tokenizer_dir) if tokenizer_dir is not None else Path(tempfile.mkdtemp(prefix="cleandift-tokenizer-"))
    pipe = StableDiffusionXLPipeline(
        vae=vae, unet=unet, text_encoder=text_encoder, text_encoder_2=text_encoder_2,
        tokenizer=components.clip_tokenizer(folder / "tok1"), tokenizer_2=components.clip_tokenizer(folder / "tok2"),
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER), add_watermarker=False)
    backbone = StableDiffusionXLBackbone(pipe, resolution=spec["resolution"], name=f"random-{arch}")
    return backbone.to(dtype=dtype)


def save_pipeline_folder(backbone: StableDiffusionBackbone, folder: str | Path) -> Path:
    """Write a backbone as a standard diffusers Stable Diffusion pipeline folder."""
    from diffusers import StableDiffusionPipeline  # noqa: PLC0415

    pipe = StableDiffusionPipeline(vae=backbone.vae, text_encoder=backbone.text_encoder, tokenizer=backbone.tokenizer,
                                   unet=backbone.unet, scheduler=backbone.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(str(folder))
    return Path(folder)

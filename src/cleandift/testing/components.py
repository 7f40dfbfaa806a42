"""Tiny real-class components shared by the tiny family pipelines: CLIP and T5 text encoders, a VAE.

Sizes follow diffusers' own tiny test configs where they exist; CLIP encoders have several layers so
"second-to-last hidden state" is a different tensor from the last one (SDXL / SD3 read it).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .tokenizers import T5_VOCAB_SIZE, write_char_tokenizer, write_t5_tokenizer

#: The character CLIP tokenizer's special ids (256 bytes + 256 word-final bytes, then BOS, EOS).
CLIP_BOS, CLIP_EOS = 512, 513


def clip_text_encoder(hidden_size: int = 32, projection_dim: int = 32, with_projection: bool = False,
                      seed: int = 0, layers: int = 3):
    """A ``CLIPTextModel`` (or ``CLIPTextModelWithProjection``) over the character tokenizer's vocabulary."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection  # noqa: PLC0415

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_attention_heads=4,
                         num_hidden_layers=layers, vocab_size=1000, max_position_embeddings=77,
                         bos_token_id=CLIP_BOS, eos_token_id=CLIP_EOS, pad_token_id=CLIP_EOS,
                         projection_dim=projection_dim, hidden_act="gelu")
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def clip_tokenizer(folder: str | Path):
    from transformers import CLIPTokenizer  # noqa: PLC0415

    return CLIPTokenizer.from_pretrained(str(write_char_tokenizer(folder)))


def t5_encoder(d_model: int = 32, seed: int = 0, layers: int = 2):
    """A ``T5EncoderModel`` over :func:`~.tokenizers.write_t5_tokenizer`'s vocabulary."""
    from transformers import T5Config, T5EncoderModel  # noqa: PLC0415

    torch.manual_seed(seed)
    cfg = T5Config(vocab_size=T5_VOCAB_SIZE, d_model=d_model, d_kv=8, d_ff=2 * d_model, num_layers=layers,
                   num_heads=4, relative_attention_num_buckets=8, feed_forward_proj="gated-gelu",
                   decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    return T5EncoderModel(cfg)


def t5_tokenizer(folder: str | Path, model_max_length: int = 512):
    from transformers import T5TokenizerFast  # noqa: PLC0415

    return T5TokenizerFast.from_pretrained(str(write_t5_tokenizer(folder, model_max_length)))


def vae(latent_channels: int = 4, seed: int = 0, **config):
    """A two-level ``AutoencoderKL`` (latent factor 2); ``config`` adds e.g. ``shift_factor``."""
    from diffusers import AutoencoderKL  # noqa: PLC0415

    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=latent_channels,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=32,
                         **config)

"""Offline tokenizers for tiny test pipelines: a character-level CLIP tokenizer and a T5 tokenizer.

Real CLIP / T5 tokenizers cannot be downloaded here; these have the real classes and special tokens
(CLIP: BOS/EOS, 77 positions; T5: ``</s>`` appended, ``<pad>`` = 0) over a small alphabet.
"""

from __future__ import annotations

import string
from pathlib import Path

from ..backbones.random_init import write_char_tokenizer

__all__ = ["write_char_tokenizer", "write_t5_tokenizer", "T5_VOCAB_SIZE"]

_T5_SPECIALS = ("<pad>", "</s>", "<unk>")
_T5_PIECES = tuple(string.ascii_letters + string.digits + string.punctuation) + ("\u2581",)
#: Vocabulary size of :func:`write_t5_tokenizer` (size the tiny T5 encoder's embedding by it).
T5_VOCAB_SIZE = len(_T5_SPECIALS) + len(_T5_PIECES)


def write_t5_tokenizer(folder: str | Path, model_max_length: int = 512) -> Path:
    """A unigram T5 tokenizer over single characters, saved with ``save_pretrained`` into ``folder``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors  # noqa: PLC0415
    from transformers import T5TokenizerFast  # noqa: PLC0415

    vocab = [(p, 0.0) for p in _T5_SPECIALS] + [(p, -1.0) for p in _T5_PIECES]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    fast = T5TokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
                           extra_ids=0, model_max_length=model_max_length)
    folder = Path(folder)
    fast.save_pretrained(str(folder))
    return folder

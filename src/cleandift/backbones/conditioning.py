"""What a prompt becomes for a family's denoiser: a small batch of named tensors.

SD 1.x/2.x need one tensor (CLIP hidden states); SDXL adds pooled text embeddings, SD3 and Flux pooled
projections, PixArt a T5 attention mask. :class:`Conditioning` carries all of them with the batch on
dim 0, so extractors and the trainer slice, repeat and cast it without knowing the family. Inputs that
depend on the image size instead (SDXL ``time_ids``, Flux ``img_ids``, PixArt resolution) are built by
the family when it calls the denoiser, not here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping

import torch

#: The key every family uses for the sequence its denoiser attends to.
HIDDEN_STATES = "encoder_hidden_states"


@dataclass(frozen=True)
class Conditioning(Mapping[str, torch.Tensor]):
    """Named conditioning tensors, each ``(B, ...)``. A read-only mapping: ``cond["pooled_projections"]``."""

    tensors: dict[str, torch.Tensor]

    def __post_init__(self) -> None:
        sizes = {k: v.shape[0] for k, v in self.tensors.items()}
        if HIDDEN_STATES not in self.tensors:
            raise ValueError(f"conditioning needs {HIDDEN_STATES!r}, got {sorted(self.tensors)}")
        if len(set(sizes.values())) > 1:
            raise ValueError(f"conditioning tensors disagree on the batch size: {sizes}")

    # Mapping
    def __getitem__(self, key):  # type: ignore[override]
        if isinstance(key, str):
            return self.tensors[key]
        return self.select(key)

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    @property
    def hidden_states(self) -> torch.Tensor:
        """The text sequence ``(B, L, D)`` (what SD 1.x/2.x's ``encode_prompts`` used to return)."""
        return self.tensors[HIDDEN_STATES]

    @property
    def batch_size(self) -> int:
        return int(self.hidden_states.shape[0])

    def select(self, index: slice | torch.Tensor | list[int]) -> "Conditioning":
        """Rows ``index`` of every tensor (a slice or an index tensor)."""
        if isinstance(index, torch.Tensor):
            return Conditioning({k: v[index.to(v.device)] for k, v in self.tensors.items()})
        return Conditioning({k: v[index] for k, v in self.tensors.items()})

    def repeat_interleave(self, repeats: int, dim: int = 0) -> "Conditioning":
        """Each row ``repeats`` times in a row (one image's rows stay together); ``dim`` must be the batch dim."""
        if dim != 0:
            raise ValueError("conditioning repeats along the batch dimension (dim=0) only")
        return Conditioning({k: v.repeat_interleave(repeats, 0) for k, v in self.tensors.items()})

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Conditioning":
        """Move every tensor; ``dtype`` casts floating tensors only (masks and ids keep theirs)."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        return Conditioning({k: v.to(device=device, dtype=dtype if v.is_floating_point() else None)
                             for k, v in self.tensors.items()})

    def rows(self) -> list[dict[str, torch.Tensor]]:
        """Per-row dicts (no batch dim): how encodings are cached per distinct prompt."""
        return [{k: v[i] for k, v in self.tensors.items()} for i in range(self.batch_size)]

    @staticmethod
    def stack(rows: list[Mapping[str, torch.Tensor]]) -> "Conditioning":
        """The inverse of :meth:`rows`."""
        if not rows:
            raise ValueError("cannot stack an empty list of conditioning rows")
        return Conditioning({k: torch.stack([r[k] for r in rows]) for k in rows[0]})

    @staticmethod
    def of(value: "Conditioning | torch.Tensor") -> "Conditioning":
        """Accept a bare hidden-states tensor where a conditioning is expected (SD 1.x/2.x callers)."""
        return value if isinstance(value, Conditioning) else Conditioning({HIDDEN_STATES: value})

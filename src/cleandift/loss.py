"""The feature-alignment loss between projected student features and the noisy teacher's features.

Paper Eq. (1) / reference ``train.py``: per tap, the cosine similarity over channels at every
spatial location, negated and averaged over ``(batch * I * HW)``; the per-tap values are summed
*unweighted*, so every tap counts the same whatever its resolution. The L1 and MSE alternatives are
the paper's Table 3 ablations (cosine is best: 61.43 vs 60.00 / 59.13 PCK_bbox).
"""

from __future__ import annotations

from typing import Callable, Literal, Mapping

import torch
import torch.nn.functional as F

from .errors import ConfigError

LossKind = Literal["cosine", "l1", "mse"]
LOSSES: tuple[str, ...] = ("cosine", "l1", "mse")


def _neg_cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return -F.cosine_similarity(pred, target, dim=-1).mean()


def _l1(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(pred, target)


def _mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return F.mse_loss(pred, target)


_FUNCS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "cosine": _neg_cosine, "l1": _l1, "mse": _mse,
}


def check_loss(kind: str) -> str:
    if kind not in _FUNCS:
        raise ConfigError(f"loss={kind!r} is not one of {', '.join(LOSSES)}")
    return kind


def alignment_loss(pred: Mapping[str, torch.Tensor], target: Mapping[str, torch.Tensor],
                   kind: LossKind = "cosine") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Total loss and per-tap losses for channels-last features ``{tap: (N, HW, C)}``.

    ``pred`` and ``target`` must have the same taps and shapes. Computed in (at least) float32:
    bf16 cosine similarities of 1280-d vectors lose ~2 digits. The teacher ``target`` is detached here, so a
    caller can never push gradients into the teacher by mistake.
    """
    fn = _FUNCS[check_loss(kind)]
    if set(pred) != set(target):
        raise ValueError(f"pred has taps {sorted(pred)} but target has {sorted(target)}")
    per_tap: dict[str, torch.Tensor] = {}
    for name, p in pred.items():
        t = target[name]
        if p.shape != t.shape:
            raise ValueError(f"tap {name}: pred {tuple(p.shape)} vs target {tuple(t.shape)}")
        dtype = torch.promote_types(p.dtype, torch.float32)  # bf16 -> fp32; fp64 stays fp64
        per_tap[name] = fn(p.to(dtype), t.detach().to(dtype))
    if not per_tap:
        raise ValueError("no taps to align")
    total = torch.stack(list(per_tap.values())).sum()
    return total, per_tap

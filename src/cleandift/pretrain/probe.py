"""kNN probe: are a checkpoint's pooled U-Net features better than raw pixels?

The quality bar of the ``mini`` model (issue 5): globally average-pooled features of some tap beat raw
pixels by >= 5 points of kNN top-1 (k = 10, cosine, bank = training images). Features are read with
the null token (the empty prompt) so the label never leaks into them; ``t = 0`` is the clean image,
larger ``t`` noises it with a fixed seed.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..backbones.pixel import PixelDiffusionBackbone


def knn_top1(bank: torch.Tensor, bank_labels: torch.Tensor, queries: torch.Tensor, query_labels: torch.Tensor,
             k: int = 10, chunk: int = 1024) -> float:
    """Top-1 accuracy of a cosine k-NN majority vote (ties broken by summed similarity)."""
    bank = torch.nn.functional.normalize(bank.float(), dim=1)
    queries = torch.nn.functional.normalize(queries.float(), dim=1)
    n_classes = int(max(bank_labels.max(), query_labels.max())) + 1
    correct = 0
    for q, y in zip(queries.split(chunk), query_labels.split(chunk)):
        sim, idx = (q @ bank.T).topk(k, dim=1)
        votes = torch.zeros(len(q), n_classes).scatter_add_(1, bank_labels[idx], torch.ones_like(sim))
        votes += torch.zeros_like(votes).scatter_add_(1, bank_labels[idx], sim) * 1e-3
        correct += int((votes.argmax(1) == y).sum())
    return correct / len(queries)


def pixel_baselines(bank: tuple[torch.Tensor, torch.Tensor], queries: tuple[torch.Tensor, torch.Tensor],
                    k: int = 10) -> dict[str, float]:
    """Raw-pixel kNN with intensities in [0, 1] (the usual baseline) and in the model's [-1, 1].

    Cosine similarity depends on the offset: in [-1, 1] the background is -1 and dominates every
    vector, so both are reported and the bar is measured against the better one.
    """
    out = {}
    for name, shift in (("pixels[0,1]", 1.0), ("pixels[-1,1]", 0.0)):
        fb, fq = (bank[0].flatten(1) + shift) / (1 + shift), (queries[0].flatten(1) + shift) / (1 + shift)
        out[name] = knn_top1(fb, bank[1], fq, queries[1], k=k)
    return out


@torch.no_grad()
def pooled_features(backbone: PixelDiffusionBackbone, images: torch.Tensor, taps: Sequence[str], t: int = 0,
                    batch_size: int = 256, seed: int = 0) -> dict[str, torch.Tensor]:
    """``{tap: (N, C)}`` globally average-pooled features of images in ``[-1, 1]`` (null prompt)."""
    selected = backbone.taps.select(list(taps))
    g = torch.Generator().manual_seed(seed)
    out: dict[str, list[torch.Tensor]] = {tap.name: [] for tap in selected}
    for batch in images.split(batch_size):
        x0 = backbone.encode_images(batch)
        tt = torch.full((len(x0),), int(t), dtype=torch.long)
        if t > 0:
            x0 = backbone.add_noise(x0, torch.randn(x0.shape, generator=g).to(x0), tt)
        cond = backbone.encode_prompts(None, len(x0))
        feats = backbone.run_taps(x0, tt.to(x0.device), cond, selected)
        for name, f in feats.items():
            out[name].append(f.float().mean(dim=(2, 3)).cpu())
    return {name: torch.cat(v) for name, v in out.items()}


def knn_probe(backbone: PixelDiffusionBackbone, bank: tuple[torch.Tensor, torch.Tensor],
              queries: tuple[torch.Tensor, torch.Tensor], taps: Sequence[str] | None = None,
              timesteps: Sequence[int] = (0, 100, 261), k: int = 10) -> dict[str, float]:
    """``{"pixels": acc, "t=0/mid": acc, ...}`` on a bank/query split of model-range images."""
    taps = list(taps or backbone.taps.names)
    results = pixel_baselines(bank, queries, k=k)
    for t in timesteps:
        fb = pooled_features(backbone, bank[0], taps, t=t, seed=1)
        fq = pooled_features(backbone, queries[0], taps, t=t, seed=2)
        for name in taps:
            results[f"t={t}/{name}"] = knn_top1(fb[name], bank[1], fq[name], queries[1], k=k)
    return results

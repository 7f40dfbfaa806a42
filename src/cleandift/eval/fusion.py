"""DINOv2 baselines and diffusion + DINOv2 fusion descriptors (SD-DINO, TLFR zero-shot), adaptive flip.

All descriptors follow :mod:`cleandift.eval.descriptors` (``size``, ``resize``, ``__call__``,
``describe``) and own their matching protocol through ``match_pair`` (settings in ``self.match``).

**DINOv2 only** (:class:`Dinov2Descriptor`, issue D4): ViT-B/14 at 840 px, block 11, facet
``token`` → 60 x 60 patch descriptors; source = the patch containing the keypoint, target = argmax
over patch centres.

**SD-DINO** (:class:`SDDinoDescriptor`, anchors §4): SD maps ``us8`` / ``us5`` / ``us2`` (ODISE's
#8 / #5 / #2, called s3 / s4 / s5 there; 60 / 30 / 15 cells for a 960 px input), DINOv2 as above.
With ``co_pca`` (default, as SD-DINO) each SD tap is reduced to 256 dims by a PCA fit *jointly on the
two images of a pair*; then s5 is upsampled to s4 and concatenated, that to s3
(``[s3, up(s4 ‖ up(s5))]``), the SD part and the DINO part are each L2-normalised, weighted (1 : 1)
and concatenated. SD-DINO matches by L2 distance, which on this constant-norm concatenation ranks
exactly like cosine.

*How co-PCA is applied per pair:* features are cached per image (descriptor contract), so
``__call__`` returns the *raw* parts -- each SD tap resized to the DINO grid by nearest-neighbour
replication when the grid is an integer multiple of the tap's (15 → 60, 30 → 60), else bilinearly,
followed by the DINO map. ``match_pair`` (or :meth:`SDDinoDescriptor.fuse_pair`) splits them again,
takes every ``k``-th cell to recover each tap's native grid exactly, fits the PCA on the pooled
native vectors of source *and* target, projects both, and fuses as above. Replication repeats every
native vector ``k^2`` times, so even fitting on the replicated grid would give the same axes.

**TLFR zero-shot** (:class:`TLFRDescriptor`, anchors §5): ``cat[us8, up(us5), up(us2)]`` bilinearly
resized to the DINO grid (``align_corners=False``), the SD part L2-normalised, the DINO part
L2-normalised separately, concatenated, renormalised; matched by TLFR's window soft-argmax
(±5 cells, temperature 0.02) over patch centres.

**Adaptive flip** (:class:`AdaptiveFlipDescriptor`, anchors §12a): also describe the source image
mirrored left-right; if its mean nearest-neighbour feature distance to the target (descriptors
resampled to 64 x 64, restricted to real image content) is smaller than the original's, keypoints
are mirrored, their left/right ids swapped by a category permutation, and matched from the mirrored
source. The SPair permutation table (TLFR's ``SPAIR_FLIP``) is **not** in our reference notes, so it
is an input (:func:`load_flip_permutations`, :func:`permutation_from_pairs`). TLFR restricts the
distance to SAM instance masks; we have none, so padding is excluded and nothing else.

Frames: the SD and DINO inputs (960 / 840 px) are resized from one descriptor frame, by default the
larger of the two (960, so DINO is downsampled with antialiasing rather than SD upsampled), with
SD-DINO's resize policy ``pad`` (longer side to the frame, zero padding).
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..images import ResizeTransform
from .cache import weights_fingerprint
from .descriptors import PairContext, PromptArg, flip_points, image_seed, split_prompts
from .dinov2 import DEFAULT_DINOV2, SD_DINO_IMAGE_SIZE, SD_DINO_LAYER, Dinov2Features, load_dinov2

log = logging.getLogger(__name__)

#: SD maps of SD-DINO and TLFR, finest first: ODISE #8 (s3), #5 (s4), #2 (s5).
SD_DINO_TAPS: tuple[str, ...] = ("us8", "us5", "us2")
SD_DINO_SD_SIZE = 960
SD_DINO_PCA_DIMS: tuple[int, ...] = (256, 256, 256)
TLFR_FLIP_DISTANCE_SIZE = 64
_PCA_CHUNK = 1 << 16  # rows per step when accumulating a covariance


# ---------------------------------------------------------------------------------------------- matching settings
@dataclass(frozen=True)
class MatchSettings:
    """Arguments of :func:`cleandift.eval.matching.match_points` a descriptor's protocol fixes."""

    method: str = "argmax"
    grid: str = "cells"
    source: str = "cell"
    window: int = 5
    temperature: float = 0.02

    def as_dict(self) -> dict:
        return asdict(self)


#: SD-DINO / DINOv2+NN: the source patch's descriptor, argmax over target patch centres.
NN_CELLS = MatchSettings("argmax", "cells", "cell")
#: TLFR zero-shot: window soft-argmax, ±5 patches, temperature 0.02 (``SOFT_EVAL``).
TLFR_SOFT = MatchSettings("soft-argmax", "cells", "cell", 5, 0.02)


def _match(src: torch.Tensor, trg: torch.Tensor, src_xy: torch.Tensor, ctx: PairContext, settings: MatchSettings,
           src_transform: ResizeTransform | None = None) -> torch.Tensor:
    from .matching import match_points  # noqa: PLC0415

    return match_points(src, trg, src_xy, ctx.src_size, ctx.trg_size, src_transform=src_transform or ctx.src_transform,
                        trg_transform=ctx.trg_transform, **settings.as_dict())


# ---------------------------------------------------------------------------------------------- building blocks
def fuse_parts(parts: Sequence[torch.Tensor], weights: Sequence[float] | None = None,
               renormalize: bool = True) -> torch.Tensor:
    """L2-normalise each ``(B, C_i, h, w)`` part over channels, scale by its weight, concatenate.

    Normalising per part keeps a 3200-dim SD part from drowning a 768-dim DINO part; with
    ``renormalize`` the result is unit length again (part ``i`` then has norm
    ``w_i / sqrt(sum w^2)``).
    """
    weights = [1.0] * len(parts) if weights is None else [float(w) for w in weights]
    if len(weights) != len(parts):
        raise ValueError(f"{len(weights)} weights for {len(parts)} parts")
    out = torch.cat([F.normalize(p.float(), dim=1) * w for p, w in zip(parts, weights)], dim=1)
    return F.normalize(out, dim=1) if renormalize else out


def principal_axes(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(C,)`` and top-``k`` principal axes ``(k, C)`` of the rows of ``x`` ``(N, C)``.

    Exact (covariance eigendecomposition in float64), so results are reproducible, unlike a
    randomised ``pca_lowrank``; each axis is signed so that its largest-magnitude loading is positive,
    and axes beyond the data's rank (or the channel count) are zero.
    """
    n = x.shape[0]
    mean = sum(chunk.double().sum(dim=0) for chunk in x.split(_PCA_CHUNK)) / max(n, 1)
    cov = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
    for chunk in x.split(_PCA_CHUNK):  # never holds a float64 copy of all of x
        centred = chunk.double() - mean
        cov += centred.T @ centred
    evals, evecs = torch.linalg.eigh(cov / max(n - 1, 1))
    order = torch.argsort(evals, descending=True)
    axes = evecs[:, order].T[:k].clone()
    rank = int((evals > evals.max().clamp_min(0) * 1e-10).sum())
    axes[rank:] = 0.0
    lead = axes.gather(1, axes.abs().argmax(dim=1, keepdim=True))
    axes = axes * torch.where(lead < 0, -1.0, 1.0)
    if axes.shape[0] < k:  # fewer channels than requested axes
        axes = torch.cat([axes, axes.new_zeros(k - axes.shape[0], axes.shape[1])])
    return mean.float(), axes.float()


def co_pca(src: torch.Tensor, trg: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Project two ``(C, h, w)`` maps on the top-``dim`` principal axes of their *pooled* vectors.

    SD-DINO's ``co_pca``: one basis for both images of a pair, so projected features stay
    comparable. ``dim`` is clipped to ``min(C, number of vectors)``.
    """
    if src.shape[0] != trg.shape[0]:
        raise ValueError(f"co_pca needs equal channels, got {src.shape[0]} and {trg.shape[0]}")
    c = src.shape[0]
    a, b = src.float().flatten(1).T, trg.float().flatten(1).T
    q = max(1, min(int(dim), c, a.shape[0] + b.shape[0]))
    mean, axes = principal_axes(torch.cat([a, b]).cpu(), q)
    mean, axes = mean.to(a.device), axes.to(a.device)
    project = lambda rows, hw: ((rows - mean) @ axes.T).T.reshape(q, *hw)  # noqa: E731
    return project(a, src.shape[-2:]), project(b, trg.shape[-2:])


def stack_pyramid(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """SD-DINO's stacking of maps given finest first: ``[m0, up(m1 ‖ up(m2 ‖ ...))]`` at ``m0``'s size."""
    acc = maps[-1]
    for m in reversed(maps[:-1]):
        acc = torch.cat([m, _resize(acc, tuple(m.shape[-2:]))], dim=-3)
    return acc


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinear (``align_corners=False``) resize of ``(C, h, w)`` or ``(B, C, h, w)``; no-op at equal size."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    batched = x.ndim == 4
    out = F.interpolate(x if batched else x[None], size=size, mode="bilinear", align_corners=False)
    return out if batched else out[0]


def _resize_images(images: torch.Tensor, side: int) -> torch.Tensor:
    if tuple(images.shape[-2:]) == (side, side):
        return images
    return F.interpolate(images.float(), size=(side, side), mode="bilinear", align_corners=False, antialias=True)


def _replication_factor(native: tuple[int, int], grid: tuple[int, int]) -> tuple[int, int] | None:
    """Integer ``(fy, fx)`` with ``grid = native * f``, else ``None``."""
    if grid[0] % native[0] or grid[1] % native[1]:
        return None
    return grid[0] // native[0], grid[1] // native[1]


def _finest_first(extractor, taps: tuple[str, ...]) -> tuple[str, ...]:
    """Taps sorted finest first (presets may list them coarsest first, e.g. ``us2, us5, us8``)."""
    if not taps:
        raise ValueError("need at least one SD tap")
    table = extractor.backbone.taps
    table.select(list(taps))  # unknown names fail here, with the list of valid ones
    return tuple(sorted(taps, key=lambda name: table[name].stride))


# ---------------------------------------------------------------------------------------------- descriptors
class Dinov2Descriptor:
    """DINOv2-only baseline: L2-normalised patch tokens ``(B, C, h, w)`` (issue D4).

    Args:
        dino: a :class:`~cleandift.eval.dinov2.Dinov2Features` (input size, layer, facet inside).
        size, resize: the descriptor input frame (default: the DINO input size, ``pad``).
        match: matching protocol used by :meth:`match_pair` (default argmax over patch centres).
        weights: what identifies the weights, recorded in :meth:`describe` next to a fingerprint.
    """

    def __init__(self, dino: Dinov2Features, *, size: int | tuple[int, int] | None = None, resize: str = "pad",
                 match: MatchSettings = NN_CELLS, weights: dict | None = None) -> None:
        self.dino = dino
        self.size = size if size is not None else (dino.image_size or SD_DINO_IMAGE_SIZE)
        self.resize = resize
        self.match = match
        self.weights = dict(weights or {})
        self._fingerprint: str | None = None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: PromptArg = None) -> torch.Tensor:
        return F.normalize(self.dino(images), dim=1)

    def match_pair(self, src_feats: torch.Tensor, trg_feats: torch.Tensor, src_xy: torch.Tensor,
                   ctx: PairContext) -> torch.Tensor:
        return _match(src_feats, trg_feats, src_xy, ctx, self.match)

    def describe(self) -> dict:
        if self._fingerprint is None:
            self._fingerprint = weights_fingerprint(self.dino.model)
        return {"kind": "dinov2", "size": self.size, "resize": self.resize, **self.dino.describe(),
                "weights": {**self.weights, "dino_fingerprint": self._fingerprint}}


class _SDDinoBase:
    """Shared by the fusion descriptors: SD taps at ``sd_size`` plus DINOv2 on the same frame."""

    kind = "fusion"

    def __init__(self, extractor, dino: Dinov2Features, *, taps: Sequence[str] = SD_DINO_TAPS,
                 sd_size: int = SD_DINO_SD_SIZE, size: int | None = None, resize: str = "pad",
                 part_weights: Sequence[float] = (1.0, 1.0), match: MatchSettings = NN_CELLS, seed: int = 0,
                 weights: dict | None = None) -> None:
        self.extractor = extractor
        self.dino = dino
        self.taps = _finest_first(extractor, (taps,) if isinstance(taps, str) else tuple(taps))
        self.sd_size = int(sd_size)
        self.size = int(size) if size is not None else max(self.sd_size, dino.image_size or self.sd_size)
        self.resize = resize
        if len(part_weights) != 2:
            raise ValueError(f"part_weights is (sd, dino), got {tuple(part_weights)}")
        self.part_weights = tuple(float(w) for w in part_weights)
        self.match = match
        self.seed = int(seed)
        self.weights = dict(weights or {})
        self._fingerprints: dict | None = None

    # -- geometry
    def dino_grid(self) -> tuple[int, int]:
        side = self.dino.image_size or self.size
        return side // self.dino.patch_size, side // self.dino.patch_size

    def tap_grid(self, name: str) -> tuple[int, int]:
        """Native ``(h, w)`` of an SD tap for a ``sd_size`` input."""
        backbone = self.extractor.backbone
        stride = backbone.latent_factor * backbone.taps[name].stride
        return self.sd_size // stride, self.sd_size // stride

    def tap_channels(self) -> list[int]:
        return [int(self.extractor.backbone.taps[name].channels) for name in self.taps]

    # -- extraction
    def sd_maps(self, images: torch.Tensor, prompts: PromptArg = None) -> list[torch.Tensor]:
        """Raw SD maps ``[(B, C_t, h_t, w_t)]`` in ``self.taps`` order, one image at a time.

        Each image gets its own generator, so features do not depend on the batch (required by the
        feature cache; matters for noisy extractors only). It is seeded from ``seed`` and the image
        content -- or from ``seed`` alone when the extractor's noise is ``shared``, which gives every
        image the same draw: SD-DINO / TLFR's fixed shared noise.
        """
        frame = _resize_images(images, self.sd_size)
        device = getattr(getattr(self.extractor, "backbone", None), "device", frame.device)
        shared = getattr(self.extractor, "noise_mode", None) == "shared"
        out: list[list[torch.Tensor]] = [[] for _ in self.taps]
        for image, prompt in zip(frame, split_prompts(prompts, frame.shape[0])):
            seed = self.seed if shared else image_seed(image, self.seed)
            generator = torch.Generator(device="cpu").manual_seed(seed)
            feats = self.extractor(image[None].to(device), prompts=prompt, taps=list(self.taps), generator=generator)
            for i, name in enumerate(self.taps):
                out[i].append(feats[name].float())
        return [torch.cat(chunks) for chunks in out]

    def dino_map(self, images: torch.Tensor) -> torch.Tensor:
        return self.dino(images)

    def describe(self) -> dict:
        if self._fingerprints is None:
            unet = getattr(self.extractor, "unet", None)
            self._fingerprints = {"unet_fingerprint": weights_fingerprint(unet) if unet is not None else None,
                                  "dino_fingerprint": weights_fingerprint(self.dino.model)}
        info = self.extractor.describe() if hasattr(self.extractor, "describe") else {}
        return {"kind": self.kind, "taps": list(self.taps), "sd_size": self.sd_size, "size": self.size,
                "resize": self.resize, "seed": self.seed, "part_weights": list(self.part_weights),
                **self._describe_extra(), **self.dino.describe(), "extractor": info,
                "weights": {**self.weights, **self._fingerprints}}

    def _describe_extra(self) -> dict:
        return {}

    def pair_descriptors(self, src_feats: torch.Tensor, trg_feats: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The descriptors actually compared for a pair (identity unless pair-dependent)."""
        return src_feats, trg_feats

    def match_pair(self, src_feats: torch.Tensor, trg_feats: torch.Tensor, src_xy: torch.Tensor,
                   ctx: PairContext) -> torch.Tensor:
        src, trg = self.pair_descriptors(src_feats, trg_feats)
        return _match(src, trg, src_xy, ctx, self.match)


class SDDinoDescriptor(_SDDinoBase):
    """SD-DINO fusion ("A Tale of Two Features"), see the module docstring.

    Args:
        extractor: a Clean/Noisy extractor (SD-DINO's own setting: noisy, ``t=100``, one draw of
            shared noise, VAE posterior mean; CleanDIFT: the clean student).
        dino: DINOv2 features (840 px, block 11, ``token``).
        taps: SD taps (sorted finest first internally: s3, s4, s5 = ``us8, us5, us2``).
        sd_size: SD input side (960).
        size, resize: descriptor input frame (default ``max(sd_size, dino size)``) and policy (``pad``).
        co_pca: reduce each tap by a PCA fit on the pair (then ``__call__`` returns raw parts and
            the fusion happens in :meth:`fuse_pair` / :meth:`match_pair`).
        pca_dims: output dims per tap, finest tap first (clipped to the tap's channels and to the
            number of vectors of the pair).
        part_weights: ``(sd, dino)`` weights after per-part normalisation (1 : 1).
        match: matching protocol (SD-DINO: argmax over patch centres).
        seed: noise seed for noisy extractors (combined with each image's content).
    """

    kind = "sd-dino"

    def __init__(self, extractor, dino: Dinov2Features, *, co_pca: bool = True,
                 pca_dims: Sequence[int] = SD_DINO_PCA_DIMS, **kwargs) -> None:
        super().__init__(extractor, dino, **kwargs)
        self.co_pca = bool(co_pca)
        self.pca_dims = tuple(int(d) for d in pca_dims)
        if self.co_pca and len(self.pca_dims) != len(self.taps):
            raise ValueError(f"pca_dims has {len(self.pca_dims)} entries for {len(self.taps)} taps")

    def _describe_extra(self) -> dict:
        return {"co_pca": self.co_pca, "pca_dims": list(self.pca_dims) if self.co_pca else None,
                "output": "raw-parts" if self.co_pca else "fused"}

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: PromptArg = None) -> torch.Tensor:
        """``co_pca``: raw parts on the DINO grid (see :meth:`pack`); else the fused descriptor."""
        sd = self.sd_maps(images, prompts)
        dino = self.dino_map(images).to(sd[0].device)
        if self.co_pca:
            return self.pack(sd, dino)
        return fuse_parts([_resize(stack_pyramid(sd), tuple(dino.shape[-2:])), dino], self.part_weights)

    # -- raw layout for co-PCA
    def pack(self, sd: Sequence[torch.Tensor], dino: torch.Tensor) -> torch.Tensor:
        """Raw SD maps moved to the DINO grid (replicated where exact, else bilinear) + the DINO map."""
        grid = tuple(dino.shape[-2:])
        moved = []
        for m in sd:
            factor = _replication_factor(tuple(m.shape[-2:]), grid)
            if factor is None:
                moved.append(_resize(m, grid))
            else:
                moved.append(m.repeat_interleave(factor[0], dim=-2).repeat_interleave(factor[1], dim=-1))
        return torch.cat([*moved, dino.float()], dim=-3)

    def unpack(self, packed: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Inverse of :meth:`pack` for one ``(C, h, w)`` map: native SD maps and the DINO map."""
        channels = self.tap_channels()
        if packed.shape[0] != sum(channels) + self.dino.channels:
            raise ValueError(f"expected {sum(channels) + self.dino.channels} packed channels "
                             f"({channels} + DINO {self.dino.channels}), got {packed.shape[0]}")
        parts = list(torch.split(packed, [*channels, self.dino.channels], dim=0))
        grid = tuple(packed.shape[-2:])
        sd = []
        for name, m in zip(self.taps, parts[:-1]):
            factor = _replication_factor(self.tap_grid(name), grid)
            sd.append(m if factor is None else m[:, ::factor[0], ::factor[1]])
        return sd, parts[-1]

    def fuse_pair(self, src_packed: torch.Tensor, trg_packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Co-PCA per tap on the pair, pyramid stacking, per-part normalisation: ``(C', h, w)`` each."""
        src_sd, src_dino = self.unpack(src_packed)
        trg_sd, trg_dino = self.unpack(trg_packed)
        reduced = [co_pca(s, t, d) for s, t, d in zip(src_sd, trg_sd, self.pca_dims)]
        grid = tuple(src_dino.shape[-2:])
        src_sd_map = _resize(stack_pyramid([r[0] for r in reduced]), grid)
        trg_sd_map = _resize(stack_pyramid([r[1] for r in reduced]), grid)
        src = fuse_parts([src_sd_map[None], src_dino[None]], self.part_weights)[0]
        trg = fuse_parts([trg_sd_map[None], trg_dino[None]], self.part_weights)[0]
        return src, trg

    def pair_descriptors(self, src_feats, trg_feats):
        if not self.co_pca:
            return src_feats, trg_feats
        return self.fuse_pair(_chw(src_feats), _chw(trg_feats))


class TLFRDescriptor(_SDDinoBase):
    """TLFR zero-shot descriptor ("Telling Left from Right"), see the module docstring.

    Returns ``(B, C_sd + C_dino, h, w)`` unit vectors on the DINO grid: the SD part (taps bilinearly
    resized to that grid and concatenated, finest first) and the DINO part each L2-normalised,
    weighted by ``part_weights`` (TLFR: 1 : 1), concatenated and renormalised. Arguments as
    :class:`SDDinoDescriptor` (no PCA); ``match`` defaults to TLFR's window soft-argmax. Wrap in
    :class:`AdaptiveFlipDescriptor` for the adaptive flip test.
    """

    kind = "tlfr"

    def __init__(self, extractor, dino: Dinov2Features, *, match: MatchSettings = TLFR_SOFT, **kwargs) -> None:
        super().__init__(extractor, dino, match=match, **kwargs)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: PromptArg = None) -> torch.Tensor:
        sd = self.sd_maps(images, prompts)
        dino = self.dino_map(images).to(sd[0].device)
        grid = tuple(dino.shape[-2:])
        sd_part = torch.cat([_resize(m, grid) for m in sd], dim=1)
        return fuse_parts([sd_part, dino], self.part_weights)


def _chw(feats: torch.Tensor) -> torch.Tensor:
    return feats[0] if feats.ndim == 4 and feats.shape[0] == 1 else feats


# ---------------------------------------------------------------------------------------------- adaptive flip
def permutation_from_pairs(pairs: Iterable[Sequence[int]], num_keypoints: int) -> list[int]:
    """Left/right permutation from symmetric id pairs: ``[[0, 1], [4, 5]]`` swaps 0↔1 and 4↔5.

    ``perm[k]`` is the id whose mirrored position becomes keypoint ``k`` after a horizontal flip
    (the mirrored right eye is where a left eye appears). Ids in no pair map to themselves.
    """
    perm = list(range(num_keypoints))
    seen: set[int] = set()
    for group in pairs:
        group = [int(k) for k in group]
        if len(group) != 2:
            raise ValueError(f"flip pairs must have two ids each, got {group}")
        a, b = group
        if {a, b} & seen or not (0 <= a < num_keypoints and 0 <= b < num_keypoints):
            raise ValueError(f"flip pair {group} repeats an id or is out of range 0..{num_keypoints - 1}")
        seen.update((a, b))
        perm[a], perm[b] = b, a
    return perm


def load_flip_permutations(source: str | Path | Mapping, num_keypoints: int = 30) -> dict[str, list[int]]:
    """Per-category permutations from a JSON file or dict.

    Each category maps to either a full permutation (``num_keypoints`` ids) or a list of symmetric
    id pairs (``[[a, b], ...]``, see :func:`permutation_from_pairs`). SPair-71k has at most 30
    keypoint ids per category.
    """
    table = json.loads(Path(source).read_text(encoding="utf-8")) if not isinstance(source, Mapping) else source
    out = {}
    for category, entry in table.items():
        entry = list(entry)
        if entry and all(isinstance(e, (list, tuple)) for e in entry):
            out[str(category)] = permutation_from_pairs(entry, num_keypoints)
        else:
            perm = [int(k) for k in entry]
            if sorted(perm) != list(range(len(perm))):
                raise ValueError(f"flip permutation of {category!r} is not a permutation: {perm}")
            out[str(category)] = perm
    return out


def flip_keypoints(xy: torch.Tensor, width: int, permutation: Sequence[int] | None = None) -> torch.Tensor:
    """Mirror ``(K, 2)`` keypoints (indexed by id) in an image ``width`` px wide and swap left/right ids.

    Row ``k`` of the result is keypoint ``k`` of the mirrored image: the mirror of keypoint
    ``permutation[k]`` (pixel-index convention: ``x -> width - 1 - x``). NaN rows stay NaN.
    """
    mirrored = flip_points(torch.as_tensor(xy, dtype=torch.float32), width)
    if permutation is None:
        return mirrored
    return mirrored[torch.as_tensor(list(permutation), dtype=torch.long)]


def mirrored_transform(tf: ResizeTransform) -> ResizeTransform:
    """The transform of the mirrored original into the mirrored frame (same scale, mirrored offset)."""
    return replace(tf, offset_x=tf.out_w - tf.orig_w * tf.scale_x - tf.offset_x)


def content_mask(tf: ResizeTransform | None, grid: tuple[int, int]) -> torch.Tensor:
    """``(h, w)`` bool: cells of a map over ``tf``'s frame whose centre lies on image content (not padding)."""
    h, w = grid
    if tf is None:
        return torch.ones(h, w, dtype=torch.bool)
    x0, y0, x1, y1 = tf.valid_region()
    ys = (torch.arange(h) + 0.5) * tf.out_h / h
    xs = (torch.arange(w) + 0.5) * tf.out_w / w
    return ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None, :]


def nn_feature_distance(src: torch.Tensor, trg: torch.Tensor, src_mask: torch.Tensor | None = None,
                        trg_mask: torch.Tensor | None = None, size: int | None = TLFR_FLIP_DISTANCE_SIZE,
                        chunk: int = 1024) -> float:
    """Mean over source cells of the L2 distance to the nearest target cell (TLFR's ``get_distance``).

    Maps ``(C, h, w)`` are bilinearly resampled to ``size`` x ``size`` first (TLFR: 64); masks
    ``(h, w)`` (nearest-resampled) restrict both sides. Vectors are compared as given.
    """
    def cells(m: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        m = _chw(m).float()
        grid = (size, size) if size else tuple(m.shape[-2:])
        m = _resize(m, grid).flatten(1).T
        if mask is None:
            return m
        mask = F.interpolate(mask[None, None].float(), size=grid, mode="nearest")[0, 0].bool().flatten()
        return m[mask.to(m.device)]

    a, b = cells(src, src_mask), cells(trg, trg_mask).to(src.device)
    if a.shape[0] == 0 or b.shape[0] == 0:
        return float("inf")
    total = 0.0
    for start in range(0, a.shape[0], chunk):
        total += float(torch.cdist(a[start:start + chunk], b).min(dim=1).values.sum())
    return total / a.shape[0]


@dataclass(frozen=True)
class FlipDecision:
    """Outcome of the adaptive flip test for one pair."""

    flipped: bool
    distance: float
    flipped_distance: float


class AdaptiveFlipDescriptor:
    """Wrap a descriptor with TLFR's test-time adaptive flip (features and cache are the base's).

    Args:
        base: any dense descriptor; its ``match`` settings and ``pair_descriptors`` (if any) are used.
        permutations: ``{category: perm}`` (:func:`load_flip_permutations`). Required: without the
            left/right table a flip would match left keypoints to right ones. A category missing from
            it falls back to the original orientation (logged once).
        distance_size: grid side for :func:`nn_feature_distance` (TLFR: 64; smaller is faster).
        match: override of the base's matching settings.

    ``match_pair`` needs ``ctx.get_features`` (for the mirrored source). Keypoint ids come from
    ``ctx.kps_ids`` and all source keypoints from ``ctx.extra["src_kps_all"]`` (``(K, 2)`` indexed
    by id, NaN = invisible); without the latter, partners are looked up among the queried keypoints
    only; without ids the points are mirrored with no swap. Predictions are replaced only for
    keypoints whose permuted partner is visible (TLFR's rule).
    """

    def __init__(self, base, permutations: Mapping[str, Sequence[int]], *,
                 distance_size: int | None = TLFR_FLIP_DISTANCE_SIZE, match: MatchSettings | None = None) -> None:
        if permutations is None:
            raise ValueError("adaptive flip needs the per-category left/right keypoint permutations "
                             "(load_flip_permutations); SPair's table is not bundled")
        self.base = base
        self.permutations = {str(k): list(v) for k, v in permutations.items()}
        self.distance_size = distance_size
        self.match = match or getattr(base, "match", NN_CELLS)
        self.size = base.size
        self.resize = base.resize
        self.last_decision: FlipDecision | None = None
        self._warned: set[str] = set()

    def __call__(self, images: torch.Tensor, prompts: PromptArg = None) -> torch.Tensor:
        return self.base(images, prompts)

    def describe(self) -> dict:
        return self.base.describe()  # the flip only changes matching, not the cached features

    def pair_descriptors(self, src_feats, trg_feats):
        fn = getattr(self.base, "pair_descriptors", None)
        return fn(src_feats, trg_feats) if fn else (src_feats, trg_feats)

    def decide(self, src: torch.Tensor, src_flipped: torch.Tensor, trg: torch.Tensor,
               ctx: PairContext | None = None) -> FlipDecision:
        """Compare the two source orientations by mean nearest-neighbour distance to the target."""
        grid = tuple(_chw(src).shape[-2:])
        src_tf = ctx.src_transform if ctx else None
        src_mask = content_mask(src_tf, grid)
        flip_mask = content_mask(mirrored_transform(src_tf), grid) if src_tf else src_mask
        trg_mask = content_mask(ctx.trg_transform if ctx else None, tuple(_chw(trg).shape[-2:]))
        d = nn_feature_distance(src, trg, src_mask, trg_mask, self.distance_size)
        d_flip = nn_feature_distance(src_flipped, trg, flip_mask, trg_mask, self.distance_size)
        return FlipDecision(d_flip < d, d, d_flip)

    def match_pair(self, src_feats: torch.Tensor, trg_feats: torch.Tensor, src_xy: torch.Tensor,
                   ctx: PairContext) -> torch.Tensor:
        src_xy = torch.as_tensor(src_xy, dtype=torch.float32).reshape(-1, 2)
        src, trg = self.pair_descriptors(src_feats, trg_feats)
        pred = _match(src, trg, src_xy, ctx, self.match)
        if ctx.get_features is None:
            raise ValueError("adaptive flip needs ctx.get_features to describe the mirrored source")
        src_flip, trg_for_flip = self.pair_descriptors(ctx.get_features(ctx.src_id, flipped=True), trg_feats)
        decision = self.decide(src, src_flip, trg_for_flip, ctx)
        self.last_decision = decision
        if not decision.flipped:
            return pred
        queries, usable = self._flipped_queries(src_xy, ctx)
        if not usable.any():
            return pred
        flip_pred = _match(src_flip, trg_for_flip, queries[usable], ctx, self.match,
                           src_transform=mirrored_transform(ctx.src_transform))
        pred = pred.clone()
        pred[usable] = flip_pred.to(pred)
        return pred

    def _flipped_queries(self, src_xy: torch.Tensor, ctx: PairContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Query points for the mirrored source (in the mirrored original) and which of them exist.

        Query ``i`` (id ``k``) becomes the mirror of source keypoint ``perm[k]``: taken from
        ``ctx.extra["src_kps_all"]`` when given, else from the queries themselves (so only partners
        that are also queried can be used).
        """
        width = ctx.src_size[1]
        if ctx.kps_ids is None:  # no keypoint identities: mirror the points, nothing to swap
            queries = flip_keypoints(src_xy, width)
            return queries, torch.isfinite(queries).all(dim=1)
        perm = self.permutations.get(ctx.category)
        if perm is None:
            if ctx.category not in self._warned:
                log.warning("adaptive flip: no left/right permutation for category %r; keeping the "
                            "original orientation", ctx.category)
                self._warned.add(ctx.category)
            return src_xy, torch.zeros(src_xy.shape[0], dtype=torch.bool)
        ids = [int(k) for k in ctx.kps_ids]
        partner = [perm[k] if k < len(perm) else k for k in ids]
        kps_all = (ctx.extra or {}).get("src_kps_all")
        if kps_all is not None:
            kps_all = torch.as_tensor(kps_all, dtype=torch.float32).reshape(-1, 2)
            nan = torch.full((2,), float("nan"))
            points = torch.stack([kps_all[p] if p < kps_all.shape[0] else nan for p in partner])
        else:
            row = {k: j for j, k in enumerate(ids)}
            points = torch.stack([src_xy[row[p]] if p in row else torch.full((2,), float("nan")) for p in partner])
        queries = flip_points(points, width)
        return queries, torch.isfinite(queries).all(dim=1)


# ---------------------------------------------------------------------------------------------- builders
def _resolve_dino(dino: Dinov2Features | None, dino_model: str, dino_size: int, dino_layer: int, dino_facet: str,
                  device, dtype: torch.dtype, local_files_only: bool | None) -> Dinov2Features:
    if dino is not None:
        return dino
    return load_dinov2(dino_model, device=device, dtype=dtype, image_size=dino_size, layer=dino_layer,
                       facet=dino_facet, local_files_only=local_files_only)


def _extractor_device(extractor, device):
    if device is not None:
        return device
    return getattr(getattr(extractor, "backbone", None), "device", "cpu")


def build_dinov2_descriptor(*, dino: Dinov2Features | None = None, dino_model: str = DEFAULT_DINOV2,
                            dino_size: int = SD_DINO_IMAGE_SIZE, dino_layer: int = SD_DINO_LAYER,
                            dino_facet: str = "token", size: int | None = None, resize: str = "pad",
                            match: MatchSettings = NN_CELLS, weights: dict | None = None, device=None,
                            dtype: torch.dtype = torch.float32,
                            local_files_only: bool | None = None) -> Dinov2Descriptor:
    """DINOv2-only baseline (issue D4): ViT-B/14, 840 px, block 11, ``token``, argmax over patches.

    Args:
        dino: a ready :class:`Dinov2Features` (then the ``dino_*`` loading arguments are ignored).
        dino_model: folder or hub id for :func:`~cleandift.eval.dinov2.load_dinov2`.
        dino_size, dino_layer, dino_facet: DINO input side, block index (0-based), facet.
        size, resize: descriptor frame (default ``dino_size``) and policy.
        match: matching protocol of :meth:`Dinov2Descriptor.match_pair`.
        weights: identity of the weights for ``describe()`` (default ``{"dino": dino_model}``).
        device, dtype, local_files_only: for loading (device default CPU).
    """
    dino = _resolve_dino(dino, dino_model, dino_size, dino_layer, dino_facet, device, dtype, local_files_only)
    return Dinov2Descriptor(dino, size=size, resize=resize, match=match,
                            weights=weights if weights is not None else {"dino": dino_model})


def build_sd_dino_descriptor(*, extractor, dino: Dinov2Features | None = None, dino_model: str = DEFAULT_DINOV2,
                             dino_size: int = SD_DINO_IMAGE_SIZE, dino_layer: int = SD_DINO_LAYER,
                             dino_facet: str = "token", taps: Sequence[str] = SD_DINO_TAPS,
                             sd_size: int = SD_DINO_SD_SIZE, size: int | None = None, resize: str = "pad",
                             co_pca: bool = True, pca_dims: Sequence[int] = SD_DINO_PCA_DIMS,
                             part_weights: Sequence[float] = (1.0, 1.0), match: MatchSettings = NN_CELLS,
                             seed: int = 0, weights: dict | None = None, device=None,
                             dtype: torch.dtype = torch.float32,
                             local_files_only: bool | None = None) -> SDDinoDescriptor:
    """SD-DINO fusion descriptor (anchors §4) on top of any Clean/Noisy ``extractor``.

    Args:
        extractor: SD features (SD-DINO baseline: ``NoisyExtractor(t=100, ensemble=1, noise="shared",
            sample_posterior=False)``; CleanDIFT: ``CleanExtractor(backbone, unet=student)``).
        dino / dino_model / dino_size / dino_layer / dino_facet: as :func:`build_dinov2_descriptor`.
        taps: SD taps finest first (``us8, us5, us2`` = ODISE #8, #5, #2).
        sd_size: SD input side (960). size / resize: descriptor frame (default ``max(sd_size,
            dino_size)``) and policy (``pad``).
        co_pca, pca_dims: joint PCA per tap on each pair, dims per tap (256 each).
        part_weights: ``(sd, dino)`` (1 : 1). match: matching protocol (argmax over patches).
        seed: noise seed (noisy extractors). weights: identity of the weights for ``describe()``.
        device, dtype, local_files_only: for loading DINOv2 (device default: the extractor's).
    """
    dino = _resolve_dino(dino, dino_model, dino_size, dino_layer, dino_facet, _extractor_device(extractor, device),
                         dtype, local_files_only)
    return SDDinoDescriptor(extractor, dino, co_pca=co_pca, pca_dims=pca_dims, taps=taps, sd_size=sd_size,
                            size=size, resize=resize, part_weights=part_weights, match=match, seed=seed,
                            weights=weights if weights is not None else {"dino": dino_model})


def build_tlfr_descriptor(*, extractor, dino: Dinov2Features | None = None, dino_model: str = DEFAULT_DINOV2,
                          dino_size: int = SD_DINO_IMAGE_SIZE, dino_layer: int = SD_DINO_LAYER,
                          dino_facet: str = "token", taps: Sequence[str] = SD_DINO_TAPS,
                          sd_size: int = SD_DINO_SD_SIZE, size: int | None = None, resize: str = "pad",
                          part_weights: Sequence[float] = (1.0, 1.0), match: MatchSettings = TLFR_SOFT,
                          adaptive_flip: bool = False,
                          flip_permutations: Mapping[str, Sequence[int]] | str | Path | None = None,
                          flip_distance_size: int | None = TLFR_FLIP_DISTANCE_SIZE, seed: int = 0,
                          weights: dict | None = None, device=None, dtype: torch.dtype = torch.float32,
                          local_files_only: bool | None = None):
    """TLFR zero-shot descriptor (anchors §5), optionally with the adaptive flip test.

    Args:
        extractor, dino*, taps, sd_size, size, resize, seed, weights, device, dtype, local_files_only:
            as :func:`build_sd_dino_descriptor` (TLFR: SD at 960, t=50 noisy or the clean student).
        part_weights: ``(sd, dino)`` (1 : 1, TLFR's identity aggregation).
        match: matching protocol (window soft-argmax, ±5 cells, temperature 0.02).
        adaptive_flip: wrap in :class:`AdaptiveFlipDescriptor` (TLFR's ``ADAPT_FLIP``). Off by
            default because it needs ``flip_permutations``.
        flip_permutations: ``{category: perm or [[a, b], ...]}`` or a JSON file of that
            (:func:`load_flip_permutations`); the SPair table is not bundled.
        flip_distance_size: resampling side of the flip distance (64).
    Returns:
        a :class:`TLFRDescriptor`, or an :class:`AdaptiveFlipDescriptor` around one.
    """
    dino = _resolve_dino(dino, dino_model, dino_size, dino_layer, dino_facet, _extractor_device(extractor, device),
                         dtype, local_files_only)
    desc = TLFRDescriptor(extractor, dino, taps=taps, sd_size=sd_size, size=size, resize=resize,
                          part_weights=part_weights, match=match, seed=seed,
                          weights=weights if weights is not None else {"dino": dino_model})
    if not adaptive_flip:
        return desc
    if flip_permutations is None:
        raise ValueError("adaptive_flip=True needs flip_permutations (per-category left/right keypoint "
                         "permutations, e.g. TLFR's SPAIR_FLIP as JSON); the SPair table is not bundled")
    perms = load_flip_permutations(flip_permutations)
    return AdaptiveFlipDescriptor(desc, perms, distance_size=flip_distance_size)


# ---------------------------------------------------------------------------------------------- presets adapter
#: Keys of ``CorrespondenceSettings.fusion`` understood here (aliases on the right).
FUSION_KEYS: dict[str, tuple[str, ...]] = {
    "dino_model": ("dinov2",), "dino_size": (), "dino_layer": (), "dino_facet": ("facet",), "co_pca": (),
    "pca_dims": (), "part_weights": ("weights",), "adaptive_flip": (), "flip_permutations": (),
    "flip_distance_size": (), "sd_size": (), "freeu": (),
}


def _fusion_options(fusion: Mapping) -> dict:
    """Canonical keyword arguments from a settings ``fusion`` dict; unknown keys raise."""
    alias = {a: key for key, names in FUSION_KEYS.items() for a in (key, *names)}
    unknown = sorted(set(fusion) - set(alias))
    if unknown:
        raise ConfigError(f"unknown fusion setting(s) {unknown}; known: {sorted(alias)}")
    out = {alias[k]: v for k, v in fusion.items()}
    if out.pop("freeu", False):
        raise ConfigError("fusion.freeu=true is not supported (CleanDIFT's TLFR reproduction disables FreeU)")
    return out


def build_descriptor(settings, *, extractor=None, device=None, dtype: torch.dtype = torch.float32):
    """Build the fusion descriptor a ``CorrespondenceSettings`` names (called by :mod:`.presets`).

    ``settings.descriptor`` picks :func:`build_dinov2_descriptor`, :func:`build_sd_dino_descriptor`
    or :func:`build_tlfr_descriptor`; ``taps``, ``size``, ``resize``, ``seed`` and the matching keys
    (``method``, ``grid``, ``source``, ``window``, ``temperature``) come from the settings, the rest
    from ``settings.fusion`` (:data:`FUSION_KEYS`). ``sd_size`` defaults to ``settings.size``.
    """
    opts = _fusion_options(dict(settings.fusion or {}))
    match = MatchSettings(settings.method, settings.grid, settings.source, int(settings.window),
                          float(settings.temperature))
    ident = {"model": settings.model, "checkpoint": settings.checkpoint,
             "dino": opts.get("dino_model", DEFAULT_DINOV2)}
    dino_args = {k: opts.pop(k) for k in ("dino_model", "dino_size", "dino_layer", "dino_facet") if k in opts}
    if "pca_dims" in opts:
        opts["pca_dims"] = tuple(int(d) for d in opts["pca_dims"])
    if "part_weights" in opts:
        opts["part_weights"] = tuple(float(w) for w in opts["part_weights"])
    common = dict(resize=settings.resize, match=match, device=device, dtype=dtype, **dino_args)
    if settings.descriptor == "dinov2":
        _no_extra(opts, "dinov2")
        return build_dinov2_descriptor(size=settings.size, weights={"dino": ident["dino"]}, **common)
    if extractor is None:
        raise ConfigError(f"descriptor {settings.descriptor!r} needs an SD extractor")
    sd = dict(extractor=extractor, taps=tuple(settings.taps), sd_size=int(opts.pop("sd_size", settings.size)),
              size=settings.size, seed=settings.seed, weights=ident, **common)
    if settings.descriptor == "sd-dino":
        keep = {k: opts.pop(k) for k in ("co_pca", "pca_dims", "part_weights") if k in opts}
        _no_extra(opts, "sd-dino")
        return build_sd_dino_descriptor(**sd, **keep)
    if settings.descriptor == "tlfr":
        keep = {k: opts.pop(k) for k in ("part_weights", "adaptive_flip", "flip_permutations", "flip_distance_size")
                if k in opts}
        _no_extra(opts, "tlfr")
        if keep.get("adaptive_flip") and keep.get("flip_permutations") is None:
            raise ConfigError("the TLFR adaptive flip needs fusion.flip_permutations: a JSON file of per-category "
                              "left/right keypoint permutations (e.g. TLFR's SPAIR_FLIP, not bundled); or set "
                              "fusion.adaptive_flip=false")
        return build_tlfr_descriptor(**sd, **keep)
    raise ConfigError(f"cleandift.eval.fusion cannot build descriptor {settings.descriptor!r}")


def _no_extra(opts: dict, kind: str) -> None:
    if opts:
        raise ConfigError(f"fusion setting(s) {sorted(opts)} do not apply to descriptor {kind!r}")

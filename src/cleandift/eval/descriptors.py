"""Dense descriptors: the one interface the correspondence evaluation talks to.

A *dense descriptor* turns a batch of images, already resized to its input frame, into one feature
map per image. Anything with these four members works (structural typing, no base class needed)::

    class MyDescriptor:
        size = 768                 # input frame: int = square side, or (W, H) as in images.resize_image
        resize = "stretch"         # how originals are put into the frame: stretch | pad | crop
        def __call__(self, images: Tensor, prompts: str | list[str] | None = None) -> Tensor: ...
        def describe(self) -> dict: ...

Contract of ``__call__``:

* ``images``: ``(B, 3, H, W)`` float in ``[-1, 1]``, exactly the frame given by ``size`` (the caller
  resized them with :func:`cleandift.images.prepare_images` using ``size`` and ``resize``).
* ``prompts``: ``None``, one string for the batch, or one string per image (already formatted, e.g.
  ``"a photo of a cat"``). Descriptors without text conditioning ignore it.
* returns ``(B, C, h, w)`` float32 on any device. The map covers the *whole* input frame with
  ``align_corners=False`` geometry: cell ``(i, j)`` is centred at pixel
  ``((j + 0.5) * W / w - 0.5, (i + 0.5) * H / h - 0.5)`` (pixel-index convention of
  :mod:`cleandift.images`, pixel centres at integers). Vectors are compared by **cosine
  similarity**, so their scale does not matter (matching normalises them).
* it must be a deterministic function of the image and prompt (same image => same features, whatever
  the batch it comes in or the order of calls), because features are cached per image and an
  interrupted run resumes from the cache.

Contract of ``describe()``: a JSON-able dict of *every* setting that changes the features (model,
weights fingerprint, taps, timestep, ensemble, seed, input size, resize policy, ...). Its hash keys
the feature cache, so anything missing from it risks silently reusing stale features.

Optional hook for pair-dependent descriptors (co-PCA of SD-DINO, TLFR's adaptive flip): a
descriptor may define ``match_pair(src_feats, trg_feats, src_xy, ctx) -> pred_xy``; the runner then
calls it instead of :func:`cleandift.eval.matching.match_points`. Points and frames are exactly those
of ``match_points``: ``src_xy`` ``(N, 2)`` in the original source image, the result ``(N, 2)`` in the
original target image, and ``ctx`` (:class:`PairContext`) carries the transforms from original
images to the descriptor frame plus a cached feature getter (also for horizontally flipped images).

Building from settings: :func:`cleandift.eval.presets.build_descriptor` builds ``diffusion`` itself
and, for the fusion kinds (``dinov2``, ``sd-dino``, ``tlfr``), calls
``cleandift.eval.fusion.build_descriptor(settings, extractor=..., device=..., dtype=...)`` where
``settings`` is a :class:`cleandift.eval.presets.CorrespondenceSettings` (fusion options in
``settings.fusion``) and ``extractor`` the clean/noisy diffusion extractor it describes (``None`` for
``dinov2``).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
import torch.nn.functional as F

from ..images import ResizeTransform
from .cache import weights_fingerprint

PromptArg = str | Sequence[str] | None


@runtime_checkable
class DenseDescriptor(Protocol):
    """Structural type of a dense descriptor (see the module docstring for the full contract)."""

    size: int | tuple[int, int]
    resize: str

    def __call__(self, images: torch.Tensor, prompts: PromptArg = None) -> torch.Tensor:
        """``(B, 3, H, W)`` in ``[-1, 1]`` at the input frame -> ``(B, C, h, w)`` float32."""
        ...

    def describe(self) -> dict:
        """JSON-able settings that determine the features (hashed into the cache key)."""
        ...


@dataclass
class PairContext:
    """What a pair-dependent descriptor's ``match_pair`` may need beyond the two feature maps.

    Attributes:
        category: dataset category of the pair (``"aeroplane"``, ...).
        src_id, trg_id: dataset image ids (cache keys), e.g. ``"aeroplane/2008_000033"``.
        src_size, trg_size: ``(H, W)`` of the *original* images (the frames of the points).
        src_transform, trg_transform: original image -> descriptor input frame.
        kps_ids: dataset keypoint ids of the ``N`` query points (SPair ``kps_ids``), or ``None``.
        get_features: ``get_features(image_id, flipped=False) -> (C, h, w)``; ``flipped=True`` gives
            the features of the input-frame image mirrored left-right (``torch.flip(x, [-1])``), so a
            point ``x`` in the input frame sits at ``W_in - 1 - x`` there (:func:`flip_points`).
            Results are cached like the plain features.
        extra: ``"pair"`` -- the :class:`~cleandift.eval.pairs.CorrespondencePair` (boxes, keypoints,
            files); ``"src_kps_all"`` (SPair, when its ``ImageAnnotation`` file exists) -- ``(K, 2)``
            every annotated source keypoint in the original frame indexed by keypoint id, NaN where
            invisible; plus the dataset's own pair fields (SPair: ``mirror``, ``src_annotation``, ...).
    """

    category: str
    src_id: str
    trg_id: str
    src_size: tuple[int, int]
    trg_size: tuple[int, int]
    src_transform: ResizeTransform
    trg_transform: ResizeTransform
    kps_ids: tuple[int, ...] | None = None
    get_features: Callable[..., torch.Tensor] | None = None
    extra: dict = field(default_factory=dict)


def flip_points(xy: torch.Tensor, width: int) -> torch.Tensor:
    """Mirror ``(x, y)`` points left-right in a frame ``width`` pixels wide (pixel-index convention)."""
    out = xy.clone().float()
    out[..., 0] = (width - 1) - out[..., 0]
    return out


def input_frame(size: int | tuple[int, int]) -> tuple[int, int]:
    """``(W, H)`` of a descriptor's input frame from its ``size`` attribute."""
    return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def concat_taps(maps: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2-normalise each ``(B, C_i, h_i, w_i)`` map over channels, resize to the finest, concatenate.

    Normalising per tap first gives every tap the same weight in the cosine similarity regardless
    of its channel count or activation scale (otherwise the 1280-channel taps dominate).
    """
    if not maps:
        raise ValueError("concat_taps needs at least one feature map")
    finest = max(maps, key=lambda m: m.shape[-2] * m.shape[-1])
    size = tuple(finest.shape[-2:])
    out = []
    for m in maps:
        m = F.normalize(m.float(), dim=1)
        if tuple(m.shape[-2:]) != size:
            m = F.interpolate(m, size=size, mode="bilinear", align_corners=False)
        out.append(m)
    return torch.cat(out, dim=1)


def image_seed(image: torch.Tensor, seed: int) -> int:
    """A 63-bit seed from ``seed`` and the image content.

    Noisy extraction draws its noise from this, so an image's features do not depend on the batch
    it comes in or on how many images were extracted before it (cache resume stays exact), while
    different images still get independent noise (as in DIFT, unlike a shared draw).
    """
    digest = hashlib.sha1(image.detach().float().cpu().contiguous().numpy().tobytes())
    digest.update(str(int(seed)).encode())
    return int.from_bytes(digest.digest()[:8], "little") & ((1 << 63) - 1)


class DiffusionDescriptor:
    """Diffusion-feature descriptor: taps of a Clean/Noisy extractor, each L2-normalised, concatenated.

    Args:
        extractor: a :class:`cleandift.extract.CleanExtractor` or :class:`~cleandift.extract.NoisyExtractor`
            (or anything with ``__call__(images, prompts=, taps=, generator=) -> {tap: map}`` and
            ``describe()``).
        taps: tap names; with several, coarser maps are bilinearly upsampled to the finest one.
        size, resize: the input frame (``768`` / ``"stretch"`` in DIFT).
        seed: noise seed; each image's noise comes from ``seed`` and its content (:func:`image_seed`).
        weights: what identifies the weights (e.g. model and checkpoint names) for :meth:`describe`;
            a fingerprint of the U-Net parameters is always added on top.
    """

    def __init__(self, extractor, taps: str | Sequence[str] = ("us6",), size: int | tuple[int, int] = 768,
                 resize: str = "stretch", seed: int = 0, weights: dict | None = None) -> None:
        self.extractor = extractor
        self.taps = (taps,) if isinstance(taps, str) else tuple(taps)
        if not self.taps:
            raise ValueError("DiffusionDescriptor needs at least one tap")
        self.size = size
        self.resize = resize
        self.seed = int(seed)
        self.weights = dict(weights or {})
        self._fingerprint: str | None = None

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: PromptArg = None) -> torch.Tensor:
        if images.ndim != 4:
            raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
        per_image = split_prompts(prompts, images.shape[0])
        out = []
        for image, prompt in zip(images, per_image):  # one generator per image => order independent
            generator = torch.Generator(device="cpu").manual_seed(image_seed(image, self.seed))
            feats = self.extractor(image[None], prompts=prompt, taps=list(self.taps), generator=generator)
            out.append(concat_taps([feats[t] for t in self.taps]))
        return torch.cat(out)

    def describe(self) -> dict:
        unet = getattr(self.extractor, "unet", None)
        if self._fingerprint is None and unet is not None:
            self._fingerprint = weights_fingerprint(unet)
        info = self.extractor.describe() if hasattr(self.extractor, "describe") else {}
        return {"kind": "diffusion", "taps": list(self.taps), "size": self.size, "resize": self.resize,
                "seed": self.seed, "weights": {**self.weights, "unet_fingerprint": self._fingerprint},
                "extractor": info}


def split_prompts(prompts: PromptArg, batch_size: int) -> list[str | None]:
    """One prompt per image from ``None``, a shared string or a per-image list (length checked)."""
    if prompts is None or isinstance(prompts, str):
        return [prompts] * batch_size
    prompts = list(prompts)
    if len(prompts) != batch_size:
        raise ValueError(f"got {len(prompts)} prompts for {batch_size} images")
    return prompts

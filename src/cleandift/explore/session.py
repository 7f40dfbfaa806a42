"""The explorer's state and answers, without a web framework: settings, cached features, matches.

An :class:`Explorer` holds one backbone (and optionally a CleanDIFT student), the served images and a
bounded feature cache. It answers the page's questions in original-image pixels:

* :meth:`Explorer.match` -- where source points land on each target, per method, plus a cosine
  heatmap of one point over each target (DIFT's protocol via :func:`cleandift.eval.matching.match_points`);
* :meth:`Explorer.mutual` -- top-K mutual nearest neighbours with a confidence (:mod:`.mutual`);
* :meth:`Explorer.export` -- a keypoint template transferred to the targets, as a JSON document.

Features are computed once per (image, settings) under one lock (the model never runs twice at once)
and cached, so a repeated click only matches.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import CleanDIFTError
from ..eval.matching import GRIDS, METHODS, match_points, source_descriptors
from ..features import sample_points
from ..images import RESIZE_POLICIES, ResizeTransform, prepare_images
from ..timesteps import DIFT_TIMESTEP, validate_timestep
from .cache import FeatureCache
from .limits import ExploreRequestError, Limits
from .mutual import top_mutual_matches
from .store import ImageStore

#: the methods the page compares, in display order
METHOD_LABELS = {"cleandift": "CleanDIFT", "dift": "DIFT (noisy)", "frozen": "Frozen, clean"}
FROZEN_T = 0  #: the frozen model on the clean image at t = 0 (the "naive clean" baseline, as in the demo)
DEFAULT_RESIZE = "pad"  #: keeps the aspect ratio (padding is excluded from matches by the transform)
#: softmax temperature of the mutual-NN confidence: at 0.02 (the soft-argmax default) nearly every mutual
#: pair of the mini model scored > 0.95; at 0.05 same-class pairs (median ~0.7) and other-class pairs
#: (~0.5) separate
MUTUAL_TEMPERATURE = 0.05


@dataclass(frozen=True)
class FeatureSettings:
    """Everything that determines an image's feature map (the cache key, with the image id)."""

    method: str
    tap: str
    prompt: str = ""
    resize: str = DEFAULT_RESIZE
    t: float | None = None  #: dift: noise timestep; frozen: timestep input; cleandift: None = learned value
    ensemble: int = 1  #: dift only
    seed: int = 0  #: dift only

    def describe(self, learned_t: float | None = None) -> dict:
        """JSON-able settings; ``learned_t`` fills in the student's timestep where ``t`` is its default."""
        out = asdict(self)
        if out["t"] is None:
            out["t"] = learned_t
        if self.method != "dift":
            out.pop("ensemble")
            out.pop("seed")
        return out


@dataclass(frozen=True)
class MatchSettings:
    """How a source descriptor is located on a target (see :mod:`cleandift.eval.matching`)."""

    method: str = "argmax"  #: argmax or soft-argmax (window soft-argmax, sub-pixel)
    grid: str = "pixels"  #: pixels (upsampled map, DIFT) or cells
    window: int = 5  #: soft-argmax: +- grid steps around the argmax
    temperature: float = 0.02  #: soft-argmax (and the mutual confidence) softmax temperature


@dataclass(frozen=True)
class Features:
    feats: torch.Tensor  #: (C, h, w) float32 on the CPU
    transform: ResizeTransform  #: original image -> model frame
    seconds: float  #: time it took to compute

    def cell_px(self) -> tuple[float, float]:
        """Size of one feature cell in original-image pixels ``(x, y)``."""
        t, (h, w) = self.transform, self.feats.shape[-2:]
        return t.out_w / w / t.scale_x, t.out_h / h / t.scale_y


class Explorer:
    """One model, its images and its feature cache (thread-safe)."""

    def __init__(self, backbone, images: ImageStore, *, student=None, student_timestep: float | None = None,
                 size: int | None = None, limits: Limits | None = None, model_name: str = "",
                 checkpoint_name: str | None = None, chunk_size: int = 8) -> None:
        self.backbone = backbone
        self.images = images
        self.student = student
        self.student_timestep = student_timestep
        self.size = int(size or backbone.resolution)
        self.limits = limits or images.limits
        self.model_name = model_name or getattr(backbone, "name", "model")
        self.checkpoint_name = checkpoint_name
        self.chunk_size = chunk_size
        self.cache = FeatureCache(self.limits.cache_bytes)
        self._model_lock = threading.Lock()

    # ------------------------------------------------------------------ description
    def config(self) -> dict:
        """What the page needs to build its controls (model, taps, methods, defaults, limits)."""
        backbone = self.backbone
        return {
            "model": self.model_name, "backbone": backbone.name, "family": backbone.family,
            "checkpoint": self.checkpoint_name, "size": self.size, "cell_px": backbone.size_multiple,
            "taps": [{"name": t.name, "channels": t.channels, "stride": t.stride} for t in backbone.taps],
            "default_tap": backbone.default_feature_taps[0],
            "methods": [{"name": name, "label": label,
                         "available": name != "cleandift" or self.student is not None,
                         "t": self.default_t(name), "ensemble": 8 if name == "dift" else None}
                        for name, label in METHOD_LABELS.items()],
            "t_max": backbone.num_train_timesteps - 1, "t_integer": bool(backbone.noise.discrete),
            "resize_policies": list(RESIZE_POLICIES), "default_resize": DEFAULT_RESIZE,
            "matchers": list(METHODS), "grids": list(GRIDS), "default_matcher": asdict(MatchSettings()),
            "prompt_suggestions": list(getattr(backbone, "class_names", ()) or ()),
            "limits": self.limits.as_dict(),
            "skipped": [{"name": n, "reason": r} for n, r in self.images.skipped],
        }

    def default_t(self, method: str) -> float | None:
        if method == "cleandift":
            return self.student_timestep
        return float(DIFT_TIMESTEP if method == "dift" else FROZEN_T)

    # ------------------------------------------------------------------ validation
    def settings(self, method: str, tap: str | None = None, prompt: str = "", resize: str = DEFAULT_RESIZE,
                 t: float | None = None, ensemble: int = 8, seed: int = 0) -> FeatureSettings:
        """Checked :class:`FeatureSettings`; every problem is a one-line :class:`ExploreRequestError`."""
        if method not in METHOD_LABELS:
            raise ExploreRequestError(f"unknown method {method!r}; choose from {', '.join(METHOD_LABELS)}")
        if method == "cleandift" and self.student is None:
            raise ExploreRequestError("method cleandift needs a student: restart with --checkpoint (a "
                                      "CleanDIFT export or released student)")
        tap = tap or self.backbone.default_feature_taps[0]
        if tap not in self.backbone.taps:
            raise ExploreRequestError(f"unknown tap {tap!r} for {self.model_name}; taps: "
                                      f"{', '.join(self.backbone.taps.names)}")
        if resize not in RESIZE_POLICIES:
            raise ExploreRequestError(f"unknown resize policy {resize!r}; choose from "
                                      f"{', '.join(RESIZE_POLICIES)}")
        if not isinstance(prompt, str) or len(prompt) > self.limits.max_prompt_chars:
            raise ExploreRequestError(f"prompt must be text of at most {self.limits.max_prompt_chars} "
                                      "characters")
        t = self.default_t(method) if t is None else t
        if t is not None:
            integer = method == "dift" and bool(self.backbone.noise.discrete)
            t = float(validate_timestep(t, self.backbone.num_train_timesteps, "t", integer=integer))
        if method == "cleandift" and t == self.student_timestep:
            t = None  # the learned value: one cache entry whether the page sends it or not
        if method != "dift":
            ensemble, seed = 1, 0
        elif not 1 <= ensemble <= self.limits.max_ensemble:
            raise ExploreRequestError(f"ensemble {ensemble}: must be between 1 and "
                                      f"{self.limits.max_ensemble} (DIFT uses 8)")
        if not 0 <= seed < 2**31:
            raise ExploreRequestError(f"seed {seed}: must be in [0, 2^31)")
        return FeatureSettings(method, tap, prompt.strip(), resize, t, int(ensemble), int(seed))

    def matcher(self, method: str = "argmax", grid: str = "pixels", window: int = 5,
                temperature: float = 0.02) -> MatchSettings:
        if method not in METHODS:
            raise ExploreRequestError(f"unknown matcher {method!r}; choose from {', '.join(METHODS)}")
        if grid not in GRIDS:
            raise ExploreRequestError(f"unknown grid {grid!r}; choose from {', '.join(GRIDS)}")
        if not 0 <= window <= 50:
            raise ExploreRequestError(f"window {window}: must be between 0 and 50 grid steps")
        if not (math.isfinite(temperature) and 1e-4 <= temperature <= 10):
            raise ExploreRequestError(f"temperature {temperature}: must be between 0.0001 and 10")
        return MatchSettings(method, grid, int(window), float(temperature))

    def _points(self, image_id: int, points: Sequence[Sequence[float]]) -> torch.Tensor:
        entry = self.images.get(image_id)
        if not 1 <= len(points) <= self.limits.max_points:
            raise ExploreRequestError(f"need 1 to {self.limits.max_points} points, got {len(points)}")
        xy = torch.tensor([list(p) for p in points], dtype=torch.float32).reshape(-1, 2)
        bad = ~torch.isfinite(xy).all(1) | (xy[:, 0] < -0.5) | (xy[:, 0] > entry.width - 0.5) | \
            (xy[:, 1] < -0.5) | (xy[:, 1] > entry.height - 0.5)
        if bad.any():
            p = xy[bad.nonzero()[0, 0]].tolist()
            raise ExploreRequestError(f"point {p} is outside image {image_id} ({entry.width}x{entry.height} "
                                      "px); points are original-image pixels, (0, 0) the top-left pixel's "
                                      "centre")
        return xy

    def _targets(self, targets: Sequence[int]) -> list[int]:
        if not 1 <= len(targets) <= self.limits.max_targets:
            raise ExploreRequestError(f"need 1 to {self.limits.max_targets} targets, got {len(targets)}")
        for image_id in targets:
            self.images.get(image_id)
        return list(dict.fromkeys(targets))

    def _methods(self, settings: Sequence[FeatureSettings]) -> list[FeatureSettings]:
        if not 1 <= len(settings) <= self.limits.max_methods:
            raise ExploreRequestError(f"need 1 to {self.limits.max_methods} methods, got {len(settings)}")
        return list(dict.fromkeys(settings))

    # ------------------------------------------------------------------ features
    def features(self, image_id: int, settings: FeatureSettings) -> Features:
        """The feature map of an image under ``settings``: cached, else computed (one model run at a time)."""
        key = (image_id, settings)
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        with self._model_lock:
            hit = self.cache.get(key)  # another request may have computed it while this one waited
            if hit is not None:
                return hit
            image = self.images.image(image_id)
            start = time.perf_counter()
            feats, transform = self._extract(image, settings)
            result = Features(feats, transform, time.perf_counter() - start)
            self.cache.put(key, result)
            return result

    def _extract(self, image, s: FeatureSettings) -> tuple[torch.Tensor, ResizeTransform]:
        from ..feature_files import noise_generators  # noqa: PLC0415

        extractor = self._extractor(s)
        batch, transforms = prepare_images([image], self.size, s.resize)
        generators = noise_generators(extractor, batch, s.seed) if s.method == "dift" else None
        try:
            feats = extractor.extract(batch.to(self.backbone.device), prompts=s.prompt, taps=[s.tap],
                                      generator=generators)
        except CleanDIFTError as exc:  # e.g. a prompt the mini model has no class for
            raise ExploreRequestError(str(exc)) from exc
        return feats[s.tap][0].float().cpu().contiguous(), transforms[0]

    def _extractor(self, s: FeatureSettings):
        from ..extract import CleanExtractor, NoisyExtractor  # noqa: PLC0415

        if s.method == "dift":
            return NoisyExtractor(self.backbone, t=s.t, ensemble=s.ensemble, taps=[s.tap],
                                  chunk_size=self.chunk_size)
        if s.method == "cleandift":
            return CleanExtractor(self.backbone, unet=self.student, timestep=s.t, taps=[s.tap],
                                  chunk_size=self.chunk_size)
        return CleanExtractor(self.backbone, timestep=s.t, taps=[s.tap], chunk_size=self.chunk_size)

    def _all_features(self, ids: Sequence[int], settings: Sequence[FeatureSettings]) -> tuple[dict, float]:
        """Features of every (image, settings) pair and the seconds spent computing the missing ones."""
        out, computed = {}, 0.0
        for s in settings:
            for image_id in dict.fromkeys(ids):
                cached = (image_id, s) in self.cache
                out[image_id, s] = self.features(image_id, s)
                computed += 0.0 if cached else out[image_id, s].seconds
        return out, computed

    # ------------------------------------------------------------------ answers
    def match(self, source: int, points: Sequence[Sequence[float]], targets: Sequence[int],
              settings: Sequence[FeatureSettings], matcher: MatchSettings | None = None,
              heatmap_point: int | None = -1) -> dict:
        """Predicted points (original target pixels), their cosine scores and one point's heatmap."""
        matcher = matcher or MatchSettings()
        xy = self._points(source, points)
        targets, settings = self._targets(targets), self._methods(settings)
        if heatmap_point is not None and not -len(xy) <= heatmap_point < len(xy):
            raise ExploreRequestError(f"heatmap point {heatmap_point}: there are {len(xy)} points")
        feats, feature_s = self._all_features([source, *targets], settings)
        start = time.perf_counter()
        src_entry = self.images.get(source)
        src_size = (src_entry.height, src_entry.width)
        results = []
        for s in settings:
            src = feats[source, s]
            query = None
            if heatmap_point is not None:
                query = source_descriptors(src.feats, xy[heatmap_point][None], src_size, src.transform)[0]
            for target in targets:
                trg = feats[target, s]
                frame, trg_transform, back = self._match_frame(self.images.get(target), trg.transform)
                pred, scores = match_points(src.feats, trg.feats, xy, src_size, frame,
                                            method=matcher.method, grid=matcher.grid, window=matcher.window,
                                            temperature=matcher.temperature, src_transform=src.transform,
                                            trg_transform=trg_transform, return_scores=True)
                pred = (pred + 0.5) * back - 0.5
                results.append({
                    "target": target, "method": s.method, "label": METHOD_LABELS[s.method],
                    "points": [[round(float(x), 2), round(float(y), 2)] for x, y in pred.tolist()],
                    "scores": [round(float(v), 4) for v in scores.tolist()],
                    "cell_px": [round(v, 3) for v in trg.cell_px()],
                    "heatmap": None if query is None else self.heatmap(query, trg, heatmap_point % len(xy)),
                })
        points = [[round(float(x), 2), round(float(y), 2)] for x, y in xy.tolist()]
        return {"source": source, "points": points, "results": results,
                "settings": [s.describe(self.student_timestep) for s in settings], "matcher": asdict(matcher),
                "timing": {"features_ms": round(feature_s * 1000, 1),
                           "match_ms": round((time.perf_counter() - start) * 1000, 1)}}

    def _match_frame(self, entry, transform: ResizeTransform
                     ) -> tuple[tuple[int, int], ResizeTransform, torch.Tensor]:
        """The target frame the matcher searches: the image, or a reduced copy of a large one.

        Returns ``(H, W)`` of that frame, its transform to the model frame and the ``(x, y)`` factors that
        take its points back to original pixels (``x = (x' + 0.5) * f - 0.5``; 1 for the image itself).
        """
        f = min(1.0, self.limits.max_match_side / max(entry.width, entry.height))
        if f >= 1.0:
            return (entry.height, entry.width), transform, torch.ones(2)
        w, h = max(1, round(entry.width * f)), max(1, round(entry.height * f))
        back = torch.tensor([entry.width / w, entry.height / h])
        reduced = replace(transform, orig_w=w, orig_h=h, scale_x=transform.scale_x * float(back[0]),
                          scale_y=transform.scale_y * float(back[1]))
        return (h, w), reduced, back

    def heatmap(self, query: torch.Tensor, trg: Features, point: int = 0) -> dict:
        """Cosine of ``query`` over the target, on a grid of about one sample per feature cell.

        The grid covers the *original* image (centres of ``width x height`` equal boxes), sampled
        bilinearly from the map through the resize transform, so the page can stretch it over the image
        whatever the resize policy (padding is never shown).
        """
        t = trg.transform
        h, w = trg.feats.shape[-2:]
        side = self.limits.max_heatmap_side
        gw = max(2, min(side, round(t.orig_w * t.scale_x * w / t.out_w)))
        gh = max(2, min(side, round(t.orig_h * t.scale_y * h / t.out_h)))
        xs = (torch.arange(gw, dtype=torch.float32) + 0.5) * (t.orig_w / gw) - 0.5
        ys = (torch.arange(gh, dtype=torch.float32) + 0.5) * (t.orig_h / gh) - 0.5
        gy, gx = torch.meshgrid(ys, xs, indexing="ij")
        xy = t.to_model(torch.stack([gx.reshape(-1), gy.reshape(-1)], -1))
        vecs = sample_points(trg.feats[None], xy[None], (t.out_h, t.out_w))[0]  # (gh*gw, C)
        sim = F.normalize(vecs, dim=-1) @ query.to(vecs)
        return {"width": gw, "height": gh, "point": point, "min": round(float(sim.min()), 4),
                "max": round(float(sim.max()), 4), "values": [round(float(v), 3) for v in sim.tolist()]}

    def mutual(self, source: int, targets: Sequence[int], settings: Sequence[FeatureSettings], k: int = 20,
               radius: float = 0.0, temperature: float = MUTUAL_TEMPERATURE) -> dict:
        """Top-``k`` mutual nearest neighbours between the source and each target, per method."""
        if not 1 <= k <= 500:
            raise ExploreRequestError(f"k {k}: must be between 1 and 500")
        if not (math.isfinite(radius) and radius >= 0):
            raise ExploreRequestError(f"radius {radius}: must be a number of pixels >= 0")
        self.matcher(temperature=temperature)  # the same bounds as the soft-argmax temperature
        self.images.get(source)
        targets, settings = self._targets(targets), self._methods(settings)
        feats, feature_s = self._all_features([source, *targets], settings)
        start = time.perf_counter()
        results = []
        for s in settings:
            src = feats[source, s]
            for target in targets:
                trg = feats[target, s]
                pairs, total = top_mutual_matches(src.feats, trg.feats, src.transform, trg.transform, k=k,
                                                  radius=radius, temperature=temperature)
                results.append({"target": target, "method": s.method, "label": METHOD_LABELS[s.method],
                                "pairs": pairs, "mutual_total": total})
        return {"source": source, "results": results,
                "settings": [s.describe(self.student_timestep) for s in settings],
                "k": k, "radius": radius, "temperature": temperature,
                "timing": {"features_ms": round(feature_s * 1000, 1),
                           "match_ms": round((time.perf_counter() - start) * 1000, 1)}}

    def export(self, source: int, points: Sequence[Sequence[float]], targets: Sequence[int],
               settings: Sequence[FeatureSettings], matcher: MatchSettings | None = None) -> dict:
        """A keypoint template and its transfer to every target, as a self-describing JSON document."""
        answer = self.match(source, points, targets, settings, matcher, heatmap_point=None)
        src = self.images.get(source)
        by_target: dict[int, dict] = {}
        for r in answer["results"]:
            methods = by_target.setdefault(r["target"], {})
            methods[r["method"]] = {"points": r["points"], "scores": r["scores"]}
        return {
            "format": "cleandift-explore-keypoints", "version": 1,
            "coordinates": "original-image pixels (x, y); (0, 0) is the centre of the top-left pixel",
            "model": self.model_name, "family": self.backbone.family, "checkpoint": self.checkpoint_name,
            "size": self.size, "settings": answer["settings"], "matcher": answer["matcher"],
            "source": {**_image_doc(src), "points": answer["points"]},
            "targets": [{**_image_doc(self.images.get(t)), "methods": methods}
                        for t, methods in by_target.items()],
        }

    def close(self) -> None:
        self.images.close()


def _image_doc(entry) -> dict:
    return {"image": entry.name, "id": entry.id, "width": entry.width, "height": entry.height}


# ---------------------------------------------------------------------------------------------- opening
def default_checkpoint(model: str) -> str | None:
    """The bundled student for the bundled ``mini`` model, else ``None`` (no student unless given)."""
    from ..backbones.pixel import BUNDLED_MINI_STUDENT_DIR  # noqa: PLC0415
    from ..backbones.presets import get_preset  # noqa: PLC0415

    preset = get_preset(model)
    if preset is not None and preset.name == "mini" and (BUNDLED_MINI_STUDENT_DIR / "unet").is_dir():
        return str(BUNDLED_MINI_STUDENT_DIR)
    return None


def open_session(model: str = "mini", checkpoint: str | None = None, inputs: Sequence[str] = (), *,
                 device=None, dtype: torch.dtype = torch.float32, size: int | None = None,
                 limits: Limits | None = None, single_file_config: str | None = None,
                 offload: bool = False) -> Explorer:
    """Load the model (and student), list the images; with no images and ``mini``, a few bundled samples."""
    from ..backbones.loading import load_backbone  # noqa: PLC0415
    from ..checkpoints import load_student  # noqa: PLC0415
    from .store import write_sample_images  # noqa: PLC0415

    backbone = load_backbone(model, device=device, dtype=dtype, single_file_config=single_file_config,
                             offload=offload)
    bundled = checkpoint is None and default_checkpoint(model) is not None
    checkpoint = checkpoint or default_checkpoint(model)
    student = student_t = None
    if checkpoint:
        student, ckpt = load_student(backbone.unet, checkpoint)
        student = student.eval().requires_grad_(False)
        student_t = float(ckpt.timestep if ckpt.timestep is not None else DIFT_TIMESTEP)
    store = ImageStore(limits, min_side=backbone.latent_factor)
    if inputs:
        store.add_paths(inputs)
    elif default_checkpoint(model) is not None or getattr(backbone, "name", "") == "mini":
        samples = write_sample_images(store.upload_dir / "samples", backbone.resolution)
        store.add_paths(samples, origin="sample")
    name = "bundled mini student" if bundled else (Path(checkpoint).name if checkpoint else None)
    return Explorer(backbone, store, student=student, student_timestep=student_t, size=size, limits=limits,
                    model_name=model, checkpoint_name=name)

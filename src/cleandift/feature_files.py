"""Extract features for many image files and store them as one safetensors file.

File format: tensor keys ``"<image key>/<tap>"`` with ``(C, h, w)`` maps, and the safetensors
metadata entry ``"cleandift"`` holding JSON with the extraction settings and, per image, its
original size and the :class:`~cleandift.images.ResizeTransform` (so points can be mapped between
the original image and the feature grid later). Image keys are paths relative to the input folder.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import BadImageError
from .extract import FeatureExtractor
from .images import ResizePolicy, load_image, prepare_images

log = logging.getLogger(__name__)
METADATA_KEY = "cleandift"


@dataclass
class ExtractionResult:
    features: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # image key -> tap -> (C, h, w)
    images: dict[str, dict] = field(default_factory=dict)  # image key -> {path, size, transform}
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def image_keys(paths: Sequence[Path]) -> list[str]:
    """Short, unique keys: paths relative to their common folder (POSIX separators)."""
    if not paths:
        return []
    resolved = [p.resolve() for p in paths]
    common = Path(os.path.commonpath([str(p.parent) for p in resolved]))
    return [p.relative_to(common).as_posix() for p in resolved]


def extract_files(extractor: FeatureExtractor, paths: Sequence[Path], *, size: int, resize: ResizePolicy = "stretch",
                  prompt: str | Callable[[Path], str] | None = None, taps: str | Sequence[str] | None = None,
                  batch_size: int = 4, seed: int = 0, save_dtype: torch.dtype = torch.float16,
                  progress: bool = True) -> ExtractionResult:
    """Run ``extractor`` over image files in batches; bad files are skipped and reported, never fatal.

    ``prompt`` is one string for all images or a function of the path (e.g. a category template).
    Noise for a noisy extractor comes from one generator seeded with ``seed``, so a run is
    reproducible for a fixed file list, batch size and seed.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    keys = image_keys(list(paths))
    result = ExtractionResult()
    generator = torch.Generator().manual_seed(seed)
    min_side = extractor.backbone.latent_factor
    bar = tqdm(total=len(paths), desc="extract", unit="img", disable=not progress)
    for start in range(0, len(paths), batch_size):
        batch_paths, batch_keys, images = [], [], []
        for path, key in zip(paths[start:start + batch_size], keys[start:start + batch_size]):
            try:
                images.append(load_image(path, min_side=min_side))
            except BadImageError as exc:
                result.failed.append((str(path), exc.reason))
                log.warning("skipping %s", exc)
                bar.update(1)
                continue
            batch_paths.append(path)
            batch_keys.append(key)
        if not images:
            continue
        batch, transforms = prepare_images(images, size, resize)
        prompts = [prompt(p) if callable(prompt) else (prompt or "") for p in batch_paths]
        feats = extractor.extract(batch, prompts=prompts, taps=taps, generator=generator)
        for i, (path, key, tf) in enumerate(zip(batch_paths, batch_keys, transforms)):
            result.features[key] = {tap: f[i].to(save_dtype).cpu().contiguous() for tap, f in feats.items()}
            result.images[key] = {"path": str(path), "size": [tf.orig_w, tf.orig_h], "prompt": prompts[i],
                                  "transform": tf.as_dict()}
        bar.update(len(batch_paths))
    bar.close()
    return result


def save_features(result: ExtractionResult, out: str | Path, settings: dict) -> Path:
    """Write features + metadata atomically (temp file, then rename)."""
    from safetensors.torch import save_file  # noqa: PLC0415

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{key}/{tap}": t for key, taps in result.features.items() for tap, t in taps.items()}
    meta = {"settings": settings, "images": result.images, "failed": result.failed}
    tmp = out.with_name(out.name + ".tmp")
    save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(meta)})
    os.replace(tmp, out)
    return out


def load_features(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a feature file back: ``({image key: {tap: (C, h, w)}}, metadata)``."""
    from safetensors import safe_open  # noqa: PLC0415

    features: dict[str, dict[str, torch.Tensor]] = {}
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get(METADATA_KEY, "{}"))
        for name in f.keys():
            key, tap = name.rsplit("/", 1)
            features.setdefault(key, {})[tap] = f.get_tensor(name)
    return features, meta


def merge_feature_files(parts: Sequence[Path], out: Path) -> Path:
    """Merge per-process parts (``accelerate launch``) into one file and delete the parts."""
    merged = ExtractionResult()
    settings: dict = {}
    for part in parts:
        feats, meta = load_features(part)
        merged.features.update(feats)
        merged.images.update(meta.get("images", {}))
        merged.failed.extend(tuple(x) for x in meta.get("failed", []))
        settings = meta.get("settings", settings)
    save_features(merged, out, settings)
    for part in parts:
        Path(part).unlink()
    return out

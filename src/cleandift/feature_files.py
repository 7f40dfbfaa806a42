"""Extract features for many image files and store them as one safetensors file.

File format: tensor keys ``"<image key>/<tap>"`` with ``(C, h, w)`` maps, and the safetensors
metadata entry ``"cleandift"`` holding JSON with the extraction settings and, per image, its
original size and the :class:`~cleandift.images.ResizeTransform` (so points can be mapped between
the original image and the feature grid later), plus the list of skipped files with the reason.
Image keys are paths relative to the input folder (:func:`cleandift.images.path_keys`), valid UTF-8.
Read a file back with :func:`load_features` (also ``cleandift.load_features``).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import BadImageError, OutputError, printable
from .extract import FeatureExtractor, image_generators
from .images import ResizePolicy, load_image, path_keys, prepare_images

log = logging.getLogger(__name__)
METADATA_KEY = "cleandift"
TMP_SUFFIX = ".tmp"


@dataclass
class ExtractionResult:
    features: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # image key -> tap -> (C, h, w)
    images: dict[str, dict] = field(default_factory=dict)  # image key -> {path, size, transform}
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason)


def image_keys(paths: Sequence[Path]) -> list[str]:
    """Short, unique keys: paths relative to their common folder (POSIX separators, never resolved)."""
    return path_keys(list(paths))


def extract_files(extractor: FeatureExtractor, paths: Sequence[Path], *, size: int, resize: ResizePolicy = "stretch",
                  prompt: str | Callable[[Path], str] | None = None, taps: str | Sequence[str] | None = None,
                  batch_size: int = 4, seed: int = 0, save_dtype: torch.dtype = torch.float16,
                  progress: bool = True, keys: Sequence[str] | None = None, strict: bool = False) -> ExtractionResult:
    """Run ``extractor`` over image files in batches; bad files are skipped and reported, never fatal.

    ``prompt`` is one string for all images or a function of the path (e.g. a category template).
    ``keys`` default to :func:`image_keys`. ``strict`` raises :class:`BadImageError` at the first bad
    file instead (before any later image is processed).

    Noise (noisy extractors) comes from one generator per image seeded with ``seed`` and the image
    content (:func:`cleandift.extract.image_generators`, as ``eval`` does), and such extractors run one
    image at a time (its ensemble draws still batched), so an image's features are bit-identical whatever
    the other files, their order or ``batch_size``. With ``noise="shared"`` every image gets the draws of
    a generator seeded with ``seed`` alone. Clean extraction draws nothing and stays batched.
    """
    from tqdm.auto import tqdm  # noqa: PLC0415

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keys = list(keys) if keys is not None else image_keys(list(paths))
    if len(keys) != len(paths):
        raise ValueError(f"got {len(keys)} keys for {len(paths)} paths")
    result = ExtractionResult()
    min_side = extractor.backbone.latent_factor
    bar = tqdm(total=len(paths), desc="extract", unit="img", disable=not progress)
    for start in range(0, len(paths), batch_size):
        batch_paths, batch_keys, images = [], [], []
        for path, key in zip(paths[start:start + batch_size], keys[start:start + batch_size]):
            try:
                images.append(load_image(path, min_side=min_side))
            except BadImageError as exc:
                if strict:
                    bar.close()
                    raise
                result.failed.append((printable(path), exc.reason))
                log.warning("skipping %s", exc)
                bar.update(1)
                continue
            batch_paths.append(path)
            batch_keys.append(key)
        if not images:
            continue
        batch, transforms = prepare_images(images, size, resize)
        prompts = [prompt(p) if callable(prompt) else (prompt or "") for p in batch_paths]
        feats = _extract_batch(extractor, batch, prompts, taps, seed)
        for i, (path, key, tf) in enumerate(zip(batch_paths, batch_keys, transforms)):
            result.features[key] = {tap: f[i].to(save_dtype).cpu().contiguous() for tap, f in feats.items()}
            result.images[key] = {"path": printable(path), "size": [tf.orig_w, tf.orig_h], "prompt": prompts[i],
                                  "transform": tf.as_dict()}
        bar.update(len(batch_paths))
    bar.close()
    return result


def noise_generators(extractor: FeatureExtractor, batch: torch.Tensor, seed: int) -> list[torch.Generator] | None:
    """One generator per image: seeded from ``seed`` and its content, or from ``seed`` alone if shared.

    ``None`` when the extractor draws no noise (clean extraction without posterior sampling).
    """
    mode = getattr(extractor, "noise_mode", None)
    if mode is None and not getattr(extractor, "sample_posterior", False):
        return None
    if mode == "shared":
        return [torch.Generator().manual_seed(seed) for _ in range(batch.shape[0])]
    return image_generators(batch, seed)


def _extract_batch(extractor: FeatureExtractor, batch: torch.Tensor, prompts: list[str],
                   taps: str | Sequence[str] | None, seed: int) -> dict[str, torch.Tensor]:
    """Batched when nothing is random; else image by image, so batch-size-dependent kernels cannot
    change a feature (batched float kernels differ from unbatched ones in the last bits)."""
    generators = noise_generators(extractor, batch, seed)
    if generators is None:
        return extractor.extract(batch, prompts=prompts, taps=taps)
    parts = [extractor.extract(batch[i:i + 1], prompts=prompts[i:i + 1], taps=taps, generator=g)
             for i, g in enumerate(generators)]
    return {tap: torch.cat([part[tap] for part in parts]) for tap in parts[0]}


def check_output(out: str | Path) -> Path:
    """Refuse an ``--out`` that cannot be written *before* any work: a folder, a missing or read-only folder.

    Probes the folder by creating (and removing) a temporary file there, which also catches read-only
    file systems and permissions that ``os.access`` misjudges.
    """
    text = os.fspath(out)
    out = Path(text).expanduser()
    if text.endswith(("/", os.sep)) or out.is_dir():
        raise OutputError(f"--out {printable(out)} is a folder; give a file name, e.g. "
                          f"{printable(out / 'features.safetensors')}")
    parent = out.parent
    if not parent.is_dir():
        raise OutputError(f"--out {printable(out)}: the folder {printable(parent)} does not exist; create it first "
                          f"(mkdir -p {printable(parent)}) or pick another --out")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.probe.", suffix=TMP_SUFFIX, dir=parent)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OutputError(f"--out {printable(out)}: cannot write in {printable(parent)} ({exc.strerror or exc}); "
                          "pick a writable folder") from exc
    return out


def remove_stale_temps(out: str | Path) -> list[Path]:
    """Delete temp files of ``out`` left by killed runs (their process is gone); returns what was removed."""
    out = Path(out)
    prefix = f".{out.name}."
    removed = []
    for name in os.listdir(out.parent):
        if not (name.startswith(prefix) and name.endswith(TMP_SUFFIX)):
            continue
        pid = name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and not _process_alive(int(pid)):
            (out.parent / name).unlink(missing_ok=True)
            removed.append(out.parent / name)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def save_features(result: ExtractionResult, out: str | Path, settings: dict) -> Path:
    """Write features + metadata atomically (hidden temp file in the same folder, then rename).

    Keys and metadata are escaped to valid UTF-8 first, so a strange file name can never make the save
    fail after the work is done; on any failure the temp file is removed and nothing else is touched.
    """
    from safetensors.torch import save_file  # noqa: PLC0415

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tensors = {f"{printable(key)}/{tap}": t for key, taps in result.features.items() for tap, t in taps.items()}
    meta = _printable_tree({"settings": settings, "images": result.images, "failed": [list(x) for x in result.failed]})
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.{os.getpid()}.", suffix=TMP_SUFFIX, dir=out.parent)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata={METADATA_KEY: json.dumps(meta)})
        os.replace(tmp, out)
    except OSError as exc:
        Path(tmp).unlink(missing_ok=True)
        raise OutputError(f"{printable(out)}: could not write the features ({exc.strerror or exc}); "
                          "nothing was written -- free some space or pick another --out") from exc
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out


def _printable_tree(obj):
    """Metadata with every string (keys included) escaped to valid UTF-8."""
    if isinstance(obj, str):
        return printable(obj)
    if isinstance(obj, dict):
        return {printable(k) if isinstance(k, str) else k: _printable_tree(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_printable_tree(v) for v in obj]
    return obj


def load_features(path: str | Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a feature file written by ``cleandift extract`` (or :func:`save_features`).

    Returns ``({image key: {tap: (C, h, w) tensor}}, metadata)``; ``metadata`` has ``"settings"`` (how the
    features were extracted), ``"images"`` (per key: source ``path``, original ``size`` ``[W, H]``, ``prompt``
    and the resize ``transform``, see :class:`cleandift.images.ResizeTransform`) and ``"failed"``
    (``[path, reason]`` of every skipped file). Tensors are stored in ``--save-dtype`` (fp16 by default).
    """
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

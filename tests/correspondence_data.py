"""Writers of tiny SPair-71k and PF-Pascal datasets in their exact on-disk formats; a synthetic descriptor.

Images are random colour blocks (8 x 8 px), so a descriptor that averages each block knows exactly
where every keypoint lands; pairs are (image, itself) and (image, its left-right mirror) with the
keypoints mirrored as ``x -> W - 1 - x``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

BLOCK = 8
W, H = 64, 48


def block_image(seed: int, width: int = W, height: int = H) -> np.ndarray:
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(height // BLOCK, width // BLOCK, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, BLOCK, axis=0), BLOCK, axis=1)


def save_jpeg(arr: np.ndarray, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, quality=100, subsampling=0)


def mirror_points(kps: list[list[float]], width: int = W) -> list[list[float]]:
    return [[width - 1 - x, y] for x, y in kps]


#: Keypoints near block centres (integers, as SPair stores them).
KPS = [[11, 19], [27, 35], [43, 11], [51, 27]]


def write_spair(root: Path, categories=("cat", "dog"), split: str = "test") -> Path:
    """Per category: image a, its mirror b; pairs a->a (identical) and a->b (mirrored)."""
    root = Path(root)
    for ci, cat in enumerate(categories):
        a = block_image(100 + ci)
        b = a[:, ::-1].copy()
        names = {"a": f"{cat}_a", "b": f"{cat}_b"}
        save_jpeg(a, root / "JPEGImages" / cat / f"{names['a']}.jpg")
        save_jpeg(b, root / "JPEGImages" / cat / f"{names['b']}.jpg")
        for key, kps in (("a", KPS), ("b", mirror_points(KPS))):
            ann = {"filename": f"{names[key]}.jpg", "category": cat, "image_width": W, "image_height": H,
                   "bndbox": [0, 0, W, H],
                   "kps": {str(i): (kps[i] if i < len(kps) else None) for i in range(6)}}
            write_json(root / "ImageAnnotation" / cat / f"{names[key]}.json", ann)
        for pid, (trg, trg_kps) in enumerate((("a", KPS), ("b", mirror_points(KPS)))):
            pair = spair_pair(pid + 1, cat, names["a"], names[trg], KPS, trg_kps)
            name = f"{pid + 1:06d}-{names['a']}-{names[trg]}:{cat}.json"
            write_json(root / "PairAnnotation" / split / name, pair)
    return root


def spair_pair(pid: int, cat: str, src: str, trg: str, src_kps, trg_kps, **overrides) -> dict:
    data = {
        "pair_id": pid, "filename": f"{pid:06d}-{src}-{trg}:{cat}", "src_imname": f"{src}.jpg",
        "trg_imname": f"{trg}.jpg", "src_imsize": [W, H, 3], "trg_imsize": [W, H, 3],
        "src_bndbox": [0, 0, W, H], "trg_bndbox": [0, 0, W, H], "category": cat, "src_pose": 0, "trg_pose": 0,
        "src_kps": src_kps, "trg_kps": trg_kps, "kps_ids": [str(i) for i in range(len(src_kps))], "mirror": 0,
        "viewpoint_variation": 0, "scale_variation": 0, "truncation": 0, "occlusion": 0,
    }
    data.update(overrides)
    return data


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def write_pfpascal(parent: Path, split: str = "test") -> Path:
    """``<parent>/PF-dataset-PASCAL/{JPEGImages, test_pairs_pf_pascal.csv}``; CSV paths relative to parent."""
    root = Path(parent) / "PF-dataset-PASCAL"
    rows = []
    for cls_id, seed in ((8, 1), (12, 2)):  # cat, dog
        a = block_image(seed)
        save_jpeg(a, root / "JPEGImages" / f"2009_00{seed}a.jpg")
        save_jpeg(a[:, ::-1].copy(), root / "JPEGImages" / f"2009_00{seed}b.jpg")
        for trg, kps in ((f"2009_00{seed}a", KPS), (f"2009_00{seed}b", mirror_points(KPS))):
            images = "PF-dataset-PASCAL/JPEGImages"
            rows.append([f"{images}/2009_00{seed}a.jpg", f"{images}/{trg}.jpg", cls_id,
                         *coords(KPS), *coords(kps)])
    write_csv(root / f"{split}_pairs_pf_pascal.csv", rows)
    return root


def coords(kps) -> list[str]:
    """``[[x, y], ...]`` -> the two ``;``-separated columns (X, Y) of the PF-Pascal CSVs."""
    return [";".join(str(p[0]) for p in kps), ";".join(str(p[1]) for p in kps)]


CSV_HEADER = ("source_image", "target_image", "class", "XA", "YA", "XB", "YB")


def write_csv(path: Path, rows, header=CSV_HEADER) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        if header:
            writer.writerow(header)
        writer.writerows(rows)


class BlockDescriptor:
    """Synthetic dense descriptor of each 8 x 8 block's mean colour, counting calls.

    The colour goes through random Fourier features (256 dims, bandwidth ~1/30 of the colour range),
    so equal colours have cosine ~1 and different blocks ~0 -- sharp enough for a soft-argmax at
    temperature 0.02, unlike raw 3-d colours whose cosines are all high.
    """

    def __init__(self, size=(W, H), resize: str = "stretch", dims: int = 256, scale: float = 30.0) -> None:
        self.size = size
        self.resize = resize
        self.calls = 0
        g = torch.Generator().manual_seed(0)
        self.proj = torch.randn(dims, 3, generator=g) * scale
        self.phase = torch.rand(dims, generator=g) * 2 * torch.pi

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        self.calls += images.shape[0]
        colours = F.avg_pool2d(images.float(), BLOCK)  # (B, 3, h, w)
        return torch.cos(torch.einsum("dc,bchw->bdhw", self.proj, colours) + self.phase[None, :, None, None])

    def describe(self) -> dict:
        return {"kind": "block-colour", "block": BLOCK, "size": list(self.size), "resize": self.resize}

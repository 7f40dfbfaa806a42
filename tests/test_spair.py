"""SPair-71k reader on a tiny dataset written in the official layout, and every bad-input error."""

from __future__ import annotations

import json
import math

import pytest
import torch
from correspondence_data import KPS, H, W, mirror_points, spair_pair, write_json, write_spair

from cleandift.errors import DatasetError
from cleandift.eval.spair import SPAIR_CATEGORIES, read_image_keypoints, read_spair


@pytest.fixture
def spair(tmp_path):
    return write_spair(tmp_path / "SPair-71k")


def pair_files(root, split="test"):
    return sorted((root / "PairAnnotation" / split).glob("*.json"))


def test_reads_the_official_layout(spair):
    pairs = read_spair(spair, "test")
    assert [p.category for p in pairs] == ["cat", "cat", "dog", "dog"]
    p = pairs[1]
    assert p.src_id == "cat/cat_a" and p.trg_id == "cat/cat_b"
    assert p.src_image == spair / "JPEGImages" / "cat" / "cat_a.jpg"
    assert p.src_size == (H, W) and p.trg_size == (H, W)  # imsize [W, H, C] -> (H, W)
    assert p.trg_bbox == (0.0, 0.0, float(W), float(H))
    assert torch.equal(p.src_kps, torch.tensor(KPS, dtype=torch.float32))
    assert torch.equal(p.trg_kps, torch.tensor(mirror_points(KPS), dtype=torch.float32))
    assert p.kps_ids == (0, 1, 2, 3)
    assert p.extra["mirror"] == 0 and p.extra["src_annotation"].name == "cat_a.json"
    assert p.annotation.name.endswith(":cat.json")


def test_categories_limit_and_split_alias(spair):
    assert {p.category for p in read_spair(spair, categories=["dog"])} == {"dog"}
    assert len(read_spair(spair, limit=1)) == 2  # one per category
    write_spair(spair, split="trn")
    assert len(read_spair(spair, split="train")) == 4


def test_image_annotation_keypoints(spair):
    kps = read_image_keypoints(spair / "ImageAnnotation" / "cat" / "cat_a.json")
    assert kps.shape == (6, 2)
    assert kps[:4].tolist() == [[float(x), float(y)] for x, y in KPS]
    assert all(math.isnan(v) for v in kps[4:].flatten().tolist())
    with pytest.raises(DatasetError, match="cat_zzz.json: image annotation file not found"):
        read_image_keypoints(spair / "ImageAnnotation" / "cat" / "cat_zzz.json")


def test_unknown_category_requested(spair):
    with pytest.raises(DatasetError, match="unknown category 'unicorn'.*aeroplane"):
        read_spair(spair, categories=["unicorn"])


def test_unknown_category_in_a_file(spair):
    bad = spair / "PairAnnotation" / "test" / "000009-a-b:unicorn.json"
    write_json(bad, spair_pair(9, "unicorn", "a", "b", KPS, KPS))
    with pytest.raises(DatasetError, match=r"000009-a-b:unicorn\.json: unknown category"):
        read_spair(spair)


def test_missing_split_folder_and_empty_split(tmp_path, spair):
    with pytest.raises(DatasetError, match="PairAnnotation/val: folder not found"):
        read_spair(spair, "val")
    (spair / "PairAnnotation" / "val").mkdir()
    with pytest.raises(DatasetError, match="empty split"):
        read_spair(spair, "val")
    with pytest.raises(DatasetError, match="unknown SPair-71k split"):
        read_spair(spair, "dev")
    with pytest.raises(DatasetError, match="folder not found"):
        read_spair(tmp_path / "nowhere")


def test_missing_image_file(spair):
    (spair / "JPEGImages" / "dog" / "dog_b.jpg").unlink()
    message = r"dog_b\.jpg: image file not found \(referenced by .*:dog\.json\)"
    with pytest.raises(DatasetError, match=message):
        read_spair(spair)


def test_keypoint_outside_the_image(spair):
    path = pair_files(spair)[0]
    data = json.loads(path.read_text())
    data["trg_kps"][2] = [W + 5, 10]
    write_json(path, data)
    with pytest.raises(DatasetError, match=rf"{path.name}: target keypoint #2 at \({W + 5}, 10\) is outside"):
        read_spair(spair)


def test_keypoint_on_the_border_is_accepted(spair):
    path = pair_files(spair)[0]
    data = json.loads(path.read_text())
    data["src_kps"][0] = [W, H]  # 1-based / edge annotations put points at x = W
    data["trg_kps"][0] = [0, 0]
    write_json(path, data)
    assert read_spair(spair)[0].src_kps[0].tolist() == [W, H]


@pytest.mark.parametrize("edit, message", [
    (lambda d: d.pop("trg_bndbox"), "missing field.*trg_bndbox"),
    (lambda d: d.update(trg_kps=d["trg_kps"][:2]), "src_kps has 4 keypoints but trg_kps has 2"),
    (lambda d: d.update(category="dog"), "file name says category 'cat'"),
    (lambda d: d.update(src_imsize="big"), "src_imsize must be"),
    (lambda d: d.update(trg_bndbox=[10, 10, 5, 20]), "x2 > x1"),
    (lambda d: d.update(kps_ids=["0"]), "1 kps_ids for 4 keypoints"),
])
def test_malformed_pair_annotation(spair, edit, message):
    path = pair_files(spair)[0]
    data = json.loads(path.read_text())
    edit(data)
    write_json(path, data)
    with pytest.raises(DatasetError, match=message) as info:
        read_spair(spair)
    assert path.name in str(info.value)


def test_unreadable_json(spair):
    path = pair_files(spair)[0]
    path.write_text("{not json")
    with pytest.raises(DatasetError, match=rf"{path.name}: unreadable JSON"):
        read_spair(spair)


def test_eighteen_categories():
    assert len(SPAIR_CATEGORIES) == 18 and list(SPAIR_CATEGORIES) == sorted(SPAIR_CATEGORIES)

"""PF-Pascal reader on a tiny dataset written in the pair-CSV format, and every bad-input error."""

from __future__ import annotations

import pytest
import torch
from correspondence_data import KPS, H, W, mirror_points, write_csv, write_pfpascal

from cleandift.errors import DatasetError
from cleandift.eval.pfpascal import PF_PASCAL_CATEGORIES, read_pfpascal


@pytest.fixture
def pascal(tmp_path):
    return write_pfpascal(tmp_path)


def rewrite(root, rows, header=True, name="test_pairs_pf_pascal.csv"):
    kw = {} if header else {"header": None}
    write_csv(root / name, rows, **kw)


IMAGES = "PF-dataset-PASCAL/JPEGImages"


def good_row(cls=8, src=f"{IMAGES}/2009_001a.jpg", trg=f"{IMAGES}/2009_001b.jpg", kps=KPS, trg_kps=None):
    trg_kps = trg_kps if trg_kps is not None else mirror_points(kps)
    return [src, trg, cls, ";".join(str(p[0]) for p in kps), ";".join(str(p[1]) for p in kps),
            ";".join(str(p[0]) for p in trg_kps), ";".join(str(p[1]) for p in trg_kps)]


def test_reads_the_csv_layout(pascal):
    pairs = read_pfpascal(pascal, "test")
    assert [p.category for p in pairs] == ["cat", "cat", "dog", "dog"]  # class ids 8 and 12 (1-based)
    p = pairs[1]
    assert p.src_image == pascal / "JPEGImages" / "2009_001a.jpg"
    assert p.src_size == (H, W) and p.trg_size == (H, W)  # read from the image headers
    assert torch.equal(p.src_kps, torch.tensor(KPS, dtype=torch.float32))
    assert torch.equal(p.trg_kps, torch.tensor(mirror_points(KPS), dtype=torch.float32))
    assert p.src_bbox is None and p.trg_bbox is None and p.kps_ids is None
    assert p.src_id == "cat/2009_001a" and p.pair_id == "row3"


def test_categories_limit_headerless_and_bare_names(pascal):
    assert len(read_pfpascal(pascal, categories=["dog"])) == 2
    assert len(read_pfpascal(pascal, limit=1)) == 2
    rewrite(pascal, [good_row(src="2009_001a.jpg", trg="2009_001b.jpg")], header=False)
    pairs = read_pfpascal(pascal)
    assert len(pairs) == 1 and pairs[0].trg_image == pascal / "JPEGImages" / "2009_001b.jpg"
    # a CSV given as the split
    write_csv(pascal / "mine.csv", [good_row()])
    assert len(read_pfpascal(pascal, str(pascal / "mine.csv"))) == 1


def test_missing_csv_and_bad_splits(pascal):
    with pytest.raises(DatasetError, match="val_pairs_pf_pascal.csv: pair list not found"):
        read_pfpascal(pascal, "val")
    with pytest.raises(DatasetError, match="no keypoint columns"):
        read_pfpascal(pascal, "trn")
    with pytest.raises(DatasetError, match="unknown PF-Pascal split"):
        read_pfpascal(pascal, "dev")


def test_unknown_category_and_empty_split(pascal):
    with pytest.raises(DatasetError, match="unknown category 'unicorn'.*diningtable"):
        read_pfpascal(pascal, categories=["unicorn"])
    message = "test_pairs_pf_pascal.csv: no pairs for categories sofa.*empty split"
    with pytest.raises(DatasetError, match=message):
        read_pfpascal(pascal, categories=["sofa"])
    rewrite(pascal, [])
    with pytest.raises(DatasetError, match="empty split"):
        read_pfpascal(pascal)


@pytest.mark.parametrize("row, message", [
    (good_row(cls=0), r":2: class must be an integer id 1-20, got '0'"),
    (good_row(cls=21), r":2: class must be an integer id 1-20"),
    (good_row()[:3] + ["1;2", "3", "1;2", "3;4"], r":2: XA/YA have 2 x but 1 y values"),
    (good_row(trg_kps=KPS[:2]), r":2: 4 source but 2 target keypoints"),
    (good_row(trg_kps=[[x, y + 100] for x, y in KPS]), r":2: target keypoint #0 .* outside the 64x48 image"),
    (good_row(src="PF-dataset-PASCAL/JPEGImages/missing.jpg"), r":2: image file not found: .*missing.jpg"),
    (good_row()[:3] + ["a;b", "1;2", "1;2", "1;2"], r":2: XA/YA must be ';'-separated numbers"),
    (good_row()[:5], r":2: expected 7 columns"),
])
def test_bad_rows_name_the_file_and_line(pascal, row, message):
    rewrite(pascal, [row])
    with pytest.raises(DatasetError, match=message) as info:
        read_pfpascal(pascal)
    assert "test_pairs_pf_pascal.csv" in str(info.value)


def test_twenty_categories_in_voc_order():
    assert len(PF_PASCAL_CATEGORIES) == 20
    assert PF_PASCAL_CATEGORIES[7] == "cat" and PF_PASCAL_CATEGORIES[11] == "dog"

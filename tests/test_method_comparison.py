"""The scoring engine behind `benchmarks/mini_comparison.py` and `cleandift demo`."""

import torch

from cleandift.eval.method_comparison import Method, make_eval_set, score_method
from cleandift.eval.warp import WarpConfig
from cleandift.pretrain.probe import knn_top1


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.full((n, 1, 32, 32), -1.0)
    for i, y in enumerate(labels.tolist()):  # class = which third of the image holds a bright bar
        images[i, 0, 4:28, 4 + 8 * y: 12 + 8 * y] = 0.5 + 0.5 * torch.rand(24, 8, generator=g)
    return images, labels


def test_pixel_method_scores_like_pixel_knn_and_is_reproducible():
    train, test = _data(60, 0), _data(30, 1)
    data = make_eval_set(train, test, seed=0, n_bank=45, n_queries=12, n_points=8, warp=WarpConfig())
    pixels = Method("pixels", "clean-t0", 1, lambda x, g: {"px": x.flatten(1)[:, :, None, None]})
    scores = score_method(pixels, data, ["px"], batch=5)
    expected = knn_top1(data.bank.flatten(1), data.bank_labels, data.pairs.source.flatten(1), data.query_labels)
    assert scores.knn["px"] == expected == 1.0  # the bars separate the classes perfectly
    assert scores.seconds_per_image > 0
    again = make_eval_set(train, test, seed=0, n_bank=45, n_queries=12, n_points=8, warp=WarpConfig())
    assert torch.equal(again.pairs.target, data.pairs.target) and torch.equal(again.bank, data.bank)


def test_score_cache_resumes_only_matching_settings_and_survives_a_torn_line(tmp_path):
    from cleandift.eval.method_comparison import ScoreCache, Scores

    path = tmp_path / "scores.jsonl"
    first = Scores(knn={"mid": 0.5}, pck10={"mid": 0.25}, pck05={"mid": 0.125}, seconds_per_image=0.01)
    cache = ScoreCache(path, {"bank": 10})
    cache.put(0, "clean t=0", first)
    with path.open("a") as fh:  # a crash in the middle of the next write
        fh.write('{"fingerprint": "')
    again = ScoreCache(path, {"bank": 10})
    assert len(again) == 1 and again.get(0, "clean t=0") == first and again.get(1, "clean t=0") is None
    again.put(1, "clean t=0", Scores(knn={"mid": 1.0}))  # appended after the torn line, not glued to it
    assert ScoreCache(path, {"bank": 10}).get(1, "clean t=0").knn == {"mid": 1.0}
    assert len(ScoreCache(path, {"bank": 20})) == 0  # other settings: nothing reused

"""The demo can be rerun in its folder, validates sizes first, times fairly, picks taps on validation data and
draws titles that fit (issue 13, item 17). The full runs are in test_demo.py / test_mini_demo.py."""

from __future__ import annotations

import torch
import pytest
from PIL import Image

from cleandift.errors import ConfigError
from cleandift.eval.method_comparison import Method, make_eval_set, pick_best, score_method, score_method_splits
from cleandift.eval.warp import WarpConfig, make_warp_pairs
from cleandift.mini_demo import DEMO_MARKER, check_demo_settings, prepare_out_dir


def test_a_rerun_replaces_the_demos_own_outputs(tmp_path):
    out = tmp_path / "demo"
    prepare_out_dir(out)
    assert (out / DEMO_MARKER).is_file() and (out / "figures").is_dir()
    (out / "distill" / "run" / "checkpoints" / "step-40").mkdir(parents=True)  # what the first run left
    (out / "figures" / "matches_old-name_0.png").write_bytes(b"png")
    prepare_out_dir(out)
    assert not (out / "distill").exists() and list((out / "figures").iterdir()) == []


def test_a_demo_folder_of_the_previous_version_is_recognised(tmp_path):
    out = tmp_path / "demo"
    (out / "distill" / "run").mkdir(parents=True)
    (out / "report.html").write_text("<html>")
    (out / "results.json").write_text("{}")
    prepare_out_dir(out)
    assert not (out / "distill").exists()


def test_folders_the_demo_did_not_write_are_never_deleted(tmp_path):
    out = tmp_path / "mine"
    (out / "distill").mkdir(parents=True)
    (out / "distill" / "precious.txt").write_text("keep")
    with pytest.raises(ConfigError, match="not written by `cleandift demo`"):
        prepare_out_dir(out)
    assert (out / "distill" / "precious.txt").read_text() == "keep"


@pytest.mark.parametrize("bank,queries,steps,message", [
    (1901, 300, 40, "--bank 1901"), (5, 300, 40, "--bank 5"), (1000, 501, 40, "--queries 501"),
    (1000, 0, 40, "--queries 0"), (1000, 300, 0, "--distill-steps 0")])
def test_sizes_the_bundled_data_cannot_serve_are_refused_before_loading(bank, queries, steps, message):
    with pytest.raises(ConfigError, match=message):
        check_demo_settings(bank, queries, steps)
    check_demo_settings(1900, 500, 1)  # the largest allowed


def test_timing_is_a_median_after_a_warm_up_with_methods_taking_turns(monkeypatch):
    """Fake clock. Warm-ups cost 1 s and are not timed; then rounds a, b, a, b, a, b."""
    import cleandift.eval.method_comparison as mc

    now = [0.0]
    calls = []

    def method(name, costs):
        costs = iter(costs)

        def extract(images, g):
            calls.append(name)
            now[0] += next(costs)
            return {}

        return Method(name, "noisy", 1, extract)

    monkeypatch.setattr(mc.time, "perf_counter", lambda: now[0])
    methods = {"a": method("a", [1.0, 0.1, 0.5, 0.2]), "b": method("b", [1.0, 0.4, 0.3, 0.9])}
    seconds = mc.time_methods(methods, torch.zeros(4, 1, 8, 8), repeats=3)
    assert seconds == pytest.approx({"a": 0.2 / 4, "b": 0.4 / 4})
    assert calls == ["a", "b", "a", "b", "a", "b", "a", "b"]


def test_the_tap_is_picked_on_validation_and_reported_on_test():
    assert pick_best({"a": 0.9, "b": 0.5}, {"a": 0.1, "b": 0.8}) == ("a", 0.1)  # not test's best "b"


def _data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 3
    images = torch.full((n, 1, 32, 32), -1.0)
    for i, y in enumerate(labels.tolist()):
        images[i, 0, 4:28, 4 + 8 * y: 12 + 8 * y] = 0.5 + 0.5 * torch.rand(24, 8, generator=g)
    return images, labels


def test_scoring_a_validation_split_leaves_the_test_numbers_unchanged():
    train, test, val = _data(45, 0), _data(12, 1), _data(9, 2)
    data = make_eval_set(train, test, seed=0, n_bank=45, n_queries=12, n_points=8, warp=WarpConfig())

    def noisy(x, g):  # draws from the generator, so the order of splits would matter if it leaked
        return {"px": (x + 0.3 * torch.randn(x.shape, generator=g)).flatten(1)[:, :, None, None]}

    method = Method("noisy pixels", "noisy", 1, noisy)
    alone = score_method(method, data, ["px"], batch=5)
    splits = {"test": (data.pairs, data.query_labels),
              "val": (make_warp_pairs(val[0], WarpConfig(), n_points=8, seed=1), val[1])}
    both = score_method_splits(method, data, splits, ["px"], batch=5)
    assert both["test"].knn == alone.knn and both["test"].pck10 == alone.pck10
    assert set(both) == {"test", "val"}


def test_long_figure_titles_wrap_inside_the_figure_and_above_the_images(tmp_path):
    from cleandift.viz.correspondence import _figure, _title_above, draw_matches

    title = "CleanDIFT (demo run), tap us10: green = within 0.1 x 32 px of the true point  12/16 correct"
    fig, ax = _figure((6, 3.3), 100)
    _title_above(fig, ax, title)
    renderer = fig.canvas.get_renderer()
    text = fig.texts[-1].get_window_extent(renderer)
    assert "\n" in fig.texts[-1].get_text()  # wrapped: one line would be wider than 600 px
    assert 0 <= text.x0 and text.x1 <= 600 and text.y1 <= 330  # all of it on the canvas
    assert ax.get_window_extent(renderer).y1 <= text.y0  # the images start below the title
    img = Image.new("RGB", (256, 256), (90, 90, 90))
    pts = torch.tensor([[10.0, 10.0], [100.0, 120.0]])
    path = draw_matches(img, img, pts, pts, tmp_path / "m.png", gt_xy=pts, threshold=25.6, title=title,
                        figsize=(6, 3.3))
    with Image.open(path) as png:
        assert png.size == (600, 330)  # the exact size is kept

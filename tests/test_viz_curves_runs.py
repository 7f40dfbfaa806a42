"""``viz curves`` keeps runs apart and never drops a point (issue 13, item 18), and labels the naive-clean
baseline by its name (item 20)."""

from __future__ import annotations

import json
import logging

import pytest

from cleandift.cli.main import main
from cleandift.cli.viz import read_curves
from cleandift.errors import ConfigError

KEY = "pck@0.10/bbox/per-point"


def _result(path, t, value, label=None, mode="noisy", **settings):
    record = {"results": {KEY: value},
              "settings": {"preset": "dift-spair", "mode": mode, "t": t, "ensemble": 8, "checkpoint": None,
                           "device": "cpu", **settings}}
    if label:
        record["label"] = label
    path.write_text(json.dumps(record))
    return path


def test_runs_of_one_preset_with_other_settings_stay_apart(tmp_path, caplog):
    """DIFT ens-1 vs ens-8 at the same t: two points, two curves (before: one point, the last file's)."""
    a = _result(tmp_path / "a.json", 261, 0.40, ensemble=1)
    b = _result(tmp_path / "b.json", 261, 0.45, ensemble=8)
    c = _result(tmp_path / "c.json", 100, 0.50, ensemble=8)  # no clash, but ensemble 8 is another run than 1
    with caplog.at_level(logging.WARNING):
        curves, constants, _ = read_curves([a, b, c], KEY)
    assert curves == {"dift-spair (ensemble=1)": ([261.0], [0.40]),
                      "dift-spair (ensemble=8)": ([100.0, 261.0], [0.50, 0.45])}
    assert constants == {}
    assert "drawn separately" in caplog.text


def test_settings_that_do_not_change_values_do_not_split_a_curve(tmp_path):
    files = [_result(tmp_path / f"n{t}.json", t, t / 1000, device=device, chunk_size=chunk)
             for t, device, chunk in ((0, "cpu", 8), (261, "cuda", 2), (500, "cpu", 8))]
    curves, _, _ = read_curves(files, KEY)
    assert curves == {"dift-spair": ([0.0, 261.0, 500.0], [0.0, 0.261, 0.5])}


def test_identical_runs_in_two_files_are_told_apart_by_file(tmp_path):
    a = _result(tmp_path / "first.json", 261, 0.40)
    b = _result(tmp_path / "second.json", 261, 0.41)
    curves, _, _ = read_curves([a, b], KEY)
    assert curves == {"dift-spair [first]": ([261.0], [0.40]), "dift-spair [second]": ([261.0], [0.41])}


def test_a_point_nothing_tells_apart_is_an_error_not_an_overwrite(tmp_path):
    record = {"results": {KEY: 0.4}, "settings": {"preset": "dift-spair", "mode": "noisy", "t": 261}}
    path = tmp_path / "twice.json"
    path.write_text(json.dumps([record, {**record, "results": {KEY: 0.5}}]))
    with pytest.raises(ConfigError, match=r"twice.json: two values for 'dift-spair' at t=261.*--label"):
        read_curves([path], KEY)


def test_explicit_labels_name_the_curves(tmp_path):
    a = _result(tmp_path / "a.json", 261, 0.40, label="DIFT ens 1", ensemble=1)
    b = _result(tmp_path / "b.json", 100, 0.30, label="DIFT ens 1", ensemble=1)
    c = _result(tmp_path / "c.json", 261, 0.45, label="DIFT ens 8")
    curves, _, _ = read_curves([a, b, c], KEY)
    assert curves == {"DIFT ens 1": ([100.0, 261.0], [0.30, 0.40]), "DIFT ens 8": ([261.0], [0.45])}


def test_curves_files_with_the_same_names_keep_every_point(tmp_path):
    for name, values in (("x", [0.5, 0.55]), ("y", [0.6, 0.65])):
        (tmp_path / f"{name}.json").write_text(json.dumps({"curves": {"naive clean": {"t": [0, 261],
                                                                                    "pck": values}},
                                                           "constants": {"TLFR": 0.696}}))
    curves, constants, _ = read_curves([tmp_path / "x.json", tmp_path / "y.json"], KEY)
    assert curves == {"naive clean [x]": ([0.0, 261.0], [0.5, 0.55]), "naive clean [y]": ([0.0, 261.0], [0.6, 0.65])}
    assert constants == {"TLFR [x]": 0.696, "TLFR [y]": 0.696}


def test_clean_mode_without_a_student_is_labelled_naive_clean(tmp_path):
    student = _result(tmp_path / "s.json", 261, 0.61, mode="clean", preset="cleandift-spair", checkpoint="s.pt")
    frozen = _result(tmp_path / "f.json", 261, 0.50, mode="clean", preset="cleandift-spair")
    recorded = json.loads(frozen.read_text())
    tagged = tmp_path / "m.json"
    tagged.write_text(json.dumps({**recorded, "method": "naive-clean"}))
    _, constants, _ = read_curves([student, frozen], KEY)
    assert constants == {"cleandift-spair": 0.61, "naive-clean": 0.50}
    assert read_curves([tagged], KEY)[1] == {"naive-clean": 0.50}


def test_results_of_older_versions_in_percent_are_plotted_as_fractions(tmp_path):
    old = _result(tmp_path / "old.json", 261, 45.0)
    data = json.loads(old.read_text())
    data["protocol"] = {"values": "percent of correct keypoints (0-100)"}
    old.write_text(json.dumps(data))
    new = _result(tmp_path / "new.json", 100, 0.5)
    curves, _, _ = read_curves([old, new], KEY)
    assert curves == {"dift-spair": ([100.0, 261.0], [0.5, 0.45])}


def test_cli_curves_draws_both_runs(tmp_path, capsys):
    a = _result(tmp_path / "a.json", 261, 0.40, ensemble=1)
    b = _result(tmp_path / "b.json", 261, 0.45, ensemble=8)
    assert main(["viz", "curves", str(a), str(b), "--out", str(tmp_path / "c.png")]) == 0
    assert capsys.readouterr().out.strip().endswith("c.png")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"curves": {"x": {"t": [0, 1], "pck": [0.1]}}}))
    assert main(["viz", "curves", str(bad), "--out", str(tmp_path / "d.png")]) == 2
    assert "1 values" in capsys.readouterr().err

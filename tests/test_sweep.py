"""Timestep sweep: which extractors it builds, the table / plot, a kNN task on the tiny SD model, the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cleandift.analysis.sweep import SweepResult, SweepRow, TaskScorer, make_task_scorer, timestep_sweep
from cleandift.extract import CleanExtractor, NoisyExtractor


def write_image_folder(root, splits=("train", "val"), classes=((200, 30, 30), (30, 60, 210)), seed=0):
    rng = np.random.default_rng(seed)
    for split in splits:
        for c, colour in enumerate(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True, exist_ok=True)
            arr = np.clip(np.array(colour) + rng.normal(0, 20, (48, 56, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(folder / "0.png")
    return root


def test_sweep_builds_noisy_clean_and_naive_extractors(tiny_backbone):
    student = object()  # never run: the scorer only records what it is given
    seen = []

    def score(extractor) -> float:
        seen.append(extractor)
        return float(len(seen))

    result = timestep_sweep(score, tiny_backbone, [50, 700], student=student, student_timestep=250.0, ensemble=3,
                            progress=False)
    assert [(r.method, r.t, r.ensemble) for r in result.rows] == [
        ("noisy", 50, 3), ("noisy", 700, 3), ("clean", None, None), ("naive-clean", 50, None),
        ("naive-clean", 700, None)]
    noisy, clean, naive = seen[:2], seen[2], seen[3:]
    assert all(isinstance(e, NoisyExtractor) for e in noisy)
    assert [(e.t, e.ensemble) for e in noisy] == [(50, 3), (700, 3)]
    assert isinstance(clean, CleanExtractor) and clean.student is student and clean.timestep == 250.0
    assert all(isinstance(e, CleanExtractor) and e.student is tiny_backbone.unet for e in naive)
    assert [e.timestep for e in naive] == [50.0, 700.0]
    assert result.metric == "score" and result.best("noisy").t == 700  # higher is better by default

    no_extras = timestep_sweep(score, tiny_backbone, [10], naive_clean=False, progress=False)
    assert [r.method for r in no_extras.rows] == ["noisy"]


def test_sweep_runs_the_tiny_model_with_a_generic_score(tiny_backbone):
    images = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def score(extractor) -> float:
        feats = extractor(images, taps="us6", generator=torch.Generator().manual_seed(1)) \
            if isinstance(extractor, NoisyExtractor) else extractor(images, taps="us6")
        return float(feats["us6"].norm())

    result = timestep_sweep(score, tiny_backbone, [0, 999], student=tiny_backbone.unet, progress=False)
    assert len(result.rows) == 5 and all(np.isfinite(r.score) and r.score > 0 for r in result.rows)
    clean = result.by_method("clean")[0].score
    naive_261 = score(CleanExtractor(tiny_backbone, unet=tiny_backbone.unet, timestep=261))
    assert clean == pytest.approx(naive_261, rel=1e-5)  # same weights, same t: the student row is that extractor


def test_sweep_result_table_and_plot(tmp_path):
    rows = [SweepRow("noisy", 0, 1, 0.6), SweepRow("noisy", 300, 1, 0.45), SweepRow("noisy", 600, 1, 0.5),
            SweepRow("clean", None, None, 0.44), SweepRow("naive-clean", 0, None, 0.7),
            SweepRow("naive-clean", 300, None, 0.8)]
    result = SweepResult("rmse", False, rows, {"ts": [0, 300, 600]})
    assert result.best("noisy").t == 300  # lower is better for RMSE
    assert result.best("naive-clean").t == 0
    data = result.to_dict()
    assert data["best_noisy"]["t"] == 300 and len(data["rows"]) == 6
    result.save_csv(tmp_path / "s.csv")
    assert (tmp_path / "s.csv").read_text().splitlines()[:2] == ["method,t,ensemble,rmse", "noisy,0,1,0.6"]
    assert Image.open(result.plot(tmp_path / "s.png")).size[0] > 100


def test_knn_task_scorer_on_the_tiny_model(tmp_path, tiny_backbone):
    root = write_image_folder(tmp_path / "data")
    from cleandift.eval.probe_common import FeatureSpec

    scorer = make_task_scorer("knn", root, spec=FeatureSpec(taps="us6", size=64), progress=False)
    assert isinstance(scorer, TaskScorer) and scorer.metric == "top1" and scorer.higher_is_better
    result = timestep_sweep(scorer, tiny_backbone, [500], naive_clean=False, progress=False)
    assert result.metric == "top1" and len(result.rows) == 1
    assert 0.0 <= result.rows[0].score <= 1.0
    assert scorer.details[0]["num_samples"] == 2
    with pytest.raises(ValueError, match="unknown task"):
        make_task_scorer("pose", root)


def test_cli_sweep(tmp_path, tiny_backbone, tiny_pipeline_dir):
    from safetensors.torch import save_file

    from cleandift.cli.main import main

    root = write_image_folder(tmp_path / "data")
    ckpt = tmp_path / "student_unet.safetensors"
    save_file({k: v.contiguous() for k, v in tiny_backbone.unet.state_dict().items()}, str(ckpt))
    out = tmp_path / "sweep"
    code = main(["analyze", "sweep", "--task", "knn", "--root", str(root), "--model", str(tiny_pipeline_dir),
                 "--checkpoint", str(ckpt), "--device", "cpu", "--ts", "500", "--size", "64", "--k", "1",
                 "--out", str(out), "--no-progress"])
    assert code == 0
    data = json.loads((out / "sweep.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["noisy", "clean", "naive-clean"]
    assert data["metric"] == "top1" and data["config"]["task"] == "knn"
    assert (out / "sweep.png").is_file() and (out / "sweep.csv").is_file()
    assert main(["analyze", "sweep", "--task", "seg", "--root", str(tmp_path / "missing"),
                 "--model", str(tiny_pipeline_dir), "--out", str(out)]) == 2

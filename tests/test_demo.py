"""The README's first command: ``cleandift demo`` runs offline end to end and writes its outputs."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from cleandift.backbones.pixel import bundled_mini_available
from cleandift.cli.main import main


@pytest.mark.slow
def test_demo_runs_offline_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "demo"
    # smaller bank / query set / distillation than the defaults, to keep CI short; the code path is the same
    assert main(["demo", "--out", str(out), "--bank", "500", "--queries", "150", "--distill-steps", "10"]) == 0
    printed = capsys.readouterr().out
    if not bundled_mini_available():  # an install without the shipped model: the random-weight plumbing demo
        assert str(out.resolve()) in printed
        assert len(list(out.glob("*.png"))) >= 2
        return
    assert str((out / "report.html").resolve()) in printed
    table = {row["method"]: row for row in json.loads((out / "results.json").read_text())["table"]}
    clean, dift1 = table["CleanDIFT"], table["DIFT t=261, 1 draw"]  # the shipped student, not the demo's own
    assert table["DIFT t=261, 8 draws"]["passes"] == 8 and clean["passes"] == 1
    # the method's claim on the shipped weights: one clean pass beats a noisy pass at DIFT's timestep
    assert clean["pck10"] > dift1["pck10"] + 0.05
    assert clean["knn"] > table["raw pixels / nothing moves"]["knn"]
    assert table["raw pixels / nothing moves"]["pck10"] <= 0.3  # the warps are strong
    page = (out / "report.html").read_text()
    assert "is the shipped, fully trained student" in page and "not the 10-step run" in page
    assert "median of 5" in page and "validation set" in page
    pngs = sorted((out / "figures").glob("*.png"))
    assert len(pngs) >= 10
    for png in pngs:
        with Image.open(png) as img:
            assert img.size[0] > 0

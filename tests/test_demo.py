"""The README's first command: ``cleandift demo`` runs offline end to end and writes its outputs."""

from __future__ import annotations

import pytest
from PIL import Image

from cleandift.cli.main import main


@pytest.mark.slow
def test_demo_runs_offline_and_writes_figures(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out.resolve()) in printed
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert len(pngs) >= 2
    for name in pngs:
        with Image.open(out / name) as img:
            assert img.size[0] > 0

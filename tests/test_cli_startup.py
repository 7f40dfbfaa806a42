"""Issue 13 item 15: ``cleandift --help`` must not import the heavy stack (it took ~4-5 s when it did).

Checked by module presence, not by timing: a subprocess builds the parser, asks every (sub)command for
``--help`` and reports which heavy packages ended up in ``sys.modules``.
"""

from __future__ import annotations

import json
import subprocess
import sys

HEAVY = ("torch", "diffusers", "transformers", "accelerate", "matplotlib", "numpy", "PIL", "safetensors")

_PROBE = r"""
import argparse, contextlib, io, json, sys

from cleandift.cli.main import build_parser, main


def command_paths(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield prefix + (name,)
                yield from command_paths(sub, prefix + (name,))


heavy = sys.argv[1].split(",")
paths = [()] + sorted(set(command_paths(build_parser())))
report = {}
for path in paths:
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.suppress(SystemExit):
        main([*path, "--help"])
    report[" ".join(path) or "(top)"] = {"helped": "usage: cleandift" in out.getvalue(),
                                         "heavy": sorted(m for m in heavy if m in sys.modules)}
print(json.dumps(report))
"""


def _help_report() -> dict:
    proc = subprocess.run([sys.executable, "-c", _PROBE, ",".join(HEAVY)], capture_output=True, text=True,
                          timeout=120, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_help_of_every_command_imports_no_heavy_package():
    report = _help_report()
    # every registered command (and nested task) answered --help
    for command in ("(top)", "demo", "extract", "train", "pretrain-mini", "eval", "eval knn", "eval spair",
                    "analyze", "analyze sweep", "viz", "viz pca", "convert", "env"):
        assert command in report, sorted(report)
    assert all(entry["helped"] for entry in report.values()), report
    loaded = {command: entry["heavy"] for command, entry in report.items() if entry["heavy"]}
    assert loaded == {}, f"--help imported heavy packages: {loaded}"


def test_import_cleandift_is_lazy_but_complete():
    code = ("import sys, cleandift; before = 'torch' in sys.modules; "
            "missing = [n for n in cleandift.__all__ if not hasattr(cleandift, n)]; "
            "print(before, missing, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.split() == ["False", "[]", "True"]


def test_cleandift_unknown_attribute_raises_attribute_error():
    import cleandift

    try:
        cleandift.no_such_name  # noqa: B018
    except AttributeError as exc:
        assert "no_such_name" in str(exc)
    else:  # pragma: no cover
        raise AssertionError("expected AttributeError")


def test_light_constants_match_the_modules_that_use_them():
    """The CLI's torch-free copies of argparse choices must equal the run-time definitions."""
    import torch

    from cleandift import constants
    from cleandift.backbones.pixel import FASHION_MNIST_CLASSES
    from cleandift.cli.common import DTYPES
    from cleandift.eval.pooling import READOUTS
    from cleandift.images import RESIZE_POLICIES
    from cleandift.pretrain.idx import DEFAULT_DATA_DIR
    from cleandift.pretrain.train import PretrainConfig
    from cleandift.train.config import OPTIMIZERS

    assert constants.RESIZE_POLICIES == RESIZE_POLICIES
    assert constants.READOUTS == READOUTS
    assert constants.OPTIMIZERS == OPTIMIZERS
    assert constants.FASHION_MNIST_CLASSES == FASHION_MNIST_CLASSES
    assert constants.FASHION_MNIST_DIR == str(DEFAULT_DATA_DIR) == PretrainConfig().data
    assert dict(DTYPES) == {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16,
                            "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16}

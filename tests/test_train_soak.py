"""Soak test (issue 13): SIGKILL a tiny `cleandift train` at random points, checkpoint writes included,
resume each time, and end bit-identical to an uninterrupted run.

The run is a subprocess started through a small driver that announces every checkpoint file write,
rename and optimizer step on stdout (then pauses 20 ms), so a kill can be aimed at a random one of
those moments -- most of them inside a checkpoint write.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
import textwrap
import time

import pytest
import torch
from image_folders import write_random_images

STEPS = 5
KILLS = 6

_DRIVER = textwrap.dedent('''
    import os, sys, time
    import torch
    torch.set_num_threads(1)
    import cleandift.train.loop as loop
    from cleandift.train import run_state

    def announce(label, fn):
        def wrapper(*args, **kwargs):
            where = os.fspath(args[0]) if label != "step" else ""
            print(f"EVENT {label} {os.path.basename(os.path.dirname(where))}/{os.path.basename(where)}", flush=True)
            time.sleep(0.02)
            return fn(*args, **kwargs)
        return wrapper

    run_state.write_tensors = announce("write", run_state.write_tensors)
    run_state.write_json = announce("write", run_state.write_json)
    os.replace = announce("rename", os.replace)
    loop.train_step = announce("step", loop.train_step)
    from cleandift.cli.main import main
    sys.exit(main(sys.argv[1:]))
''')


def _images(folder, n: int = 5):
    return write_random_images(folder, n)


def _load(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.slow
def test_sigkill_at_random_points_then_resume_is_bit_identical(tiny_pipeline_dir, tiny_backbone, tmp_path):
    from cleandift.train import TrainConfig, train

    data = _images(tmp_path / "data")
    driver = tmp_path / "driver.py"
    driver.write_text(_DRIVER)
    run = tmp_path / "killed"
    args = [sys.executable, str(driver), "train", "--model", str(tiny_pipeline_dir), "--data", str(data),
            "--out", str(run), "--size", "64", "--max-steps", str(STEPS), "--checkpoint-every", "1", "--workers", "0",
            "--taps", "mid,us6", "--device", "cpu", "--val-images", "0", "--val-every", "0", "--batch-size", "1",
            "--warmup-steps", "1", "--lr", "1e-3", "--seed", "3", "--keep-checkpoints", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    rng = random.Random(13)
    kills: list[str] = []
    start = time.perf_counter()
    for attempt in range(KILLS + 3):
        resume = ["--resume"] if (run / "checkpoints").is_dir() and any((run / "checkpoints").glob("step-*")) else []
        target = rng.randint(1, 14) if len(kills) < KILLS else None  # ~13 events per step
        log = open(tmp_path / f"stderr-{attempt}.txt", "w")
        proc = subprocess.Popen(args + resume, stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        events = 0  # counted from this run's first optimizer step: every run makes some progress
        for line in proc.stdout:
            if line.startswith("EVENT step") or events and line.startswith("EVENT"):
                events += 1
                if events == target:
                    proc.kill()  # SIGKILL
                    kills.append(line.split(" ", 1)[1].strip())
                    break
        proc.stdout.close()
        rc = proc.wait()
        log.close()
        if target is None or events < target:  # ran to the end
            assert rc == 0, (tmp_path / f"stderr-{attempt}.txt").read_text()[-3000:]
            break
        assert rc == -9
    else:
        pytest.fail("the run never finished")
    seconds = time.perf_counter() - start
    during_writes = [k for k in kills if k.startswith(("write .tmp-step", "rename .tmp-step", "rename checkpoints"))]
    print(f"{len(kills)} SIGKILLs survived ({len(during_writes)} during checkpoint writes) in {seconds:.1f} s: {kills}")
    assert len(kills) >= 5 and len(during_writes) >= 3

    reference = tmp_path / "straight"
    config = TrainConfig(data=str(data), out=str(reference), size=64, max_steps=STEPS, checkpoint_every=STEPS,
                         workers=0, taps="mid,us6", val_images=0, val_every=0, batch_size=1, warmup_steps=1, lr=1e-3,
                         seed=3, model=str(tiny_pipeline_dir), device="cpu")
    train(config, backbone=tiny_backbone, progress=False)
    final = f"checkpoints/step-{STEPS:07d}"
    for name in ("model.safetensors", "optimizer.safetensors"):
        a, b = _load(run / final / name), _load(reference / final / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert (run / "export" / "heads.safetensors").read_bytes() == (reference / "export" / "heads.safetensors").read_bytes()
    with open(run / "train_log.csv") as f:
        assert [row.split(",")[0] for row in f.read().splitlines()[1:]] == [str(s) for s in range(1, STEPS + 1)]
    leftovers = [p.name for p in (run / "checkpoints").iterdir() if "tmp" in p.name]
    assert not leftovers

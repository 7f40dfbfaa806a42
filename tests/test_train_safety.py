"""Training safety (issue 13): resume never unpickles, NaN stops the run, signals checkpoint, damaged
checkpoints fall back, changed settings are refused, disk-full saves leave nothing behind, fp16 on CPU.

Every payload is generated here, in tmp dirs: a pickle whose ``__reduce__`` creates a marker file.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import multiprocessing
import os
import pickle
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch

from cleandift.errors import CleanDIFTError, ConfigError
from cleandift.train import run_state
from cleandift.train.config import TrainConfig, replace, resolve_config
from cleandift.train.run_state import CheckpointWriteError, verify
from image_folders import write_random_images


# ---------------------------------------------------------------------------------------------- helpers
def _images(folder, n: int = 5):
    return write_random_images(folder, n)


def _config(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), size=64, batch_size=1, max_steps=3, workers=0, taps="mid,us6",
                lr=1e-3, warmup_steps=1, val_every=0, checkpoint_every=1, keep_checkpoints=3, val_images=0,
                export=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _ckpt(run, step: int):
    return run / "checkpoints" / f"step-{step:07d}"


def _tensors(folder, name):
    from safetensors.torch import load_file

    return load_file(str(folder / name))


def _assert_same_state(a, b):
    """Bit-identical weights and Adam state."""
    for name in ("model.safetensors", "optimizer.safetensors"):
        x, y = _tensors(a, name), _tensors(b, name)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), f"{name}:{k} differs"


@pytest.fixture(scope="module")
def straight(tiny_backbone, tmp_path_factory):
    """An uninterrupted 3-step run with a checkpoint after every step (kept): the reference."""
    from cleandift.train import train

    root = tmp_path_factory.mktemp("straight")
    data = _images(root / "data")
    result = train(_config(data, root / "run"), backbone=tiny_backbone, progress=False)
    assert result.step == 3
    return data, root / "run"


def _copy_run(run, dest, steps=(1, 2, 3)):
    """A copy of a run folder with the checkpoints of ``steps``; big tensor files are hard links (cheap), so
    tests must replace files, never modify them in place (:func:`_rewrite`)."""
    dest.mkdir(parents=True)
    for path in run.iterdir():
        if path.is_file():
            shutil.copy2(path, dest / path.name)
    for step in steps:
        link = lambda src, dst: os.link(src, dst) if src.endswith(".safetensors") else shutil.copy2(src, dst)
        shutil.copytree(_ckpt(run, step), _ckpt(dest, step), copy_function=link)
    return dest


def _rewrite(path, data: bytes) -> None:
    path.unlink(missing_ok=True)
    path.write_bytes(data)


# ---------------------------------------------------------------------------------------------- 1: no pickle
class _Payload:
    """Unpickling this creates ``marker``: proof that foreign code ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _payloads(marker) -> dict[str, bytes]:
    buffer = io.BytesIO()
    torch.save({"state": _Payload(marker)}, buffer)
    return {"pickle": pickle.dumps(_Payload(marker)), "torch": buffer.getvalue()}


def test_payloads_are_live(tmp_path):
    """The payloads do run when unpickled: their absence later is meaningful."""
    for kind, blob in _payloads(tmp_path / "ran").items():
        (tmp_path / "ran").unlink(missing_ok=True)
        if kind == "pickle":
            pickle.loads(blob)
        else:
            torch.load(io.BytesIO(blob), weights_only=False)
        assert (tmp_path / "ran").exists(), kind


# accelerate's save_state names (the old format) and other names a loader might try
_FOREIGN_NAMES = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl", "random_states_1.pkl",
                  "optimizer.bin", "scheduler.bin", "sampler.bin", "scaler.pt", "pytorch_model.bin", "model.bin",
                  "model.pt", "optimizer.pt", "scheduler.pt", "trainer_state.pt", "rng_state.pth", "training_args.bin")
_OWN_NAMES = ("model.safetensors", "optimizer.safetensors", "optimizer.json", "scheduler.json", "trainer.json",
              "rng-0.safetensors", "rng-0.json", "manifest.json")


def test_resume_never_unpickles_planted_payloads(straight, tiny_backbone, tmp_path):
    from cleandift.cli.main import main
    from cleandift.train import train

    data, run = straight
    marker = tmp_path / "PAYLOAD_RAN"
    blobs = _payloads(marker)
    planted = 0

    # (a) foreign pickles in every checkpoint folder and in checkpoints/: ignored, the resume works
    work = _copy_run(run, tmp_path / "a")
    for folder in (work / "checkpoints", *[_ckpt(work, s) for s in (1, 2, 3)]):
        for name in _FOREIGN_NAMES:
            _rewrite(folder / name, blobs["torch" if name.endswith((".pt", ".pth", ".bin")) else "pickle"])
            planted += 1
    result = train(_config(data, work, max_steps=4), backbone=tiny_backbone, resume=True, progress=False)
    assert result.step == 4 and not marker.exists()

    # (b) every file our format reads, replaced by a payload -- also with a forged manifest that matches it
    for name in _OWN_NAMES:
        for kind, blob in blobs.items():
            for forge in (False, True):
                case = _copy_run(run, tmp_path / f"b-{name}-{kind}-{forge}", steps=(3,))  # nothing to fall back to
                folder = _ckpt(case, 3)
                _rewrite(folder / name, blob)
                planted += 1
                if forge and name != "manifest.json":
                    manifest = json.loads((folder / "manifest.json").read_text())
                    manifest["files"][name] = {"bytes": len(blob), "sha256": run_state.sha256_file(folder / name)}
                    _rewrite(folder / "manifest.json", json.dumps(manifest).encode())
                with pytest.raises(CleanDIFTError):
                    train(_config(data, case, max_steps=4), backbone=tiny_backbone, resume=True, progress=False)
                assert not marker.exists(), (name, kind, forge)

    # (c) a checkpoint in accelerate's old pickle layout (no manifest) is refused by name, never loaded
    old = tmp_path / "old"
    folder = old / "checkpoints" / "step-0000002"
    folder.mkdir(parents=True)
    shutil.copy(_ckpt(run, 2) / "model.safetensors", folder / "model.safetensors")
    for name in ("custom_checkpoint_0.pkl", "random_states_0.pkl", "optimizer.bin", "scheduler.bin"):
        (folder / name).write_bytes(blobs["torch" if name.endswith(".bin") else "pickle"])
        planted += 1
    with pytest.raises(ConfigError, match="pickle-based save_state.*never loaded"):
        train(_config(data, old), backbone=tiny_backbone, resume=True, progress=False)
    with pytest.raises(ConfigError, match="pickle"):
        train(_config(data, old), backbone=tiny_backbone, resume=str(folder), progress=False)

    # (d) the CLI reads RUN_DIR/config.yaml on --resume: a payload there is an error, not code
    cli = _copy_run(run, tmp_path / "cli")
    _rewrite(cli / "config.yaml", blobs["pickle"])
    planted += 1
    assert main(["train", "--out", str(cli), "--resume", "--device", "cpu"]) == 2
    assert not marker.exists()
    print(f"planted {planted} payload files, executed 0")
    assert planted >= 90


# ---------------------------------------------------------------------------------------------- 2: NaN / inf
def test_nonfinite_loss_stops_keeps_last_good_checkpoint_and_exports_nothing(tiny_backbone, tmp_path, capsys):
    from cleandift.cli.main import main
    from cleandift.train import train
    from cleandift.train.loop import TrainingDivergedError

    data = _images(tmp_path / "data")
    run = tmp_path / "run"
    with pytest.raises(TrainingDivergedError) as info:  # lr 1e6: the loss is NaN at step 3 on this tiny model
        train(_config(data, run, lr=1e6, max_steps=6, keep_checkpoints=1, export=True), backbone=tiny_backbone,
              progress=False)
    err = info.value
    message = str(err)
    assert err.step == 3 and err.what == "loss" and "\n" not in message
    assert message.startswith("step 3: the loss is nan") and "learning rate is too high (lr 1e+06)" in message
    assert "step-0000002 is kept" in message and "nothing was exported" in message
    assert [p.name for p in (run / "checkpoints").iterdir() if p.is_dir()] == ["step-0000002"]  # not replaced
    verify(_ckpt(run, 2))
    assert all(torch.isfinite(v).all() for v in _tensors(_ckpt(run, 2), "model.safetensors").values())
    assert not (run / "export").exists()

    # the same through the CLI: one line on stderr, exit 2, nothing exported
    cli_run = tmp_path / "cli"
    args = ["train", "--model", "unused", "--data", str(data), "--out", str(cli_run), "--size", "64", "--lr", "1e6",
            "--max-steps", "6", "--workers", "0", "--taps", "mid,us6", "--device", "cpu", "--val-images", "0",
            "--val-every", "0", "--batch-size", "1", "--warmup-steps", "1", "--seed", "1"]
    import cleandift.train.loop as loop

    original = loop.load_training_backbone
    loop.load_training_backbone = lambda config, device: tiny_backbone
    try:
        assert main(args) == 2
    finally:
        loop.load_training_backbone = original
    printed = capsys.readouterr()
    lines = [line for line in printed.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "step 3: the loss is nan" in lines[0]
    assert "trained" not in printed.out and not (cli_run / "export").exists()


def test_nonfinite_gradient_and_weights_are_caught(tiny_backbone, tmp_path, monkeypatch):
    import cleandift.train.loop as loop
    from cleandift.train import train
    from cleandift.train.loop import TrainingDivergedError

    data = _images(tmp_path / "data")
    original = loop.build_aligner

    def inf_grad_aligner(*args, **kwargs):  # a finite loss whose gradient overflows
        aligner = original(*args, **kwargs)
        aligner.timestep.register_hook(lambda g: torch.full_like(g, float("inf")))
        return aligner

    monkeypatch.setattr(loop, "build_aligner", inf_grad_aligner)
    with pytest.raises(TrainingDivergedError, match=r"step 1: the gradient norm is inf.*no checkpoint had been"):
        train(_config(data, tmp_path / "g"), backbone=tiny_backbone, progress=False)
    assert not (tmp_path / "g" / "checkpoints").exists()
    monkeypatch.setattr(loop, "build_aligner", original)

    # weights poisoned after the last step's (finite) checkpoint: the export refuses them
    holder = {}
    monkeypatch.setattr(loop, "build_aligner", lambda *a, **k: holder.setdefault("aligner", original(*a, **k)))

    def poison(step, logs):
        if step == 2:
            with torch.no_grad():
                holder["aligner"].adapters["us6"].layers[0].norm.linear.weight.fill_(float("nan"))

    with pytest.raises(TrainingDivergedError, match=r"step 2: the weights is not finite in 1 tensor"):
        train(_config(data, tmp_path / "w", max_steps=2, export=True), backbone=tiny_backbone, callbacks=[poison],
              progress=False)
    assert not (tmp_path / "w" / "export").exists()
    verify(_ckpt(tmp_path / "w", 2))  # written before the poisoning, finite


@pytest.mark.parametrize("flags, message", [
    (["--lr", "nan"], "lr must be a finite number > 0, got nan"),
    (["--lr", "inf"], "lr must be a finite number > 0, got inf"),
    (["--lr", "0"], "lr must be a finite number > 0, got 0.0"),
    (["--lr=-1e-4"], "lr must be a finite number > 0, got -0.0001"),
    (["--dtype", "fp16", "--device", "cpu"], "--dtype fp16 needs a GPU"),
])
def test_bad_float_flags_and_fp16_on_cpu_fail_before_loading(tmp_path, capsys, flags, message):
    from cleandift.cli.main import main

    data = _images(tmp_path / "data", 2)
    args = ["train", "--model", "no/such-model", "--data", str(data), "--out", str(tmp_path / "run"), *flags]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err  # not a model-loading error
    assert not (tmp_path / "run").exists()


def test_float_settings_are_validated(tmp_path):
    for key, value in (("adam_eps", float("nan")), ("adam_beta1", 1.0), ("adam_beta2", float("inf")),
                       ("weight_decay", -0.1), ("max_grad_norm", float("nan")), ("timestep_init", float("inf"))):
        with pytest.raises(ConfigError, match=f"{key} must be a finite number"):
            TrainConfig(**{key: value})
    yaml_file = tmp_path / "x.yaml"
    yaml_file.write_text("lr: .nan\n")
    with pytest.raises(ConfigError, match="lr must be a finite number"):
        resolve_config(yaml_file, {})


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a CPU-only torch")
def test_cuda_and_fp16_on_a_cpu_only_torch_are_refused(tmp_path):
    from cleandift.train import train
    from cleandift.train.loop import check_run

    data = _images(tmp_path / "data", 2)
    with pytest.raises(ConfigError, match="--dtype fp16 needs a GPU"):
        train(_config(data, tmp_path / "r", dtype="fp16", model="no/such-model"))
    with pytest.raises(ConfigError, match="--dtype fp16 needs a GPU"):
        check_run(_config(data, tmp_path / "r", dtype="fp16", model="no/such-model"))
    with pytest.raises(ConfigError, match="--device cuda: this torch build has no usable CUDA"):
        train(_config(data, tmp_path / "r", device="cuda", model="no/such-model"))


# ---------------------------------------------------------------------------------------------- 3: signals
def test_stop_on_signals_records_first_and_second_sigint_interrupts():
    from cleandift.signals import STOP_SIGNALS, exit_code, stop_on_signals

    before = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    with stop_on_signals() as stop:
        assert not stop.requested
        os.kill(os.getpid(), signal.SIGHUP)
        assert stop.signum == signal.SIGHUP and stop.name == "SIGHUP"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in STOP_SIGNALS} == before
    assert (exit_code(signal.SIGINT), exit_code(signal.SIGTERM), exit_code(signal.SIGHUP)) == (130, 143, 129)


def test_sigterm_finishes_the_step_checkpoints_and_resumes_exactly(straight, tiny_backbone, tmp_path):
    from cleandift.train import train

    data, reference = straight
    run = tmp_path / "run"

    def term(step, logs):
        if step == 2:
            workers = multiprocessing.active_children()
            assert len(workers) == 1
            # a scheduler signals the whole process group, DataLoader worker included: it must not die of it
            # (sent by another process: torch's worker quietly exits on a SIGTERM from its parent only)
            pids = [workers[0].pid, os.getpid()]
            subprocess.run([sys.executable, "-c", f"import os, signal\nfor p in {pids}: os.kill(p, signal.SIGTERM)"],
                           check=True)

    # checkpoint_every=0: only the signal makes step 2 saved (else the next save would be the last step)
    result = train(_config(data, run, checkpoint_every=0, export=True, workers=1), backbone=tiny_backbone,
                   callbacks=[term], progress=False)
    assert (result.stopped_by, result.step, result.export_dir) == (signal.SIGTERM, 2, None)
    assert result.checkpoint == _ckpt(run, 2) and (run / "checkpoints" / "latest").read_text() == "step-0000002"
    assert not (run / "export").exists()
    resumed = train(_config(data, run, checkpoint_every=0), backbone=tiny_backbone, resume=True, progress=False)
    assert resumed.step == 3 and resumed.stopped_by is None
    _assert_same_state(_ckpt(run, 3), _ckpt(reference, 3))


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGHUP, 129), (signal.SIGTERM, 143)])
def test_cli_exits_with_128_plus_signal_after_checkpointing(tiny_pipeline_dir, tmp_path, capsys, monkeypatch,
                                                            signum, code):
    import cleandift.train.loop as loop
    from cleandift.cli.main import main

    original = loop.train_step

    def step_then_signal(*args, **kwargs):
        out = original(*args, **kwargs)
        if args[4].step == 1:  # state
            os.kill(os.getpid(), signum)  # arrives in the middle of the loop's work
        return out

    monkeypatch.setattr(loop, "train_step", step_then_signal)
    data = _images(tmp_path / "data", 3)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_pipeline_dir), "--data", str(data), "--out", str(out), "--size", "64",
            "--max-steps", "3", "--workers", "0", "--taps", "mid,us6", "--device", "cpu", "--val-images", "0",
            "--val-every", "0", "--batch-size", "1", "--checkpoint-every", "0"]
    assert main(args) == code
    printed = capsys.readouterr().out
    assert f"stopped by {signal.Signals(signum).name} after step 1/3" in printed and "--resume" in printed
    verify(_ckpt(out, 1))
    assert not (out / "export").exists()


def test_signal_during_a_checkpoint_write_is_handled_after_it(straight, tiny_backbone, tmp_path, monkeypatch):
    from cleandift.train import train

    data, _ = straight
    original = run_state.write_json
    calls = []

    def write_json(path, obj):
        if path.name == "optimizer.json" and not calls:
            calls.append(path)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(path, obj)

    monkeypatch.setattr(run_state, "write_json", write_json)
    result = train(_config(data, tmp_path / "run", max_steps=5), backbone=tiny_backbone, progress=False)
    assert (result.stopped_by, result.step) == (signal.SIGTERM, 1)
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir() if p.is_dir()] == ["step-0000001"]
    verify(_ckpt(tmp_path / "run", 1))


# ---------------------------------------------------------------------------------------------- 4: integrity
def _flip(path):
    raw = bytearray(path.read_bytes())
    at = len(raw) // 2
    raw[at:at + 64] = bytes(b ^ 0xFF for b in raw[at:at + 64])  # same size, 64 bytes flipped
    _rewrite(path, bytes(raw))


_DAMAGE = {
    "flip": (lambda f: _flip(f / "model.safetensors"), "model.safetensors fails its sha256 checksum"),
    "truncate": (lambda f: _rewrite(f / "optimizer.safetensors", (f / "optimizer.safetensors").read_bytes()[:100]),
                 "optimizer.safetensors is 100 bytes but"),
    "empty": (lambda f: _rewrite(f / "trainer.json", b""), "trainer.json is empty (0 bytes)"),
    "missing": (lambda f: (f / "rng-0.safetensors").unlink(), "rng-0.safetensors is missing"),
    "no-manifest": (lambda f: (f / "manifest.json").unlink(), "manifest.json is missing"),
}


@pytest.mark.parametrize("kind", sorted(_DAMAGE))
def test_damaged_newest_checkpoint_falls_back_to_intact_one(straight, tiny_backbone, tmp_path, caplog, kind):
    from cleandift.train import train

    data, reference = straight
    run = _copy_run(reference, tmp_path / "run")
    damage, problem = _DAMAGE[kind]
    damage(_ckpt(run, 3))
    with caplog.at_level(logging.WARNING):
        result = train(_config(data, run), backbone=tiny_backbone, resume=True, progress=False)
    warnings = caplog.text
    assert f"checkpoint step-0000003 is damaged: {problem}" in warnings
    assert "resuming from step-0000002, the newest intact checkpoint" in warnings
    assert "moved step-0000003 aside to damaged-step-0000003" in warnings
    assert result.step == 3 and (run / "checkpoints" / "damaged-step-0000003").is_dir()
    _assert_same_state(_ckpt(run, 3), _ckpt(reference, 3))  # step 3 redone from step 2, bit-identical


def test_no_intact_checkpoint_or_damaged_explicit_one_is_refused(straight, tiny_backbone, tmp_path):
    from cleandift.train import train

    data, reference = straight
    run = _copy_run(reference, tmp_path / "run")
    _flip(_ckpt(run, 3) / "model.safetensors")
    with pytest.raises(ConfigError, match=r"--resume .*step-0000003: model.safetensors fails its sha256"):
        train(_config(data, run), backbone=tiny_backbone, resume=str(_ckpt(run, 3)), progress=False)
    for step in (1, 2):
        _rewrite(_ckpt(run, step) / "optimizer.safetensors", b"")
    with pytest.raises(ConfigError, match=r"no intact checkpoint in .*step-0000003: model.safetensors fails.*"
                                          r"step-0000002: optimizer.safetensors is empty"):
        train(_config(data, run), backbone=tiny_backbone, resume=True, progress=False)


def test_explicit_older_checkpoint_supersedes_newer_ones(straight, tiny_backbone, tmp_path):
    from cleandift.train import train

    data, reference = straight
    run = _copy_run(reference, tmp_path / "run")
    result = train(_config(data, run), backbone=tiny_backbone, resume=str(_ckpt(run, 1)), progress=False)
    assert result.step == 3 and (run / "checkpoints" / "superseded-step-0000003").is_dir()
    assert sorted(p.name for p in (run / "checkpoints").glob("step-*")) == ["step-0000001", "step-0000002",
                                                                            "step-0000003"]
    _assert_same_state(_ckpt(run, 3), _ckpt(reference, 3))


# ---------------------------------------------------------------------------------------------- 5: settings
def test_resume_refuses_changed_hyperparameters_and_keeps_config_truthful(tiny_pipeline_dir, tmp_path, capsys):
    from cleandift.cli.main import main

    data = _images(tmp_path / "data", 4)
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_pipeline_dir), "--data", str(data), "--out", str(out), "--size", "64",
            "--max-steps", "2", "--workers", "0", "--taps", "mid,us6", "--device", "cpu", "--val-images", "0",
            "--val-every", "0", "--batch-size", "1", "--lr", "1e-4", "--no-export"]
    assert main(args) == 0
    saved = (out / "config.yaml").read_text()
    capsys.readouterr()

    assert main(["train", "--out", str(out), "--resume", "--lr", "1e-3", "--batch-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "lr 0.0001 -> 0.001" in err and "batch_size 1 -> 2" in err and "may only change max_steps" in err
    assert (out / "config.yaml").read_text() == saved  # still says what the run used
    assert sorted(p.name for p in (out / "checkpoints").glob("step-*")) == ["step-0000002"]

    assert main(["train", "--out", str(out), "--resume", "--max-steps", "3", "--checkpoint-every", "5"]) == 0
    now = (out / "config.yaml").read_text()
    assert "# resumed at step 2: max_steps 2 -> 3, checkpoint_every 100 -> 5" in now
    assert "lr: 0.0001" in now and "max_steps: 3" in now
    trainer = json.loads((_ckpt(out, 3) / "trainer.json").read_text())
    assert trainer["state"]["history"] == [{"step": 2, "changed": {"max_steps": [2, 3], "checkpoint_every": [100, 5]}}]
    assert trainer["config"]["lr"] == 1e-4


def test_resume_changes_api(straight, tiny_backbone, tmp_path):
    from cleandift.train import train
    from cleandift.train.config import RESUME_MAY_CHANGE, resume_changes

    data, reference = straight
    config = _config(data, reference)
    refused, allowed = resume_changes(config.to_dict(), replace(config, lr=2e-3, max_steps=9, seed=5,
                                                                data=str(data) + "/./"))  # the same folder
    assert refused == {"lr": (1e-3, 2e-3), "seed": (1, 5)} and allowed == {"max_steps": (3, 9)}
    assert "lr" not in RESUME_MAY_CHANGE and "batch_size" not in RESUME_MAY_CHANGE
    run = _copy_run(reference, tmp_path / "run")
    with pytest.raises(ConfigError, match=r"other settings \(grad_accum 1 -> 2\)"):
        train(_config(data, run, grad_accum=2), backbone=tiny_backbone, resume=True, progress=False)


# ---------------------------------------------------------------------------------------------- 6: disk full
def test_disk_full_during_checkpoint_leaves_last_good_one_resumable(straight, tiny_backbone, tmp_path, monkeypatch):
    from cleandift.train import train

    data, reference = straight
    run = tmp_path / "run"
    original = run_state.write_tensors

    def full_disk(path, tensors):
        if path.parent.name == ".tmp-step-0000002" and path.name == "optimizer.safetensors":
            path.write_bytes(b"\0" * 1000)  # a partial file, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, tensors)

    monkeypatch.setattr(run_state, "write_tensors", full_disk)
    with pytest.raises(CheckpointWriteError, match=r"step 2: could not write the checkpoint .*No space left on device"
                                                   r".*partial folder was removed.*step-0000001 is intact"):
        train(_config(data, run), backbone=tiny_backbone, progress=False)
    monkeypatch.setattr(run_state, "write_tensors", original)
    ckpts = run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000001"]
    verify(_ckpt(run, 1))

    # leftovers of a killed run are removed when it resumes
    (ckpts / ".tmp-step-0000002").mkdir()
    (ckpts / ".tmp-step-0000002" / "model.safetensors").write_bytes(b"partial")
    (ckpts / "latest.tmp").write_text("step-0000002")
    (run / "config.yaml.tmp").write_text("partial")
    (run / ".export.tmp").mkdir()
    result = train(_config(data, run), backbone=tiny_backbone, resume=True, progress=False)
    assert result.step == 3
    assert not [p for p in ckpts.iterdir() if "tmp" in p.name] and not (run / "config.yaml.tmp").exists()
    assert not (run / ".export.tmp").exists()
    _assert_same_state(_ckpt(run, 3), _ckpt(reference, 3))


def test_disk_full_while_publishing_the_manifest(straight, tiny_backbone, tmp_path, monkeypatch):
    from cleandift.train import train

    data, _ = straight
    original = run_state.write_json

    def full_disk(path, obj):
        if path.name == "manifest.json" and path.parent.name == ".tmp-step-0000003":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, obj)

    monkeypatch.setattr(run_state, "write_json", full_disk)
    with pytest.raises(CheckpointWriteError, match="step 3: .*step-0000002 is intact"):
        train(_config(data, tmp_path / "run"), backbone=tiny_backbone, progress=False)
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["latest", "step-0000001", "step-0000002"]
    assert (ckpts / "latest").read_text() == "step-0000002"


# ---------------------------------------------------------------------------------------------- format
def test_run_state_tree_round_trip_is_exact():
    state = {"state": {0: {"step": torch.tensor(3.0), "m": torch.randn(4)}}, "groups": [{"betas": (0.9, 0.999),
             "lr": 1e-4 / 3, "params": [0], "fused": None}], "__odd": -0.0}
    tensors: dict = {}
    tree = run_state.encode_tree(state, tensors)
    back = run_state.decode_tree(json.loads(json.dumps(tree)), tensors)
    assert back["groups"][0]["betas"] == (0.9, 0.999) and back["groups"][0]["lr"] == 1e-4 / 3
    assert list(back["state"]) == [0] and torch.equal(back["state"][0]["m"], state["state"][0]["m"])
    with pytest.raises(TypeError, match="tensors and JSON only"):
        run_state.encode_tree({"f": print}, {})


class _OneProcess:
    """The few Accelerator members run_state uses, for a single process with an fp16 loss scaler."""

    is_main_process, process_index, num_processes, device = True, 0, 1, torch.device("cpu")

    def __init__(self):
        self.scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)

    def get_state_dict(self, model):
        return model.state_dict()

    def unwrap_model(self, model):
        return model


def test_run_state_round_trip_restores_scaler_and_every_generator(tmp_path):
    import random

    from cleandift.train.loop import _Warmup

    def build():
        model = torch.nn.Linear(3, 2)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
        return model, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _Warmup(4))

    accelerator = _OneProcess()
    model, optimizer, scheduler = build()
    model(torch.randn(5, 3)).sum().backward()
    optimizer.step()
    scheduler.step()
    accelerator.scaler.scale(torch.ones(()))  # initialises the scale
    accelerator.scaler.update(new_scale=256.0)
    folder = tmp_path / "state"
    folder.mkdir()
    trainer = {"state": {"step": 1, "batches": 1, "images_seen": 1}, "config": {}}
    run_state.save_state(folder, accelerator, model, optimizer, scheduler, trainer)
    run_state.write_manifest(folder, 1)
    expected = (torch.rand(3), random.random(), np.random.rand())  # what the generators give next

    other = _OneProcess()
    model2, optimizer2, scheduler2 = build()
    torch.manual_seed(99), random.seed(99), np.random.seed(99)
    run_state.load_state(folder, verify(folder), other, model2, optimizer2, scheduler2)
    assert other.scaler.get_scale() == 256.0 and other.scaler.state_dict() == accelerator.scaler.state_dict()
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), model2.state_dict().values()))
    assert scheduler2.state_dict() == scheduler.state_dict() and scheduler2.lr_lambdas[0].warmup == 4
    s1, s2 = optimizer.state_dict(), optimizer2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    assert all(torch.equal(s1["state"][i][k], s2["state"][i][k]) for i in s1["state"] for k in s1["state"][i])
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]

"""``pretrain-mini`` run files never run code, damaged ones are named, and stop signals checkpoint (issue 13)."""

from __future__ import annotations

import os
import shutil
import signal

import numpy as np
import pytest
import torch

from cleandift.cli.main import main
from cleandift.errors import CheckpointMismatchError, ConfigError
from cleandift.pretrain.idx import write_idx
from cleandift.pretrain.runstate import load_state_file
from cleandift.pretrain.train import CHECKPOINT, LEGACY_CHECKPOINT, PretrainConfig, open_run, read_run

TINY = ["--channels", "8,16,16,24", "--batch-size", "4", "--warmup-steps", "1", "--no-progress"]


class Payload:
    """Unpickling this writes ``marker``: what a planted checkpoint would do under ``weights_only=False``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('payload ran')",)


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, size=(16, 28, 28), dtype=np.uint8)
    labels = (np.arange(16) % 10).astype(np.uint8)
    for split in ("train", "t10k"):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images)
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels)
    return folder


def _config(out, data, **kw) -> PretrainConfig:
    base = dict(out=str(out), data=str(data), steps=4, batch_size=4, lr=1e-3, warmup_steps=1,
                block_out_channels=(8, 16, 16, 24), cross_attention_dim=16, attention_heads=2, norm_num_groups=8,
                checkpoint_every=2, snapshot_every=2, log_every=100, progress=False)
    base.update(kw)
    return PretrainConfig(**base)


@pytest.fixture(scope="module")
def run_dir(idx_dir, tmp_path_factory):
    """A genuine 2-step run: last.safetensors, step_000002.safetensors, loss.csv, config.json."""
    out = tmp_path_factory.mktemp("runs") / "run"
    open_run(_config(out, idx_dir, steps=2), resume=False).run()
    return out


def _plant(path, marker) -> None:
    torch.save(Payload(str(marker)), path)  # a real torch zip archive whose data.pkl runs code


def test_the_payload_is_live(tmp_path):
    """Sanity: the planted file does run code when unpickled the old way (so the tests below mean something)."""
    marker = tmp_path / "marker"
    _plant(tmp_path / "evil.pt", marker)
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.read_text() == "payload ran"


@pytest.mark.parametrize("planted", [CHECKPOINT, "step_000002.safetensors", "loss.csv", "config.json",
                                     "knn_probe.jsonl", LEGACY_CHECKPOINT, "step_000002.pt"])
def test_a_payload_planted_in_any_run_file_never_runs(planted, run_dir, idx_dir, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    if planted == LEGACY_CHECKPOINT:  # an older run: only last.pt is there
        (run / CHECKPOINT).unlink()
    marker = tmp_path / "marker"
    _plant(run / planted, marker)
    export = ["--export-only", "--card-samples", "1", "--sample-steps", "1"]
    commands = [
        ["pretrain-mini", "--data", str(idx_dir), "--out", str(run), "--steps", "3", "--resume", *TINY],
        ["pretrain-mini", "--out", str(run), *export, "--export", str(tmp_path / "e1")],
        ["pretrain-mini", "--out", str(run / planted), *export, "--export", str(tmp_path / "e2")],
        ["pretrain-mini", "--data", str(idx_dir), "--out", str(tmp_path / "new1"), "--steps", "3",
         "--init-from", str(run / planted), *TINY],
        ["pretrain-mini", "--data", str(idx_dir), "--out", str(tmp_path / "new2"), "--steps", "3",
         "--init-from", str(run), *TINY],
    ]
    for argv in commands:
        rc = main(argv)
        assert not marker.exists(), f"payload in {planted} ran: {argv}"
        err = capsys.readouterr().err
        assert rc in (0, 2), (argv, rc, err)
        if rc == 2:
            assert err.startswith("error: ") and "Traceback" not in err


def test_damaged_checkpoints_are_named(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    data = (run / CHECKPOINT).read_bytes()
    cases = {"truncated": data[: len(data) // 2], "empty": b"", "garbage": b"\x00" * 64}
    for name, payload in cases.items():
        (run / CHECKPOINT).write_bytes(payload)
        with pytest.raises(CheckpointMismatchError, match=str(run / CHECKPOINT)):
            read_run(run)
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(run / CHECKPOINT))  # a safetensors file, but not a run
    with pytest.raises(CheckpointMismatchError, match="without cleandift run metadata"):
        read_run(run)


def test_a_legacy_pt_checkpoint_resumes_exactly_with_weights_only(idx_dir, tmp_path):
    """Runs of earlier versions (torch.save of plain tensors and numbers) keep working, loaded weights-only."""
    straight = open_run(_config(tmp_path / "a", idx_dir), resume=False)
    straight.run()
    old = open_run(_config(tmp_path / "b", idx_dir, snapshot_every=0), resume=False)
    old.run(max_steps=2)
    state = old.state_dict()
    torch.save(state, tmp_path / "b" / LEGACY_CHECKPOINT)  # exactly what the old code wrote
    (tmp_path / "b" / CHECKPOINT).unlink()
    resumed = open_run(_config(tmp_path / "b", idx_dir, snapshot_every=0), resume=True)
    assert resumed.step == 2
    resumed.run()
    a, b = straight.state_dict(), resumed.state_dict()
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert torch.equal(a["generator"], b["generator"])
    assert (tmp_path / "b" / CHECKPOINT).is_file()  # the run continues in the new format


def test_run_state_round_trips_through_safetensors(idx_dir, tmp_path):
    """Every entry survives the file: tensors bit-exact, optimizer hyper-parameters typed as before."""
    trainer = open_run(_config(tmp_path / "r", idx_dir, steps=2), resume=False)
    trainer.run()
    before = trainer.state_dict()
    after = load_state_file(tmp_path / "r" / CHECKPOINT)
    assert after["step"] == 2 and after["config"] == before["config"]
    assert all(torch.equal(before["model"][k], after["model"][k]) for k in before["model"])
    assert [list(s) for s in after["optimizer"]["state"].values()] == \
        [list(s) for s in before["optimizer"]["state"].values()]
    assert after["lr_schedule"] == {k: v for k, v in before["lr_schedule"].items()}
    assert torch.equal(after["torch_rng"], before["torch_rng"])
    resumed = open_run(_config(tmp_path / "r", idx_dir, steps=2), resume=True)
    assert resumed.optimizer.param_groups[0]["betas"] == (0.9, 0.999)


def test_partial_writes_of_a_killed_run_are_removed_at_start(run_dir, idx_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / f"{CHECKPOINT}.tmp").write_bytes(b"half a checkpoint")
    open_run(_config(run, idx_dir, steps=2), resume=True)
    assert not (run / f"{CHECKPOINT}.tmp").exists()


def test_a_damaged_loss_log_is_named_on_resume(run_dir, idx_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "loss.csv").write_bytes(b"step,loss\nnot-a-step,1\n")
    with pytest.raises(ConfigError, match="loss.csv: damaged loss log"):
        open_run(_config(run, idx_dir, steps=2), resume=True)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGHUP", "SIGINT"])
def test_stop_signals_finish_the_step_checkpoint_and_exit(signame, idx_dir, tmp_path, monkeypatch, capsys):
    from cleandift.pretrain.train import Pretrainer

    signum = getattr(signal, signame, None)
    if signum is None:
        pytest.skip(f"no {signame} on this platform")
    # Before the fix this signal had no handler: make that a test failure, not a killed test process.
    def unhandled(*_) -> None:
        raise AssertionError(f"{signame} reached the test's own handler: pretrain-mini did not handle it")

    original = signal.signal(signum, unhandled)
    step = Pretrainer.train_step

    def step_then_signal(self):
        loss = step(self)
        if self.step == 1:
            os.kill(os.getpid(), signum)
        return loss

    monkeypatch.setattr(Pretrainer, "train_step", step_then_signal)
    out = tmp_path / "run"
    argv = ["pretrain-mini", "--data", str(idx_dir), "--out", str(out), "--steps", "4",
            "--checkpoint-every", "100", *TINY]
    try:
        rc = main(argv)
        restored = signal.getsignal(signum)
    finally:
        signal.signal(signum, original)
    assert rc == 128 + signum
    assert f"stopped by {signame} at step 1" in capsys.readouterr().out
    assert read_run(out).step == 1  # checkpointed although checkpoint_every is 100
    assert restored is unhandled  # the previous handler is back

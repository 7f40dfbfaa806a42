"""Training: config resolution, data folder handling, exact resume, export round trip, CLI."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from PIL import Image

from cleandift.errors import ConfigError, DatasetError
from cleandift.train.config import PRESETS, TrainConfig, coerce, resolve_config
from cleandift.train.data import ImageFolder, ImageRecord, StreamBatchSampler, prepare_datasets, scan_folder


def _write_images(folder, n: int, seed: int = 0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        arr = rng.integers(0, 255, (72 + 8 * i, 96, 3), dtype=np.uint8)
        sub = folder / "nested" if i % 2 else folder
        sub.mkdir(exist_ok=True)
        Image.fromarray(arr).save(sub / f"img{i}.{'png' if i % 3 else 'jpg'}")
    return folder


@pytest.fixture
def image_dir(tmp_path):
    return _write_images(tmp_path / "data", 5)


def _config(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), size=64, batch_size=2, max_steps=3, workers=0, taps="mid,us6",
                lr=1e-3, warmup_steps=1, val_every=0, checkpoint_every=0, val_images=0, export=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


# ---------------------------------------------------------------------------------------------- config
def test_presets_yaml_and_flags_precedence(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("preset: code\nlr: 3e-6\nbatch-size: 4\nmax_steps: 50\nhead_norm: film\n")
    config = resolve_config(yaml_file, {"max_steps": 7, "batch_size": None})
    assert (config.preset, config.warmup_steps, config.resize) == ("code", 2000, "stretch")  # from the preset
    assert config.lr == 3e-6 and isinstance(config.lr, float)  # YAML's "3e-6" string is converted
    assert (config.batch_size, config.max_steps, config.head_norm) == (4, 7, "film")  # unset flags don't clobber
    paper = resolve_config(None, {})
    assert (paper.lr, paper.max_steps, paper.batch_size, paper.resize) == (2e-6, 400, 8, "crop")
    assert PRESETS["code"]["lr"] == 1e-5
    saved = config.save(tmp_path / "out" / "config.yaml")
    assert resolve_config(saved, {}) == config


def test_unknown_and_bad_keys_are_config_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("learning_rate: 1e-5\n")
    with pytest.raises(ConfigError, match="bad.yaml.*unknown config key 'learning_rate'"):
        resolve_config(bad, {})
    bad.write_text("batch_size: eight\n")
    with pytest.raises(ConfigError, match="batch_size='eight'"):
        resolve_config(bad, {})
    with pytest.raises(ConfigError, match="did you mean 'max_steps'"):
        coerce({"max_step": 3}, "x")
    with pytest.raises(ConfigError, match="loss"):
        TrainConfig(loss="huber")


# ---------------------------------------------------------------------------------------------- data
def test_scan_captions_and_bad_images_are_counted(tmp_path):
    data = _write_images(tmp_path / "d", 4)
    (data / "img0.txt").write_text("  a red car \n")
    (data / "nested" / "img1.json").write_text(json.dumps({"caption": "a dog"}))
    (data / "empty.jpg").write_bytes(b"")
    (data / "text.png").write_text("not an image")
    good = np.asarray(Image.open(data / "img0.jpg"))
    Image.fromarray(good).save(data / "truncated.jpg")
    raw = (data / "truncated.jpg").read_bytes()
    (data / "truncated.jpg").write_bytes(raw[: len(raw) // 3])  # header fine, pixel data cut off

    records = {r.path.name: r.caption for r in scan_folder(data)}
    assert records["img0.jpg"] == "a red car" and records["img1.png"] == "a dog" and records["img2.png"] is None
    train, val, bad = prepare_datasets(data, 64, val_images=0, prompt="default")
    assert sorted(p.split("/")[-1] for p, _ in bad) == ["empty.jpg", "text.png"]
    assert val is None and len(train) == 5

    idx = [r.path.name for r in train.records].index("truncated.jpg")
    item = train[idx]  # fails to decode -> replaced by the next image, and reported
    assert item["image"].shape == (3, 64, 64)
    assert [p.split("/")[-1] for p, _ in item["skipped"]] == ["truncated.jpg"]
    assert train[[r.path.name for r in train.records].index("img2.png")]["caption"] == "default"


def test_missing_or_empty_folder_fails_before_any_model_loads(tmp_path):
    from cleandift.train import train

    (tmp_path / "empty").mkdir()
    for folder, message in ((tmp_path / "missing", "not found"), (tmp_path / "empty", "no training images")):
        config = TrainConfig(data=str(folder), out=str(tmp_path / "run"), model="no/such-model")
        with pytest.raises(DatasetError, match=message):
            train(config)  # a model load would raise BackboneNotFoundError instead


def test_crop_and_stretch_resize(tmp_path):
    Image.fromarray(np.zeros((64, 128, 3), np.uint8)).save(tmp_path / "wide.png")
    rec = [ImageRecord(tmp_path / "wide.png")]
    assert ImageFolder(rec, 32, "crop")[0]["image"].shape == (3, 32, 32)
    assert ImageFolder(rec, 32, "stretch")[0]["image"].shape == (3, 32, 32)


def test_stream_sampler_is_resumable_and_sharded():
    full = StreamBatchSampler(7, 3, seed=5)
    it = iter(full)
    first = [next(it) for _ in range(6)]
    resumed = iter(StreamBatchSampler(7, 3, seed=5, start_batch=4))
    assert [next(resumed) for _ in range(2)] == first[4:]
    epoch0 = [i for b in first for i in b][:7]
    assert sorted(epoch0) == list(range(7))  # every image once per epoch
    r0, r1 = StreamBatchSampler(8, 2, 1, num_replicas=2, rank=0), StreamBatchSampler(8, 2, 1, num_replicas=2, rank=1)
    seen = [i for k in range(2) for i in r0.batch(k) + r1.batch(k)]
    assert sorted(seen) == list(range(8))


# ---------------------------------------------------------------------------------------------- training
class _Interrupt(Exception):
    pass


def _read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_interrupted_and_resumed_run_equals_uninterrupted(tiny_backbone, tmp_path):
    from safetensors.torch import load_file

    from cleandift.train import train

    data = _write_images(tmp_path / "data", 5)
    kw = dict(max_steps=4, batch_size=1, grad_accum=2, checkpoint_every=2)
    straight = train(_config(data, tmp_path / "a", **kw), backbone=tiny_backbone, progress=False)

    def crash(step, logs):
        if step == 3:  # after the step-2 checkpoint, with one step of work to lose
            raise _Interrupt

    with pytest.raises(_Interrupt):
        train(_config(data, tmp_path / "b", **kw), backbone=tiny_backbone, callbacks=[crash], progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        train(_config(data, tmp_path / "b", **kw), backbone=tiny_backbone, progress=False)
    resumed = train(_config(data, tmp_path / "b", **kw), backbone=tiny_backbone, resume=True, progress=False)
    assert straight.step == resumed.step == 4

    a = load_file(str(tmp_path / "a" / "checkpoints" / "step-0000004" / "model.safetensors"))
    b = load_file(str(tmp_path / "b" / "checkpoints" / "step-0000004" / "model.safetensors"))
    assert a.keys() == b.keys() and "timestep" in a and "adapters.us6.layers.0.norm.linear.weight" in a
    assert max((a[k].float() - b[k].float()).abs().max().item() for k in a) <= 1e-6
    rows_a, rows_b = _read_csv(tmp_path / "a" / "train_log.csv"), _read_csv(tmp_path / "b" / "train_log.csv")
    assert [r["step"] for r in rows_b] == ["1", "2", "3", "4"]  # the redone step 3 is logged once
    assert float(rows_a[-1]["loss"]) == pytest.approx(float(rows_b[-1]["loss"]), abs=1e-6)
    assert rows_b[-1]["images_seen"] == "8"
    assert next(tiny_backbone.unet.parameters()).requires_grad is False  # the shared teacher stayed frozen


def test_export_loads_with_checkpoints_module_and_extracts_identically(tiny_backbone, tmp_path):
    from cleandift.checkpoints import load_student, read_checkpoint
    from cleandift.distill import FeatureAligner
    from cleandift.extract import CleanExtractor
    from cleandift.heads import load_heads
    from cleandift.train.export import UNET_FILE, export_run

    aligner = FeatureAligner(tiny_backbone, taps="us6,us9")
    opt = torch.optim.Adam(aligner.trainable_parameters(), lr=1e-3)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 2 - 1
    for step in range(2):
        opt.zero_grad()
        aligner(images, generator=torch.Generator().manual_seed(step)).loss.backward()
        opt.step()
    out = export_run(aligner, tmp_path / "export")

    student, ckpt = load_student(tiny_backbone.unet, out)
    assert ckpt.format == "export" and ckpt.timestep == pytest.approx(aligner.timestep.item())
    extractor = CleanExtractor(tiny_backbone, unet=student, timestep=ckpt.timestep, taps="us6,us9")
    ours = aligner.extract(images, taps="us6,us9")
    theirs = extractor(images)
    for k in ours:
        torch.testing.assert_close(theirs[k], ours[k], rtol=0, atol=1e-6)
    heads, t = load_heads(out)
    for k, v in heads.state_dict().items():
        torch.testing.assert_close(v, aligner.state_dict()[k])
    meta = json.loads((out / "cleandift.json").read_text())
    assert meta["taps"] == ["us6", "us9"] and meta["head_config"]["head_norm"] == "adarms"
    plain = read_checkpoint(out / UNET_FILE)  # the reference *_unet layout
    assert plain.format == "unet" and plain.student.keys() == student.state_dict().keys()

    from cleandift.train.loop import build_aligner  # --checkpoint EXPORT initialises a new run from it

    from cleandift.train.export import write_student_folder  # the compact fp16 copy that ships in the package

    compact = write_student_folder(out, tmp_path / "compact", dtype=torch.float16)
    assert sorted(p.name for p in compact.iterdir()) == ["cleandift.json", "unet"]
    half, half_ckpt = load_student(tiny_backbone.unet, compact)
    assert half_ckpt.timestep == pytest.approx(ckpt.timestep) and not half_ckpt.heads
    assert next(half.parameters()).dtype == torch.float32  # cast back to the base U-Net's dtype
    for k, v in half.state_dict().items():
        torch.testing.assert_close(v, student.state_dict()[k].half().float())

    again = build_aligner(TrainConfig(checkpoint=str(out), taps="us6,us9"), tiny_backbone)
    for k, v in aligner.state_dict().items():
        torch.testing.assert_close(again.state_dict()[k], v)


def test_memory_estimate_is_ordered(tiny_backbone):
    from cleandift.heads import HeadConfig
    from cleandift.train.memory import estimate_memory

    est = estimate_memory(tiny_backbone, tiny_backbone.taps.select(None), 128, 4, 3, HeadConfig())
    fp32 = est.total(precision="fp32")
    assert est.total(precision="fp32", checkpointing=True) < fp32
    assert est.total(precision="bf16") < fp32
    assert est.total(optimizer="adam8bit") < fp32
    assert est.profile.reached_params < sum(p.numel() for p in tiny_backbone.unet.parameters())
    report = est.report()
    assert "estimate" in report and "| bf16 autocast | yes |" in report


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_dry_run_and_three_step_run(tiny_pipeline_dir, tmp_path, capsys):
    from cleandift.cli.main import main

    data = _write_images(tmp_path / "data", 5)
    (data / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    yaml_file = tmp_path / "train.yaml"
    yaml_file.write_text("max_steps: 10\nbatch_size: 2\nwarmup_steps: 1\nlr: 1e-4\nval_images: 1\n")
    out = tmp_path / "run"
    args = ["train", "--model", str(tiny_pipeline_dir), "--data", str(data), "--out", str(out), "--size", "64",
            "--config", str(yaml_file), "--max-steps", "3", "--workers", "0", "--taps", "mid,us6", "--device", "cpu",
            "--val-every", "2", "--checkpoint-every", "2"]
    assert main(args + ["--dry-run"]) == 0
    report = capsys.readouterr().out
    assert "4 training image(s)" in report and "1 unreadable" in report and "memory estimate" in report
    assert not out.exists()

    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "trained 3 steps" in printed and "1 unreadable image(s) skipped" in printed
    saved = (out / "config.yaml").read_text()
    assert "max_steps: 3" in saved and "batch_size: 2" in saved and "lr: 0.0001" in saved
    rows = _read_csv(out / "train_log.csv")
    assert [r["step"] for r in rows] == ["1", "2", "3"] and rows[0]["skipped_images"] == "1"
    assert [r["step"] for r in _read_csv(out / "val_log.csv")] == ["0", "2", "3"]
    assert (out / "export" / "unet" / "config.json").is_file() and (out / "export" / "heads.safetensors").is_file()
    assert (out / "checkpoints" / "latest").read_text() == "step-0000003"

    assert main(args + ["--max-steps", "4", "--resume"]) == 0  # continue the finished run
    assert [r["step"] for r in _read_csv(out / "train_log.csv")] == ["1", "2", "3", "4"]
    assert main(["train", "--data", str(tmp_path / "nothing"), "--out", str(tmp_path / "x"), "--dry-run"]) == 2
    assert "training folder not found" in capsys.readouterr().err


def test_training_releases_what_it_never_runs(tiny_pipeline_dir, image_dir, tmp_path):
    from cleandift import load_backbone
    from cleandift.train.loop import build_optimizer, release_unused_parts

    backbone = load_backbone(str(tiny_pipeline_dir))
    (image_dir / "img0.txt").write_text("a red car")
    train_set, val_set, _ = prepare_datasets(image_dir, 64, val_images=1, prompt="", seed=0)
    captions = train_set.prompts() | val_set.prompts()
    assert captions == {"", "a red car"}
    assert release_unused_parts(backbone, [train_set, val_set], max_prompts=1) > 0  # 2 prompts: CLIP stays
    assert backbone.vae.decoder is None and backbone.text_encoder is not None
    release_unused_parts(backbone, [train_set, val_set])
    assert backbone.text_encoder is None and backbone.encode_prompts(["a red car", ""], 2).batch_size == 2

    params = [torch.nn.Parameter(torch.zeros(3))]
    assert build_optimizer(_config(image_dir, tmp_path), params).defaults["fused"]  # "adam": fused on CPU
    foreach = build_optimizer(_config(image_dir, tmp_path, optimizer="adam-foreach"), params)
    assert not foreach.defaults["fused"] and foreach.defaults["foreach"]

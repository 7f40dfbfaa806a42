"""``cleandift pretrain-mini``: idx reading, a few training steps, exact resume, export."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pytest
import torch

from cleandift.errors import CleanDIFTError, ConfigError, DatasetError
from cleandift.pretrain.idx import load_idx_dataset, read_idx, resolve_split, to_model_range, write_idx
from cleandift.pretrain.runstate import load_state_file
from cleandift.pretrain.train import CHECKPOINT, PretrainConfig, load_checkpoint_backbone, lr_lambda, open_run

N_IMAGES = 12


@pytest.fixture(scope="module")
def idx_dir(tmp_path_factory):
    """Tiny Fashion-MNIST look-alike in the real idx.gz format: bright squares whose size encodes the label."""
    folder = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    labels = (np.arange(N_IMAGES) % 10).astype(np.uint8)
    images = rng.integers(0, 40, size=(N_IMAGES, 28, 28), dtype=np.uint8)
    for i, y in enumerate(labels):
        images[i, 4:8 + 2 * int(y), 4:8 + 2 * int(y)] = 255
    for split, n in (("train", N_IMAGES), ("t10k", 4)):
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images[:n])
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels[:n])
    return folder


def _config(out, **kw) -> PretrainConfig:
    base = dict(out=str(out), steps=4, batch_size=4, lr=1e-3, warmup_steps=2, block_out_channels=(8, 16, 16, 24),
                cross_attention_dim=16, attention_heads=2, norm_num_groups=8, checkpoint_every=2, snapshot_every=2,
                log_every=100, progress=False)
    base.update(kw)
    return PretrainConfig(**base)


# ------------------------------------------------------------------------------------------------ idx
def test_idx_round_trip_gz_and_raw(tmp_path):
    array = np.arange(2 * 3 * 5, dtype=np.uint8).reshape(2, 3, 5)
    for name in ("a-ubyte", "a-ubyte.gz"):
        assert np.array_equal(read_idx(write_idx(tmp_path / name, array)), array)


def test_dataset_from_folder_or_images_path(idx_dir):
    images, labels = load_idx_dataset(idx_dir, "train")
    assert images.shape == (N_IMAGES, 28, 28) and images.dtype == torch.uint8
    assert labels.tolist() == [i % 10 for i in range(N_IMAGES)]
    img_path, lab_path = resolve_split(idx_dir / "t10k-images-idx3-ubyte.gz")
    assert lab_path.name == "t10k-labels-idx1-ubyte.gz"
    assert len(load_idx_dataset(img_path)[0]) == 4


def test_model_range_pads_28_to_32_with_background():
    images = torch.full((1, 28, 28), 255, dtype=torch.uint8)
    x = to_model_range(images, 32)
    assert x.shape == (1, 1, 32, 32)
    assert torch.all(x[..., 2:30, 2:30] == 1) and x[..., 0, :].eq(-1).all() and x[..., :, 31].eq(-1).all()


@pytest.mark.parametrize("payload,message", [
    (b"\x00\x00\x08", "only 3 bytes"),
    (b"\x12\x34\x08\x03" + b"\x00" * 12, "bad idx magic"),
    (b"\x00\x00\x08\x03\x00\x00\x00\x02", "truncated header"),
    (b"\x00\x00\x08\x01\x00\x00\x00\x05" + b"\x01\x02", "truncated or corrupt"),
])
def test_bad_idx_files_raise_clear_errors(tmp_path, payload, message):
    path = tmp_path / "bad-ubyte.gz"
    with gzip.open(path, "wb") as fh:
        fh.write(payload)
    with pytest.raises(DatasetError, match=message) as info:
        read_idx(path)
    assert str(path) in str(info.value) and isinstance(info.value, CleanDIFTError)


def test_not_gzip_and_missing_files(tmp_path, idx_dir):
    bad = tmp_path / "x-ubyte.gz"
    bad.write_bytes(b"not gzip at all")
    with pytest.raises(DatasetError, match="cannot read"):
        read_idx(bad)
    with pytest.raises(DatasetError, match="no such"):
        read_idx(tmp_path / "missing-ubyte.gz")
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte"):
        load_idx_dataset(tmp_path, "train")


def test_image_label_count_mismatch(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", np.zeros((3, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.zeros((2,), np.uint8))
    with pytest.raises(DatasetError, match="3 images but"):
        load_idx_dataset(tmp_path, "train")


# ------------------------------------------------------------------------------------------------ training
def test_lr_schedule_warmup_then_cosine():
    assert lr_lambda(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(55, 10, 100, 0.1) == pytest.approx(0.55)


def test_few_steps_write_atomic_checkpoint_and_loss_csv(idx_dir, tmp_path):
    trainer = open_run(_config(tmp_path / "run", data=str(idx_dir)), resume=False)
    loss = trainer.run()
    assert np.isfinite(loss) and trainer.step == 4
    files = {p.name for p in (tmp_path / "run").iterdir()}
    assert {CHECKPOINT, "loss.csv", "config.json", "step_000002.safetensors", "step_000004.safetensors"} <= files
    assert not any(name.endswith(".tmp") for name in files)
    rows = (tmp_path / "run" / "loss.csv").read_text().splitlines()
    assert rows[0] == "step,loss,lr,seconds" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3", "4"]
    assert json.loads((tmp_path / "run" / "config.json").read_text())["batch_size"] == 4
    backbone = load_checkpoint_backbone(tmp_path / "run")
    assert backbone.pretrain_step == 4
    ema = trainer.ema.shadow["unet.conv_in.weight"]
    assert torch.equal(backbone.unet.conv_in.weight, ema)


def test_interrupted_and_resumed_equals_uninterrupted(idx_dir, tmp_path):
    straight = open_run(_config(tmp_path / "a", data=str(idx_dir)), resume=False)
    straight.run()
    first = open_run(_config(tmp_path / "b", data=str(idx_dir)), resume=False)
    first.run(max_steps=2)  # checkpoints step 2
    first.train_step()  # ... then "dies" during step 3: never checkpointed, its loss row never written
    del first
    resumed = open_run(_config(tmp_path / "b", data=str(idx_dir)), resume=True)
    assert resumed.step == 2
    resumed.run()
    _assert_same_state(straight, resumed, step=4)
    losses = lambda run: [r.split(",")[:3] for r in (tmp_path / run / "loss.csv").read_text().splitlines()]  # noqa: E731
    assert losses("a") == losses("b")


def _assert_same_state(first, second, step: int) -> None:
    """Bit-identical model, EMA, optimizer moments and RNG at ``step``."""
    a, b = first.state_dict(), second.state_dict()
    assert a["step"] == b["step"] == step
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]) for k in a["ema"]["shadow"])
    assert all(torch.equal(x, y) for x, y in zip(_opt_tensors(a), _opt_tensors(b)))
    assert torch.equal(a["generator"], b["generator"])


def _opt_tensors(state: dict) -> list[torch.Tensor]:
    return [v for s in state["optimizer"]["state"].values() for v in s.values() if isinstance(v, torch.Tensor)]


def test_resume_refuses_changed_settings_and_new_run_refuses_existing(idx_dir, tmp_path):
    open_run(_config(tmp_path / "r", data=str(idx_dir), steps=2), resume=False).run()
    with pytest.raises(ConfigError, match="lr"):
        open_run(_config(tmp_path / "r", data=str(idx_dir), steps=2, lr=5e-4), resume=True)
    with pytest.raises(ConfigError, match="--resume"):
        open_run(_config(tmp_path / "r", data=str(idx_dir), steps=2), resume=False)
    resumed = open_run(_config(tmp_path / "r", data=str(idx_dir), steps=2, threads=2), resume=True)
    assert resumed.step == 2 and resumed.config.threads == 2


def test_init_from_with_an_unchanged_recipe_equals_the_uninterrupted_run(idx_dir, tmp_path):
    straight = open_run(_config(tmp_path / "a", data=str(idx_dir)), resume=False)
    straight.run()
    open_run(_config(tmp_path / "src", data=str(idx_dir)), resume=False).run(max_steps=2)
    cont = open_run(_config(tmp_path / "b", data=str(idx_dir), init_from=str(tmp_path / "src" / CHECKPOINT)),
                    resume=False)
    assert cont.step == 2
    cont.run()
    _assert_same_state(straight, cont, step=4)
    rows = (tmp_path / "b" / "loss.csv").read_text().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["3", "4"]  # the new run logs only its own steps


def test_init_from_changes_the_recipe_and_checks_the_model(idx_dir, tmp_path):
    src = tmp_path / "src" / CHECKPOINT
    open_run(_config(tmp_path / "src", data=str(idx_dir), steps=2), resume=False).run()
    source = load_state_file(src)
    cfg = _config(tmp_path / "ft", data=str(idx_dir), steps=6, label_dropout=0.5, lr=5e-4, init_from=str(src))
    ft = open_run(cfg, resume=False)
    assert ft.step == 2 and all(torch.equal(v, source["model"][k]) for k, v in ft.model.state_dict().items())
    # the new schedule at the inherited step: 5e-4 * (0.1 + 0.9 * 0.5 * (1 + cos(0))) with warmup 2, total 6
    assert ft.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)
    ft.run(max_steps=1)
    assert ft.optimizer.param_groups[0]["lr"] == pytest.approx(5e-4 * lr_lambda(3, 2, 6, 0.1))
    assert json.loads((tmp_path / "ft" / "config.json").read_text())["init_from"] == str(src)
    resumed = open_run(_config(tmp_path / "ft", data=str(idx_dir), steps=6, label_dropout=0.5, lr=5e-4),
                       resume=True)
    assert resumed.step == 3 and resumed.config.label_dropout == 0.5
    with pytest.raises(CleanDIFTError, match="block_out_channels"):
        open_run(_config(tmp_path / "x1", data=str(idx_dir), steps=6, init_from=str(src),
                         block_out_channels=(8, 16, 16, 32)), resume=False)
    with pytest.raises(ConfigError, match="already at step 2"):
        open_run(_config(tmp_path / "x2", data=str(idx_dir), steps=2, init_from=str(src)), resume=False)
    with pytest.raises(CleanDIFTError, match="not a full pretrain-mini checkpoint"):
        open_run(_config(tmp_path / "x3", data=str(idx_dir), steps=6,
                         init_from=str(tmp_path / "src" / "step_000002.safetensors")), resume=False)
    with pytest.raises(ConfigError, match="no checkpoint"):
        open_run(_config(tmp_path / "x4", data=str(idx_dir), steps=6, init_from=str(tmp_path / "nope.pt")),
                 resume=False)
    assert not (tmp_path / "x1").exists()  # a refused start leaves no run folder behind


def test_cli_trains_resumes_and_exports(idx_dir, tmp_path, capsys):
    from cleandift.backbones.pixel import load_pixel_backbone
    from cleandift.cli.main import main

    out, export = tmp_path / "cli", tmp_path / "export"
    common = ["pretrain-mini", "--data", str(idx_dir), "--out", str(out), "--steps", "3", "--batch-size", "4",
              "--channels", "8,16,16,24", "--checkpoint-every", "2", "--no-progress", "--warmup-steps", "1"]
    assert main(common + ["--max-steps", "2"]) == 0
    assert main(common + ["--resume", "--export", str(export), "--card-samples", "1", "--sample-steps", "2"]) == 0
    assert "exported" in capsys.readouterr().out
    backbone = load_pixel_backbone(export)
    assert backbone.unet.dtype == torch.float32  # loaded in the caller's dtype
    card = (export / "MODEL_CARD.md").read_text()
    assert "3 steps" in card and "| `us10` | `up_blocks.3.resnets.0` |" in card
    assert (export / "samples.png").is_file() and (export / "loss_curve.png").is_file()
    weights = export / "unet" / "diffusion_pytorch_model.safetensors"
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as fh:
        assert all(fh.get_tensor(k).dtype == torch.float16 for k in fh.keys())
    assert main(["pretrain-mini", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2
    ft = ["pretrain-mini", "--data", str(idx_dir), "--out", str(tmp_path / "ft"), "--steps", "4", "--batch-size", "4",
          "--channels", "8,16,16,24", "--no-progress", "--label-dropout", "0.5", "--init-from", str(out / CHECKPOINT)]
    assert main(ft) == 0
    state = load_state_file(tmp_path / "ft" / CHECKPOINT)
    assert state["step"] == 4 and state["config"]["label_dropout"] == 0.5


# ------------------------------------------------------------------------------------------------ probe
def test_knn_top1_majority_vote():
    from cleandift.pretrain.probe import knn_top1

    bank = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]])
    labels = torch.tensor([0, 0, 1, 1])
    queries = torch.tensor([[1.0, 0.05], [0.05, 1.0], [1.0, 0.0]])
    assert knn_top1(bank, labels, queries, torch.tensor([0, 1, 1]), k=2) == pytest.approx(2 / 3)


def test_knn_probe_reports_pixels_and_every_tap(idx_dir):
    from cleandift.backbones.pixel import build_pixel_backbone
    from cleandift.pretrain.probe import knn_probe

    backbone = build_pixel_backbone(_config("unused").unet_config())
    images, labels = load_idx_dataset(idx_dir, "train")
    x = to_model_range(images)
    results = knn_probe(backbone, (x[:8], labels[:8]), (x[8:], labels[8:]), taps=["mid", "us6"], timesteps=(0, 261),
                        k=3)
    assert set(results) == {"pixels[0,1]", "pixels[-1,1]", "t=0/mid", "t=0/us6", "t=261/mid", "t=261/us6"}
    assert all(0.0 <= v <= 1.0 for v in results.values())


def test_export_only_reads_a_run_without_touching_it(idx_dir, tmp_path):
    from cleandift.backbones.pixel import load_pixel_backbone
    from cleandift.cli.main import main

    out = tmp_path / "ro"
    open_run(_config(out, data=str(idx_dir), steps=2), resume=False).run()
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(["pretrain-mini", "--out", str(out), "--export-only", "--export", str(tmp_path / "e"),
                 "--card-samples", "1", "--sample-steps", "1"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert load_pixel_backbone(tmp_path / "e").taps.names[0] == "mid"
    assert json.loads((tmp_path / "e" / "pixel_backbone.json").read_text())["pretrain_step"] == 2
    assert (tmp_path / "e" / "checksum.json").is_file()
    assert "**Recognisable?**" in (tmp_path / "e" / "MODEL_CARD.md").read_text()


def test_exporting_a_snapshot_ignores_the_losses_of_later_steps(idx_dir, tmp_path):
    from cleandift.cli.main import main

    out = tmp_path / "run"
    open_run(_config(out, data=str(idx_dir)), resume=False).run()  # 4 steps, snapshot at step 2
    rows = [r.split(",") for r in (out / "loss.csv").read_text().splitlines()[1:]]
    assert main(["pretrain-mini", "--out", str(out / "step_000002.safetensors"), "--export-only", "--export",
                 str(tmp_path / "e"), "--card-samples", "1", "--sample-steps", "1"]) == 0
    card = (tmp_path / "e" / "MODEL_CARD.md").read_text()
    first_two = (float(rows[0][1]) + float(rows[1][1])) / 2
    assert "- 2 steps of batch" in card and f"**{first_two:.4f}**" in card


def test_stop_request_checkpoints_the_current_step(idx_dir, tmp_path):
    trainer = open_run(_config(tmp_path / "s", data=str(idx_dir), steps=4, checkpoint_every=100), resume=False)
    trainer.stop_requested = True  # what the CLI's SIGTERM handler does
    trainer.run()
    assert trainer.step == 1
    assert open_run(_config(tmp_path / "s", data=str(idx_dir), steps=4, checkpoint_every=100), resume=True).step == 1


def test_trainer_reads_idx_data_padded_like_pretraining(idx_dir):
    from cleandift.train.data import IdxImages, collate, prepare_datasets

    train, val, bad = prepare_datasets(idx_dir, 32, val_images=2, seed=0)
    assert isinstance(train, IdxImages) and isinstance(val, IdxImages) and bad == []
    images, _ = load_idx_dataset(idx_dir, "train")
    assert len(train) + len(val) == len(images) and not set(train.indices) & set(val.indices)
    item = train[0]
    assert item["image"].shape == (3, 32, 32)
    assert torch.equal(item["image"][0], to_model_range(images[train.indices[0]:train.indices[0] + 1])[0, 0])
    assert collate([train[0], train[1]])["images"].shape == (2, 3, 32, 32)


def test_sample_agreement_is_one_for_true_labels_and_zero_for_wrong_ones(idx_dir):
    from cleandift.pretrain.export import sample_agreement

    images, labels = load_idx_dataset(idx_dir, "train")
    x = to_model_range(images, 32)
    right = sample_agreement(x, labels.long(), idx_dir, bank_size=N_IMAGES, k=1)  # nearest neighbour = itself
    wrong = sample_agreement(x, (labels.long() + 1) % 10, idx_dir, bank_size=N_IMAGES, k=1)
    assert right["samples"] == 1.0 and right["per_class"] == [1.0] * 10
    assert wrong["samples"] == 0.0 and right["n"] == N_IMAGES


def test_agreement_text_derives_chance_and_k_from_the_measurement():
    from cleandift.pretrain.export import agreement_markdown

    agreement = {"samples": 0.5, "per_class": [1.0, 0.5, 0.0, 0.5], "real_test": 0.75, "n": 8, "bank": 100, "k": 3}
    text = agreement_markdown(agreement, ["a", "b", "c", "d"])
    assert "k = 3" in text and "chance 25 %" in text and "**50.0 %** of 8 samples" in text
    assert "a 100, b 50, c 0, d 50" in text and "75.0 % on 8 real test images" in text


def test_unguided_sampling_skips_the_null_pass_and_matches_the_guidance_formula(idx_dir, tmp_path):
    from cleandift.pretrain.sampling import sample_images

    trainer = open_run(_config(tmp_path / "run", data=str(idx_dir), steps=2), resume=False)
    trainer.run()
    backbone = trainer.ema_backbone()
    calls = []
    backbone.unet.register_forward_pre_hook(lambda m, args, kwargs: calls.append(args[0].shape[0]), with_kwargs=True)
    plain = sample_images(backbone, [0, 3], steps=3, guidance_scale=1.0, generator=torch.Generator().manual_seed(0))
    assert calls == [2, 2, 2]  # one conditional pass per step, no null-token copy
    guided = sample_images(backbone, [0, 3], steps=3, guidance_scale=1.0 + 1e-6,
                           generator=torch.Generator().manual_seed(0))
    assert calls[3:] == [4, 4, 4]
    torch.testing.assert_close(plain, guided, atol=1e-4, rtol=0)


def test_scheduler_options_reach_the_sampler(idx_dir, tmp_path):
    """DDIM's last step returns the predicted x0 (final alpha = 1), so clipping it to 0.1 bounds the output."""
    from cleandift.pretrain.sampling import sample_images

    trainer = open_run(_config(tmp_path / "run", data=str(idx_dir), steps=1), resume=False)
    trainer.run()
    backbone = trainer.ema_backbone()
    kwargs = {"steps": 3, "guidance_scale": 3.0, "generator": torch.Generator().manual_seed(0)}
    plain = sample_images(backbone, [0, 1, 2], **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    clipped = sample_images(backbone, [0, 1, 2], scheduler_options={"clip_sample": True, "clip_sample_range": 0.1},
                            **kwargs)
    assert plain.abs().max() > 0.1
    assert clipped.abs().max() <= 0.1 + 1e-6


def test_clipped_ddim_step_rederives_the_noise_from_the_clipped_x0(idx_dir, tmp_path):
    """One DDIM step by hand: x0 = (x - sqrt(1 - a) eps) / sqrt(a), clipped to r; eps re-derived from the
    clipped x0; next x = sqrt(a') x0c + sqrt(1 - a') eps'. The U-Net's second input must be exactly that."""
    from diffusers import DDIMScheduler

    from cleandift.pretrain.sampling import sample_images

    trainer = open_run(_config(tmp_path / "run", data=str(idx_dir), steps=1), resume=False)
    trainer.run()
    backbone = trainer.ema_backbone()
    seen = []
    backbone.unet.register_forward_hook(lambda m, args, kwargs, out: seen.append((args[0], out[0])),
                                        with_kwargs=True)
    options = {"clip_sample": True, "clip_sample_range": 0.05}
    sample_images(backbone, [0, 1], steps=2, guidance_scale=1.0, generator=torch.Generator().manual_seed(0),
                  scheduler_options=options)
    sched = DDIMScheduler.from_config({**dict(backbone.scheduler.config), **options})
    sched.set_timesteps(2)
    t, t_next = sched.timesteps.tolist()
    a, a_next = sched.alphas_cumprod[t].double(), sched.alphas_cumprod[t_next].double()
    (x, eps), (x_next, _) = seen[0], seen[1]
    x, eps = x.double(), eps.double()
    x0 = ((x - (1 - a).sqrt() * eps) / a.sqrt()).clamp(-0.05, 0.05)
    eps_rederived = (x - a.sqrt() * x0) / (1 - a).sqrt()
    expected = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps_rederived
    assert not torch.allclose(eps_rederived, eps, atol=1e-3)  # clipping did act
    torch.testing.assert_close(x_next.double(), expected, atol=1e-5, rtol=1e-5)


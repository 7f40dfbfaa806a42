"""``cache_latents``: per-image VAE moments encoded once, bit-identical runs, a released encoder, stale caches."""

from __future__ import annotations

import csv
import json
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from cleandift.errors import ConfigError
from cleandift.train.config import TrainConfig
from image_folders import write_random_images


def _write_images(folder, n: int = 6, seed: int = 0):
    return write_random_images(folder, n, seed, grow=8)


def _config(data, out, **kw) -> TrainConfig:
    base = dict(data=str(data), out=str(out), size=64, batch_size=2, max_steps=3, workers=0, taps="mid,us6",
                lr=1e-3, warmup_steps=1, val_every=0, checkpoint_every=0, val_images=0, export=False, seed=1)
    base.update(kw)
    return TrainConfig(**base)


def _weights(run, step: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "checkpoints" / f"step-{step:07d}" / "model.safetensors"))


def _assert_identical(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return [{k: v for k, v in row.items() if k != "sec_per_step"} for row in csv.DictReader(f)]


class _Interrupt(Exception):
    pass


def _crash_at(at: int):
    def crash(step, logs):
        if step == at:
            raise _Interrupt

    return crash


@pytest.fixture
def loaded(monkeypatch):
    """The backbones train() loads itself (it releases parts of those only)."""
    from cleandift.train import loop

    backbones = []
    original = loop.load_training_backbone

    def load(config, device):
        backbones.append(original(config, device))
        return backbones[-1]

    monkeypatch.setattr(loop, "load_training_backbone", load)
    return backbones


def test_cached_run_is_bit_identical_and_frees_the_vae_encoder(tiny_pipeline_dir, tmp_path, loaded, caplog):
    from cleandift.backbones.latents import nbytes
    from cleandift.train import train

    data = _write_images(tmp_path / "data")
    kw = dict(model=str(tiny_pipeline_dir), val_images=1, val_every=2)  # validation reads the cache too
    train(_config(data, tmp_path / "a", **kw), progress=False)
    with caplog.at_level(logging.INFO, logger="cleandift.train.latent_cache"):
        train(_config(data, tmp_path / "b", cache_latents=True, **kw), progress=False)

    _assert_identical(_weights(tmp_path / "a", 3), _weights(tmp_path / "b", 3))
    for log_file in ("train_log.csv", "val_log.csv"):  # every loss, to the last bit
        assert _rows(tmp_path / "a" / log_file) == _rows(tmp_path / "b" / log_file)
    assert len(_rows(tmp_path / "b" / "val_log.csv")) == 3

    plain, cached = loaded
    assert nbytes(plain.vae.encoder) > 0 and nbytes(cached.vae) == 0  # encoder (and decoder) freed
    assert sum(p.numel() for p in cached.vae.parameters()) == 0
    assert "released the VAE encoder" in caplog.text and "encoded the VAE posterior of 6 image(s)" in caplog.text
    with pytest.raises(RuntimeError, match="VAE encoder was released"):
        cached.encode_images(torch.zeros(1, 3, 64, 64))
    assert cached.describe()["backbone"] == plain.describe()["backbone"]

    meta = json.loads((tmp_path / "b" / "latents.json").read_text())
    assert (meta["key"]["size"], meta["key"]["resize"], meta["key"]["batch_size"]) == (64, "crop", 2)
    assert len(meta["key"]["train"]) == 5 and len(meta["key"]["val"]) == 1
    assert {"path", "mtime_ns", "size"} <= set(meta["key"]["train"][0])
    assert (tmp_path / "b" / "latents.safetensors").read_bytes()[8:9] == b"{"  # safetensors header, not pickle


def test_resume_with_the_cache_equals_an_uncached_run(tiny_backbone, tmp_path, caplog):
    from cleandift.backbones.latents import nbytes
    from cleandift.train import train

    data = _write_images(tmp_path / "data", 5)
    kw = dict(max_steps=4, batch_size=1, grad_accum=2, checkpoint_every=2)
    train(_config(data, tmp_path / "a", **kw), backbone=tiny_backbone, progress=False)

    # cached from the start: the resume reads RUN_DIR/latents.safetensors instead of encoding again
    cached = _config(data, tmp_path / "b", cache_latents=True, **kw)
    with pytest.raises(_Interrupt):
        train(cached, backbone=tiny_backbone, callbacks=[_crash_at(3)], progress=False)
    with caplog.at_level(logging.INFO, logger="cleandift.train.latent_cache"):
        train(cached, backbone=tiny_backbone, resume=True, progress=False)
    assert "loaded the VAE posterior of 5 image(s)" in caplog.text
    _assert_identical(_weights(tmp_path / "a", 4), _weights(tmp_path / "b", 4))

    # uncached, resumed with the cache: an allowed change (it changes nothing)
    with pytest.raises(_Interrupt):
        train(_config(data, tmp_path / "c", **kw), backbone=tiny_backbone, callbacks=[_crash_at(3)], progress=False)
    train(_config(data, tmp_path / "c", cache_latents=True, **kw), backbone=tiny_backbone, resume=True,
          progress=False)
    _assert_identical(_weights(tmp_path / "a", 4), _weights(tmp_path / "c", 4))
    assert "cache_latents False -> True" in (tmp_path / "c" / "config.yaml").read_text()
    assert nbytes(tiny_backbone.vae.encoder) > 0  # a caller's backbone is never mutated


def test_stale_or_damaged_cache_is_rebuilt_not_used(tiny_backbone, tmp_path, caplog):
    from cleandift.train.data import prepare_datasets
    from cleandift.train.latent_cache import CACHE_FILE, prepare_latent_cache

    data = _write_images(tmp_path / "data", 5)
    run = tmp_path / "run"
    config = _config(data, run, cache_latents=True, val_images=1)
    train_set, val_set, _ = prepare_datasets(data, 64, val_images=1, seed=config.seed)

    def prepare(cfg=config):
        return prepare_latent_cache(cfg, tiny_backbone, train_set, val_set, run, release=False)

    first = prepare()
    assert first.source == "built" and (run / CACHE_FILE).is_file()
    again = prepare()
    assert again.source == "file"
    assert torch.equal(again.train.mean, first.train.mean) and torch.equal(again.val.std, first.val.std)
    assert again.train.items == first.train.items

    # an image modified in place (same name): the cache no longer describes it
    target = train_set.records[2].path
    Image.fromarray(np.full((64, 64, 3), 200, dtype=np.uint8)).save(target)
    with caplog.at_level(logging.INFO, logger="cleandift.train.latent_cache"):
        rebuilt = prepare()
    assert rebuilt.source == "built" and "stale" in caplog.text and target.name in caplog.text
    assert not torch.equal(rebuilt.train.mean[2], first.train.mean[2])
    assert torch.equal(rebuilt.train.mean[[0, 1, 3]], first.train.mean[[0, 1, 3]])
    assert prepare().source == "file"

    # other settings the moments depend on: rebuilt
    assert prepare(_config(data, run, cache_latents=True, val_images=1, batch_size=3)).source == "built"
    assert prepare().source == "built"
    # a damaged file: rebuilt with a warning, never trusted
    (run / CACHE_FILE).write_bytes((run / CACHE_FILE).read_bytes()[:100])
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="cleandift.train.latent_cache"):
        assert prepare().source == "built"
    assert "cannot use" in caplog.text


def test_lora_student_with_the_cache_is_bit_identical(tiny_pipeline_dir, tmp_path):
    from cleandift.train import train

    data = _write_images(tmp_path / "data", 4)
    kw = dict(model=str(tiny_pipeline_dir), student="lora", lora_rank=4, max_steps=2, taps="us6")
    train(_config(data, tmp_path / "a", **kw), progress=False)
    train(_config(data, tmp_path / "b", cache_latents=True, **kw), progress=False)
    a, b = _weights(tmp_path / "a", 2), _weights(tmp_path / "b", 2)
    assert any(k.startswith("unet_feature_extractor_lora.") for k in a)
    _assert_identical(a, b)


def test_memory_limit_and_cli_flag(tiny_backbone, tmp_path, monkeypatch):
    from cleandift.cli.main import build_parser
    from cleandift.cli.train import resolve_from_args
    from cleandift.train import latent_cache
    from cleandift.train.data import prepare_datasets

    data = _write_images(tmp_path / "data", 4)
    train_set, _, _ = prepare_datasets(data, 64, val_images=0)
    config = _config(data, tmp_path / "run", cache_latents=True)
    assert latent_cache.cache_nbytes(tiny_backbone, 4, 64) == 4 * 2 * 4 * 8 * 8 * 4
    monkeypatch.setattr(latent_cache, "available_memory", lambda: 4000)
    with pytest.raises(ConfigError, match=r"need .* GB, more than a quarter .* drop --cache-latents"):
        latent_cache.prepare_latent_cache(config, tiny_backbone, train_set, None, tmp_path / "run", release=False)
    assert not (tmp_path / "run").exists()

    parse = build_parser().parse_args
    assert resolve_from_args(parse(["train", "--data", str(data), "--cache-latents"])).cache_latents is True
    assert resolve_from_args(parse(["train", "--data", str(data), "--no-cache-latents"])).cache_latents is False
    assert resolve_from_args(parse(["train", "--data", str(data)])).cache_latents is False

"""``cleandift extract`` under hostile input (issue 13, items 2, 4, 7-14, 20).

The fuzzed image corpus is generated here, in tmp dirs: truncated / empty / garbage files, decompression
bombs, 16-bit and float images, odd modes, EXIF rotation, symlink loops, dangling links, a FIFO, a folder
named like an image and non-UTF-8 names. Every bad entry must be reported by name, none may crash the run,
none may vanish silently, and every good one must be extracted.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from cleandift.cli.main import main
from cleandift.errors import BadImageError
from cleandift.feature_files import load_features

pytestmark = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="POSIX file system features")
NON_UTF8_GOOD = os.fsdecode(b"caf\xe9.png")  # Latin-1 name: not valid UTF-8
NON_UTF8_BAD = os.fsdecode(b"\xff\xfebad.jpg")


def printable(text: object) -> str:
    """Expected escaping of a name: undecodable bytes as \\xNN (what keys and messages must show)."""
    return os.fsencode(str(text)).decode("utf-8", "backslashreplace")


# ------------------------------------------------------------------------------------------------ corpus
def _png(width: int, height: int, bit_depth: int = 8, color_type: int = 0, raw: bytes = b"", crc_ok: bool = True
         ) -> bytes:
    """A PNG from its chunks (lets a header claim any size)."""
    def chunk(kind: bytes, data: bytes, ok: bool = True) -> bytes:
        crc = zlib.crc32(kind + data) ^ (0 if ok else 1)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr, crc_ok) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def build_corpus(root: Path) -> tuple[Path, set[str], set[str], set[str]]:
    """Write the fuzz corpus; returns (folder, good keys, names that must be reported, names ignored)."""
    folder = root / "corpus"
    (folder / "sub").mkdir(parents=True)
    good: dict[str, Image.Image | None] = {
        "good.png": Image.fromarray(_rgb(30, 40, 0)),
        "gray.png": Image.fromarray(_rgb(24, 24, 1)[..., 0]),
        "rgba.png": Image.fromarray(np.dstack([_rgb(20, 20, 2), np.full((20, 20), 128, np.uint8)])),
        "la.png": Image.fromarray(_rgb(20, 20, 3)[..., :2]).convert("LA"),
        "bilevel.png": Image.fromarray(_rgb(16, 16, 4)[..., 0]).convert("1"),
        "cmyk.jpg": Image.new("CMYK", (16, 16), (0, 255, 255, 0)),
        "deep16.png": Image.fromarray(np.full((16, 16), 30000, np.uint16)),
        "deep16.tif": Image.fromarray(np.full((16, 16), 60000, np.uint16)),
        "int32.tif": Image.fromarray(np.full((16, 16), 200, np.int32)),
        "float01.tif": Image.fromarray(np.full((16, 16), 0.5, np.float32)),
        "float_wide.tif": Image.fromarray(np.linspace(-3, 700, 256, dtype=np.float32).reshape(16, 16)),
        "photo.webp": Image.fromarray(_rgb(20, 20, 5)),
        "photo.bmp": Image.fromarray(_rgb(20, 20, 6)),
        "photo.gif": Image.fromarray(_rgb(20, 20, 7)).convert("P"),
        "photo.ppm": Image.fromarray(_rgb(20, 20, 8)),
        "photo.pgm": Image.fromarray(_rgb(20, 20, 9)[..., 0]),
        "sub/nested.png": Image.fromarray(_rgb(20, 20, 10)),
        "x.jpg/inner.png": Image.fromarray(_rgb(20, 20, 11)),  # inside a folder named like an image
        NON_UTF8_GOOD: Image.fromarray(_rgb(20, 20, 12)),
    }
    palette = Image.new("P", (16, 16))
    palette.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    good["palette.png"] = palette
    (folder / "x.jpg").mkdir()
    for name, img in good.items():
        img.save(folder / name)
    exif_img = Image.fromarray(_rgb(20, 40, 13))
    exif = exif_img.getexif()
    exif[0x0112] = 6
    exif_img.save(folder / "exif.jpg", exif=exif)
    outside = root / "elsewhere"
    outside.mkdir()
    Image.fromarray(_rgb(20, 20, 14)).save(outside / "ext.png")
    os.symlink(outside / "ext.png", folder / "outside.png")  # a link out of the folder must not move any key
    os.symlink("good.png", folder / "alias.png")  # an alias keeps its own key
    good_keys = {printable(k) for k in good} | {"exif.jpg", "outside.png", "alias.png"}

    bad: dict[str, bytes] = {
        "empty.png": b"",
        "garbage.jpg": np.random.default_rng(0).integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "text.png": b"hello, not an image",
        "bad_crc.png": _png(8, 8, raw=b"\x00" * 9 * 8, crc_ok=False),
        "zero_size.png": _png(0, 0),
        "bomb_header.png": _png(65535, 65535),  # a ~70-byte header claiming 65535 x 65535
        NON_UTF8_BAD: b"\x00garbage",
    }
    for name, data in bad.items():
        (folder / name).write_bytes(data)
    assert len(bad["bomb_header.png"]) < 100
    full_png = folder / "full.tmp"
    Image.fromarray(_rgb(64, 64, 15)).save(full_png, format="PNG")
    (folder / "truncated.png").write_bytes(full_png.read_bytes()[:300])
    Image.fromarray(_rgb(64, 64, 16)).save(full_png, format="JPEG", quality=95)
    (folder / "truncated.jpg").write_bytes(full_png.read_bytes()[:600])
    full_png.unlink()
    Image.new("1", (14000, 14000)).save(folder / "bomb_1bit.png")  # 196 Mpx in ~24 KB: a real bomb
    inf = np.full((16, 16), 0.5, np.float32)
    inf[3, 3] = np.inf
    Image.fromarray(inf).save(folder / "float_inf.tif")
    nan = np.full((16, 16), 0.5, np.float32)
    nan[0, 0] = np.nan
    Image.fromarray(nan).save(folder / "float_nan.tif")
    Image.new("RGB", (5, 5)).save(folder / "tiny.png")  # under the 8-px VAE cell
    os.symlink("loop.png", folder / "loop.png")
    os.symlink("nowhere.jpg", folder / "dangling.jpg")
    os.mkfifo(folder / "fifo.png")
    os.symlink("..", folder / "sub" / "up")  # a folder loop
    (folder / "notes.txt").write_text("not an image name: ignored by design")
    reported = {*bad, "truncated.png", "truncated.jpg", "bomb_1bit.png", "float_inf.tif", "float_nan.tif",
                "tiny.png", "loop.png", "dangling.jpg", "fifo.png", "x.jpg", "sub/up"}
    return folder, good_keys, {printable(n) for n in reported}, {"notes.txt"}


@pytest.fixture
def corpus(tmp_path):
    return build_corpus(tmp_path)


@pytest.fixture
def good_png(tmp_path) -> Path:
    path = tmp_path / "imgs" / "good.png"
    path.parent.mkdir()
    Image.fromarray(_rgb(30, 40, 0)).save(path)
    return path


def _fail_if_model_loads(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("the model was loaded before the arguments were checked")

    monkeypatch.setattr("cleandift.backbones.load_backbone", boom)


def _one_line_error(capsys) -> str:
    """The CLI's one ``error: ...`` line (log lines may precede it; a traceback may not)."""
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.rstrip().endswith(errors[0]) and "Traceback" not in err, err
    return errors[0]


# ------------------------------------------------------------------------------------------------ item 7-10: the fuzz corpus
def test_fuzz_corpus_every_bad_file_named_none_dropped(tiny_pipeline_dir, corpus, tmp_path, capsys):
    folder, good_keys, reported, ignored = corpus
    out = tmp_path / "f.safetensors"
    code = main(["extract", str(folder), "--model", str(tiny_pipeline_dir), "--out", str(out), "--size", "64"])
    printed = capsys.readouterr().out
    assert code == 0  # no entry crashes the run
    feats, meta = load_features(out)
    assert set(feats) == good_keys
    failed = {str(Path(p).relative_to(folder)): reason for p, reason in meta["failed"]}
    assert set(failed) == reported
    for name in reported:  # every bad entry is listed at the end, by name
        assert f"  {printable(folder / name)}: " in printed
    # none silently dropped: every image-named entry is extracted or reported
    entries = {printable(p.relative_to(folder).as_posix()) for p in _all_entries(folder)}
    assert entries == good_keys | reported | ignored | {"sub"}  # "sub" is a plain folder (searched)
    assert all(torch.isfinite(t.float()).all() for taps in feats.values() for t in taps.values())
    assert "decompression bomb" in failed["bomb_header.png"] and "decompression bomb" in failed["bomb_1bit.png"]
    assert "NaN or inf" in failed["float_inf.tif"] and "NaN or inf" in failed["float_nan.tif"]
    assert "symlink loop" in failed["loop.png"] and "symlink loop" in failed["sub/up"]
    assert "dangling symlink" in failed["dangling.jpg"] and "FIFO" in failed["fifo.png"]
    assert "folder" in failed["x.jpg"]
    print(f"fuzz corpus: tried {len(good_keys) + len(reported)}, crashes 0, reported {len(failed)}, "
          f"extracted {len(feats)}, silently dropped 0")


def _all_entries(folder: Path) -> list[Path]:
    out = []
    for name in os.listdir(folder):
        path = folder / name
        out.append(path)
        if path.is_dir() and not path.is_symlink():
            out.extend(_all_entries(path))
    return out


def test_symlink_loop_fifo_and_missing_as_arguments(tiny_pipeline_dir, corpus, tmp_path, capsys):
    folder, *_ = corpus
    out = tmp_path / "f.safetensors"
    code = main(["extract", str(folder / "loop.png"), str(folder / "fifo.png"), str(folder / "missing.png"),
                 str(folder / "good.png"), "--model", str(tiny_pipeline_dir), "--out", str(out), "--size", "64"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "loop.png: symlink loop" in printed and "fifo.png: not a regular file (a FIFO)" in printed
    assert "missing.png: file not found" in printed
    assert set(load_features(out)[0]) == {"good.png"}


def test_keys_are_stable_under_symlinks(tiny_pipeline_dir, tmp_path):
    """A link out of the folder leaves every key alone; an alias keeps its own key (item 9)."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    (tmp_path / "far" / "away").mkdir(parents=True)
    Image.fromarray(_rgb(20, 20, 0)).save(folder / "own.png")
    Image.fromarray(_rgb(20, 20, 1)).save(tmp_path / "far" / "away" / "ext.png")
    os.symlink(tmp_path / "far" / "away" / "ext.png", folder / "ext.png")
    os.symlink("own.png", folder / "alias.png")
    out = tmp_path / "f.safetensors"
    assert main(["extract", str(folder), "--model", str(tiny_pipeline_dir), "--out", str(out), "--size", "64"]) == 0
    feats, meta = load_features(out)
    assert sorted(feats) == ["alias.png", "ext.png", "own.png"]
    assert meta["images"]["alias.png"]["path"] == str(folder / "alias.png")  # never resolved
    torch.testing.assert_close(feats["alias.png"]["us6"], feats["own.png"]["us6"], rtol=0, atol=0)


def test_non_utf8_names_are_saved_escaped(tiny_pipeline_dir, tmp_path, capsys):
    """Undecodable name bytes become \\xNN escapes in keys, paths and messages; the save succeeds (item 8)."""
    folder = tmp_path / os.fsdecode(b"d\xefr")
    folder.mkdir()
    Image.fromarray(_rgb(20, 20, 0)).save(folder / NON_UTF8_GOOD)
    (folder / NON_UTF8_BAD).write_bytes(b"junk")
    out = tmp_path / "f.safetensors"
    assert main(["extract", str(folder), "--model", str(tiny_pipeline_dir), "--out", str(out), "--size", "64"]) == 0
    feats, meta = load_features(out)
    assert list(feats) == ["caf\\xe9.png"]
    assert meta["images"]["caf\\xe9.png"]["path"].endswith("d\\xefr/caf\\xe9.png")
    assert meta["failed"][0][0].endswith("d\\xefr/\\xff\\xfebad.jpg")
    assert "\\xff\\xfebad.jpg: not a readable image format" in capsys.readouterr().out


def test_float_tiff_scaled_by_its_range_and_nonfinite_rejected(tmp_path):
    """Float images in [0, 1] are not treated as 0-255; an inf pixel is refused by name (item 10)."""
    from cleandift.images import load_image

    Image.fromarray(np.full((8, 8), 0.5, np.float32)).save(tmp_path / "half.tif")
    assert load_image(tmp_path / "half.tif").getpixel((0, 0)) == (128, 128, 128)  # was (1, 1, 1)
    Image.fromarray(np.full((8, 8), 200.0, np.float32)).save(tmp_path / "bytes.tif")
    assert load_image(tmp_path / "bytes.tif").getpixel((0, 0)) == (200, 200, 200)
    ramp = np.linspace(-1.0, 3.0, 64, dtype=np.float32).reshape(8, 8)  # outside any standard range: min..max
    Image.fromarray(ramp).save(tmp_path / "ramp.tif")
    img = load_image(tmp_path / "ramp.tif")
    assert img.getpixel((0, 0))[0] == 0 and img.getpixel((7, 7))[0] == 255
    Image.fromarray(np.full((8, 8), 40000, np.int32)).save(tmp_path / "i32.tif")  # 16-bit data in mode I
    assert load_image(tmp_path / "i32.tif").getpixel((0, 0))[0] == round(40000 / 65535 * 255)
    ramp[2, 2] = np.inf
    Image.fromarray(ramp).save(tmp_path / "inf.tif")
    with pytest.raises(BadImageError, match=r"inf.tif: 1 of 64 pixel values are NaN or inf"):
        load_image(tmp_path / "inf.tif")


def test_decompression_bomb_is_a_bad_image(tmp_path):
    from cleandift.images import load_image

    (tmp_path / "bomb.png").write_bytes(_png(65535, 65535))
    with pytest.raises(BadImageError, match=r"bomb.png: refused as a decompression bomb"):
        load_image(tmp_path / "bomb.png")


def test_scan_reports_special_entries(corpus):
    from cleandift.images import find_images, scan_images

    folder, *_ = corpus
    scan = scan_images(folder)
    assert {str(Path(p).relative_to(folder)) for p, _ in scan.skipped} == {
        "loop.png", "dangling.jpg", "fifo.png", "x.jpg", "sub/up"}
    assert len(scan.paths) == len(scan.keys) == len(set(scan.keys))
    assert [p.name for p in find_images(folder)] == [p.name for p in scan.paths]


# ------------------------------------------------------------------------------------------------ item 11: --out
@pytest.mark.parametrize("case", ["missing_dir", "is_dir", "trailing_slash", "read_only"])
def test_bad_out_refused_before_loading(case, good_png, tmp_path, monkeypatch, capsys):
    out = {"missing_dir": tmp_path / "nope" / "f.safetensors", "is_dir": tmp_path,
           "trailing_slash": f"{tmp_path}/new/", "read_only": "/proc/cleandift-test.safetensors"}[case]
    if case == "read_only" and not Path("/proc/self").is_dir():
        pytest.skip("needs Linux /proc (read-only even for root)")
    _fail_if_model_loads(monkeypatch)
    assert main(["extract", str(good_png), "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert {"missing_dir": "does not exist; create it first", "is_dir": "is a folder; give a file name",
            "trailing_slash": "is a folder; give a file name", "read_only": "cannot write in /proc"}[case] in err


def test_failed_save_leaves_no_temp_and_stale_temps_are_removed(tiny_pipeline_dir, good_png, tmp_path, monkeypatch,
                                                                 capsys):
    import errno

    import safetensors.torch

    out_dir = tmp_path / "out"
    out_dir.mkdir()
    stale = out_dir / ".f.safetensors.999999999.abc.tmp"  # left by a killed run (no such pid)
    stale.write_bytes(b"x" * 100)

    def disk_full(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", disk_full)
    code = main(["extract", str(good_png), "--model", str(tiny_pipeline_dir),
                 "--out", str(out_dir / "f.safetensors"), "--size", "64"])
    assert code == 2
    assert "could not write the features (No space left on device)" in _one_line_error(capsys)
    assert os.listdir(out_dir) == []  # neither the stale temp nor the partial one remains


# ------------------------------------------------------------------------------------------------ item 12: --strict
def test_strict_stops_at_first_bad_file(tiny_pipeline_dir, tmp_path, monkeypatch, capsys):
    import cleandift.feature_files as ff

    folder = tmp_path / "imgs"
    folder.mkdir()
    for name in ("a.png", "c.png", "d.png"):
        Image.fromarray(_rgb(20, 20, 0)).save(folder / name)
    (folder / "b.png").write_bytes(b"broken")
    seen = []
    real = ff.load_image
    monkeypatch.setattr(ff, "load_image", lambda p, **k: (seen.append(Path(p).name), real(p, **k))[1])
    code = main(["extract", str(folder), "--model", str(tiny_pipeline_dir), "--out", str(tmp_path / "f.safetensors"),
                 "--strict", "--batch-size", "1"])
    assert code == 2 and seen == ["a.png", "b.png"]  # nothing after the bad file is read
    assert "b.png: not a readable image format" in _one_line_error(capsys)
    assert not (tmp_path / "f.safetensors").exists()


def test_strict_refuses_special_entries_before_loading(corpus, tmp_path, monkeypatch, capsys):
    folder, *_ = corpus
    _fail_if_model_loads(monkeypatch)
    assert main(["extract", str(folder), "--out", str(tmp_path / "f.safetensors"), "--strict"]) == 2
    assert "dangling.jpg: dangling symlink" in _one_line_error(capsys)  # the first special entry


# ------------------------------------------------------------------------------------------------ item 13: noise per image
def test_noisy_features_do_not_depend_on_neighbours_or_batch(tiny_pipeline_dir, tmp_path):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i, name in enumerate(["a.png", "b.png", "sub/c.png", "d.png", "e.png"]):
        Image.fromarray(_rgb(60 + 10 * i, 80, i)).save(folder / name)
    common = ["--model", str(tiny_pipeline_dir), "--mode", "noisy", "--ensemble", "2", "--seed", "5",
              "--save-dtype", "fp32", "--taps", "mid,us6", "--size", "64"]
    runs = {
        "alone": [str(folder / "sub" / "c.png")],
        "folder": [str(folder)],
        "batch1": [str(folder), "--batch-size", "1"],
        "batch3": [str(folder), "--batch-size", "3", "--chunk-size", "3"],
        "reversed": [str(folder / n) for n in ("e.png", "d.png", "sub/c.png", "b.png", "a.png")],
    }
    feats = {}
    for name, args in runs.items():
        out = tmp_path / f"{name}.safetensors"
        assert main(["extract", *args, *common, "--out", str(out)]) == 0
        feats[name] = {Path(k).name: v for k, v in load_features(out)[0].items()}
    for name in ("folder", "batch1", "batch3", "reversed"):
        for key, taps in feats[name].items():
            for tap, t in taps.items():
                assert torch.equal(t, feats["folder"][key][tap]), (name, key, tap)  # bit-identical
    for tap in ("mid", "us6"):
        assert torch.equal(feats["alone"]["c.png"][tap], feats["folder"]["c.png"][tap])
    assert not torch.equal(feats["folder"]["a.png"]["us6"], feats["folder"]["b.png"]["us6"])


def test_cli_noise_equals_api_with_image_seed(tiny_backbone, tiny_pipeline_dir, tmp_path):
    """The CLI's per-image noise is eval's: a generator seeded with image_seed(image, seed)."""
    from cleandift.eval.descriptors import image_seed
    from cleandift.extract import NoisyExtractor
    from cleandift.images import load_image, prepare_images

    Image.fromarray(_rgb(50, 70, 3)).save(tmp_path / "a.png")
    out = tmp_path / "f.safetensors"
    assert main(["extract", str(tmp_path / "a.png"), "--model", str(tiny_pipeline_dir), "--mode", "noisy",
                 "--ensemble", "3", "--seed", "7", "--save-dtype", "fp32", "--size", "64", "--out", str(out)]) == 0
    batch, _ = prepare_images([load_image(tmp_path / "a.png")], 64)
    extractor = NoisyExtractor(tiny_backbone, t=261, ensemble=3)
    gen = torch.Generator().manual_seed(image_seed(batch[0], 7))
    expected = extractor(batch, generator=gen)["us6"][0]
    assert torch.equal(load_features(out)[0]["a.png"]["us6"], expected)
    _, meta = load_features(out)
    assert meta["settings"]["noise_seed"].startswith("per image")


def test_shared_noise_gives_every_image_the_same_draws(tiny_backbone):
    from cleandift.extract import NoisyExtractor

    extractor = NoisyExtractor(tiny_backbone, ensemble=2, noise="shared")
    same = torch.rand(1, 3, 64, 64) * 2 - 1
    feats = extractor(same.expand(3, -1, -1, -1), generator=torch.Generator().manual_seed(0))["us6"]
    torch.testing.assert_close(feats[0], feats[2], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="pass one generator"):
        extractor(same.expand(2, -1, -1, -1), generator=[torch.Generator(), torch.Generator()])


def test_per_image_generators_match_single_image_calls(tiny_backbone, tiny_images):
    from cleandift.extract import NoisyExtractor, image_generators

    extractor = NoisyExtractor(tiny_backbone, ensemble=2)
    batched = extractor(tiny_images, generator=image_generators(tiny_images, 3))["us6"]
    for i in range(2):
        alone = extractor(tiny_images[i:i + 1], generator=image_generators(tiny_images[i:i + 1], 3))["us6"]
        torch.testing.assert_close(batched[i], alone[0], rtol=0, atol=1e-5)  # same draws; batched kernels


# ------------------------------------------------------------------------------------------------ item 14: arguments
@pytest.mark.parametrize("extra, message", [
    (["--ensemble", "0"], "--ensemble 0: must be at least 1"),
    (["--batch-size", "0"], "--batch-size 0: must be at least 1"),
    (["--chunk-size", "0"], "--chunk-size 0: must be at least 1"),
    (["--size", "100"], "--size 100: must be a multiple of 64 px"),
    (["--size", "0"], "--size 0: must be a positive number"),
    (["--checkpoint", "missing.safetensors"], "--checkpoint missing.safetensors: no such file or folder"),
    (["--checkpoint", "runs/x/export"], "--checkpoint runs/x/export: no such file or folder"),
    (["--device", "cuda"], "--device cuda: CUDA is not available"),
    (["--pca", "us9", "--taps", "us6"], "--pca us9: the tap is not in --taps us6; add it (--taps us6,us9)"),
    (["--mode", "noisy", "--t", "nan"], "t=nan is not a finite number"),
    (["--mode", "noisy", "--t", "inf"], "t=inf is not a finite number"),
    (["--t=-inf"], "t=-inf is not a finite number"),
    (["--mode", "noisy", "--t", "999.5"], "t=999.5 is outside [0, 999]"),
    (["--t", "999.5"], "t=999.5 is outside [0, 999]"),
    (["--mode", "noisy", "--t", "261.7"], "t=261.7 is not a whole number"),
    (["--mode", "noisy", "--checkpoint", "x.safetensors"], "is not used by --mode noisy"),
    ([], None),
])
def test_bad_arguments_refused_before_loading(extra, message, tiny_pipeline_dir, good_png, tmp_path, monkeypatch,
                                              capsys):
    if extra[:2] == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    _fail_if_model_loads(monkeypatch)
    args = ["extract", str(good_png), "--model", str(tiny_pipeline_dir), "--out",
            str(tmp_path / "f.safetensors"), *extra]
    if message is None:  # control: good arguments do reach the model loader
        with pytest.raises(AssertionError, match="the model was loaded"):
            main(args)
        return
    assert main(args) == 2
    assert message in _one_line_error(capsys)


def test_size_checked_against_loaded_model_too(tiny_pipeline_dir, good_png, tmp_path, monkeypatch, capsys):
    """For a model whose configs cannot be read up front, --size is checked right after loading."""
    monkeypatch.setattr("cleandift.cli.extract.model_facts", lambda model: (None, None))
    assert main(["extract", str(good_png), "--model", str(tiny_pipeline_dir), "--size", "96",
                 "--out", str(tmp_path / "f.safetensors")]) == 2
    assert "--size 96: must be a multiple of 64 px" in _one_line_error(capsys)


def test_model_facts_match_the_loaded_model(tiny_backbone, tiny_pipeline_dir):
    from cleandift.cli.extract import model_facts

    assert model_facts(str(tiny_pipeline_dir)) == (tiny_backbone.size_multiple, tiny_backbone.num_train_timesteps)
    assert model_facts("sd15") == (64, 1000) and model_facts("no/such/thing") == (None, None)


def test_noisy_t_validated_like_clean(tiny_backbone):
    """NoisyExtractor refuses what it used to truncate; clean mode keeps fractional timesteps."""
    from cleandift.errors import TimestepError
    from cleandift.extract import CleanExtractor, NoisyExtractor

    for bad in (999.5, 261.7, float("nan"), float("inf")):
        with pytest.raises(TimestepError):
            NoisyExtractor(tiny_backbone, t=bad)
    assert NoisyExtractor(tiny_backbone, t=261.0).t == 261
    assert CleanExtractor(tiny_backbone, timestep=261.7).timestep == pytest.approx(261.7)
    with pytest.raises(TimestepError, match="not a finite number"):
        CleanExtractor(tiny_backbone, timestep=float("nan"))


# ------------------------------------------------------------------------------------------------ item 2: NaN/inf
def test_nonfinite_image_tensor_is_a_clear_value_error(tiny_backbone, tiny_images):
    from cleandift.extract import CleanExtractor, NoisyExtractor

    images = tiny_images.clone()
    images[1, 0, 5, 5] = float("nan")
    for extractor in (CleanExtractor(tiny_backbone), NoisyExtractor(tiny_backbone, ensemble=1)):
        with pytest.raises(ValueError, match=r"non-finite values \(NaN/inf\) in batch position\(s\) 1;"):
            extractor(images)
    images[1, 0, 5, 5] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        CleanExtractor(tiny_backbone)(images)


def test_all_nan_checkpoint_is_refused(tiny_backbone, tiny_pipeline_dir, good_png, tmp_path, capsys):
    state = {k: torch.full_like(v, float("nan")) for k, v in tiny_backbone.unet.state_dict().items()}
    ckpt = tmp_path / "all_nan.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(ckpt))
    out = tmp_path / "f.safetensors"
    assert main(["extract", str(good_png), "--model", str(tiny_pipeline_dir), "--checkpoint", str(ckpt),
                 "--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert f"{ckpt}: {len(state)} of {len(state)} weight tensor(s) hold NaN/inf values" in err
    assert not out.exists()


def test_one_inf_weight_or_nan_timestep_is_refused(tiny_backbone, tmp_path):
    from cleandift.checkpoints import read_checkpoint
    from cleandift.errors import DamagedCheckpointError

    state = {k: v.clone().contiguous() for k, v in tiny_backbone.unet.state_dict().items()}
    state["conv_in.weight"].view(-1)[7] = float("inf")
    save_file(state, str(tmp_path / "one_inf.safetensors"))
    with pytest.raises(DamagedCheckpointError, match=r"1 of \d+ weight tensor\(s\).*student conv_in.weight"):
        read_checkpoint(tmp_path / "one_inf.safetensors")
    state["conv_in.weight"].view(-1)[7] = 0.0
    state["timestep"] = torch.tensor(float("nan"))
    save_file(state, str(tmp_path / "nan_t.safetensors"))
    with pytest.raises(DamagedCheckpointError, match=r"timestep \(nan\)"):
        read_checkpoint(tmp_path / "nan_t.safetensors")


# ------------------------------------------------------------------------------------------------ item 4: damaged exports
def _export(tiny_backbone, root: Path) -> Path:
    export = root / "export"
    tiny_backbone.unet.save_pretrained(str(export / "unet"))
    save_file({"time_emb.weight": torch.randn(4, 1), "timestep": torch.tensor(250.0)}, str(export / "heads.safetensors"))
    (export / "cleandift.json").write_text(json.dumps({"timestep": 255.0}))
    return export


@pytest.mark.parametrize("damage, file, message", [
    ("truncate", "unet/diffusion_pytorch_model.safetensors", "not a readable safetensors file, truncated or damaged"),
    ("empty", "unet/diffusion_pytorch_model.safetensors", "not a readable safetensors file (empty, 0 bytes)"),
    ("delete", "unet/diffusion_pytorch_model.safetensors", "missing from the export"),
    ("delete", "unet/config.json", "missing from the export"),
    ("garble", "unet/config.json", "not valid JSON"),
    ("garble", "cleandift.json", "not valid JSON"),
    ("truncate", "heads.safetensors", "not a readable safetensors file, truncated or damaged"),
])
def test_damaged_export_folder_named_clearly(damage, file, message, tiny_backbone, tmp_path):
    from cleandift.checkpoints import load_student, read_checkpoint
    from cleandift.errors import DamagedCheckpointError

    export = _export(tiny_backbone, tmp_path)
    load_student(tiny_backbone.unet, export)  # intact: loads
    target = export / file
    if damage == "truncate":
        target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])
    elif damage == "empty":
        target.write_bytes(b"")
    elif damage == "delete":
        target.unlink()
    else:
        target.write_text('{"timestep": 25')
    with pytest.raises(DamagedCheckpointError) as info:
        read_checkpoint(export)
    text = str(info.value)
    assert text.startswith(str(target)) and message in text and "\n" not in text
    assert "re-export it" in text


def test_damaged_export_via_cli_is_one_line(tiny_backbone, tiny_pipeline_dir, good_png, tmp_path, capsys):
    export = _export(tiny_backbone, tmp_path)
    weights = export / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    assert main(["extract", str(good_png), "--model", str(tiny_pipeline_dir), "--checkpoint", str(export),
                 "--out", str(tmp_path / "f.safetensors")]) == 2
    assert f"{weights}: not a readable safetensors file" in _one_line_error(capsys)


def test_truncated_pt_is_damaged_not_a_pickle_refusal(tmp_path):
    from cleandift.checkpoints import read_checkpoint
    from cleandift.errors import DamagedCheckpointError

    torch.save({"w": torch.zeros(64)}, tmp_path / "w.pt")
    data = (tmp_path / "w.pt").read_bytes()
    (tmp_path / "w.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(DamagedCheckpointError, match="w.pt: not a readable torch checkpoint"):
        read_checkpoint(tmp_path / "w.pt")


# ------------------------------------------------------------------------------------------------ item 20
def test_help_names_tap_table_and_save_dtype_default(capsys):
    with pytest.raises(SystemExit):
        main(["extract", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "see `cleandift env`" not in text
    assert "README (section Taps)" in text and "--list-taps" in text
    assert "default fp16" in text


def test_list_taps_prints_the_models_taps(tiny_pipeline_dir, capsys):
    assert main(["extract", "--list-taps", "--model", str(tiny_pipeline_dir), "--size", "128"]) == 0
    out = capsys.readouterr().out
    assert "us6" in out and "up_blocks.1.upsamplers.0" in out
    row = next(line.split() for line in out.splitlines() if line.startswith("us6 "))
    assert row[-1] == "8x8"  # 128 px / VAE 8 / stride 2


def test_noisy_run_does_not_record_a_checkpoint(tiny_pipeline_dir, good_png, tmp_path):
    out = tmp_path / "f.safetensors"
    assert main(["extract", str(good_png), "--model", str(tiny_pipeline_dir), "--mode", "noisy",
                 "--ensemble", "1", "--size", "64", "--out", str(out)]) == 0
    assert "checkpoint" not in load_features(out)[1]["settings"]


def test_load_features_is_exported():
    import cleandift
    from cleandift import feature_files

    assert cleandift.load_features is feature_files.load_features
    assert "load_features" in cleandift.__all__

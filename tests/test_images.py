"""Reading odd images, resize policies and the pixel-coordinate convention."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cleandift.errors import BadImageError
from cleandift.features import sample_points, upsample
from cleandift.images import find_images, image_to_tensor, load_image, resize_image


def _save(img: Image.Image, path, **kw):
    img.save(path, **kw)
    return path


def test_zero_byte_file(tmp_path):
    path = tmp_path / "empty.png"
    path.write_bytes(b"")
    with pytest.raises(BadImageError, match="empty.png: file is empty"):
        load_image(path)


def test_missing_file(tmp_path):
    with pytest.raises(BadImageError, match="nope.jpg: file not found"):
        load_image(tmp_path / "nope.jpg")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("hello")
    with pytest.raises(BadImageError, match="notes.jpg: not a readable image format"):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    path = _save(Image.new("RGB", (64, 64), (200, 10, 10)), tmp_path / "full.jpg", quality=95)
    data = path.read_bytes()
    cut = tmp_path / "cut.jpg"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(BadImageError, match="cut.jpg: corrupt or truncated"):
        load_image(cut)


def test_grayscale_becomes_rgb(tmp_path):
    img = load_image(_save(Image.new("L", (20, 10), 77), tmp_path / "g.png"))
    assert img.mode == "RGB" and img.getpixel((0, 0)) == (77, 77, 77)


def test_rgba_is_composited_on_white(tmp_path):
    arr = np.zeros((8, 8, 4), np.uint8)
    arr[..., 0] = 255  # red under full transparency
    arr[:4, :, 3] = 255  # top half opaque red
    img = load_image(_save(Image.fromarray(arr, "RGBA"), tmp_path / "a.png"))
    assert img.getpixel((0, 0)) == (255, 0, 0)
    assert img.getpixel((0, 7)) == (255, 255, 255)


def test_cmyk_jpeg(tmp_path):
    img = load_image(_save(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), tmp_path / "c.jpg"))
    assert img.mode == "RGB"
    r, g, b = img.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_16bit_png_keeps_its_range(tmp_path):
    arr = np.full((8, 8), 32768, np.uint16)  # mid-grey at 16 bit; naive conversion would clip to white
    arr[0, 0] = 65535
    path = tmp_path / "deep.png"
    Image.fromarray(arr).save(path)
    img = load_image(path)
    assert img.getpixel((4, 4))[0] in (127, 128)
    assert img.getpixel((0, 0))[0] == 255


def test_exif_rotation_is_applied(tmp_path):
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rot.jpg"
    img.save(path, exif=exif)
    assert load_image(path).size == (20, 40)


def test_too_small_image(tmp_path):
    with pytest.raises(BadImageError, match=r"4x3 px, smaller than one model cell \(8 px\)"):
        load_image(_save(Image.new("RGB", (4, 3)), tmp_path / "tiny.png"), min_side=8)


def test_palette_image(tmp_path):
    img = Image.new("P", (8, 8))
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * 762)
    img.putpixel((1, 1), 1)
    assert load_image(_save(img, tmp_path / "p.png")).getpixel((1, 1)) == (10, 200, 30)


@pytest.mark.parametrize("policy", ["stretch", "pad", "crop"])
def test_resize_transform_round_trip(policy):
    img = Image.new("RGB", (300, 200))
    out, tf = resize_image(img, 128, policy)
    assert out.size == (128, 128)
    pts = torch.tensor([[0.0, 0.0], [299.0, 199.0], [150.0, 37.5]])
    torch.testing.assert_close(tf.to_original(tf.to_model(pts)), pts, atol=1e-4, rtol=0)


def test_resize_geometry_by_hand():
    img = Image.new("RGB", (200, 100))
    _, pad = resize_image(img, 100, "pad")  # -> 100x50 content centred vertically: offset y 25
    assert (pad.scale_x, pad.scale_y, pad.offset_x, pad.offset_y) == (0.5, 0.5, 0.0, 25.0)
    # pixel-centre convention: original pixel x=1 covers [1, 2) in edge coordinates -> [0.5, 1.0) after
    # scaling by 0.5 -> centre 0.75 -> index coordinate 0.25; y=0 -> centre 0.25 -> -0.25 + 25 offset
    torch.testing.assert_close(pad.to_model(torch.tensor([[1.0, 0.0]])), torch.tensor([[0.25, 24.75]]))
    _, crop = resize_image(img, 100, "crop")  # -> 200x100 already; crop x from 50
    assert (crop.scale_x, crop.offset_x, crop.offset_y) == (1.0, -50.0, 0.0)
    assert pad.valid_region() == (0.0, 25.0, 100.0, 75.0)


def test_pad_content_is_where_the_transform_says(tmp_path):
    img = Image.new("RGB", (64, 32), (255, 255, 255))
    out, tf = resize_image(img, 64, "pad")
    arr = np.asarray(out)
    assert arr[:15, :, 0].max() == 0 and arr[17:47, :, 0].min() == 255 and arr[49:, :, 0].max() == 0
    assert tf.offset_y == 16


def test_sample_points_equals_indexing_the_upsampled_map():
    feats = torch.randn(2, 5, 4, 6)
    size = (32, 48)
    xy = torch.tensor([[0.0, 0.0], [47.0, 31.0], [10.0, 7.0], [23.0, 16.0]])
    sampled = sample_points(feats, xy, size)
    dense = upsample(feats, size)
    expected = torch.stack([dense[:, :, int(y), int(x)] for x, y in xy.tolist()], dim=1)
    torch.testing.assert_close(sampled, expected, atol=1e-5, rtol=1e-5)


def test_image_to_tensor_range():
    t = image_to_tensor(Image.new("RGB", (2, 2), (0, 255, 127)))
    assert t.shape == (3, 2, 2)
    torch.testing.assert_close(t[:, 0, 0], torch.tensor([-1.0, 1.0, 127 / 127.5 - 1]))


def test_find_images(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ["b.jpg", "a.PNG", "sub/c.webp", "notes.txt"]:
        (tmp_path / name).write_bytes(b"x")
    found = [p.relative_to(tmp_path).as_posix() for p in find_images(tmp_path)]
    assert found == ["a.PNG", "b.jpg", "sub/c.webp"]
    assert [p.name for p in find_images(str(tmp_path / "*.jpg"))] == ["b.jpg"]

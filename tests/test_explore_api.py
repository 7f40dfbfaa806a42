"""Issue 15: the ``cleandift explore`` HTTP API (FastAPI ``TestClient``) on the bundled mini model.

Hand-checkable anchors: a point matched against its own image comes back within one feature cell (for
the DIFT protocol -- bilinear source descriptor, argmax over upsampled target pixels -- exactly), and
every refusal is a 4xx with a one-line ``detail`` (never a crash, never a file outside the served set).
"""

from __future__ import annotations

import io
import os
import struct
import threading
import zlib

import pytest
import torch
from PIL import Image

if not os.environ.get("CI"):  # CI installs the extra; a missing one there must fail, not skip
    pytest.importorskip("fastapi")
    pytest.importorskip("httpx")

from cleandift.explore.limits import Limits  # noqa: E402
from cleandift.explore.session import Explorer, open_session  # noqa: E402
from cleandift.explore.store import ImageStore  # noqa: E402

METHODS = [{"name": "cleandift"}, {"name": "dift", "ensemble": 2}, {"name": "frozen"}]


@pytest.fixture(scope="module")
def explorer():
    ex = open_session("mini")
    yield ex
    ex.close()


@pytest.fixture(scope="module")
def client(explorer):
    from fastapi.testclient import TestClient

    from cleandift.explore.server import create_app

    with TestClient(create_app(explorer)) as c:
        yield c


@pytest.fixture(scope="module")
def small_client(explorer):
    """The same model behind tight limits (tiny uploads, few pixels, a one-entry-sized cache)."""
    from fastapi.testclient import TestClient

    from cleandift.explore.server import create_app

    limits = Limits(max_upload_bytes=20_000, max_pixels=200_000, cache_bytes=1)
    ex = Explorer(explorer.backbone, ImageStore(limits), student=explorer.student,
                  student_timestep=explorer.student_timestep, limits=limits, model_name="mini")
    with TestClient(create_app(ex)) as c:
        yield c
    ex.close()


def _png(width: int, height: int, seed: int = 0) -> bytes:
    g = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(height // 8 + 1, width // 8 + 1, 3, generator=g) * 255).byte().numpy()
    image = Image.fromarray(pixels).resize((width, height), Image.NEAREST)
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png(width: int = 100_000, height: int = 100_000) -> bytes:
    """A PNG whose header claims ``width x height`` pixels (10 gigapixels) with almost no data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        return struct.pack(">I", len(data)) + kind + data + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    body = chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + body


def _match(client, **overrides):
    body = {"source": 0, "points": [[118.0, 150.0]], "targets": [0], "methods": METHODS, **overrides}
    return client.post("/api/match", json=body)


def _detail(response) -> str:
    detail = response.json()["detail"]
    assert isinstance(detail, str) and "\n" not in detail and detail
    return detail


# ---------------------------------------------------------------------------------------------- page, config
def test_page_static_files_and_config(client):
    page = client.get("/")
    assert page.status_code == 200 and "/static/explore.js" in page.text
    for name in ("explore.js", "explore.css"):
        assert client.get(f"/static/{name}").status_code == 200
    cfg = client.get("/api/config").json()
    assert cfg["model"] == "mini" and cfg["default_tap"] == "us6" and cfg["size"] == 32
    assert {t["name"] for t in cfg["taps"]} >= {"mid", "us6", "us10"}
    assert [m["name"] for m in cfg["methods"]] == ["cleandift", "dift", "frozen"]
    assert all(m["available"] for m in cfg["methods"]) and cfg["checkpoint"] == "bundled mini student"
    assert cfg["t_max"] == 999 and cfg["t_integer"] is True
    assert "Ankle boot" in cfg["prompt_suggestions"] and cfg["limits"]["max_points"] >= 1


def test_images_are_listed_and_served_as_decoded_pixels(client):
    images = client.get("/api/images").json()["images"]
    assert [im["name"] for im in images[:2]] == ["ankle-boot-1.png", "ankle-boot-2.png"]
    assert all(set(im) == {"id", "name", "width", "height", "origin"} for im in images)  # never a server path
    response = client.get(f"/api/images/{images[0]['id']}")
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(response.content)).size == (images[0]["width"], images[0]["height"])


@pytest.mark.parametrize("path", [
    "/api/images/..%2F..%2F..%2Fetc%2Fpasswd", "/api/images/%2Fetc%2Fpasswd", "/api/images/..",
    "/api/images/-1", "/api/images/999", "/api/images/0x0", "/api/images/%2e%2e%2fpyproject.toml",
    "/static/..%2Fsession.py", "/static/%2e%2e/session.py", "/static/../session.py",
    "/api/images/0/../../../etc/passwd",
])
def test_traversal_attempts_read_nothing(client, path):
    response = client.get(path)
    assert 400 <= response.status_code < 500, (path, response.status_code)
    assert b"root:" not in response.content and b"import torch" not in response.content


def test_unknown_image_id_is_404_with_message(client):
    response = client.get("/api/images/12345")
    assert response.status_code == 404 and "unknown image id" in _detail(response)


# ---------------------------------------------------------------------------------------------- uploads
def test_upload_multipart_and_raw_then_match_in_original_pixels(client):
    upload = {"file": ("../../wide photo.png", _png(300, 180), "image/png")}
    response = client.post("/api/images", files=upload)
    assert response.status_code == 201, response.text
    wide = response.json()
    assert wide["name"] == "wide photo.png" and (wide["width"], wide["height"]) == (300, 180)
    raw = client.post("/api/images?name=tall.png", content=_png(120, 200, seed=1),
                      headers={"content-type": "application/octet-stream"})
    assert raw.status_code == 201 and raw.json()["name"] == "tall.png"
    big = client.post("/api/images", files={"file": ("big.png", _png(1200, 700, seed=2), "image/png")}).json()
    ids = [im["id"] for im in client.get("/api/images").json()["images"]]
    assert {wide["id"], raw.json()["id"], big["id"]} <= set(ids)
    # over Limits.max_match_side the pixel grid is a reduced frame; points still come back in original pixels
    for point in ([1011.0, 97.0], [3.0, 690.0]):
        for r in _match(client, source=big["id"], targets=[big["id"]], points=[point]).json()["results"]:
            (x, y), = r["points"]
            assert abs(x - point[0]) <= 1200 / 512 and abs(y - point[1]) <= 700 / 299, (point, r)
    # a non-square image matched against itself, every resize policy: the same point, in original pixels
    point = [201.0, 47.0]
    for resize in ("stretch", "pad", "crop"):
        answer = _match(client, source=wide["id"], targets=[wide["id"]], points=[point], resize=resize).json()
        for r in answer["results"]:
            cell_x, cell_y = r["cell_px"]
            (x, y), = r["points"]
            assert abs(x - point[0]) <= cell_x and abs(y - point[1]) <= cell_y, (resize, r["method"], x, y)


@pytest.mark.parametrize("data, status, words", [
    (b"\x00garbage bytes, certainly not an image" * 3, 400, "not a readable image format"),
    (b"", 400, "empty"),
    (_bomb_png(100_000, 100_000), 413, "decompression bomb"),  # PIL's own guard, before any decoding
    (_bomb_png(10_000, 10_000), 413, "over the limit of 40 megapixels"),  # ours, below PIL's
], ids=["garbage", "empty", "bomb-header", "too-many-pixels"])
def test_bad_uploads_get_a_message(client, data, status, words):
    response = client.post("/api/images", files={"file": ("x.png", data, "image/png")})
    assert response.status_code == status and words in _detail(response), response.text
    assert client.get("/api/config").status_code == 200  # still serving


def test_truncated_and_oversized_uploads(client, small_client):
    whole = _png(256, 256)
    truncated = client.post("/api/images", files={"file": ("cut.png", whole[: len(whole) // 2], "image/png")})
    assert truncated.status_code == 400 and "cut.png" in _detail(truncated)
    too_big = small_client.post(
        "/api/images", files={"file": ("big.png", b"\x89PNG" + b"0" * 30_000, "image/png")})
    assert too_big.status_code == 413 and "over the upload limit" in _detail(too_big)
    raw_big = small_client.post("/api/images?name=big.png", content=b"0" * 100_000)
    assert raw_big.status_code == 413
    flat = io.BytesIO()
    Image.new("RGB", (600, 400), (90, 90, 90)).save(flat, format="PNG")  # a few hundred bytes, 240k pixels
    many_pixels = small_client.post("/api/images", files={"file": ("px.png", flat.getvalue(), "image/png")})
    assert many_pixels.status_code == 413 and "megapixels" in _detail(many_pixels)
    no_file = client.post("/api/images", files={"other": ("x.png", whole, "image/png")})
    assert no_file.status_code == 400 and "form field 'file'" in _detail(no_file)


def test_served_folder_lists_images_and_names_what_it_skips(explorer, tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "good.png").write_bytes(_png(64, 48))
    (tmp_path / "broken.png").write_bytes(b"not an image at all")
    (tmp_path / "notes.txt").write_text("not listed: not an image name")
    store = ImageStore(Limits())
    try:
        added = store.add_paths([tmp_path])
        assert [(e.name, e.width, e.height) for e in added] == [("sub/good.png", 64, 48)]
        assert [name for name, _ in store.skipped] == ["broken.png"]
        assert "not a readable image format" in store.skipped[0][1]
    finally:
        store.close()


def test_without_a_student_cleandift_is_unavailable(explorer):
    from fastapi.testclient import TestClient

    from cleandift.explore.server import create_app

    ex = Explorer(explorer.backbone, ImageStore(Limits()), model_name="mini")
    ex.images.add_upload(_png(64, 64), "a.png")
    with TestClient(create_app(ex)) as c:
        methods = {m["name"]: m["available"] for m in c.get("/api/config").json()["methods"]}
        assert methods == {"cleandift": False, "dift": True, "frozen": True}
        refused = _match(c, points=[[10.0, 10.0]], methods=[{"name": "cleandift"}])
        assert refused.status_code == 400 and "--checkpoint" in _detail(refused)
        assert _match(c, points=[[10.0, 10.0]], methods=[{"name": "frozen"}]).status_code == 200
    ex.close()


# ---------------------------------------------------------------------------------------------- matching
def test_point_matched_on_its_own_image_comes_back(client):
    answer = _match(client).json()
    assert [r["method"] for r in answer["results"]] == ["cleandift", "dift", "frozen"]
    for r in answer["results"]:
        # DIFT's protocol (bilinear source descriptor, argmax over upsampled pixels): exactly the same pixel
        assert r["points"] == [[118.0, 150.0]] and r["scores"][0] == pytest.approx(1.0, abs=1e-4)
        assert r["cell_px"] == [16.0, 16.0]  # 256 px shown, 32 px model input, us6 has stride 2: 16 cells
        heat = r["heatmap"]
        assert (heat["width"], heat["height"]) == (16, 16) and len(heat["values"]) == 16 * 16
        peak = max(range(256), key=lambda i: heat["values"][i])
        assert (peak % 16, peak // 16) == (118 // 16, 150 // 16)  # the hottest cell holds the clicked point
    for matcher in ({"method": "soft-argmax"}, {"grid": "cells"}, {"method": "soft-argmax", "grid": "cells"}):
        for r in _match(client, matcher=matcher).json()["results"]:
            (x, y), = r["points"]
            assert abs(x - 118) <= 16 and abs(y - 150) <= 16, (matcher, r)


def test_features_are_cached_between_clicks(client, explorer):
    body = {"source": 1, "points": [[90.0, 120.0]], "targets": [2, 3],
            "methods": [{"name": "dift", "t": 300}]}
    first = client.post("/api/match", json=body).json()
    again = client.post("/api/match", json={**body, "points": [[30.0, 40.0], [100.0, 100.0]]}).json()
    assert first["timing"]["features_ms"] > 0 and again["timing"]["features_ms"] == 0
    assert len(again["results"][0]["points"]) == 2
    stats = client.get("/api/cache").json()
    assert stats["entries"] >= 3 and stats["hits"] >= 3 and stats["bytes"] <= stats["max_bytes"]


def test_concurrent_requests_compute_features_once(explorer):
    settings = explorer.settings("dift", t=123, ensemble=3)
    out = [None] * 4

    def work(i):
        out[i] = explorer.features(4, settings)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(o is out[0] for o in out)  # one computation, shared from the cache


@pytest.mark.parametrize("overrides, status, words", [
    ({"methods": [{"name": "dift", "t": 5000}]}, 400, "outside [0, 999]"),
    ({"methods": [{"name": "dift", "t": -1}]}, 400, "outside [0, 999]"),
    ({"methods": [{"name": "dift", "t": 261.5}]}, 400, "not a whole number"),
    ({"methods": [{"name": "dift", "ensemble": 0}]}, 400, "ensemble 0"),
    ({"methods": [{"name": "sdxl-magic"}]}, 400, "unknown method"),
    ({"methods": []}, 422, "methods"),
    ({"tap": "us99"}, 400, "unknown tap 'us99'"),
    ({"resize": "squash"}, 400, "unknown resize policy"),
    ({"prompt": "a photo of a giraffe"}, 400, "names no class"),
    ({"points": [[300.0, 10.0]]}, 400, "outside image 0"),
    ({"points": []}, 422, "points"),
    ({"points": [[1.0]]}, 422, "points"),
    ({"source": 999}, 404, "unknown image id 999"),
    ({"targets": [0, 999]}, 404, "unknown image id 999"),
    ({"targets": []}, 422, "targets"),
    ({"matcher": {"method": "hungarian"}}, 400, "unknown matcher"),
    ({"matcher": {"temperature": 0}}, 400, "temperature"),
    ({"heatmap_point": 3}, 400, "heatmap point"),
    ({"unexpected": 1}, 422, "unexpected"),
])
def test_bad_parameters_are_4xx_with_a_message(client, overrides, status, words):
    response = _match(client, **overrides)
    assert response.status_code == status, response.text
    assert words in _detail(response)


def test_malformed_json_is_422(client):
    response = client.post("/api/match", content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422 and _detail(response)


# ------------------------------------------------------------------------------------------ mutual, export
def test_mutual_nearest_neighbours_in_original_pixels(client):
    body = {"source": 0, "targets": [0, 1], "methods": [{"name": "cleandift"}], "k": 12, "radius": 40}
    answer = client.post("/api/mutual", json=body)
    assert answer.status_code == 200, answer.text
    same, other = answer.json()["results"]
    assert same["mutual_total"] == 16 * 16  # an image is its own mutual nearest neighbour everywhere
    for r in (same, other):
        pairs = r["pairs"]
        assert 0 < len(pairs) <= 12
        confidences = [p["confidence"] for p in pairs]
        assert all(0 <= c <= 1 for c in confidences) and confidences == sorted(confidences, reverse=True)
        for p in pairs:
            assert all(-0.5 <= v <= 255.5 for v in p["source"] + p["target"])
        src = torch.tensor([p["source"] for p in pairs])
        assert (torch.cdist(src, src) + torch.eye(len(pairs)) * 1e9).min() >= 40  # the suppression radius
    assert all(p["source"] == p["target"] for p in same["pairs"])
    assert min(p["confidence"] for p in same["pairs"]) > 0.5
    bad = client.post("/api/mutual", json={**body, "k": 0})
    assert bad.status_code == 400 and "k 0" in _detail(bad)


def test_export_holds_the_points_and_settings(client):
    points = [[118.0, 150.0], [40.5, 200.25]]
    body = {"source": 0, "points": points, "targets": [0, 1], "methods": METHODS[:2], "tap": "us6"}
    doc = client.post("/api/export", json=body).json()
    assert doc["format"] == "cleandift-explore-keypoints" and "original-image pixels" in doc["coordinates"]
    assert doc["source"]["image"] == "ankle-boot-1.png" and doc["source"]["points"] == points
    assert [t["image"] for t in doc["targets"]] == ["ankle-boot-1.png", "ankle-boot-2.png"]
    same = doc["targets"][0]["methods"]["cleandift"]["points"]  # the image itself: the points, to a pixel
    assert torch.tensor(same) == pytest.approx(torch.tensor(points).round(), abs=1)
    assert len(doc["targets"][1]["methods"]["dift"]["points"]) == 2
    dift = next(s for s in doc["settings"] if s["method"] == "dift")
    assert dift == {"method": "dift", "tap": "us6", "prompt": "", "resize": "pad", "t": 261.0, "ensemble": 2,
                    "seed": 0}
    clean = next(s for s in doc["settings"] if s["method"] == "cleandift")
    assert clean["t"] == pytest.approx(261.0, abs=0.01)  # the student's learned timestep, recorded


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_refuses_bad_flags_before_loading(capsys, tmp_path):
    from cleandift.cli.main import main

    assert main(["explore", "--port", "70000"]) == 2
    assert "--port 70000" in capsys.readouterr().err
    assert main(["explore", str(tmp_path / "nothing-here")]) == 2
    assert "no image files found" in capsys.readouterr().err
    assert main(["explore", "--size", "30"]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_cli_names_the_extra_when_fastapi_is_missing(capsys, monkeypatch):
    import importlib.util

    from cleandift.cli.main import main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "fastapi" else real(name, *a))
    assert main(["explore"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and 'pip install "cleandift[explore]"' in err


# ------------------------------------------------------------------------------------------ other families
def test_latent_sd_model_without_student(tiny_pipeline_dir, tmp_path):
    """A Stable-Diffusion folder (VAE latents, text prompts), no --checkpoint: DIFT and frozen only."""
    from fastapi.testclient import TestClient

    from cleandift.explore.server import create_app

    Image.open(io.BytesIO(_png(200, 120))).save(tmp_path / "photo.png")
    ex = open_session(str(tiny_pipeline_dir), inputs=[str(tmp_path)], size=64)
    try:
        with TestClient(create_app(ex)) as c:
            cfg = c.get("/api/config").json()
            assert cfg["checkpoint"] is None and cfg["default_tap"] == "us6" and cfg["size"] == 64
            assert [m["available"] for m in cfg["methods"]] == [False, True, True]
            body = {"source": 0, "points": [[150.0, 30.0]], "targets": [0], "prompt": "a photo of a cat",
                    "methods": [{"name": "dift", "ensemble": 2}, {"name": "frozen"}]}
            answer = c.post("/api/match", json=body)
            assert answer.status_code == 200, answer.text
            for r in answer.json()["results"]:
                (x, y), = r["points"]
                assert abs(x - 150) <= r["cell_px"][0] and abs(y - 30) <= r["cell_px"][1], r
    finally:
        ex.close()

"""Issue 13 item 16: without a reachable hub, loading fails at once with the real cause and the fix.

Before, ``--model sd15`` with no network spent ~75 s in huggingface_hub's retries (every "Retrying" line
printed twice), then blamed "does not appear to have a file named config.json". The hub is simulated
as unreachable by pointing huggingface_hub at a closed local port; nothing here touches the network.
"""

from __future__ import annotations

import http.server
import os
import subprocess
import sys
import threading
import time
import warnings

import pytest
import torch
from hub_cache import closed_port, populate_hub_cache

from cleandift import hub, load_backbone
from cleandift.backbones import loading
from cleandift.backbones.presets import PRESETS
from cleandift.errors import BackboneNotFoundError


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    """Online mode (HF_HUB_OFFLINE unset) with an empty cache and a hub endpoint nothing answers on."""
    from huggingface_hub import constants

    endpoint = f"http://127.0.0.1:{closed_port()}"
    cache = tmp_path / "hub-cache"
    cache.mkdir()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hub, "_checked", {})
    return endpoint, cache


def test_unreachable_hub_fails_fast_with_cause_and_fix(hub_env, capfd):
    endpoint, cache = hub_env
    start = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught, pytest.raises(BackboneNotFoundError) as info:
        warnings.simplefilter("always")
        load_backbone("sd15")
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert elapsed < 2.0, f"took {elapsed:.1f} s"
    assert message.startswith(f"could not load backbone 'sd15': the Hugging Face hub ({endpoint}) cannot be reached")
    assert "Connect" in message.splitlines()[0]  # the real cause (connection refused), not a missing config.json
    assert "does not appear to have a file named" not in message
    assert all(source in message for source in PRESETS["sd15"].sources) and str(cache) in message
    for fix in ("--model /path/to/diffusers-folder", "--model mini", "HF_HUB_OFFLINE=1", "go online once"):
        assert fix in message
    hub_presets = ", ".join(name for name in PRESETS if name != "mini")
    assert f"presets: {hub_presets} (downloaded from the hub), mini (bundled, offline)" in message
    assert hub_presets.startswith("sd15, sd21, sdxl")
    assert "and 'mini'" not in message
    assert [str(w.message) for w in caught] == []
    assert "Retrying" not in capfd.readouterr().err


def test_offline_mode_names_the_cache_and_never_asks_the_hub(hub_env, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(loading, "hub_unreachable_reason", _must_not_be_called)
    with pytest.raises(BackboneNotFoundError) as info:
        load_backbone("sd21")
    message = str(info.value)
    for source in PRESETS["sd21"].sources:
        assert f"{source}: not in the local Hugging Face cache ({hub_env[1]})" in message
    assert "unset HF_HUB_OFFLINE" in message and "--model mini" in message


def test_cached_mirror_loads_without_any_network(hub_env, monkeypatch, tiny_pipeline_dir, tiny_backbone):
    """The first sd15 source is missing, the second is cached: it loads without asking the hub."""
    populate_hub_cache(hub_env[1], PRESETS["sd15"].sources[1], {".": tiny_pipeline_dir})
    monkeypatch.setattr(loading, "hub_unreachable_reason", _must_not_be_called)
    backbone = load_backbone("sd15")
    assert backbone.name == "sd15"
    for (name, a), (_, b) in zip(backbone.unet.state_dict().items(), tiny_backbone.unet.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_hub_check_reports_reachable_and_failing_servers(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    for status, expected in ((200, None), (503, "HTTP 503")):
        server = _serve(status)
        try:
            monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
            monkeypatch.setattr(hub, "_checked", {})
            reason = hub.hub_unreachable_reason()
        finally:
            server.shutdown()
        assert reason == expected or (expected and reason.startswith(expected)), reason
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_unreachable_reason() == "HF_HUB_OFFLINE is set"


def test_env_reports_the_hub_unreachable(hub_env, capsys):
    from cleandift.cli.main import main

    assert main(["env"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("hub "))
    assert f"{hub_env[0]} reachable: no (" in line and str(hub_env[1]) in line


def test_cli_extract_offline_is_one_clean_error(tmp_path):
    """End to end, as a user meets it: rc 2, only the error on stderr (no warnings, no retries)."""
    from PIL import Image

    image = tmp_path / "img.png"
    Image.new("RGB", (32, 32), (200, 30, 90)).save(image)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{closed_port()}", HF_HOME=str(tmp_path / "hf"),
               HF_HUB_CACHE=str(tmp_path / "hf" / "hub"), OMP_NUM_THREADS="1")
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "cleandift.cli.main", "extract", str(image), "--model", "sd15",
                           "--out", str(tmp_path / "f.safetensors")], env=env, capture_output=True, text=True,
                          timeout=120)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.splitlines()
    assert lines[0].startswith("error: could not load backbone 'sd15': the Hugging Face hub (http://127.0.0.1:")
    assert not any(word in proc.stderr for word in ("Retrying", "Warning", "warn(", "Traceback")), proc.stderr
    assert len(lines) == 8, proc.stderr  # the error, its cache line, "fix it with one of:" and 5 fixes
    assert elapsed < 30, f"{elapsed:.1f} s"  # interpreter + torch import on a loaded CI box; was ~75 s


def _must_not_be_called(*_args, **_kwargs):
    raise AssertionError("the hub must not be asked")


def _serve(status: int) -> http.server.HTTPServer:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):  # noqa: N802 - http.server API
            self.send_response(status)
            self.end_headers()

        def log_message(self, *_args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server



def test_library_warnings_print_once_and_ours_still_show():
    """huggingface_hub has its own stderr handler: the CLI must not add a second one via the root logger
    (every "Retrying in 1s" line used to appear twice)."""
    code = ("import logging; from cleandift.cli.main import _configure_logging; import huggingface_hub; "
            "_configure_logging(False); "
            "logging.getLogger('huggingface_hub.utils._http').warning('Retrying in 1s [Retry 1/5].'); "
            "logging.getLogger('cleandift.cli.extract').info('wrote f.safetensors'); "
            "logging.getLogger('cleandift.cli.extract').debug('hidden')")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert proc.stderr.splitlines() == ["Retrying in 1s [Retry 1/5].", "wrote f.safetensors"]

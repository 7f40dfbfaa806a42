"""``cleandift explore``: a local web page to click a point and see where each method matches it.

Everything that can be checked without a model is checked first (images, port, checkpoint path,
device, the ``explore`` extra), so a typo costs a second, not a model load.
"""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import logging

from .common import add_model_args, resolve_device, resolve_dtype

log = logging.getLogger(__name__)
EXTRA_MODULES = ("fastapi", "uvicorn", "multipart")


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "explore", help="interactive page: click a point, see its matches (CleanDIFT vs DIFT) side by side",
        description="Serve a local page that matches clicked points across images with the CleanDIFT "
                    "student, DIFT (noisy features) and the frozen model, with similarity heatmaps, mutual "
                    "nearest neighbours and keypoint-template export. Default: the bundled mini model and a "
                    "few bundled Fashion-MNIST images (works offline on any CPU). Needs: pip install "
                    "\"cleandift[explore]\".")
    p.add_argument("images", nargs="*", help="image files, folders (searched recursively) or glob patterns "
                                             "(default with --model mini: a few bundled test images)")
    add_model_args(p, default_model="mini")
    p.add_argument("--offload", action="store_true", help="keep weights in CPU memory between model runs")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 exposes the "
                        "model and uploads to the network)")
    p.add_argument("--port", type=int, default=8765, help="port (default 8765; 0: any free port)")
    p.add_argument("--size", type=int, default=None,
                   help="model input size in px, a multiple of the model's coarsest cell (default: the "
                        "model's resolution)")
    p.add_argument("--cache-mb", type=int, default=512, help="feature cache budget in MB (default 512)")
    p.add_argument("--max-upload-mb", type=int, default=25, help="largest accepted upload in MB (default 25)")
    p.add_argument("--max-megapixels", type=float, default=40.0,
                   help="largest accepted image in megapixels, checked before decoding (default 40)")
    p.set_defaults(func=run)
    return p


def validate_args(args) -> None:
    """One-line :class:`ConfigError` for every problem knowable before loading the model."""
    from ..errors import ConfigError  # noqa: PLC0415

    missing = [m for m in EXTRA_MODULES if importlib.util.find_spec(m) is None]
    if missing:
        raise ConfigError(f"cleandift explore needs {', '.join(missing)} (not installed); "
                          "pip install \"cleandift[explore]\"")
    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port}: must be in 0..65535 (0: any free port)")
    if not args.host.strip():
        raise ConfigError("--host is empty; use 127.0.0.1 (this machine only) or 0.0.0.0 (the network)")
    for flag, value in (("--cache-mb", args.cache_mb), ("--max-upload-mb", args.max_upload_mb),
                        ("--max-megapixels", args.max_megapixels)):
        if not value > 0:
            raise ConfigError(f"{flag} {value}: must be positive")
    _check_size(args)
    if args.checkpoint:
        from ..checkpoints import check_checkpoint_path  # noqa: PLC0415

        check_checkpoint_path(args.checkpoint)
    if args.images:
        from ..images import entry_kind, scan_images  # noqa: PLC0415

        scan = scan_images(args.images)
        if not any(entry_kind(p)[0] == "file" for p in scan.paths):
            why = f" ({scan.skipped[0][0]}: {scan.skipped[0][1]})" if scan.skipped else ""
            raise ConfigError(f"no image files found in {' '.join(args.images)}{why}; pass image files, "
                              "folders or glob patterns")
    resolve_device(args.device)


def _check_size(args) -> None:
    from ..errors import ConfigError  # noqa: PLC0415
    from .extract import model_facts  # noqa: PLC0415

    if args.size is None:
        return
    cell, _ = model_facts(args.model)
    if args.size < 1 or (cell and args.size % cell):
        hint = f"a multiple of {cell} px (the model's coarsest cell)" if cell else "a positive number of px"
        raise ConfigError(f"--size {args.size}: must be {hint}")


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def run(args) -> int:
    validate_args(args)
    from ..explore.limits import Limits  # noqa: PLC0415
    from ..explore.server import create_app, serve, url_of  # noqa: PLC0415
    from ..explore.session import open_session  # noqa: PLC0415

    limits = Limits(max_upload_bytes=args.max_upload_mb * 2**20, max_pixels=int(args.max_megapixels * 1e6),
                    cache_bytes=args.cache_mb * 2**20)
    sock = _bind(args.host, args.port)  # before the model loads: a taken port fails fast
    explorer = open_session(args.model, args.checkpoint, args.images, device=resolve_device(args.device),
                            dtype=resolve_dtype(args.dtype), size=args.size, limits=limits,
                            single_file_config=args.single_file_config, offload=args.offload)
    _check_loaded_size(explorer)
    for name, reason in explorer.images.skipped:
        log.warning("skipped %s: %s", name, reason)
    if not _is_loopback(args.host):
        log.warning("listening on %s: anyone who can reach this machine can run the model and upload images",
                    args.host)
    print(f"cleandift explore: {explorer.model_name} ({explorer.checkpoint_name or 'no student'}), "
          f"{len(explorer.images)} image(s)")
    print(f"open {url_of(sock)}  (Ctrl+C stops the server)", flush=True)
    try:
        serve(create_app(explorer), sock)
    finally:
        explorer.close()
        sock.close()
    return 0


def _bind(host: str, port: int):
    from ..errors import ConfigError  # noqa: PLC0415
    from ..explore.server import bind  # noqa: PLC0415

    try:
        return bind(host, port)
    except OSError as exc:
        raise ConfigError(f"cannot listen on {host}:{port} ({exc.strerror or exc}); pick another --port "
                          "(0: any free one) or --host") from exc


def _check_loaded_size(explorer) -> None:
    from ..errors import ConfigError  # noqa: PLC0415

    cell = explorer.backbone.size_multiple
    if explorer.size % cell:
        raise ConfigError(f"--size {explorer.size}: must be a multiple of {cell} px (the model's coarsest "
                          "cell)")

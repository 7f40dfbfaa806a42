"""``cleandift extract``: images -> features (safetensors), clean (CleanDIFT) or noisy (DIFT).

Every argument is checked before any model is loaded (numbers, ``--t``, ``--out``, ``--checkpoint``,
``--device``, ``--pca`` vs ``--taps``; ``--size`` against the model's cell where its config is readable
without loading it), so a typo costs a second, not a model load plus a whole extraction.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
from pathlib import Path

from ..constants import RESIZE_POLICIES
from .common import add_model_args, resolve_device, resolve_dtype

log = logging.getLogger(__name__)
#: pixels per coarsest U-Net cell and training timesteps of the presets (VAE x8 times U-Net x8 for SD)
_PRESET_FACTS = {"sd15": (64, 1000), "sd21": (64, 1000)}


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "extract", help="extract features of images (files, folders, globs) into a .safetensors file",
        description="Extract dense diffusion features. --mode clean: one pass of the student on the clean image "
                    "(CleanDIFT). --mode noisy: DIFT, noise at --t averaged over --ensemble draws. "
                    "Read the output with cleandift.load_features(path).")
    p.add_argument("images", nargs="*", help="image files, folders (searched recursively) or glob patterns")
    add_model_args(p)
    p.add_argument("--offload", action="store_true",
                   help="keep weights in CPU memory and move each model to --device only while it runs "
                        "(SDXL, SD3, PixArt, Flux on one GPU that cannot hold them all)")
    p.add_argument("--out", default="features.safetensors",
                   help="output file (default features.safetensors); its folder must exist")
    p.add_argument("--taps", default=None,
                   help="comma-separated taps or 'all' (default: the family's feature tap, us6 for SD; see "
                        "docs/backbones.md); the SD taps are tabled in the README (section Taps), --list-taps "
                        "prints the chosen model's")
    p.add_argument("--list-taps", action="store_true", help="print the model's taps (name, module, channels, "
                                                             "feature-map size) and exit")
    p.add_argument("--mode", choices=("clean", "noisy"), default="clean")
    p.add_argument("--t", type=float, default=None,
                   help="noisy: integer noise timestep in [0,999] (default 261); clean: the student's timestep "
                        "input, may be fractional (default: the checkpoint's learned value, else 261)")
    p.add_argument("--sigma", type=float, default=None,
                   help="noisy: the noise level instead of --t, for peers that quote sigma (flow models: x_t = "
                        "(1-sigma) x0 + sigma eps, exact; DDPM models: sqrt(1-abar_t), the nearest t)")
    p.add_argument("--ensemble", type=int, default=8, help="noisy: noise draws averaged (default 8, as DIFT)")
    p.add_argument("--dit-readout", choices=("residual", "adaln"), default="residual",
                   help="diffusion transformers: read block outputs as they are (default) or through the next "
                        "AdaLN-modulated norm (DiTF; SD3 and Flux)")
    p.add_argument("--massive-ratio", type=float, default=None, metavar="R",
                   help="zero channels whose RMS is over R x the image's median channel RMS (DiT 'massive "
                        "activations', e.g. 100; default: keep all)")
    p.add_argument("--noise", choices=("independent", "shared"), default="independent",
                   help="noisy: 'independent' (default): each image's draws come from --seed and the image's "
                        "content, so its features never depend on the other images or --batch-size; "
                        "'shared': every image gets the same draws (from --seed alone; SD-DINO)")
    p.add_argument("--prompt", default="", help="text prompt for every image; '{stem}' is replaced by the file "
                                                "name stem, '{parent}' by its folder name (default: empty prompt)")
    p.add_argument("--size", type=int, default=None,
                   help="model input size in px, a multiple of the model's coarsest cell (64 for SD) "
                        "(default: the model's resolution)")
    p.add_argument("--resize", choices=RESIZE_POLICIES, default="stretch",
                   help="stretch to a square (DIFT), pad the longer side (SD-DINO) or centre-crop")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch (default 4)")
    p.add_argument("--chunk-size", type=int, default=8, help="max U-Net samples per forward (bounds memory; default 8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws (noisy mode; default 0)")
    p.add_argument("--save-dtype", choices=("fp16", "fp32"), default="fp16",
                   help="precision of the stored features (default fp16: half the size)")
    p.add_argument("--pca", metavar="TAP", default=None,
                   help="also write a PCA-RGB PNG of this tap per image (the tap must be in --taps)")
    p.add_argument("--pca-dir", default=None, help="folder for the PCA PNGs (default: next to --out)")
    p.add_argument("--strict", action="store_true",
                   help="stop at the first unusable image file (default: skip it and list it at the end)")
    p.set_defaults(func=run)
    return p


def build_extractor(args, backbone, *, owns_backbone: bool = False):
    """Clean or noisy extractor from CLI args (shared with other commands).

    ``owns_backbone``: the caller loaded ``backbone`` only for this extractor, so a ``--checkpoint`` is loaded
    into its denoiser in place rather than into a copy (one denoiser in memory instead of two).
    """
    from ..checkpoints import load_student  # noqa: PLC0415
    from ..extract import CleanExtractor, NoisyExtractor  # noqa: PLC0415
    from ..timesteps import DIFT_TIMESTEP  # noqa: PLC0415

    taps = getattr(args, "taps", None)
    if args.mode == "noisy":
        if args.checkpoint:
            log.warning("--checkpoint is ignored in noisy mode (DIFT uses the frozen backbone)")
        return NoisyExtractor(backbone, t=args.t if args.t is not None else DIFT_TIMESTEP,
                              ensemble=args.ensemble, noise=getattr(args, "noise", "independent"),
                              taps=taps, chunk_size=getattr(args, "chunk_size", 8),
                              sigma=getattr(args, "sigma", None), **_cleanup_options(args))
    unet, timestep = backbone.unet, DIFT_TIMESTEP
    if args.checkpoint:
        unet, ckpt = load_student(backbone.unet, args.checkpoint, inplace=owns_backbone)
        if ckpt.timestep is not None:
            timestep = ckpt.timestep
    else:
        log.warning("no --checkpoint: clean mode runs the *frozen* backbone on clean images "
                    "(the 'naive clean' baseline), not a CleanDIFT student")
    if args.t is not None:
        timestep = args.t
    return CleanExtractor(backbone, unet=unet, timestep=timestep, taps=taps, chunk_size=getattr(args, "chunk_size", 8),
                          **_cleanup_options(args))


def _cleanup_options(args) -> dict:
    """The DiT clean-up options (:mod:`cleandift.dit_cleanup`) of commands that have them."""
    return {"readout": getattr(args, "dit_readout", "residual"), "massive_ratio": getattr(args, "massive_ratio", None)}


# ---------------------------------------------------------------------------------------------- checks
def validate_args(args) -> None:
    """One-line :class:`ConfigError` for every argument problem knowable without loading a model."""
    from ..errors import ConfigError  # noqa: PLC0415

    if not args.images and not args.list_taps:
        raise ConfigError("no images given; pass image files, folders or glob patterns (or --list-taps)")
    for flag, value, hint in (("--batch-size", args.batch_size, "e.g. 4"), ("--chunk-size", args.chunk_size, "e.g. 8"),
                              ("--ensemble", args.ensemble, "DIFT uses 8")):
        if value < 1:
            raise ConfigError(f"{flag} {value}: must be at least 1 ({hint})")
    cell, num_timesteps = model_facts(args.model)
    _check_size(args.size, cell)
    _check_t(args, num_timesteps)
    if args.checkpoint and args.mode == "noisy":
        raise ConfigError(f"--checkpoint {args.checkpoint} is not used by --mode noisy (DIFT runs the frozen "
                          "backbone); drop --checkpoint, or use --mode clean for the student")
    if args.pca and args.taps is not None and args.taps.strip() != "all":
        wanted = [t.strip() for t in args.taps.split(",") if t.strip()]
        if args.pca not in wanted:
            raise ConfigError(f"--pca {args.pca}: the tap is not in --taps {args.taps}; add it "
                              f"(--taps {','.join([*wanted, args.pca])})")
    if args.checkpoint:
        from ..checkpoints import check_checkpoint_path  # noqa: PLC0415

        check_checkpoint_path(args.checkpoint)
    resolve_device(args.device)
    if not args.list_taps:
        _check_outputs(args)


def _check_size(size: int | None, cell: int | None) -> None:
    from ..errors import ConfigError  # noqa: PLC0415

    if size is None:
        return
    if size < 1:
        raise ConfigError(f"--size {size}: must be a positive number of pixels")
    if cell and size % cell:
        lower, upper = max(cell, size // cell * cell), (size // cell + 1) * cell
        raise ConfigError(f"--size {size}: must be a multiple of {cell} px (the model's coarsest U-Net cell); "
                          f"use --size {lower}" + (f" or {upper}" if upper != lower else ""))


def _check_t(args, num_timesteps: int | None) -> None:
    """``--t`` exactly as the extractors check it; the range is the model's (1000 steps for the presets)."""
    from ..timesteps import validate_timestep  # noqa: PLC0415

    from ..errors import ConfigError  # noqa: PLC0415

    ratio = getattr(args, "massive_ratio", None)
    if ratio is not None and not (math.isfinite(ratio) and ratio > 1):
        raise ConfigError(f"--massive-ratio {ratio}: must be a number > 1 (a multiple of the median channel RMS)")
    sigma = getattr(args, "sigma", None)
    if sigma is not None:
        if args.mode != "noisy" or args.t is not None:
            raise ConfigError("--sigma sets the noise level of --mode noisy instead of --t: pass one of them, "
                              "with --mode noisy")
        if not math.isfinite(sigma) or not 0 <= sigma < 1:
            raise ConfigError(f"--sigma {sigma}: must be in [0, 1) (0 = clean, 1 = pure noise)")
    if args.t is None:
        return
    # whole-number t only for DDPM models; a model read from its configs is one (flow families are checked
    # once loaded: their t is continuous)
    integer = args.mode == "noisy" and num_timesteps is not None
    if num_timesteps is None and math.isfinite(args.t) and args.t >= 0:
        num_timesteps = max(1000, int(args.t) + 1)  # range checked once the model is loaded
    validate_timestep(args.t, num_timesteps or 1000, "t", integer=integer)


def _check_outputs(args) -> None:
    from ..errors import ConfigError  # noqa: PLC0415
    from ..feature_files import check_output, remove_stale_temps  # noqa: PLC0415

    out = check_output(args.out)
    for tmp in remove_stale_temps(out):
        log.info("removed %s (left by an interrupted run)", tmp)
    if args.pca_dir and Path(args.pca_dir).exists() and not Path(args.pca_dir).is_dir():
        raise ConfigError(f"--pca-dir {args.pca_dir}: exists and is not a folder; pick another --pca-dir")


def model_facts(model: str) -> tuple[int | None, int | None]:
    """``(cell px, training timesteps)`` of a preset or local model folder from its configs alone (no weights).

    ``(None, None)`` where unknown (hub ids, single files): those are checked once the model is loaded.
    """
    from ..backbones.presets import get_preset  # noqa: PLC0415

    if model.lower() in _PRESET_FACTS:
        return _PRESET_FACTS[model.lower()]
    folder = Path(model).expanduser()
    preset = get_preset(model)
    if preset is not None and preset.name == "mini":
        folder = Path(__file__).resolve().parents[1] / "assets" / "mini"
    try:
        unet = json.loads((folder / "unet" / "config.json").read_text())
        if (folder / "vae" / "config.json").is_file():
            latent = 2 ** (len(json.loads((folder / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
        elif (folder / "pixel_backbone.json").is_file():
            latent = 1
        else:
            return None, None
        cell = latent * 2 ** (len(unet["down_block_types"]) - 1)
        scheduler = folder / "scheduler" / "scheduler_config.json"
        steps = json.loads(scheduler.read_text()).get("num_train_timesteps") if scheduler.is_file() else None
        return cell, int(steps) if steps else None
    except (OSError, ValueError, KeyError, TypeError):
        return None, None


def _check_loaded(args, backbone, extractor, size: int) -> None:
    """What only the loaded model can tell: its cell for ``--size`` and the taps behind ``--taps all``."""
    _check_size(size, backbone.size_multiple)
    if args.pca:
        extractor.select_taps(args.pca)  # unknown tap name -> one-line UnknownTapError


# ---------------------------------------------------------------------------------------------- run
def run(args) -> int:
    from ..errors import BadImageError  # noqa: PLC0415

    validate_args(args)
    if args.list_taps:
        return _list_taps(args)
    from ..images import scan_images  # noqa: PLC0415

    scan = scan_images(args.images)
    if args.strict and scan.skipped:
        raise BadImageError(*scan.skipped[0])
    if not scan.paths:
        for path, reason in scan.skipped:
            log.error("skipped %s: %s", path, reason)
        log.error("no images found in %s", " ".join(args.images))
        return 2
    return _extract(args, scan)


def _load(args):
    from accelerate import PartialState  # noqa: PLC0415

    from ..backbones import load_backbone  # noqa: PLC0415

    wanted = resolve_device(args.device)
    state = PartialState(cpu=wanted.type == "cpu")  # cpu=True lets torchrun / accelerate form a CPU process group
    device = wanted if state.num_processes == 1 else state.device
    backbone = load_backbone(args.model, device=device, dtype=resolve_dtype(args.dtype),
                             single_file_config=args.single_file_config, offload=getattr(args, "offload", False))
    return state, backbone


def _extract(args, scan) -> int:
    import torch  # noqa: PLC0415

    from ..feature_files import extract_files, merge_feature_files, save_features  # noqa: PLC0415

    state, backbone = _load(args)
    extractor = build_extractor(args, backbone, owns_backbone=True)
    size = args.size or backbone.resolution
    _check_loaded(args, backbone, extractor, size)
    prompt = _prompt_fn(args.prompt)
    with state.split_between_processes(list(zip(scan.paths, scan.keys))) as mine:
        result = extract_files(extractor, [p for p, _ in mine], keys=[k for _, k in mine], size=size,
                               resize=args.resize, prompt=prompt, taps=args.taps, batch_size=args.batch_size,
                               seed=args.seed, save_dtype=torch.float16 if args.save_dtype == "fp16" else torch.float32,
                               progress=state.is_local_main_process, strict=args.strict)
    if state.is_main_process:
        result.failed[:0] = scan.skipped
    settings = {**extractor.describe(), "model": args.model, "size": size, "resize": args.resize,
                "taps": [t.name for t in extractor.select_taps(args.taps)], "prompt": args.prompt, "seed": args.seed,
                "dtype": args.dtype, "save_dtype": args.save_dtype}
    if args.mode == "clean":
        settings["checkpoint"] = args.checkpoint
    else:
        latent = torch.empty(1, 1, size // backbone.latent_factor, size // backbone.latent_factor)
        settings["sigma_at_size"] = backbone.sigma(extractor.timestep_for(latent), latent)
        settings["noise_seed"] = ("per image: --seed and the image content" if args.noise == "independent"
                                  else "shared: --seed alone")
    out = Path(args.out).expanduser()
    if state.num_processes > 1:
        part = out.with_name(f"{out.stem}.part{state.process_index}{out.suffix}")
        save_features(result, part, settings)
        state.wait_for_everyone()
        if state.is_main_process:
            merge_feature_files([out.with_name(f"{out.stem}.part{i}{out.suffix}")
                                 for i in range(state.num_processes)], out)
    else:
        save_features(result, out, settings)
    if args.pca:
        _write_pca(result, args.pca, Path(args.pca_dir) if args.pca_dir else out.parent / f"{out.stem}_pca")
    if state.is_main_process:
        _report(result, out)
    return 0 if result.features else 2


def _report(result, out: Path) -> None:
    from ..errors import printable  # noqa: PLC0415

    print(f"wrote features of {len(result.features)} image(s) to {printable(out)}")
    if result.failed:
        print(f"skipped {len(result.failed)} unreadable image(s):")
        for path, reason in result.failed:
            print(f"  {path}: {reason}")


def _list_taps(args) -> int:
    _, backbone = _load(args)
    size = args.size or backbone.resolution
    grid = size // backbone.latent_factor
    print(f"taps of {args.model} ({backbone.family}; feature-map size at --size {size}; extracted by default: "
          f"{','.join(backbone.default_feature_taps)}; aligned by a distillation: {','.join(backbone.taps.default)})")
    print(f"{'name':<8} {'module':<36} {'channels':>8} {'stride':>6} {'map':>9}")
    for tap in backbone.taps:
        side = max(grid // tap.stride, 1)
        print(f"{tap.name:<8} {tap.module:<36} {tap.channels:>8} {tap.stride:>6} {f'{side}x{side}':>9}")
    return 0


def _prompt_fn(template: str):
    if "{" not in template:
        return template

    from ..errors import printable  # noqa: PLC0415

    def fill(path: Path) -> str:  # names escaped: a prompt must be valid UTF-8 for the tokenizer and metadata
        return template.replace("{stem}", printable(path.stem)).replace("{parent}", printable(path.parent.name))

    return fill


def _write_pca(result, tap: str, folder: Path) -> None:
    from ..errors import ConfigError  # noqa: PLC0415
    from ..viz.pca import save_pca_png  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    for key, taps in result.features.items():
        if tap not in taps:
            raise ConfigError(f"--pca {tap}: tap was not extracted (add it to --taps)")
        size = result.images[key]["size"]
        save_pca_png(taps[tap].float(), folder / (key.replace("/", "__") + f".{tap}.png"), size=(size[0], size[1]))
    print(f"wrote PCA-RGB maps of tap {tap} to {folder}")

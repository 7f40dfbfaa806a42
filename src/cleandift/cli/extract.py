"""``cleandift extract``: images -> features (safetensors), clean (CleanDIFT) or noisy (DIFT)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..images import RESIZE_POLICIES, find_images
from .common import add_model_args, resolve_device, resolve_dtype

log = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "extract", help="extract features of images (files, folders, globs) into a .safetensors file",
        description="Extract dense diffusion features. --mode clean: one pass of the student on the clean image "
                    "(CleanDIFT). --mode noisy: DIFT, noise at --t averaged over --ensemble draws.")
    p.add_argument("images", nargs="+", help="image files, folders (searched recursively) or glob patterns")
    add_model_args(p)
    p.add_argument("--out", default="features.safetensors", help="output file (default features.safetensors)")
    p.add_argument("--taps", default="us6", help="comma-separated taps or 'all' (default us6); see `cleandift env`")
    p.add_argument("--mode", choices=("clean", "noisy"), default="clean")
    p.add_argument("--t", type=float, default=None,
                   help="noisy: noise timestep in [0,999] (default 261); clean: the student's timestep input "
                        "(default: the checkpoint's learned value, else 261)")
    p.add_argument("--ensemble", type=int, default=8, help="noisy: noise draws averaged (default 8, as DIFT)")
    p.add_argument("--noise", choices=("independent", "shared"), default="independent",
                   help="noisy: own draws per image, or the same draws for all images")
    p.add_argument("--prompt", default="", help="text prompt for every image; '{stem}' is replaced by the file "
                                                "name stem, '{parent}' by its folder name (default: empty prompt)")
    p.add_argument("--size", type=int, default=None, help="model input size in px (default: the model's resolution)")
    p.add_argument("--resize", choices=RESIZE_POLICIES, default="stretch",
                   help="stretch to a square (DIFT), pad the longer side (SD-DINO) or centre-crop")
    p.add_argument("--batch-size", type=int, default=4, help="images per batch")
    p.add_argument("--chunk-size", type=int, default=8, help="max U-Net samples per forward (bounds memory)")
    p.add_argument("--seed", type=int, default=0, help="seed of the noise draws (noisy mode)")
    p.add_argument("--save-dtype", choices=("fp16", "fp32"), default="fp16")
    p.add_argument("--pca", metavar="TAP", default=None, help="also write a PCA-RGB PNG of this tap per image")
    p.add_argument("--pca-dir", default=None, help="folder for the PCA PNGs (default: next to --out)")
    p.add_argument("--strict", action="store_true", help="fail on the first unreadable image")
    p.set_defaults(func=run)
    return p


def build_extractor(args, backbone):
    """Clean or noisy extractor from CLI args (shared with other commands)."""
    from ..checkpoints import load_student  # noqa: PLC0415
    from ..extract import CleanExtractor, NoisyExtractor  # noqa: PLC0415
    from ..timesteps import DIFT_TIMESTEP  # noqa: PLC0415

    taps = getattr(args, "taps", None)
    if args.mode == "noisy":
        if args.checkpoint:
            log.warning("--checkpoint is ignored in noisy mode (DIFT uses the frozen backbone)")
        return NoisyExtractor(backbone, t=int(args.t if args.t is not None else DIFT_TIMESTEP),
                              ensemble=args.ensemble, noise=getattr(args, "noise", "independent"),
                              taps=taps, chunk_size=getattr(args, "chunk_size", 8))
    unet, timestep = backbone.unet, DIFT_TIMESTEP
    if args.checkpoint:
        unet, ckpt = load_student(backbone.unet, args.checkpoint)
        if ckpt.timestep is not None:
            timestep = ckpt.timestep
    else:
        log.warning("no --checkpoint: clean mode runs the *frozen* backbone on clean images "
                    "(the 'naive clean' baseline), not a CleanDIFT student")
    if args.t is not None:
        timestep = args.t
    return CleanExtractor(backbone, unet=unet, timestep=timestep, taps=taps, chunk_size=getattr(args, "chunk_size", 8))


def run(args) -> int:
    import torch  # noqa: PLC0415
    from accelerate import PartialState  # noqa: PLC0415

    from ..backbones import load_backbone  # noqa: PLC0415
    from ..errors import BadImageError  # noqa: PLC0415
    from ..feature_files import extract_files, merge_feature_files, save_features  # noqa: PLC0415

    paths = find_images(args.images)
    if not paths:
        log.error("no images found in %s", " ".join(args.images))
        return 2
    wanted = resolve_device(args.device)
    state = PartialState(cpu=wanted.type == "cpu")  # cpu=True lets torchrun / accelerate form a CPU process group
    device = wanted if state.num_processes == 1 else state.device
    backbone = load_backbone(args.model, device=device, dtype=resolve_dtype(args.dtype),
                             single_file_config=args.single_file_config)
    extractor = build_extractor(args, backbone)
    size = args.size or backbone.resolution
    prompt = _prompt_fn(args.prompt)
    with state.split_between_processes(paths) as my_paths:
        result = extract_files(extractor, my_paths, size=size, resize=args.resize, prompt=prompt, taps=args.taps,
                               batch_size=args.batch_size, seed=args.seed + state.process_index,
                               save_dtype=torch.float16 if args.save_dtype == "fp16" else torch.float32,
                               progress=state.is_local_main_process)
    if args.strict and result.failed:
        raise BadImageError(result.failed[0][0], result.failed[0][1])
    settings = {**extractor.describe(), "model": args.model, "checkpoint": args.checkpoint, "size": size,
                "resize": args.resize, "taps": [t.name for t in extractor.select_taps(args.taps)],
                "prompt": args.prompt, "seed": args.seed, "dtype": args.dtype}
    out = Path(args.out)
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
        print(f"wrote features of {len(result.features)} image(s) to {out}")
        if result.failed:
            print(f"skipped {len(result.failed)} unreadable image(s):")
            for path, reason in result.failed:
                print(f"  {path}: {reason}")
    return 0 if result.features else 2


def _prompt_fn(template: str):
    if "{" not in template:
        return template

    def fill(path: Path) -> str:
        return template.replace("{stem}", path.stem).replace("{parent}", path.parent.name)

    return fill


def _write_pca(result, tap: str, folder: Path) -> None:
    from ..viz.pca import save_pca_png  # noqa: PLC0415

    folder.mkdir(parents=True, exist_ok=True)
    for key, taps in result.features.items():
        if tap not in taps:
            raise SystemExit(f"--pca {tap}: tap was not extracted (add it to --taps)")
        size = result.images[key]["size"]
        save_pca_png(taps[tap].float(), folder / (key.replace("/", "__") + f".{tap}.png"), size=(size[0], size[1]))
    print(f"wrote PCA-RGB maps of tap {tap} to {folder}")

"""``cleandift train``: distill a clean-input student from a diffusion backbone (CleanDIFT).

Examples::

    cleandift train --model sd21 --data images/ --out runs/sd21            # paper preset: 400 steps, lr 2e-6
    cleandift train --preset code --data images/ --out runs/code           # reference-code hyper-parameters
    cleandift train --config my.yaml --batch-size 4 --grad-accum 2         # YAML file, flags override it
    cleandift train --out runs/sd21 --resume --max-steps 800               # continue a run exactly
    cleandift train --data images/ --out runs/x --dry-run                  # check data / model / memory only
    cleandift train --model sdxl --student lora --data images/ --out runs/sdxl-lora --teacher-dtype bf16
                                                                           # LoRA student (r 64), one base model
    accelerate launch --multi_gpu -m cleandift.cli.main train ...          # several GPUs / nodes

Flags override the YAML file, which overrides the preset; the resolved config is saved to
RUN_DIR/config.yaml. The trained student is exported to RUN_DIR/export (load it with
``--checkpoint RUN_DIR/export`` in the other commands).

--resume continues from the newest intact checkpoint (sha256-verified; a damaged newer one is
reported and moved aside) and refuses changed hyper-parameters: only --max-steps,
--checkpoint-every, --keep-checkpoints, --val-every, --workers, --device, --out, --no-export,
--[no-]cache-latents (and log_every) may change. SIGTERM / SIGHUP / SIGINT finish the current step,
write a checkpoint and exit with 128 + the signal number (143 / 129 / 130); a second signal stops at
once. A non-finite loss, gradient or weight stops the run (exit 2) without saving or exporting it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..constants import OPTIMIZERS
from .common import add_model_args

_DTYPE_NAMES = {"fp32": "fp32", "float32": "fp32", "bf16": "bf16", "bfloat16": "bf16", "fp16": "fp16",
                "float16": "fp16"}


def register(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "train", help="distill a CleanDIFT student (fine-tune on clean images against the noisy teacher)",
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_args(parser)
    parser.set_defaults(model=None, dtype=None)  # unset flags must not override the YAML file
    parser.add_argument("--config", dest="config_file", default=None, metavar="FILE.yaml",
                        help="training config (YAML keys = the TrainConfig fields); flags override it")

    run = parser.add_argument_group("run")
    run.add_argument("--data", default=None, metavar="DIR",
                     help="folder of training images (recursive; jpg/png/webp, captions from NAME.txt or "
                          "NAME.json {\"caption\": ...})")
    run.add_argument("--val-data", default=None, metavar="DIR",
                     help="held-out folder (default: hold out images of --data)")
    run.add_argument("--val-images", type=int, default=None,
                     help="images held out of --data for validation (default 8, at most a quarter)")
    run.add_argument("--out", default=None, metavar="RUN_DIR", help="run folder (default runs/cleandift)")
    run.add_argument("--preset", choices=("paper", "code"), default=None,
                     help="paper: lr 2e-6, linear warmup, 400 steps (default); code: lr 1e-5, 2000-step warmup")
    run.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default 400)")
    run.add_argument("--batch-size", type=int, default=None, help="images per step and process (default 8)")
    run.add_argument("--grad-accum", type=int, default=None, help="micro-batches per optimizer step (default 1)")
    run.add_argument("--size", type=int, default=None, help="image side in px (default: the model's resolution)")
    run.add_argument("--resize", choices=("crop", "stretch"), default=None,
                     help="crop: centre crop + resize (paper); stretch: plain resize (reference code)")
    run.add_argument("--lr", type=float, default=None, help="peak learning rate (paper 2e-6, code 1e-5)")
    run.add_argument("--warmup-steps", type=int, default=None,
                     help="linear warmup steps (paper preset 40, code 2000)")
    run.add_argument("--optimizer", choices=OPTIMIZERS, default=None,
                     help="adam (default: torch's fused kernel where this torch/device has it, else foreach), "
                          "adam-fused, adam-foreach, adam8bit (needs bitsandbytes)")
    run.add_argument("--seed", type=int, default=None, help="seed for init, data order and noise (default 42)")
    run.add_argument("--teacher-dtype", choices=sorted(_DTYPE_NAMES), default=None,
                     help="precision of the frozen teacher (bf16 halves its memory; default: fp32)")
    run.add_argument("--gradient-checkpointing", action="store_true", default=None,
                     help="recompute student activations in backward (less memory, ~30%% slower)")
    run.add_argument("--cache-latents", action=argparse.BooleanOptionalAction, default=None,
                     help="encode every image's VAE posterior once before the first step, keep it in RAM "
                          "(and RUN_DIR/latents.safetensors) and free the VAE encoder; same results, no VAE "
                          "encode per step (default off)")
    run.add_argument("--workers", type=int, default=None, help="DataLoader worker processes (default 2)")
    run.add_argument("--checkpoint-every", type=int, default=None,
                     help="save a resumable state every N steps (default 100; the last step is always saved)")
    run.add_argument("--keep-checkpoints", type=int, default=None, help="resumable states kept (default 1)")
    run.add_argument("--val-every", type=int, default=None,
                     help="validation loss every N steps (0 = never; default 100)")
    run.add_argument("--resume", nargs="?", const=True, default=False, metavar="CHECKPOINT_DIR",
                     help="continue the run in --out from its newest checkpoint (or from CHECKPOINT_DIR)")
    run.add_argument("--dry-run", action="store_true",
                     help="check data, model and config, print the memory estimate, and exit without training")
    run.add_argument("--no-export", dest="export", action="store_false", default=None,
                     help="do not export the student at the end")

    method = parser.add_argument_group("method")
    method.add_argument("--taps", default=None,
                        help="taps to align (comma list or 'all'; default: the 11 reference taps)")
    method.add_argument("--num-timesteps", type=int, default=None,
                        help="teacher timesteps per image, I (default 3)")
    method.add_argument("--loss", choices=("cosine", "l1", "mse"), default=None,
                        help="alignment loss (default cosine)")
    method.add_argument("--head-norm", choices=("adarms", "film"), default=None,
                        help="adarms: shipped code / released weights (default); film: paper's main config")
    method.add_argument("--no-heads", dest="use_heads", action="store_false", default=None,
                        help="align student features directly (paper ablation)")
    method.add_argument("--student-timestep", choices=("learned", "fixed"), default=None,
                        help="learned scalar initialised at 261 (reference, default) or fixed at 261")
    student = parser.add_argument_group("student")
    student.add_argument("--student", choices=("full", "lora"), default=None,
                         help="full: a trainable copy of the denoiser (reference, default); lora: peft adapters in "
                              "the shared denoiser, the teacher is the base with adapters off (paper App. F)")
    student.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default 64, the paper's)")
    student.add_argument("--lora-alpha", type=float, default=None, help="LoRA alpha (default: the rank, scale 1)")
    student.add_argument("--lora-dropout", type=float, default=None, help="dropout on the adapters' input (default 0)")
    student.add_argument("--lora-targets", default=None, metavar="REGEX|LIST",
                         help="modules to adapt: a regex over module names or a comma list of name suffixes "
                              "(default: the family's self-attention + FFN preset)")
    method.add_argument("--no-captions", dest="captions", action="store_false", default=None,
                        help="ignore caption files; every image gets --prompt (default empty)")
    method.add_argument("--prompt", default=None, help="prompt for images without a caption (default empty)")
    parser.set_defaults(func=run_train)
    return parser


_OVERRIDES = ("model", "checkpoint", "single_file_config", "device", "data", "val_data", "val_images", "out",
              "preset", "max_steps", "batch_size", "grad_accum", "size", "resize", "lr", "warmup_steps",
              "optimizer", "seed", "gradient_checkpointing", "cache_latents", "workers", "checkpoint_every",
              "keep_checkpoints", "val_every", "export", "taps", "num_timesteps", "loss", "head_norm",
              "use_heads", "student_timestep", "captions", "prompt", "student", "lora_rank", "lora_alpha",
              "lora_dropout", "lora_targets")


def overrides_from_args(args: argparse.Namespace) -> dict:
    """The flags the user actually gave (``None`` = not given), as config keys."""
    values = {key: getattr(args, key, None) for key in _OVERRIDES}
    if getattr(args, "dtype", None):
        values["dtype"] = _DTYPE_NAMES[args.dtype]
    if getattr(args, "teacher_dtype", None):
        values["teacher_dtype"] = _DTYPE_NAMES[args.teacher_dtype]
    return values


def resolve_from_args(args: argparse.Namespace):
    from ..train.config import load_yaml, resolve_config  # noqa: PLC0415

    overrides = overrides_from_args(args)
    base = None
    if args.resume:
        out = overrides.get("out")
        if out is None and args.config_file:
            out = load_yaml(args.config_file).get("out")
        saved = Path(out or "runs/cleandift").expanduser() / "config.yaml"
        if saved.is_file():
            base = load_yaml(saved)
    return resolve_config(args.config_file, overrides, base)


def run_train(args: argparse.Namespace) -> int:
    config = resolve_from_args(args)
    if args.dry_run:
        from ..train.loop import check_run  # noqa: PLC0415

        print(check_run(config, resume=args.resume))
        return 0
    from ..train.loop import train  # noqa: PLC0415

    result = train(config, resume=args.resume)
    if result.stopped_by is not None:
        from ..signals import exit_code, signal_name  # noqa: PLC0415

        print(f"stopped by {signal_name(result.stopped_by)} after step {result.step}/{config.max_steps}: "
              f"checkpointed to {result.checkpoint}; continue with: cleandift train --out {result.run_dir} --resume")
        return exit_code(result.stopped_by)
    loss = f"{result.loss:.5f}" if result.loss is not None else "n/a"
    print(f"trained {result.step} steps in {result.run_dir} (final loss {loss}"
          + (f", validation {result.val_loss:.5f}" if result.val_loss is not None else "")
          + f", {result.skipped_images} unreadable image(s) skipped)")
    if result.export_dir is not None:
        print(f"student exported to {result.export_dir} (use --checkpoint {result.export_dir})")
    return 0

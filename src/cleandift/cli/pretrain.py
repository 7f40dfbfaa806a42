"""``cleandift pretrain-mini``: train (or resume, or export) the pixel-space Fashion-MNIST model."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def register(subparsers) -> argparse.ArgumentParser:
    from ..pretrain.config import PretrainConfig  # noqa: PLC0415

    d = PretrainConfig()
    p = subparsers.add_parser(
        "pretrain-mini",
        help="pretrain the bundled pixel-space diffusion model on Fashion-MNIST (CPU, resumable)",
        description="Class-conditional DDPM (epsilon, SD's scaled-linear schedule) with SD's U-Net block pattern on "
                    "Fashion-MNIST at 32x32. Checkpoints atomically to OUT/last.safetensors (safetensors + JSON: "
                    "reading it never runs code) every --checkpoint-every steps; --resume continues exactly where "
                    "it stopped. SIGTERM, SIGHUP and Ctrl-C finish the step, checkpoint and exit (128 + signal). "
                    "--export writes the EMA weights as a loadable fp16 folder plus a model card.",
    )
    p.add_argument("--data", default=d.data, help=f"folder with the idx(.gz) files or the images idx path "
                                                  f"(default: {d.data})")
    p.add_argument("--out", default=d.out, help="run directory for checkpoints and loss.csv (keep it out of git)")
    p.add_argument("--steps", type=int, default=d.steps, help=f"total optimizer steps (default {d.steps})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"default {d.batch_size}")
    p.add_argument("--lr", type=float, default=d.lr, help=f"peak AdamW learning rate (default {d.lr})")
    p.add_argument("--warmup-steps", type=int, default=d.warmup_steps)
    p.add_argument("--ema-decay", type=float, default=d.ema_decay)
    p.add_argument("--label-dropout", type=float, default=d.label_dropout,
                   help="probability of replacing the label by the null token (classifier-free guidance)")
    p.add_argument("--channels", default=",".join(map(str, d.block_out_channels)),
                   help="U-Net block_out_channels, comma-separated (default %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--bf16", action="store_true", help="bf16 autocast (only faster on CPUs with native bf16 kernels)")
    p.add_argument("--threads", type=int, default=d.threads,
                   help=f"torch CPU threads (default {d.threads}: leaves the other core free)")
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--snapshot-every", type=int, default=d.snapshot_every,
                   help="also keep an EMA-only snapshot step_NNNNNN.safetensors every this many steps (0 = never)")
    p.add_argument("--log-every", type=int, default=d.log_every)
    p.add_argument("--max-steps", type=int, default=None, help="stop after this many steps in this invocation")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--init-from", default=None, metavar="RUN",
                   help="start a new run in --out from another run (its folder or last.safetensors: weights, EMA, "
                        "optimizer, step) and "
                        "continue it under this command's recipe, e.g. a different --label-dropout; --steps is "
                        "the new total and must exceed the checkpoint's step")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (log lines only)")
    p.add_argument("--export", default=None, metavar="DIR",
                   help="after training (or right away with --steps 0 / a finished run) write the EMA model "
                        "as an fp16 pixel-backbone folder + model card to DIR")
    p.add_argument("--export-only", action="store_true",
                   help="only export the last checkpoint of --out, or the checkpoint file --out names (read-only: safe "
                        "while that run is training)")
    p.add_argument("--card-samples", type=int, default=8, help="samples per class in the model card grid")
    p.add_argument("--sample-steps", type=int, default=50, help="DDIM steps for the model card samples")
    p.set_defaults(func=run)
    return p


def _config(args: argparse.Namespace):
    from ..pretrain.config import PretrainConfig  # noqa: PLC0415

    channels = tuple(int(c) for c in str(args.channels).split(",") if c.strip())
    return PretrainConfig(data=str(args.data), out=str(args.out), steps=args.steps, batch_size=args.batch_size,
                          lr=args.lr, warmup_steps=args.warmup_steps, ema_decay=args.ema_decay,
                          label_dropout=args.label_dropout, block_out_channels=channels, seed=args.seed,
                          bf16=args.bf16, threads=args.threads, checkpoint_every=args.checkpoint_every,
                          snapshot_every=args.snapshot_every, log_every=args.log_every,
                          progress=not args.no_progress, init_from=args.init_from)


def run(args: argparse.Namespace) -> int:
    import torch  # noqa: PLC0415

    from ..errors import ConfigError  # noqa: PLC0415
    from ..pretrain.train import open_run, read_run  # noqa: PLC0415
    from ..signals import exit_code, stop_on_signals  # noqa: PLC0415

    torch.set_num_threads(max(1, args.threads))
    if args.export_only:
        if not args.export:
            raise ConfigError("--export-only needs --export DIR")
        from ..pretrain.export import export_run  # noqa: PLC0415

        snapshot = read_run(args.out)
        folder = export_run(snapshot, Path(args.export), samples_per_class=args.card_samples,
                            sample_steps=args.sample_steps)
        print(f"exported the EMA model (step {snapshot.step}) to {folder}")
        return 0
    config = _config(args)
    trainer = open_run(config, resume=args.resume)
    log.info("run %s: %d/%d steps, batch %d, %d threads, %s params", config.out, trainer.step, trainer.config.steps,
             trainer.config.batch_size, torch.get_num_threads(),
             f"{sum(p.numel() for p in trainer.model.unet.parameters()):,}")
    if trainer.step < trainer.config.steps:
        # SIGTERM / SIGHUP (schedulers) and SIGINT (Ctrl-C) finish the step, checkpoint, and exit 128 + signum
        with stop_on_signals() as stop:
            trainer.stop_signal = stop
            trainer.run(max_steps=args.max_steps)
        if stop.requested:
            print(f"stopped by {stop.name} at step {trainer.step} (checkpointed); continue with --resume")
            return exit_code(stop.signum)
    if args.export:
        from ..pretrain.export import export_run  # noqa: PLC0415

        folder = export_run(trainer, Path(args.export), samples_per_class=args.card_samples,
                            sample_steps=args.sample_steps)
        print(f"exported the EMA model (step {trainer.step}) to {folder}")
    return 0

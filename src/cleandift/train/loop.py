"""The CleanDIFT training loop, on :class:`accelerate.Accelerator`.

Single process::

    cleandift train --model sd15 --data DIR --out runs/x

Several GPUs or nodes: the same command under ``accelerate launch`` (each process reads its own
slice of every global batch; gradients are averaged by DDP)::

    accelerate launch --multi_gpu --num_processes 4 -m cleandift.cli.main train --data DIR --out runs/x

One optimizer step = ``grad_accum`` micro-batches of ``batch_size`` images per process, each a
:class:`~cleandift.distill.FeatureAligner` forward + backward; then Adam, then the LR schedule.

Exact resume: every random draw of a micro-step (VAE posterior sample, timesteps, noise) comes from a
generator seeded by ``(seed, step, micro-step, rank)``, the data order is a pure function of
``(seed, batches consumed)``, and checkpoints (``accelerator.save_state``: student + heads +
timestep, Adam, LR schedule, counters, RNG states) are written to a temporary folder and renamed
into place -- so an interrupted run resumed with ``--resume`` ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..backbones.base import DiffusionBackbone
from ..distill import FeatureAligner
from ..errors import ConfigError
from ..logs import quiet_logger
from .config import TrainConfig
from .data import ImageFolder, StreamBatchSampler, collate, make_loader, prepare_datasets

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest"
_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    """Counters saved with every checkpoint (registered with ``accelerator.register_for_checkpointing``)."""

    step: int = 0  # optimizer updates done
    batches: int = 0  # global batches consumed: the data stream's position
    images_seen: int = 0
    skipped: list[str] = field(default_factory=list)  # files that failed to decode during training

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float | None
    val_loss: float | None
    export_dir: Path | None
    skipped_images: int


StepCallback = Callable[[int, dict], None]


# ---------------------------------------------------------------------------------------------- entry
def train(config: TrainConfig, *, backbone: DiffusionBackbone | None = None, resume: bool | str = False,
          callbacks: Sequence[StepCallback] = (), progress: bool = True) -> TrainResult:
    """Run (or resume) a distillation; returns where everything was written.

    Args:
        config: the resolved :class:`~cleandift.train.config.TrainConfig`.
        backbone: use this backbone instead of loading ``config.model`` (it is moved to the training
            device and its U-Net becomes the frozen teacher).
        resume: ``True`` continues from the newest checkpoint in ``RUN_DIR/checkpoints``; a path
            continues from that checkpoint folder.
        callbacks: ``fn(step, logs)`` after every optimizer step (and its checkpoint, if any).
    """
    run_dir = Path(config.out).expanduser()
    resume_from = _resume_dir(run_dir, resume)
    accelerator = build_accelerator(config)
    main = accelerator.is_main_process

    train_set, val_set, bad = _datasets(config, backbone)  # before any model loads: fail fast on data
    if backbone is None:
        backbone = load_training_backbone(config, accelerator.device)
        release_unused_parts(backbone, [train_set, val_set])
    backbone.to(accelerator.device)
    size = check_size(config.size or backbone.resolution, backbone)
    train_set.size = size
    if val_set is not None:
        val_set.size = size

    _seed_everything(config.seed)
    aligner = build_aligner(config, backbone)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml")
        _log_start(config, backbone, aligner, size, train_set, val_set, bad, accelerator.num_processes)

    optimizer = build_optimizer(config, aligner.trainable_parameters())
    scheduler = build_scheduler(config, optimizer)
    state = TrainState(skipped=[])
    model, optimizer = accelerator.prepare(aligner, optimizer)
    accelerator.register_for_checkpointing(scheduler, state)
    if resume_from is not None:
        with quiet_logger("accelerate"):
            accelerator.load_state(str(resume_from))
        log.info("resumed from %s at step %d (%d batches consumed)", resume_from, state.step, state.batches)

    logger = RunLogger(run_dir, aligner.tap_names, enabled=main, resume_step=state.step if resume_from else None)
    sampler = StreamBatchSampler(len(train_set), config.batch_size, config.seed, start_batch=state.batches,
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    batches = iter(make_loader(train_set, sampler, config.workers))
    ckpts = CheckpointManager(run_dir / CHECKPOINT_DIR, config.keep_checkpoints)
    val_loss = None
    if val_set is not None and config.val_every and resume_from is None:
        val_loss = logger.validation(state.step, validate(model, val_set, config, accelerator))

    last_loss = None
    bar = _progress_bar(config.max_steps, state.step, enabled=progress and main)
    try:
        with _log_through(bar):
            while state.step < config.max_steps:
                t0 = time.perf_counter()
                lr = scheduler.get_last_lr()[0]
                total, per_tap = train_step(model, batches, optimizer, scheduler, state, config, accelerator)
                last_loss = total
                logs = _step_logs(state, total, per_tap, lr, aligner, sampler, time.perf_counter() - t0, len(bad))
                if state.step % config.log_every == 0 or state.step == config.max_steps:
                    logger.step(state.step, logs)
                bar.update(1)
                bar.set_postfix_str(_postfix(total, per_tap))
                if val_set is not None and config.val_every and (state.step % config.val_every == 0
                                                                  or state.step == config.max_steps):
                    val_loss = logger.validation(state.step, validate(model, val_set, config, accelerator))
                periodic = config.checkpoint_every and state.step % config.checkpoint_every == 0
                if periodic or state.step == config.max_steps:
                    ckpts.save(accelerator, state.step)
                for callback in callbacks:
                    callback(state.step, logs)
    finally:
        bar.close()
        logger.close()

    export_dir = None
    accelerator.wait_for_everyone()
    if main and config.export:
        from .export import export_run  # noqa: PLC0415

        export_dir = export_run(accelerator.unwrap_model(model), run_dir / "export", config=config)
        log.info("exported the student to %s", export_dir)
    if state.skipped:
        log.warning("%d image(s) could not be decoded during training and were skipped", len(state.skipped))
    return TrainResult(run_dir, state.step, last_loss, val_loss, export_dir, len(bad) + len(state.skipped))


def train_step(model, batches, optimizer, scheduler, state: TrainState, config: TrainConfig,
               accelerator) -> tuple[float, dict[str, float]]:
    """One optimizer update over ``grad_accum`` micro-batches; returns the mean loss and per-tap losses."""
    model.train()
    total = 0.0
    per_tap: dict[str, float] = {}
    for micro in range(config.grad_accum):
        batch = next(batches)
        state.batches += 1
        _record_skipped(state, batch["skipped"])
        images = batch["images"].to(accelerator.device)
        captions = batch["captions"]  # sidecar captions, else config.prompt (see ImageFolder)
        generator = step_generator(config.seed, state.step, micro, accelerator.process_index)
        sync = micro == config.grad_accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            out = model(images, captions, generator=generator)
            accelerator.backward(out.loss / config.grad_accum)
        total += out.loss.detach().float().item() / config.grad_accum
        for name, value in out.per_tap.items():
            per_tap[name] = per_tap.get(name, 0.0) + value.detach().float().item() / config.grad_accum
    if config.max_grad_norm > 0:
        accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.images_seen += config.batch_size * config.grad_accum * accelerator.num_processes
    return total, per_tap


@torch.no_grad()
def validate(model, val_set: ImageFolder, config: TrainConfig, accelerator) -> tuple[float, dict[str, float]]:
    """Mean alignment loss on the held-out images with fixed noise (comparable across steps)."""
    model.eval()
    total, per_tap, n = 0.0, {}, 0
    for k, start in enumerate(range(0, len(val_set), config.batch_size)):
        batch = collate([val_set[i] for i in range(start, min(start + config.batch_size, len(val_set)))])
        images = batch["images"].to(accelerator.device)
        generator = step_generator(config.seed, -1, k, 0)
        out = model(images, batch["captions"], generator=generator)
        b = images.shape[0]
        total += out.loss.float().item() * b
        for name, value in out.per_tap.items():
            per_tap[name] = per_tap.get(name, 0.0) + value.float().item() * b
        n += b
    model.train()
    return total / n, {name: v / n for name, v in per_tap.items()}


# ---------------------------------------------------------------------------------------------- builders
def build_accelerator(config: TrainConfig):
    """An Accelerator for this run (CPU when ``--device cpu`` or no GPU; DDP under ``accelerate launch``)."""
    from accelerate import Accelerator, DistributedDataParallelKwargs  # noqa: PLC0415
    from accelerate.state import AcceleratorState, PartialState  # noqa: PLC0415

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        # A second run in the same process (tests, notebooks) may use another precision; the
        # singleton state would refuse it. Only done for single-process runs.
        AcceleratorState._reset_state(reset_partial_state=True)
        PartialState._reset_state()
    device = config.device
    if device and device.startswith("cuda:") and torch.cuda.is_available():
        torch.cuda.set_device(torch.device(device))
    # Student parameters after the last tap get no gradient: DDP must be told.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    return Accelerator(mixed_precision=_PRECISION[config.dtype], cpu=device == "cpu", kwargs_handlers=[ddp],
                       step_scheduler_with_optimizer=False)


def load_training_backbone(config: TrainConfig, device: torch.device) -> DiffusionBackbone:
    """Load ``config.model`` in float32 (the student copy needs fp32 master weights)."""
    from ..backbones.loading import load_backbone  # noqa: PLC0415

    return load_backbone(config.model, device=device, dtype=torch.float32,
                         single_file_config=config.single_file_config)


def release_unused_parts(backbone: DiffusionBackbone, datasets: Sequence, max_prompts: int = 256) -> int:
    """Free what a distillation never runs: the image decoder, and the prompt encoder when the data has
    at most ``max_prompts`` distinct prompts (encoded once here). Returns the bytes freed.

    Why: next to an fp32 SD 1.5 student, its Adam state and the teacher (~19.4 GiB together), the CLIP
    text encoder (0.49 GB) and the VAE decoder (0.2 GB) are the easiest memory to give back. Only for
    backbones the trainer loaded itself -- a caller's backbone is never mutated.
    """
    prompts = set().union(*(ds.prompts() for ds in datasets if ds is not None))
    freed = backbone.release_decoder()
    if len(prompts) <= max_prompts:
        freed += backbone.release_prompt_encoder(sorted(prompts))
    if freed:
        log.info("released %.2f GB of weights training never runs (image decoder%s)", freed / 1e9,
                 f", prompt encoder after caching {len(prompts)} prompt(s)" if len(prompts) <= max_prompts else "")
    return freed


def check_size(size: int, backbone: DiffusionBackbone) -> int:
    """The image side must be a multiple of the U-Net's coarsest cell (64 px for SD)."""
    cell = backbone.latent_factor * (backbone.taps["mid"].stride if "mid" in backbone.taps else 8)
    if size % cell:
        raise ConfigError(f"--size {size} is not a multiple of {cell} px (the U-Net's coarsest cell); "
                          f"use e.g. {max(cell, round(size / cell) * cell)}")
    return size


def build_aligner(config: TrainConfig, backbone: DiffusionBackbone) -> FeatureAligner:
    aligner = FeatureAligner(
        backbone, taps=config.taps, num_timesteps=config.num_timesteps, t_min=config.t_min, t_max=config.t_max,
        loss=config.loss, use_heads=config.use_heads, head_config=config.head_config(),
        student_timestep=config.student_timestep, timestep_init=config.timestep_init,
        sample_posterior=config.sample_posterior,
        teacher_dtype=_DTYPES[config.teacher_dtype] if config.teacher_dtype else None,
        gradient_checkpointing=config.gradient_checkpointing)
    if config.checkpoint:
        from ..checkpoints import read_checkpoint  # noqa: PLC0415

        ckpt = read_checkpoint(config.checkpoint)
        aligner.load_checkpoint(ckpt, heads=bool(ckpt.heads) and aligner.use_heads)
        log.info("initialised the student%s from %s", " and heads" if ckpt.heads and aligner.use_heads else "",
                 config.checkpoint)
    return aligner


def build_optimizer(config: TrainConfig, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """Adam as in the paper and the reference (no weight decay by default)."""
    kwargs = dict(lr=config.lr, betas=(config.adam_beta1, config.adam_beta2), eps=config.adam_eps,
                  weight_decay=config.weight_decay)
    if config.optimizer == "adam8bit":
        try:
            import bitsandbytes as bnb  # noqa: PLC0415
        except ImportError as exc:
            raise ConfigError("optimizer adam8bit needs bitsandbytes: pip install bitsandbytes "
                              "(or use --optimizer adam)") from exc
        return bnb.optim.Adam8bit(params, **kwargs)
    fused = {"adam": fused_adam_available(params), "adam-fused": True, "adam-foreach": False}[config.optimizer]
    return torch.optim.Adam(params, fused=fused, foreach=not fused, **kwargs)


def fused_adam_available(params: Sequence[torch.nn.Parameter]) -> bool:
    """Whether torch's fused Adam kernel runs on ``params``' devices.

    Why the default prefers it: the foreach implementation materialises a full-size temporary per
    state tensor during the step (3.9 GB for an SD 1.5 student plus heads); the fused kernel updates
    in place and is faster.
    """
    try:  # private helper, but the list torch itself checks `fused=True` against
        from torch.optim.optimizer import _get_fused_kernels_supported_devices  # noqa: PLC0415
    except ImportError:
        return False
    supported = set(_get_fused_kernels_supported_devices())
    return all(p.device.type in supported and p.is_floating_point() for p in params)


def build_scheduler(config: TrainConfig, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
    """``constant_with_warmup``: lr * step / warmup during warmup (transformers' formula), then constant."""
    warmup = config.warmup_steps if config.lr_schedule == "constant_with_warmup" else 0
    return torch.optim.lr_scheduler.LambdaLR(optimizer, _Warmup(warmup))


class _Warmup:
    """Picklable LR factor (a lambda would not survive ``save_state``)."""

    def __init__(self, warmup: int) -> None:
        self.warmup = warmup

    def __call__(self, step: int) -> float:
        return min(1.0, step / self.warmup) if self.warmup > 0 else 1.0


def step_generator(seed: int, step: int, micro: int, rank: int) -> torch.Generator:
    """A CPU generator that depends only on (seed, step, micro-step, rank): the key to exact resume."""
    mixed = (seed * 1_000_003 + (step + 2) * 10_007 + micro * 101 + rank * 7) % (2**62)
    return torch.Generator().manual_seed(mixed)


def _seed_everything(seed: int) -> None:
    from accelerate.utils import set_seed  # noqa: PLC0415

    set_seed(seed)


def _datasets(config: TrainConfig, backbone: DiffusionBackbone | None):
    if not config.data:
        raise ConfigError("no training data: pass --data DIR (a folder of jpg/png/webp images) or set `data:` "
                          "in the config file")
    size = config.size or (backbone.resolution if backbone is not None else 512)
    train_set, val_set, bad = prepare_datasets(config.data, size, val_data=config.val_data,
                                               val_images=config.val_images, resize=config.resize,
                                               captions=config.captions, prompt=config.prompt, seed=config.seed)
    for path, reason in bad:
        log.warning("skipping unreadable image %s: %s", path, reason)
    return train_set, val_set, bad


def _record_skipped(state: TrainState, skipped: list[tuple[str, str]]) -> None:
    for path, reason in skipped:
        if path not in state.skipped:
            state.skipped.append(path)
            log.warning("skipping undecodable image %s: %s (%d skipped during training so far)", path, reason,
                        len(state.skipped))


def _resume_dir(run_dir: Path, resume: bool | str) -> Path | None:
    ckpt_root = run_dir / CHECKPOINT_DIR
    if resume and resume is not True and str(resume) != "latest":
        path = Path(resume).expanduser()
        if not (path / "model.safetensors").is_file() and not any(path.glob("model*.safetensors")):
            raise ConfigError(f"{path}: not a training checkpoint (expected a folder written by `cleandift train`, "
                              f"e.g. {ckpt_root}/step-0000100)")
        return path
    latest = CheckpointManager(ckpt_root).latest()
    if resume:
        if latest is None:
            raise ConfigError(f"--resume: no checkpoint in {ckpt_root}; start without --resume")
        return latest
    if latest is not None:
        raise ConfigError(f"{run_dir} already holds checkpoints (newest {latest.name}); pass --resume to continue "
                          "that run or choose another --out")
    return None


# ---------------------------------------------------------------------------------------------- checkpoints
class CheckpointManager:
    """``RUN_DIR/checkpoints/step-NNNNNNN`` folders written atomically; keeps the newest ``keep``."""

    def __init__(self, root: Path, keep: int = 2) -> None:
        self.root = Path(root)
        self.keep = keep

    def folders(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step-*") if p.is_dir())

    def latest(self) -> Path | None:
        pointer = self.root / LATEST
        if pointer.is_file():
            target = self.root / pointer.read_text().strip()
            if target.is_dir():
                return target
        folders = self.folders()
        return folders[-1] if folders else None

    def save(self, accelerator, step: int) -> Path:
        final = self.root / f"step-{step:07d}"
        tmp = self.root / f".tmp-step-{step:07d}"
        if accelerator.is_main_process:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
        accelerator.wait_for_everyone()
        with quiet_logger("accelerate"):  # one line of ours instead of one per saved file
            accelerator.save_state(str(tmp))
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            _atomic_write(self.root / LATEST, final.name)
            for old in self.folders()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
            log.info("step %d: saved resumable state to %s", step, final)
        accelerator.wait_for_everyone()
        return final


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- logging
class RunLogger:
    """``train_log.csv`` / ``val_log.csv`` in RUN_DIR and, if tensorboard is installed, ``RUN_DIR/tb``.

    On resume, rows logged after the checkpoint's step (work that is being redone) are dropped so
    the logs read like one uninterrupted run.
    """

    def __init__(self, run_dir: Path, taps: Sequence[str], enabled: bool = True,
                 resume_step: int | None = None) -> None:
        self.enabled = enabled
        self.train_csv = run_dir / "train_log.csv"
        self.val_csv = run_dir / "val_log.csv"
        self.step_fields = ["step", "loss", *[f"loss_{t}" for t in taps], "lr", "timestep", "images_seen", "epoch",
                            "skipped_images", "sec_per_step"]
        self.val_fields = ["step", "val_loss", *[f"val_loss_{t}" for t in taps]]
        self.tb = None
        if not enabled:
            return
        if resume_step is not None:
            for path in (self.train_csv, self.val_csv):
                _truncate_csv(path, resume_step)
        try:
            from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415

            self.tb = SummaryWriter(str(run_dir / "tb"), purge_step=resume_step)
        except Exception:  # noqa: BLE001 - tensorboard is optional
            self.tb = None

    def step(self, step: int, logs: dict) -> None:
        if not self.enabled:
            return
        _append_csv(self.train_csv, self.step_fields, logs)
        if self.tb is not None:
            for key, value in logs.items():
                if key != "step":
                    self.tb.add_scalar(f"train/{key}", value, step)

    def validation(self, step: int, result: tuple[float, dict[str, float]]) -> float:
        loss, per_tap = result
        if self.enabled:
            row = {"step": step, "val_loss": loss, **{f"val_loss_{k}": v for k, v in per_tap.items()}}
            _append_csv(self.val_csv, self.val_fields, row)
            if self.tb is not None:
                for key, value in row.items():
                    if key != "step":
                        self.tb.add_scalar(f"val/{key}", value, step)
            log.info("step %d: validation loss %.5f", step, loss)
        return loss

    def close(self) -> None:
        if self.tb is not None:
            self.tb.close()


def _append_csv(path: Path, fields: list[str], row: dict) -> None:
    new = not path.exists()
    with path.open("a", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow(row)


def _truncate_csv(path: Path, step: int) -> None:
    if not path.is_file():
        return
    with path.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
        fields = list(rows[0].keys()) if rows else None
    if fields is None:
        return
    keep = [r for r in rows if int(float(r["step"])) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(keep)
    os.replace(tmp, path)


def _step_logs(state: TrainState, total: float, per_tap: dict[str, float], lr: float, aligner: FeatureAligner,
               sampler: StreamBatchSampler, seconds: float, unreadable: int) -> dict:
    return {"step": state.step, "loss": total, **{f"loss_{k}": v for k, v in per_tap.items()}, "lr": lr,
            "timestep": float(aligner.timestep.detach()), "images_seen": state.images_seen,
            "epoch": round(sampler.epoch_of(state.batches), 4), "skipped_images": unreadable + len(state.skipped),
            "sec_per_step": round(seconds, 4)}


def _postfix(total: float, per_tap: dict[str, float]) -> str:
    taps = " ".join(f"{k}={v:.3f}" for k, v in per_tap.items())
    return f"loss={total:.4f} {taps}"


def _progress_bar(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", dynamic_ncols=True)


def _log_start(config: TrainConfig, backbone, aligner: FeatureAligner, size: int, train_set, val_set, bad,
               processes: int) -> None:
    from .memory import estimate_memory  # noqa: PLC0415

    held_out = f", {len(val_set)} held out for validation" if val_set is not None else ""
    log.info("run dir %s: %d training image(s)%s, %d unreadable skipped; %d process(es)", config.out,
             len(train_set), held_out, len(bad), processes)
    log.info("taps %s, I=%d timesteps in [%d, %d), loss %s, heads %s, student timestep %s (%.1f)",
             ",".join(aligner.tap_names), config.num_timesteps, config.t_min, config.t_max, config.loss,
             config.head_norm if config.use_heads else "none", config.student_timestep, config.timestep_init)
    try:
        estimate = estimate_memory(backbone, aligner.selected_taps, size, config.batch_size, config.num_timesteps,
                                   aligner.head_config, config.student_timestep == "learned")
        log.info(_report(estimate, config))
    except Exception as exc:  # noqa: BLE001 - an estimate must never stop a run
        log.info("(memory estimate unavailable: %s: %s)", type(exc).__name__, exc)
    if config.max_steps * config.batch_size * config.grad_accum * processes > 50 * len(train_set):
        log.warning("the run sees every training image more than 50 times; consider more images "
                    "(the paper used ~3k) or fewer steps")
    if config.lr_schedule == "constant_with_warmup" and config.warmup_steps > config.max_steps:
        log.info("note: warmup (%d steps) is longer than the run (%d steps); the LR ends at %.2e",
                 config.warmup_steps, config.max_steps, config.lr * config.max_steps / config.warmup_steps)


# ---------------------------------------------------------------------------------------------- dry run
def check_run(config: TrainConfig, *, backbone: DiffusionBackbone | None = None, resume: bool | str = False) -> str:
    """Everything :func:`train` checks before its first step, without training or writing: returns a report.

    Data (folder, readable images, split), resume state, model (loads ``config.model``), image
    size, taps and head options, the ``--checkpoint`` (student and heads fit), and the memory estimate.
    """
    from ..checkpoints import check_fits, read_checkpoint  # noqa: PLC0415
    from ..heads import ProjectionHeads, check_head_state  # noqa: PLC0415
    from .memory import estimate_memory  # noqa: PLC0415

    run_dir = Path(config.out).expanduser()
    resume_from = _resume_dir(run_dir, resume)
    train_set, val_set, bad = _datasets(config, backbone)
    lines = [f"data: {len(train_set)} training image(s) in {config.data}"
             + (f", {len(val_set)} for validation" if val_set is not None else ", no validation set")
             + f", {len(bad)} unreadable (skipped)"]
    lines += [f"  unreadable: {path}: {reason}" for path, reason in bad[:10]]
    if resume_from is not None:
        lines.append(f"resume: from {resume_from}")
    if backbone is None:
        backbone = load_training_backbone(config, torch.device(config.device or "cpu"))
    size = check_size(config.size or backbone.resolution, backbone)
    taps = backbone.taps.select(config.taps if config.taps is not None else backbone.taps.default)
    head_config = config.head_config() if config.use_heads else None
    lines.append(f"model: {config.model} ({backbone.describe().get('backbone')}), {size} px, taps "
                 f"{','.join(t.name for t in taps)}, heads {config.head_norm if head_config else 'none'}")
    if config.checkpoint:
        ckpt = read_checkpoint(config.checkpoint)
        check_fits(backbone.unet, ckpt.student, ckpt.source)
        if head_config is not None and ckpt.heads:
            with torch.device("meta"):
                heads = ProjectionHeads({t.name: t.channels for t in taps}, head_config)
            keep = ("mapping.", "time_in_proj.", "time_emb.") + tuple(f"adapters.{t.name}." for t in taps)
            check_head_state(heads, {k: v for k, v in ckpt.heads.items() if k.startswith(keep)}, ckpt.source)
        lines.append(f"checkpoint: {ckpt.source} ({ckpt.format}) fits"
                     + (", heads fit" if head_config is not None and ckpt.heads else ""))
    estimate = estimate_memory(backbone, taps, size, config.batch_size, config.num_timesteps, head_config,
                               config.student_timestep == "learned")
    lines.append(_report(estimate, config))
    lines.append(f"config ({config.preset} preset): lr {config.lr:g}, {config.lr_schedule} "
                 f"({config.warmup_steps} warmup), {config.max_steps} steps x {config.batch_size} images x "
                 f"{config.grad_accum} accumulation, dtype {config.dtype}, "
                 f"teacher {config.teacher_dtype or 'fp32'}")
    lines.append("dry run: nothing trained, nothing written")
    return "\n".join(lines)


def _report(estimate, config: TrainConfig) -> str:
    return estimate.report(config.dtype, config.gradient_checkpointing, config.optimizer, config.teacher_dtype)


@contextlib.contextmanager
def _log_through(bar):
    """Route log lines through the progress bar so they do not tear it apart."""
    if getattr(bar, "disable", True):
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: PLC0415

    with logging_redirect_tqdm():
        yield

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
``(seed, batches consumed)``, and checkpoints (:mod:`~cleandift.train.run_state`: student + heads +
timestep, Adam, LR schedule, counters, RNG states, as safetensors + JSON with a sha256 manifest) are
written to a temporary folder and renamed into place -- so an interrupted run resumed with
``--resume`` ends with the same weights as an uninterrupted one.

Safety: a non-finite loss, gradient or weight stops the run before it is applied or saved
(:class:`TrainingDivergedError`); SIGTERM / SIGHUP / SIGINT finish the step, checkpoint and return
(:mod:`cleandift.signals`); a resume verifies checksums and falls back to the newest intact
checkpoint, and refuses changed hyper-parameters (:data:`~cleandift.train.config.RESUME_MAY_CHANGE`).
"""

from __future__ import annotations

import contextlib
import csv
import logging
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from ..backbones.base import DiffusionBackbone
from ..distill import FeatureAligner
from ..errors import CleanDIFTError, ConfigError
from ..signals import StopRequest, signal_name, stop_on_signals
from ..version import __version__
from .config import RESUME_MAY_CHANGE, TrainConfig, resume_changes
from .data import ImageFolder, StreamBatchSampler, collate, make_loader, prepare_datasets
from .latent_cache import model_inputs, prepare_latent_cache
from .run_state import CheckpointManager, DamagedRunStateError, load_state, read_trainer, save_state, verify

log = logging.getLogger(__name__)

CHECKPOINT_DIR = "checkpoints"
_PRECISION = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: Left in RUN_DIR by a killed write (config, logs, export); removed when a run (re)starts.
_STALE_RUN_FILES = ("config.yaml.tmp", "train_log.csv.tmp", "val_log.csv.tmp", ".export.tmp", ".export.old",
                    "latents.safetensors.tmp", "latents.json.tmp")

__all__ = ["train", "TrainResult", "TrainState", "TrainingDivergedError", "CheckpointManager", "check_run"]


@dataclass
class TrainState:
    """Counters saved with every checkpoint (in ``trainer.json``)."""

    step: int = 0  # optimizer updates done
    batches: int = 0  # global batches consumed: the data stream's position
    images_seen: int = 0
    skipped: list[str] = field(default_factory=list)  # files that failed to decode during training
    history: list[dict] = field(default_factory=list)  # settings changed on resume: {"step", "changed"}

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key, value in state.items():
            if key in self.__dataclass_fields__:
                setattr(self, key, value)


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    loss: float | None
    val_loss: float | None
    export_dir: Path | None
    skipped_images: int
    stopped_by: int | None = None  # the signal that stopped the run early (checkpointed), else None
    checkpoint: Path | None = None  # the newest checkpoint written


class TrainingDivergedError(CleanDIFTError, ArithmeticError):
    """A non-finite loss, gradient or weight: the run stopped before applying or saving it."""

    def __init__(self, step: int, what: str, value: str) -> None:
        self.step, self.what, self.value = step, what, value
        self.lr: float | None = None
        self.dtype = "fp32"
        self.checkpoint: Path | None = None
        super().__init__(step, what, value)

    def __str__(self) -> str:
        lr = f" (lr {self.lr:g})" if self.lr is not None else ""
        cause = "the learning rate is too high" + lr
        if self.dtype == "fp16":
            cause += " or fp16 overflowed (try --dtype bf16)"
        kept = (f"the last good checkpoint {self.checkpoint} is kept" if self.checkpoint is not None
                else "no checkpoint had been written yet")
        lower = f" (e.g. --lr {self.lr / 10:g})" if self.lr is not None else ""
        return (f"step {self.step}: the {self.what} is {self.value}: training diverged, most likely because {cause}; "
                f"stopped without applying or saving it: {kept}, nothing was exported. Start a new run (another "
                f"--out) with a lower --lr{lower}")


StepCallback = Callable[[int, dict], None]


# ---------------------------------------------------------------------------------------------- entry
def train(config: TrainConfig, *, backbone: DiffusionBackbone | None = None, resume: bool | str = False,
          callbacks: Sequence[StepCallback] = (), progress: bool = True) -> TrainResult:
    """Run (or resume) a distillation; returns where everything was written.

    Args:
        config: the resolved :class:`~cleandift.train.config.TrainConfig`.
        backbone: use this backbone instead of loading ``config.model`` (it is moved to the training
            device and its U-Net becomes the frozen teacher).
        resume: ``True`` continues from the newest intact checkpoint in ``RUN_DIR/checkpoints``; a path
            continues from that checkpoint folder.
        callbacks: ``fn(step, logs)`` after every optimizer step (and its checkpoint, if any).

    SIGTERM / SIGHUP / SIGINT during the steps finish the current step, write a checkpoint and
    return early with ``stopped_by`` set (nothing is exported). Raises :class:`TrainingDivergedError`
    on a non-finite loss / gradient / weight and :class:`~cleandift.train.run_state.CheckpointWriteError`
    when a checkpoint cannot be written (disk full).
    """
    run_dir = Path(config.out).expanduser()
    check_device(config)  # before anything loads
    accelerator = build_accelerator(config)
    main = accelerator.is_main_process
    ckpts = CheckpointManager(run_dir / CHECKPOINT_DIR, config.keep_checkpoints)
    if main:
        remove_stale(run_dir, ckpts)
    accelerator.wait_for_everyone()
    resume_from = _resume_dir(run_dir, resume, warn=main)
    allowed = check_resume_config(config, resume_from)
    accelerator.wait_for_everyone()
    if main and resume_from is not None:
        ckpts.set_aside_newer(resume_from[0])

    train_set, val_set, bad = _datasets(config, backbone)  # before any model loads: fail fast on data
    own_backbone = backbone is None  # only a backbone loaded here has parts released
    if backbone is None:
        backbone = load_training_backbone(config, accelerator.device)
        release_unused_parts(backbone, [train_set, val_set])
    backbone.to(accelerator.device)
    size = check_size(config.size or backbone.resolution, backbone)
    train_set.size = size
    if val_set is not None:
        val_set.size = size
    # cache_latents: every image's VAE posterior, encoded once (then the encoder is freed); the steps and the
    # validation read these instead of decoding + encoding images (bit-identical, see latent_cache)
    latents = (prepare_latent_cache(config, backbone, train_set, val_set if config.val_every else None, run_dir,
                                    accelerator, release=own_backbone) if config.cache_latents else None)
    train_items = latents.train if latents is not None else train_set
    val_items = latents.val if latents is not None else val_set

    _seed_everything(config.seed)
    aligner = build_aligner(config, backbone, init=resume_from is None)  # a resume loads its own weights
    optimizer = build_optimizer(config, aligner.trainable_parameters())
    scheduler = build_scheduler(config, optimizer)
    state = TrainState()
    model, optimizer = accelerator.prepare(aligner, optimizer)
    if resume_from is not None:
        folder, manifest = resume_from
        trainer = load_state(folder, manifest, accelerator, model, optimizer, scheduler)
        state.load_state_dict(trainer["state"])
        if allowed:
            state.history.append({"step": state.step, "changed": {k: list(v) for k, v in allowed.items()}})
        ckpts.last_saved = folder
        log.info("resumed from %s at step %d (%d batches consumed)", folder, state.step, state.batches)
    if main:
        run_dir.mkdir(parents=True, exist_ok=True)
        config.save(run_dir / "config.yaml", history=state.history)
        _log_start(config, backbone, aligner, size, train_set, val_set, bad, accelerator.num_processes)

    # rows past the checkpoint (or all rows, for a fresh start after a run killed before its first
    # checkpoint) are work being redone: drop them so the logs read like one uninterrupted run
    logger = RunLogger(run_dir, aligner.tap_names, enabled=main, resume_step=state.step)
    sampler = StreamBatchSampler(len(train_set), config.batch_size, config.seed, start_batch=state.batches,
                                 num_replicas=accelerator.num_processes, rank=accelerator.process_index)
    batches = iter(make_loader(train_items, sampler, config.workers if latents is None else 0))
    val_loss = None
    if val_set is not None and config.val_every and resume_from is None:
        val_loss = logger.validation(state.step, validate(model, val_items, config, accelerator))

    def save() -> None:
        check_finite_weights(accelerator.unwrap_model(model), state.step)
        trainer = {"format": "cleandift-train-state", "cleandift_version": __version__, "state": state.state_dict(),
                   "config": config.to_dict(), "num_processes": accelerator.num_processes}
        ckpts.save(accelerator, state.step,
                   lambda tmp: save_state(tmp, accelerator, model, optimizer, scheduler, trainer))

    last_loss, stopped = None, None
    bar = _progress_bar(config.max_steps, state.step, enabled=progress and main)
    try:
        with _log_through(bar), stop_on_signals() as stop:
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
                    val_loss = logger.validation(state.step, validate(model, val_items, config, accelerator))
                periodic = config.checkpoint_every and state.step % config.checkpoint_every == 0
                saved = bool(periodic or state.step == config.max_steps)
                if saved:
                    save()
                for callback in callbacks:
                    callback(state.step, logs)
                stopped = _stop_signal(stop, accelerator)
                if stopped is not None:
                    if not saved:
                        save()
                    log.warning("%s: stopped after step %d and checkpointed it", signal_name(stopped), state.step)
                    break
    except TrainingDivergedError as exc:
        exc.lr, exc.dtype = scheduler.get_last_lr()[0], config.dtype
        exc.checkpoint = ckpts.last_saved
        raise
    finally:
        bar.close()
        logger.close()

    export_dir = None
    accelerator.wait_for_everyone()
    if main and config.export and stopped is None:
        from .export import export_run  # noqa: PLC0415

        unwrapped = accelerator.unwrap_model(model)
        check_finite_weights(unwrapped, state.step)
        export_dir = export_run(unwrapped, run_dir / "export", config=config)
        log.info("exported the student to %s", export_dir)
    if state.skipped:
        log.warning("%d image(s) could not be decoded during training and were skipped", len(state.skipped))
    return TrainResult(run_dir, state.step, last_loss, val_loss, export_dir, len(bad) + len(state.skipped),
                       stopped_by=stopped, checkpoint=ckpts.last_saved)


def train_step(model, batches, optimizer, scheduler, state: TrainState, config: TrainConfig,
               accelerator) -> tuple[float, dict[str, float]]:
    """One optimizer update over ``grad_accum`` micro-batches; returns the mean loss and per-tap losses.

    A non-finite loss or gradient raises :class:`TrainingDivergedError` before the update is applied.
    """
    model.train()
    total = 0.0
    per_tap: dict[str, float] = {}
    for micro in range(config.grad_accum):
        batch = next(batches)
        state.batches += 1
        _record_skipped(state, batch["skipped"])
        images, cached = model_inputs(batch, accelerator.device)  # images, or cached moments (cache_latents)
        captions = batch["captions"]  # sidecar captions, else config.prompt (see ImageFolder)
        generator = step_generator(config.seed, state.step, micro, accelerator.process_index)
        sync = micro == config.grad_accum - 1
        with contextlib.nullcontext() if sync else accelerator.no_sync(model):
            out = model(images, captions, generator=generator, **cached)
            accelerator.backward(out.loss / config.grad_accum)
        total += out.loss.detach().float().item() / config.grad_accum
        for name, value in out.per_tap.items():
            per_tap[name] = per_tap.get(name, 0.0) + value.detach().float().item() / config.grad_accum
    grad_norm = None
    if config.max_grad_norm > 0:
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
    check_finite_step(model, total, grad_norm, state.step + 1, accelerator)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.images_seen += config.batch_size * config.grad_accum * accelerator.num_processes
    return total, per_tap


def check_finite_step(model, loss: float, grad_norm: torch.Tensor | None, step: int, accelerator) -> None:
    """Raise :class:`TrainingDivergedError` if the loss or the gradient is not finite (on any process).

    With an fp16 loss scaler, overflowing gradients are normal (the scaler skips that update and lowers
    its scale), so only the loss is checked then.
    """
    what = None
    if not math.isfinite(loss):
        what = ("loss", f"{loss}")
    elif accelerator.scaler is None:
        norm = float(grad_norm if grad_norm is not None else _grad_norm(model))
        if not math.isfinite(norm):
            what = ("gradient norm", f"{norm}")
    if accelerator.num_processes > 1:  # every process must stop at the same step, or the others hang
        flag = torch.tensor([0.0 if what is None else 1.0], device=accelerator.device)
        if accelerator.reduce(flag, reduction="sum").item() > 0 and what is None:
            what = ("loss or gradient", "not finite on another process")
    if what is not None:
        raise TrainingDivergedError(step, *what)


def _grad_norm(model) -> torch.Tensor:
    """The global L2 norm of the gradients (one host sync; read-only, so the update is unchanged)."""
    grads = [p.grad.detach() for p in model.parameters() if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g, dtype=torch.float32) for g in grads]))


def check_finite_weights(model: torch.nn.Module, step: int) -> None:
    """Never checkpoint or export non-finite weights."""
    bad = [name for name, p in model.named_parameters() if not torch.isfinite(p.detach()).all()]
    if bad:
        raise TrainingDivergedError(step, "weights", f"not finite in {len(bad)} tensor(s), e.g. {bad[0]}")


def _stop_signal(stop: StopRequest, accelerator) -> int | None:
    """The stop signal received by any process (all processes then stop after the same step)."""
    signum = stop.signum
    if accelerator.num_processes > 1:
        flag = torch.tensor([float(signum or 0)], device=accelerator.device)
        signum = int(accelerator.gather(flag).max().item()) or None
    return signum


@torch.no_grad()
def validate(model, val_set: ImageFolder, config: TrainConfig, accelerator) -> tuple[float, dict[str, float]]:
    """Mean alignment loss on the held-out images with fixed noise (comparable across steps).

    ``val_set``: the image dataset, or its :class:`~cleandift.train.latent_cache.CachedLatents` (cache_latents).
    """
    model.eval()
    total, per_tap, n = 0.0, {}, 0
    for k, start in enumerate(range(0, len(val_set), config.batch_size)):
        batch = collate([val_set[i] for i in range(start, min(start + config.batch_size, len(val_set)))])
        images, cached = model_inputs(batch, accelerator.device)
        generator = step_generator(config.seed, -1, k, 0)
        out = model(images, batch["captions"], generator=generator, **cached)
        b = len(batch["captions"])
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
    accelerator = Accelerator(mixed_precision=_PRECISION[config.dtype], cpu=device == "cpu", kwargs_handlers=[ddp],
                              step_scheduler_with_optimizer=False)
    check_distributed(config, str(accelerator.distributed_type))
    return accelerator


#: accelerate back-ends that shard or wrap the *training module's* weights: a LoRA student's base denoiser is
#: shared with the teacher and lives outside that module, so they would leave it unsharded (or break on it).
_SHARDING_BACKENDS = ("FSDP", "DEEPSPEED", "MEGATRON_LM")


def check_distributed(config: TrainConfig, distributed_type: str) -> None:
    """Refuse back-ends a student kind cannot use, before any model loads (a one-line fix in the message)."""
    kind = distributed_type.rsplit(".", 1)[-1].upper()
    if config.student == "lora" and kind in _SHARDING_BACKENDS:
        raise ConfigError(f"--student lora runs under DDP (`accelerate launch --multi_gpu ...`), not {kind}: the "
                          "adapters' base denoiser is shared with the teacher outside the sharded module; use DDP "
                          "with --teacher-dtype bf16 (each GPU holds one bf16 base), or --student full for sharding")


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
    """The image side must be a multiple of the denoiser's coarsest cell (64 px for SD, 16 for a DiT)."""
    cell = backbone.size_multiple
    if size % cell:
        raise ConfigError(f"--size {size} is not a multiple of {cell} px (the U-Net's coarsest cell); "
                          f"use e.g. {max(cell, round(size / cell) * cell)}")
    return size


def build_aligner(config: TrainConfig, backbone: DiffusionBackbone, init: bool = True) -> FeatureAligner:
    """The student + heads for ``config``; ``init`` loads ``config.checkpoint`` (skipped on resume, whose
    checkpoint replaces every weight anyway, so the init file need not still exist)."""
    aligner = FeatureAligner(
        backbone, taps=config.taps, num_timesteps=config.num_timesteps, t_min=config.t_min, t_max=config.t_max,
        loss=config.loss, use_heads=config.use_heads, head_config=config.head_config(),
        student_timestep=config.student_timestep, timestep_init=config.timestep_init,
        sample_posterior=config.sample_posterior,
        teacher_dtype=_DTYPES[config.teacher_dtype] if config.teacher_dtype else None,
        gradient_checkpointing=config.gradient_checkpointing, student_kind=config.student,
        lora=config.lora_settings() if config.student == "lora" else None)
    if config.checkpoint and init:
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
    """LR factor whose only state (``warmup``) is plain data: ``LambdaLR.state_dict`` stores an object's
    ``__dict__`` (a lambda's would be lost), which goes to ``scheduler.json``."""

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


def _resume_dir(run_dir: Path, resume: bool | str, warn: bool = True) -> tuple[Path, dict] | None:
    """The verified checkpoint to resume from and its manifest (``None`` for a fresh run).

    ``resume=True`` takes the newest intact checkpoint of the run (damaged newer ones are reported,
    see :meth:`CheckpointManager.select`); an explicit folder must itself be intact.
    """
    ckpts = CheckpointManager(run_dir / CHECKPOINT_DIR)
    if resume and resume is not True and str(resume) != "latest":
        path = Path(resume).expanduser()
        if not path.is_dir():
            raise ConfigError(f"--resume {path}: no such checkpoint folder (expected a folder written by "
                              f"`cleandift train`, e.g. {ckpts.root}/step-0000100)")
        try:
            return path, verify(path)
        except DamagedRunStateError as exc:
            raise ConfigError(f"--resume {exc}; pick another checkpoint folder (or --resume alone for the newest "
                              "intact one)") from None
    if resume:
        found = ckpts.select(warn=warn)
        if found is None:
            raise ConfigError(f"--resume: no checkpoint in {ckpts.root}; start without --resume")
        return found
    existing = ckpts.folders()
    if existing:
        raise ConfigError(f"{run_dir} already holds checkpoints (newest {existing[-1].name}); pass --resume to "
                          "continue that run or choose another --out")
    return None


def check_resume_config(config: TrainConfig, resume_from: tuple[Path, dict] | None) -> dict[str, tuple]:
    """Refuse a resume whose hyper-parameters differ from the checkpoint's; returns the allowed changes.

    Why: the checkpoint's optimizer state and step counters belong to its settings; silently training
    on under others (or claiming others in ``config.yaml``) makes the run unreproducible.
    """
    if resume_from is None:
        return {}
    folder = resume_from[0]
    refused, allowed = resume_changes(read_trainer(folder)["config"], config)
    if refused:
        listed = ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in refused.items())
        raise ConfigError(f"--resume: {folder} was trained with other settings ({listed}); a resumed run may only "
                          f"change {', '.join(RESUME_MAY_CHANGE)}. Drop the changed flags, or start a new run "
                          f"(another --out; --checkpoint {folder / 'model.safetensors'} starts from its weights)")
    for key, (old, new) in allowed.items():
        log.info("resume: %s changed from %r to %r", key, old, new)
    return allowed


def check_device(config: TrainConfig) -> None:
    """Refuse device / precision combinations that would fail late or silently do something else.

    accelerate runs ``mixed_precision="fp16"`` on a CPU as plain fp32 without a word; bf16 on a CPU
    is real (torch CPU autocast; fast only on CPUs with native bf16).
    """
    device = config.device
    wants_cuda = bool(device) and device.startswith("cuda")
    if wants_cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: this torch build has no usable CUDA GPU "
                          f"(torch {torch.__version__}); use --device cpu or install a CUDA build of torch")
    on_cpu = device == "cpu" or (not device and not torch.cuda.is_available() and not _mps_available())
    if config.dtype == "fp16" and on_cpu:
        raise ConfigError("--dtype fp16 needs a GPU: on a CPU it would silently train in fp32; use --dtype bf16 "
                          "(CPU autocast) or fp32")


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()


def remove_stale(run_dir: Path, ckpts: CheckpointManager) -> None:
    """Delete partial files a killed or failed run left (temporary checkpoint folders, ``*.tmp`` files)."""
    ckpts.remove_stale()
    for name in _STALE_RUN_FILES:
        path = run_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink()
        else:
            continue
        log.info("removed %s, left by an interrupted write", path)


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
    keep = [r for r in rows if _row_step(r) is not None and _row_step(r) <= step]
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(keep)
    os.replace(tmp, path)


def _row_step(row: dict) -> int | None:
    """The step of a CSV row; ``None`` for a row cut short by a kill (it is dropped on resume)."""
    try:
        return int(float(row["step"])) if None not in row.values() else None
    except (TypeError, ValueError):
        return None


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
    trainable = sum(p.numel() for p in aligner.trainable_parameters())
    if config.student == "lora":
        from ..lora import lora_layers  # noqa: PLC0415

        lora = aligner.lora_settings
        log.info("student: LoRA rank %d, alpha %g on %s (%d adapted layers); %.2fM trainable parameters "
                 "(adapters + heads); the teacher is the base with adapters off", lora.rank, lora.alpha or lora.rank,
                 lora.targets or "the family preset", len(lora_layers(aligner.student)),
                 trainable / 1e6)
    else:
        log.info("student: full copy of the denoiser; %.2fM trainable parameters", trainable / 1e6)
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
    size, taps and head options, the ``--checkpoint`` (student and heads fit; a LoRA file needs a LoRA run
    of the same rank and layers, a full checkpoint a full run), and the memory estimate of the chosen
    student kind next to the other one (:mod:`cleandift.train.memory`).
    """
    from ..checkpoints import check_fits, read_checkpoint  # noqa: PLC0415
    from ..heads import ProjectionHeads, check_head_state  # noqa: PLC0415
    from .memory import estimate_memory  # noqa: PLC0415

    def check_lora_checkpoint(ckpt) -> None:
        """A ``--checkpoint`` for a LoRA run must be a LoRA file of the run's rank and layers; a LoRA file needs a
        LoRA run. One-line :class:`~cleandift.errors.CheckpointMismatchError` otherwise."""
        from ..errors import CheckpointMismatchError  # noqa: PLC0415
        from ..lora import LORA_FILE  # noqa: PLC0415
        from .memory import lora_count  # noqa: PLC0415

        if ckpt.lora is None:  # a full (or merged) student for a LoRA run
            lora_dir = Path(ckpt.source) / "lora"
            hint = (f"pass its adapters, --checkpoint {lora_dir}" if (lora_dir / LORA_FILE).is_file()
                    else "train it with --student full, or pass a LoRA file / a LoRA export's lora/ folder")
            raise CheckpointMismatchError(f"--checkpoint {ckpt.source}: holds a full student ({ckpt.format}), but "
                                          f"this is a --student lora run; {hint}")
        lora = ckpt.lora
        if config.student != "lora":
            raise CheckpointMismatchError(f"--checkpoint {ckpt.source}: a LoRA student (rank {lora.rank}), but this "
                                          f"is a --student {config.student} run; pass --student lora --lora-rank "
                                          f"{lora.rank} (or, for a full student, its merged export folder with unet/)")
        if lora.rank != config.lora_rank:
            raise CheckpointMismatchError(f"--checkpoint {ckpt.source}: LoRA rank {lora.rank}, but --lora-rank is "
                                          f"{config.lora_rank}; pass --lora-rank {lora.rank}")
        _, layers = lora_count(backbone, config.lora_settings())
        theirs, ours = set(lora.target_modules), set(layers)
        if theirs != ours:
            extra, missing = sorted(theirs - ours), sorted(ours - theirs)
            example = (f"e.g. {extra[0]} is not adapted by this run" if extra
                       else f"e.g. {missing[0]} is not in the file")
            raise CheckpointMismatchError(f"--checkpoint {ckpt.source}: its LoRA adapts {len(theirs)} layer(s), this "
                                          f"run's targets adapt {len(ours)} ({example}); pass the --lora-targets it "
                                          "was trained with, or use the backbone family it was trained for")

    run_dir = Path(config.out).expanduser()
    check_device(config)
    resume_from = _resume_dir(run_dir, resume)
    allowed = check_resume_config(config, resume_from)
    train_set, val_set, bad = _datasets(config, backbone)
    lines = [f"data: {len(train_set)} training image(s) in {config.data}"
             + (f", {len(val_set)} for validation" if val_set is not None else ", no validation set")
             + f", {len(bad)} unreadable (skipped)"]
    lines += [f"  unreadable: {path}: {reason}" for path, reason in bad[:10]]
    if resume_from is not None:
        lines.append(f"resume: from {resume_from[0]} (checksums verified)"
                     + "".join(f", {k} {old!r} -> {new!r}" for k, (old, new) in allowed.items()))
    loaded_here = backbone is None  # train() releases the decoder / prompt encoder only of a backbone it loaded
    if backbone is None:
        backbone = load_training_backbone(config, torch.device(config.device or "cpu"))
    size = check_size(config.size or backbone.resolution, backbone)
    taps = backbone.taps.select(config.taps if config.taps is not None else backbone.taps.default)
    head_config = config.head_config() if config.use_heads else None
    lines.append(f"model: {config.model} ({backbone.describe().get('backbone')}), {size} px, taps "
                 f"{','.join(t.name for t in taps)}, heads {config.head_norm if head_config else 'none'}")
    if config.checkpoint:
        ckpt = read_checkpoint(config.checkpoint)
        if ckpt.lora is not None or config.student == "lora":
            check_lora_checkpoint(ckpt)
        else:
            check_fits(backbone.unet, ckpt.student, ckpt.source)
        if head_config is not None and ckpt.heads:
            with torch.device("meta"):
                heads = ProjectionHeads({t.name: t.channels for t in taps}, head_config)
            keep = ("mapping.", "time_in_proj.", "time_emb.") + tuple(f"adapters.{t.name}." for t in taps)
            check_head_state(heads, {k: v for k, v in ckpt.heads.items() if k.startswith(keep)}, ckpt.source)
        what = f"LoRA rank {ckpt.lora.rank}, {len(ckpt.lora.target_modules)} layers" if ckpt.lora else ckpt.format
        lines.append(f"checkpoint: {ckpt.source} ({what}) fits"
                     + (", heads fit" if head_config is not None and ckpt.heads else ""))
    prompts = set().union(*(ds.prompts() for ds in (train_set, val_set) if ds is not None))
    estimate = estimate_memory(backbone, taps, size, config.batch_size, config.num_timesteps, head_config,
                               config.student_timestep == "learned", student_kind=config.student,
                               lora=config.lora_settings(), release_decoder=loaded_here,
                               release_prompt_encoder=loaded_here and len(prompts) <= 256,
                               release_encoder=loaded_here and config.cache_latents, compare=True)
    lines.append(_report(estimate, config))
    if config.cache_latents:
        from .latent_cache import check_cache_memory  # noqa: PLC0415

        train_set.size = size
        n = len(train_set) + (len(val_set) if val_set is not None else 0)
        need = check_cache_memory(backbone, train_set, val_set, config)  # refuses a cache too big for the RAM
        lines.append(f"latent cache (--cache-latents): {n} image(s), {_binary_size(need)} of RAM; the VAE encoder "
                     "is freed after encoding")
    lines.append(f"config ({config.preset} preset): lr {config.lr:g}, {config.lr_schedule} "
                 f"({config.warmup_steps} warmup), {config.max_steps} steps x {config.batch_size} images x "
                 f"{config.grad_accum} accumulation, dtype {config.dtype}, "
                 f"teacher {config.teacher_dtype or 'fp32'}")
    lines.append("dry run: nothing trained, nothing written")
    return "\n".join(lines)


def _binary_size(n: int) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def _report(estimate, config: TrainConfig) -> str:
    """The memory estimate of ``config``'s settings (student kind, LoRA rank / layers / trainable parameters,
    the breakdown and, when the estimate carries one, the other student kind side by side)."""
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

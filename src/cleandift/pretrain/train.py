"""Class-conditional DDPM pretraining of the pixel-space ``mini`` model, built to run for hours on a CPU.

* epsilon-prediction MSE at uniformly drawn ``t`` with SD's scaled-linear schedule;
* classifier-free label dropout (labels replaced by the null token with probability ``label_dropout``),
  so the null token is the "empty prompt" feature extraction uses;
* AdamW, linear warmup + cosine decay to ``min_lr_ratio * lr``, gradient clipping, EMA weights (exported);
* channels-last; bf16 autocast is optional because it only pays off on CPUs whose kernels PyTorch
  dispatches to native bf16 (see the model card for the measurement here);
* **atomic checkpoints** (safetensors + JSON metadata, :mod:`.runstate`, written to a temp file, then
  ``os.replace``; reading one never unpickles) every ``checkpoint_every`` steps and **exact resume**:
  model, EMA, optimizer, LR schedule, step, RNG state, and the data order (each epoch's permutation is
  a pure function of ``seed`` and the epoch, so the step number alone says where in the data a run is);
* the loss curve is appended to ``loss.csv`` at each checkpoint, so the CSV always matches the checkpoint.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from torch import nn

from ..backbones.pixel import LabelEncoder, PixelDiffusionBackbone, build_pixel_backbone
from ..errors import CheckpointMismatchError, ConfigError
from .config import PretrainConfig
from .idx import load_idx_dataset, to_model_range
from .runstate import SUFFIX, load_state_file, save_state_file

log = logging.getLogger(__name__)

CHECKPOINT = "last.safetensors"
#: What runs of cleandift 0.1.0 wrote (``torch.save``); still read, with ``weights_only=True`` only.
LEGACY_CHECKPOINT = "last.pt"
FULL_FORMAT, EMA_FORMAT = "cleandift-pretrain", "cleandift-pretrain-ema"
LOSS_HEADER = ["step", "loss", "lr", "seconds"]
#: Settings that may change between a run and its resume without breaking exactness.
RUNTIME_KEYS = {"threads", "checkpoint_every", "snapshot_every", "log_every", "progress", "data", "out"}
#: Settings that fix the model's shape: a run started ``init_from`` another must share them.
ARCHITECTURE_KEYS = ("resolution", "block_out_channels", "cross_attention_dim", "attention_heads", "norm_num_groups",
                     "class_names")


# ---------------------------------------------------------------------------------------------- pieces
class EMA:
    """Exponential moving average of parameters, with the usual warmup ``min(decay, (1+n)/(10+n))``."""

    def __init__(self, module: nn.Module, decay: float) -> None:
        self.decay = decay
        self.shadow = {k: p.detach().float().clone() for k, p in module.named_parameters()}

    @torch.no_grad()
    def update(self, module: nn.Module, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for k, p in module.named_parameters():
            self.shadow[k].lerp_(p.detach().float(), 1 - d)

    def copy_to(self, module: nn.Module) -> None:
        with torch.no_grad():
            for k, p in module.named_parameters():
                p.copy_(self.shadow[k].to(p.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.shadow}

    def load_state_dict(self, state: dict) -> None:
        self.decay = state["decay"]
        self.shadow = {k: v.clone() for k, v in state["shadow"].items()}


class DiffusionModel(nn.Module):
    """The trainable pair: U-Net + label encoder (one module so optimizer, EMA and clipping see both)."""

    def __init__(self, unet: nn.Module, label_encoder: LabelEncoder) -> None:
        super().__init__()
        self.unet = unet
        self.label_encoder = label_encoder

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cond = self.label_encoder(labels)
        return self.unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup to 1, then cosine decay to ``min_ratio`` at ``total`` (constant after)."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class EpochSampler:
    """Batches whose order is a pure function of (seed, global position): what makes resume exact."""

    def __init__(self, n: int, batch_size: int, seed: int) -> None:
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        start = step * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            out.append(self._permutation(pos // self.n)[pos % self.n])
        return torch.stack(out)


# ---------------------------------------------------------------------------------------------- trainer
class Pretrainer:
    """Owns the model, optimizer, EMA, data and RNG of one run directory; ``run()`` trains to ``steps``."""

    def __init__(self, config: PretrainConfig, images: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> None:
        self.config = config
        self.out = Path(config.out)
        if images is None or labels is None:
            images, labels = load_idx_dataset(config.data, "train")
        if int(labels.max()) >= len(config.class_names) or int(labels.min()) < 0:
            raise ConfigError(f"labels span {int(labels.min())}..{int(labels.max())} but the run has "
                              f"{len(config.class_names)} class names")
        self.images = to_model_range(images, config.resolution)
        self.labels = labels.long()
        backbone = build_pixel_backbone(config.unet_config(), config.class_names, seed=config.seed)
        self.scheduler = backbone.scheduler
        self.model = DiffusionModel(backbone.unet, backbone.label_encoder)
        self.model.requires_grad_(True).train()
        if config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.null_id = backbone.label_encoder.null_id
        self.alphas = self.scheduler.alphas_cumprod.float()
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                                           betas=(0.9, 0.999))
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_lambda(s, config.warmup_steps, config.steps, config.min_lr_ratio))
        self.ema = EMA(self.model, config.ema_decay)
        self.sampler = EpochSampler(len(self.images), config.batch_size, config.seed)
        self.generator = torch.Generator().manual_seed(config.seed + 1)
        self.step = 0
        self.last_lr = config.lr
        self.stop_requested = False  # set to checkpoint after this step and return
        self.stop_signal = None  # a cleandift.signals.StopRequest: a stop signal does the same
        self._pending: list[tuple[int, float, float, float]] = []

    # ------------------------------------------------------------------ one step
    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = self.sampler.indices(step)
        return self.images[idx], self.labels[idx]

    def train_step(self) -> float:
        cfg = self.config
        x0, labels = self.batch(self.step)
        b = x0.shape[0]
        g = self.generator
        t = torch.randint(0, self.scheduler.config.num_train_timesteps, (b,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        drop = torch.rand(b, generator=g) < cfg.label_dropout
        labels = torch.where(drop, torch.full_like(labels, self.null_id), labels)
        abar = self.alphas[t].view(-1, 1, 1, 1)
        xt = abar.sqrt() * x0 + (1 - abar).sqrt() * noise
        if cfg.channels_last:
            xt = xt.contiguous(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            pred = self.model(xt, t, labels)
        loss = nn.functional.mse_loss(pred.float(), noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {self.step}; resume from the last checkpoint "
                                     "with a lower --lr")
        self.last_lr = float(self.optimizer.param_groups[0]["lr"])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.optimizer.step()
        self.lr_schedule.step()
        self.ema.update(self.model, self.step)
        self.step += 1
        return float(loss.detach())

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict:
        return {"format": FULL_FORMAT, "version": 2, "config": self.config.to_dict(), "step": self.step,
                "model": self.model.state_dict(), "ema": self.ema.state_dict(),
                "optimizer": self.optimizer.state_dict(), "lr_schedule": self.lr_schedule.state_dict(),
                "generator": self.generator.get_state(), "torch_rng": torch.get_rng_state()}

    def load_state_dict(self, state: dict, source: str | Path = "checkpoint") -> None:
        """Restore everything :meth:`state_dict` saved; a state that does not fit names ``source``."""
        try:
            self._load_state(state)
        except (KeyError, RuntimeError, ValueError, TypeError) as exc:
            raise CheckpointMismatchError(f"{source}: the checkpoint does not fit this run ({type(exc).__name__}: "
                                          f"{exc}); it is damaged or from another model") from exc

    def _load_state(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.config.channels_last:
            self.model.to(memory_format=torch.channels_last)
        self.ema.load_state_dict(state["ema"])
        self.optimizer.load_state_dict(_typed_optimizer_state(state["optimizer"], self.optimizer))
        _match_memory_format(self.optimizer)
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.generator.set_state(state["generator"])
        torch.set_rng_state(state["torch_rng"])
        self.step = int(state["step"])

    def continue_from(self, path: str | Path) -> None:
        """Take over another run's state at its step, then follow *this* run's recipe from there.

        Weights, EMA, optimizer moments, RNG and data position carry over, so the change of recipe
        (e.g. a higher label dropout) is the only difference from continuing that run. The learning
        rate follows this run's schedule (``lr``, ``warmup_steps``, ``steps``) at the inherited step.
        """
        path = Path(path)
        if path.is_dir():
            path = run_checkpoint(path)
        if not path.is_file():
            raise ConfigError(f"init_from: no checkpoint at {path} (expected a pretrain-mini run folder or its "
                              f"{CHECKPOINT})")
        state = load_state_file(path)
        if state.get("format") != FULL_FORMAT:
            raise CheckpointMismatchError(f"init_from: {path} is not a full pretrain-mini checkpoint (use a run's "
                                          f"{CHECKPOINT}, not an EMA snapshot or an export)")
        source = _saved_config(state, path)
        diffs = [f"{k}: {path} has {getattr(source, k)!r}, this run {getattr(self.config, k)!r}"
                 for k in ARCHITECTURE_KEYS if getattr(source, k) != getattr(self.config, k)]
        if diffs:
            raise CheckpointMismatchError("init_from: the checkpoint's model does not fit this run's settings:\n  "
                                          + "\n  ".join(diffs))
        if int(state["step"]) >= self.config.steps:
            raise ConfigError(f"init_from: {path} is already at step {state['step']}; set --steps above it")
        self.load_state_dict(state, path)
        # The loaded schedule state carries the source's base lr; this run's own lambda sets the lr from here.
        self.lr_schedule.base_lrs = [self.config.lr for _ in self.optimizer.param_groups]
        for group, factor in zip(self.optimizer.param_groups, self.lr_schedule.lr_lambdas):
            group["initial_lr"] = self.config.lr
            group["lr"] = self.config.lr * factor(self.step)

    def save_checkpoint(self) -> Path:
        """Flush the loss log, then write ``last.safetensors`` atomically (and a numbered EMA snapshot
        now and then)."""
        self.out.mkdir(parents=True, exist_ok=True)
        self._flush_losses()
        path = self.out / CHECKPOINT
        save_state_file(self.state_dict(), path)
        every = self.config.snapshot_every
        if every and self.step % every == 0:
            save_state_file({"format": EMA_FORMAT, "config": self.config.to_dict(), "step": self.step,
                             "ema": self.ema.state_dict()}, self.out / f"step_{self.step:06d}{SUFFIX}")
        return path

    def _flush_losses(self) -> None:
        path = self.out / "loss.csv"
        new = not path.exists()
        with path.open("a", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            if new:
                writer.writerow(LOSS_HEADER)
            writer.writerows(self._pending)
            fh.flush()
            os.fsync(fh.fileno())
        self._pending.clear()

    # ------------------------------------------------------------------ loop
    def run(self, max_steps: int | None = None) -> float:
        """Train until ``config.steps`` (or ``max_steps`` more steps); returns the last loss."""
        cfg = self.config
        target = cfg.steps if max_steps is None else min(cfg.steps, self.step + max_steps)
        bar = _progress(self.step, cfg.steps, cfg.progress)
        window: list[float] = []
        last = float("nan")
        t_start, s_start = time.time(), self.step
        while self.step < target:
            t0 = time.time()
            last = self.train_step()
            self._pending.append((self.step, round(last, 6), self.last_lr, round(time.time() - t0, 3)))
            window.append(last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last:.4f}", refresh=False)
            if self.step % cfg.log_every == 0 or self.step == target:
                rate = (self.step - s_start) / max(1e-9, time.time() - t_start)
                log.info("step %d/%d  loss %.4f (mean of last %d)  lr %.2e  %.3f steps/s", self.step, cfg.steps,
                         sum(window) / len(window), len(window), self.lr_schedule.get_last_lr()[0], rate)
                window.clear()
            stop = self.should_stop()
            if self.step % cfg.checkpoint_every == 0 or self.step == target or stop:
                self.save_checkpoint()
            if stop:
                log.info("stop requested: checkpointed step %d, resume with --resume", self.step)
                break
        if bar is not None:
            bar.close()
        return last

    def should_stop(self) -> bool:
        """A stop was asked for (by code, or by SIGTERM / SIGHUP / SIGINT through ``stop_signal``)."""
        if self.stop_signal is not None and self.stop_signal.requested:
            self.stop_requested = True
        return self.stop_requested

    # ------------------------------------------------------------------ export
    def ema_backbone(self) -> PixelDiffusionBackbone:
        """A fresh backbone carrying the EMA weights (the model to export, sample and probe)."""
        return ema_backbone_from_state(self.config, self.ema.shadow, self.step)


def run_checkpoint(folder: Path) -> Path:
    """The full checkpoint of a run folder: ``last.safetensors``, else an older run's ``last.pt``."""
    current, legacy = folder / CHECKPOINT, folder / LEGACY_CHECKPOINT
    return legacy if legacy.is_file() and not current.is_file() else current


def _saved_config(state: dict, path: Path) -> PretrainConfig:
    try:
        return PretrainConfig.from_dict(state["config"])
    except (KeyError, TypeError, ConfigError) as exc:
        raise CheckpointMismatchError(f"{path}: damaged run settings in the checkpoint ({exc})") from exc


def _typed_optimizer_state(saved: dict, optimizer: torch.optim.Optimizer) -> dict:
    """JSON has no tuples: give saved hyper-parameters the type the live optimizer uses (e.g. ``betas``)."""
    groups = []
    for live, group in zip(optimizer.param_groups, saved["param_groups"]):
        groups.append({k: tuple(v) if isinstance(live.get(k), tuple) and isinstance(v, list) else v
                       for k, v in group.items()})
    return {"state": saved["state"], "param_groups": groups}


def _match_memory_format(optimizer: torch.optim.Optimizer) -> None:
    """Moments read back contiguous; give them their parameter's layout (channels-last) again."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            entries = optimizer.state.get(p, {})
            for name, v in entries.items():
                if isinstance(v, torch.Tensor) and v.shape == p.shape and v.stride() != p.stride():
                    entries[name] = torch.empty_like(p, dtype=v.dtype).copy_(v)


def ema_backbone_from_state(config: PretrainConfig, shadow: dict[str, torch.Tensor], step: int | None = None
                            ) -> PixelDiffusionBackbone:
    backbone = build_pixel_backbone(config.unet_config(), config.class_names, seed=config.seed, name="mini")
    model = DiffusionModel(backbone.unet, backbone.label_encoder)
    missing = set(dict(model.named_parameters())) - set(shadow)
    if missing:
        raise CheckpointMismatchError(f"EMA state lacks {len(missing)} parameters, e.g. {sorted(missing)[:3]}")
    with torch.no_grad():
        for k, p in model.named_parameters():
            p.copy_(shadow[k].to(p.dtype))
    backbone.pretrain_step = step
    return backbone


@dataclass
class RunSnapshot:
    """Read-only view of a checkpoint (what export and probes need); never touches the run's files."""

    config: PretrainConfig
    step: int
    ema_shadow: dict
    out: Path

    def ema_backbone(self) -> PixelDiffusionBackbone:
        return ema_backbone_from_state(self.config, self.ema_shadow, self.step)


def read_run(path: str | Path) -> RunSnapshot:
    """Snapshot of a run directory (its ``last.safetensors``), that file or a ``step_*.safetensors`` one
    (``.pt`` files of older runs are read with ``weights_only=True`` only).

    Safe while the run is still training: checkpoints are replaced atomically, so this reads either
    the previous or the new one, never a half-written file.
    """
    path = Path(path)
    if path.is_dir():
        path = run_checkpoint(path)
    if not path.is_file():
        raise CheckpointMismatchError(f"{path}: no pretraining checkpoint here (is the run older than its "
                                      "first --checkpoint-every steps?)")
    state = load_state_file(path)
    if state.get("format") not in (FULL_FORMAT, EMA_FORMAT):
        raise CheckpointMismatchError(f"{path}: not a cleandift pretraining checkpoint")
    try:
        step, shadow = int(state["step"]), state["ema"]["shadow"]
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointMismatchError(f"{path}: damaged pretraining checkpoint (no {exc})") from exc
    return RunSnapshot(_saved_config(state, path), step, shadow, path.parent)


def load_checkpoint_backbone(path: str | Path) -> PixelDiffusionBackbone:
    """EMA backbone from a run directory, its ``last.safetensors`` or a ``step_*.safetensors`` snapshot."""
    return read_run(path).ema_backbone()


def _progress(initial: int, total: int, enabled: bool):
    if not enabled:
        return None
    from tqdm.auto import tqdm  # noqa: PLC0415

    return tqdm(total=total, initial=initial, desc="pretrain-mini", unit="step", file=sys.stderr,
                mininterval=30 if not sys.stderr.isatty() else 0.5, dynamic_ncols=True)


# ---------------------------------------------------------------------------------------------- entry
def open_run(config: PretrainConfig, resume: bool, images: torch.Tensor | None = None,
             labels: torch.Tensor | None = None) -> Pretrainer:
    """Start a new run in ``config.out`` or resume the one there.

    Resuming takes every non-runtime setting from the checkpoint; a flag that contradicts it is an
    error (it would silently break the exactness of the resume).
    """
    out = Path(config.out)
    _remove_partial_writes(out)
    ckpt = run_checkpoint(out)
    if resume and ckpt.is_file():
        state = load_state_file(ckpt)
        if state.get("format") != FULL_FORMAT:
            raise CheckpointMismatchError(f"{ckpt}: not a full pretrain-mini checkpoint")
        saved = _saved_config(state, ckpt)
        _check_same(saved, config)
        for key in RUNTIME_KEYS:
            setattr(saved, key, getattr(config, key))
        trainer = Pretrainer(saved, images, labels)
        trainer.load_state_dict(state, ckpt)
        _truncate_losses(out / "loss.csv", trainer.step)
        log.info("resumed %s at step %d/%d", ckpt, trainer.step, saved.steps)
        return trainer
    if ckpt.is_file():
        raise ConfigError(f"{out} already holds a run (step checkpoint {ckpt}); pass --resume to continue it "
                          "or choose another --out")
    trainer = Pretrainer(config, images, labels)
    if config.init_from:
        trainer.continue_from(config.init_from)
        log.info("new run %s continues %s from step %d", out, config.init_from, trainer.step)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2) + "\n", encoding="utf-8")
    _truncate_losses(out / "loss.csv", 0)
    return trainer


def _remove_partial_writes(out: Path) -> None:
    """``*.tmp`` files a killed run left behind (checkpoints are written there, then renamed)."""
    if out.is_dir():
        for tmp in out.glob("*.tmp"):
            log.info("removing %s, a partial write of an interrupted run", tmp)
            tmp.unlink(missing_ok=True)


def _check_same(saved: PretrainConfig, requested: PretrainConfig) -> None:
    """Explicit settings that differ from the checkpoint's are refused (defaults are ignored)."""
    default = PretrainConfig()
    diffs = []
    for f in fields(PretrainConfig):
        if f.name in RUNTIME_KEYS:
            continue
        want, have, dflt = getattr(requested, f.name), getattr(saved, f.name), getattr(default, f.name)
        if want != have and want != dflt:
            diffs.append(f"{f.name}: checkpoint has {have!r}, requested {want!r}")
    if diffs:
        raise ConfigError("cannot resume with different settings (the resume would not be exact):\n  "
                          + "\n  ".join(diffs))


def _truncate_losses(path: Path, step: int) -> None:
    """Drop loss rows past ``step`` (written by a run that died after its last checkpoint)."""
    if not path.exists():
        return
    if step == 0:
        keep = [LOSS_HEADER]
    else:
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                rows = list(csv.reader(fh))
            keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= step] if rows else []
        except (UnicodeDecodeError, ValueError, csv.Error) as exc:
            raise ConfigError(f"{path}: damaged loss log ({type(exc).__name__}: {exc}); move it away to resume "
                              "(the new log then starts at the resumed step)") from exc
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="", encoding="utf-8") as fh:
        csv.writer(fh).writerows(keep)
    os.replace(tmp, path)

"""Export a pretraining run: EMA weights as a shippable fp16 folder + a model card with figures.

The card records what anyone needs to judge the model: data, steps, final loss, the loss curve, a
grid of class-conditional samples (PNG) with a measured check that they are recognisable, and the tap
table (names, modules, channels, strides).
"""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import torch

from ..backbones.pixel import CHECKSUM_FILE, PixelDiffusionBackbone, load_pixel_backbone, reference_checksum
from ..errors import DatasetError
from .idx import load_idx_dataset, to_model_range
from .probe import knn_top1
from .sampling import image_grid, sample_images
from .train import Pretrainer, RunSnapshot

CARD = "MODEL_CARD.md"
log = logging.getLogger(__name__)


def read_loss_csv(path: Path) -> tuple[list[int], list[float]]:
    """Steps and losses of a run's ``loss.csv``; a damaged log is reported and read as empty (the card
    then has no loss curve), since the weights it accompanies are still good."""
    steps, losses = [], []
    if path.is_file():
        try:
            with path.open(newline="", encoding="utf-8") as fh:
                for row in csv.DictReader(fh):
                    steps.append(int(row["step"]))
                    losses.append(float(row["loss"]))
        except (UnicodeDecodeError, ValueError, KeyError, TypeError, csv.Error) as exc:
            log.warning("%s: damaged loss log (%s: %s); the model card gets no loss curve", path,
                        type(exc).__name__, exc)
            return [], []
    return steps, losses


def smooth(values: list[float], window: int) -> list[float]:
    """Trailing moving average (the raw per-step loss of diffusion training is very noisy)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_loss(steps: list[int], losses: list[float], path: Path) -> Path:
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    ax.plot(steps, losses, lw=0.3, alpha=0.35, color="tab:blue", label="per step")
    window = max(1, len(losses) // 100)
    ax.plot(steps, smooth(losses, window), lw=1.5, color="tab:blue", label=f"mean of {window}")
    ax.set_xlabel("step")
    ax.set_ylabel("epsilon MSE")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


# Classifier-free guidance of the card's samples. Measured on release 1 (benchmarks/mini_guidance.py,
# pixel-kNN agreement, 10 samples per class): w = 2 gives 93 % against 73 % unguided, once DDIM no longer
# clips the predicted x0 (with clipping guidance broke the samples: 25 % at w = 2).
CARD_GUIDANCE = 2.0


def class_samples(backbone: PixelDiffusionBackbone, per_class: int, steps: int = 50,
                  guidance_scale: float = CARD_GUIDANCE, seed: int = 0, sampler: str = "ddim",
                  scheduler_options: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``per_class`` samples of every class (class-major order) and their labels."""
    labels = torch.arange(len(backbone.class_names)).repeat_interleave(per_class)
    images = sample_images(backbone, labels, steps=steps, guidance_scale=guidance_scale, sampler=sampler,
                           generator=torch.Generator().manual_seed(seed), scheduler_options=scheduler_options)
    return images, labels


def save_sample_grid(images: torch.Tensor, path: Path, per_class: int) -> Path:
    """One row per class (``images`` in class-major order), written as an upscaled PNG."""
    from PIL import Image  # noqa: PLC0415

    grid = image_grid(images, nrow=per_class).numpy()
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    img.resize((img.width * 3, img.height * 3), Image.NEAREST).save(path)
    return path


def sample_agreement(images: torch.Tensor, labels: torch.Tensor, data: str | Path, bank_size: int = 10_000,
                     k: int = 10) -> dict:
    """Are the samples recognisable? A raw-pixel kNN classifier (cosine, ``k`` neighbours, ``bank_size``
    training images) labels them; the share it assigns to the class they were conditioned on is the
    measure, next to the same classifier's accuracy on as many real test images (its ceiling).
    Independent of the model's own features, so it cannot flatter them.
    """
    resolution = images.shape[-1]
    xb, yb = load_idx_dataset(data, "train")
    xt, yt = load_idx_dataset(data, "test")
    bank = to_model_range(xb[:bank_size], resolution).flatten(1)
    bank_labels = yb[:bank_size].long()
    n_classes = int(labels.max()) + 1
    per_class = [knn_top1(bank, bank_labels, images[labels == c].flatten(1).float(), labels[labels == c], k=k)
                 for c in range(n_classes)]
    real = knn_top1(bank, bank_labels, to_model_range(xt[: len(images)], resolution).flatten(1),
                    yt[: len(images)].long(), k=k)
    return {"samples": sum(per_class) / n_classes, "per_class": per_class, "real_test": real,
            "n": len(images), "bank": bank_size, "k": k}


def tap_table_markdown(backbone: PixelDiffusionBackbone) -> str:
    res = backbone.resolution
    lines = ["| tap | diffusers module | channels | stride | map at 32 px | default |", "|---|---|---|---|---|---|"]
    for tap in backbone.taps:
        side = res // tap.stride
        default = "yes" if tap.name in backbone.taps.default else "no"
        lines.append(f"| `{tap.name}` | `{tap.module}` | {tap.channels} | {tap.stride} | {side}x{side} | {default} |")
    return "\n".join(lines)


def export_run(trainer: Pretrainer | RunSnapshot, folder: Path, samples_per_class: int = 8, sample_steps: int = 50,
               knn: dict | None = None) -> Path:
    """Write the EMA model (fp16) to ``folder`` with loss curve, sample grid and ``MODEL_CARD.md``."""
    folder = Path(folder)
    backbone = trainer.ema_backbone()
    cfg = trainer.config
    backbone.save(folder, dtype=torch.float16, extra={"pretrain_step": trainer.step,
                                                      "block_out_channels": list(cfg.block_out_channels)})
    steps, losses = read_loss_csv(trainer.out / "loss.csv")
    kept = [i for i, s in enumerate(steps) if s <= trainer.step]  # a snapshot of a run that went on
    steps, losses = [steps[i] for i in kept], [losses[i] for i in kept]
    if losses:
        plot_loss(steps, losses, folder / "loss_curve.png")
    agree_per_class = max(samples_per_class, 20)
    images, labels = class_samples(backbone, agree_per_class, steps=sample_steps)
    shown = torch.cat([images[labels == c][:samples_per_class] for c in range(len(backbone.class_names))])
    save_sample_grid(shown, folder / "samples.png", per_class=samples_per_class)
    try:
        agreement = sample_agreement(images, labels, cfg.data)
    except (DatasetError, OSError) as exc:  # the card is still written when the data is not at hand
        agreement = {"error": f"{type(exc).__name__}: {exc}"}
    final = sum(losses[-200:]) / len(losses[-200:]) if losses else float("nan")
    if knn is None:
        knn = latest_probe(Path(trainer.out) / "knn_probe.jsonl", trainer.step)
    (folder / CARD).write_text(model_card(backbone, trainer, final, knn, sample_steps, agreement), encoding="utf-8")
    record_checksum(folder)
    return folder


def agreement_markdown(agreement: dict | None, class_names: list[str]) -> str:
    if not agreement:
        return ""
    if "error" in agreement:
        return f"Recognisability not measured ({agreement['error']})."
    per = ", ".join(f"{name} {100 * a:.0f}" for name, a in zip(class_names, agreement["per_class"]))
    chance = 100 / len(class_names)
    return (f"**Recognisable?** A raw-pixel kNN classifier (k = {agreement.get('k', 10)}, cosine, "
            f"{agreement['bank']:,} training images) assigns **{100 * agreement['samples']:.1f} %** of "
            f"{agreement['n']} samples to the class they were conditioned on (chance {chance:.3g} %; the same "
            f"classifier scores {100 * agreement['real_test']:.1f} % on {agreement['n']} real test images). "
            f"Per class, %: {per}.")


def knn_markdown(knn: dict) -> str:
    """Probe results as a table: one row per timestep, one column per tap, pixel baselines below."""
    rows: dict[str, dict[str, float]] = {}
    for key, value in knn.items():
        if key.startswith("t=") and "/" in key:
            t, tap = key.split("/", 1)
            rows.setdefault(t, {})[tap] = value
    taps = list(dict.fromkeys(tap for row in rows.values() for tap in row))
    lines = ["| features | " + " | ".join(taps) + " |", "|---" * (len(taps) + 1) + "|"]
    for t, row in rows.items():
        lines.append(f"| {t} | " + " | ".join(f"{row[tap]:.3f}" if tap in row else "" for tap in taps) + " |")
    extras = [f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in knn.items() if "/" not in k
              or not k.startswith("t=")]
    return "\n".join(lines) + "\n\n" + "; ".join(extras) + "."


def latest_probe(path: Path, step: int) -> dict | None:
    """The kNN probe of ``step`` with the largest bank from ``knn_probe.jsonl`` (written by the benchmark)."""
    if not path.is_file():
        return None
    best = None
    for line in path.read_bytes().splitlines():  # one bad line (torn write, damage) costs only itself
        try:
            entry = json.loads(line.decode("utf-8"))
            ok = isinstance(entry, dict) and isinstance(entry.get("results"), dict) and "bank" in entry
        except (UnicodeDecodeError, json.JSONDecodeError):
            ok = False
        if not ok:
            log.warning("%s: skipping an unreadable line", path)
            continue
        if entry.get("step") == step and (best is None or entry.get("bank", 0) >= best.get("bank", 0)):
            best = entry
    if best is None:
        return None
    return {"bank / queries": f"{best['bank']} / {best.get('queries')}", **best["results"]}


def record_checksum(folder: Path) -> dict:
    """Write ``checksum.json``: the reference fingerprint of the folder *as loaded back* in fp32."""
    checksum = reference_checksum(load_pixel_backbone(folder, dtype=torch.float32))
    (folder / CHECKSUM_FILE).write_text(json.dumps(checksum, indent=2) + "\n", encoding="utf-8")
    return checksum


def model_card(backbone: PixelDiffusionBackbone, trainer: Pretrainer | RunSnapshot, final_loss: float, knn: dict | None,
               sample_steps: int = 50, agreement: dict | None = None) -> str:
    cfg = trainer.config
    params = sum(p.numel() for p in backbone.unet.parameters())
    enc = sum(p.numel() for p in backbone.label_encoder.parameters())
    lines = [
        "# cleandift `mini`: class-conditional pixel diffusion on Fashion-MNIST",
        "",
        "Trained by `cleandift pretrain-mini` so the method can be observed offline on a CPU. "
        "It is **not** Stable Diffusion; it keeps SD's interface, noise schedule and U-Net block pattern.",
        "",
        "## Data",
        "Fashion-MNIST training split (60,000 images, 10 classes; Zalando Research, MIT licence; Debian package "
        "`dataset-fashion-mnist`). 28x28 images are **padded** by 2 px of background to 32x32 (no resampling) "
        "and scaled to [-1, 1].",
        "",
        "## Model",
        f"- U-Net: diffusers `UNet2DConditionModel`, {params:,} parameters, block_out_channels "
        f"{tuple(cfg.block_out_channels)}, 2 layers per block, {cfg.attention_heads} attention heads, "
        f"down `{backbone.unet.config.down_block_types}`, mid `UNetMidBlock2DCrossAttn`, "
        f"up `{backbone.unet.config.up_block_types}` (no attention at the full 32x32 level).",
        f"- Label encoder: {enc:,} parameters; context `[bos, token]`, one token per class + a null token "
        "(empty prompt). Prompts: class names or 'a photo of a {class}'.",
        "- Schedule: DDPM, scaled-linear betas 0.00085-0.012, 1000 steps, epsilon prediction (SD's).",
        "",
        "## Training",
        f"- {trainer.step} steps of batch {cfg.batch_size} (= {trainer.step * cfg.batch_size / 60000:.1f} epochs), "
        f"AdamW lr {cfg.lr} (warmup {cfg.warmup_steps}, cosine to {cfg.min_lr_ratio}x over {cfg.steps} steps), "
        f"weight decay {cfg.weight_decay}, grad clip {cfg.grad_clip}, label dropout {cfg.label_dropout}, "
        f"EMA {cfg.ema_decay} (exported), fp32 {'+ bf16 autocast' if cfg.bf16 else '(no autocast)'}, "
        f"channels-last, {cfg.threads} CPU thread(s).",
        f"- Final loss (mean of the last 200 steps): **{final_loss:.4f}**.",
        "",
        "![loss curve](loss_curve.png)",
        "",
        "## Samples",
        f"DDIM, {sample_steps} steps, classifier-free guidance {CARD_GUIDANCE:g}, predicted x0 not clipped "
        f"(clipping it broke guided samples), one row per class "
        f"({', '.join(backbone.class_names)}).",
        "",
        "![samples](samples.png)",
        "",
        agreement_markdown(agreement, backbone.class_names),
        "",
        "## Tap table",
        "Names follow the CleanDIFT reference (`cleandift.taps.discover_taps`); strides are relative to the 32x32 "
        "input (latent factor 1).",
        "",
        tap_table_markdown(backbone),
        "",
    ]
    if knn:
        lines += ["## kNN probe (k=10, cosine, globally pooled features, null prompt)", "", knn_markdown(knn), ""]
    return "\n".join(lines)

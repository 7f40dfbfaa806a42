"""Does classifier-free guidance help the ``mini`` model's samples? Agreement vs guidance and sampler.

    python benchmarks/mini_guidance.py                                  # bundled mini, default grid
    python benchmarks/mini_guidance.py --model EXPORT --w 1 2 4 --variants clip dynamic

For every (sampler variant, guidance w) it draws ``--per-class`` samples of each class with the same seed
and labels them with the raw-pixel kNN classifier of the model card
(:func:`cleandift.pretrain.export.sample_agreement`); the share that gets the class it was conditioned
on is the score (chance = 1 / classes). Variants change only the sampler's config, never the model:

* ``clip``: DDIM clamps the predicted x0 to [-1, 1] (``clip_sample``, diffusers' ``DDPMScheduler`` default
  and the pixel scheduler's setting before release 1's card). ``sample_images`` now re-derives the noise
  from the clipped x0; ``results/mini_guidance.md`` was measured before that, with diffusers' default
  (clipped x0, unclipped noise), and ``results/mini_guidance_clip_rederived.md`` after;
* ``noclip``: no clipping of the predicted x0 (SD's setting, and the pixel scheduler's now);
* ``dynamic``: Imagen's dynamic thresholding (per-sample 99.5th percentile s of |x0|, at least 1, at most
  10; x0 clipped to [-s, s] and divided by s), the usual remedy for saturation under strong guidance in
  pixel space. diffusers bounds s by ``sample_max_value``: at 1 it is plain clipping;
* ``ddpm``: ancestral DDPM sampling with the model's own config instead of DDIM.

Prints a markdown table and writes it with the raw numbers to ``--out`` (JSON + .md).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

VARIANTS: dict[str, tuple[str, dict]] = {
    "clip": ("ddim", {"clip_sample": True, "clip_sample_range": 1.0}),
    "noclip": ("ddim", {"clip_sample": False}),
    "dynamic": ("ddim", {"clip_sample": False, "thresholding": True, "dynamic_thresholding_ratio": 0.995,
                         "sample_max_value": 10.0}),
    "ddpm": ("ddpm", {}),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bundled", help="'bundled' or an exported pixel-backbone folder")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--w", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    p.add_argument("--variants", nargs="+", default=["clip", "noclip", "dynamic"], choices=sorted(VARIANTS))
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--steps", type=int, default=50, help="sampler steps (DDPM uses them as its own spacing)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="benchmarks/results/mini_guidance")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from cleandift.backbones.pixel import load_bundled_mini, load_pixel_backbone
    from cleandift.pretrain.export import class_samples, sample_agreement
    from cleandift.pretrain.idx import load_idx_dataset, to_model_range

    backbone = load_bundled_mini() if args.model == "bundled" else load_pixel_backbone(args.model)
    rows = []
    for variant in args.variants:
        sampler, options = VARIANTS[variant]
        for w in args.w:
            t0 = time.perf_counter()
            images, labels = class_samples(backbone, args.per_class, steps=args.steps, guidance_scale=w,
                                           seed=args.seed, sampler=sampler, scheduler_options=options)
            seconds = time.perf_counter() - t0
            agreement = sample_agreement(images, labels, args.data)
            saturated = bright_share(images)
            rows.append({"variant": variant, "w": w, "agreement": agreement["samples"],
                         "per_class": agreement["per_class"], "saturated": saturated, "seconds": seconds})
            print(f"{variant:8s} w={w:<4g} agreement {100 * agreement['samples']:5.1f} %  "
                  f"white pixels {100 * saturated:5.1f} %  ({seconds:.0f} s)", flush=True)
    real, _ = load_idx_dataset(args.data, "test")
    real_bright = bright_share(to_model_range(real[:1000], backbone.resolution))
    table = markdown(rows, args.w, args.variants)
    table += f"\n\nWhite-saturated pixels in 1,000 real test images: {100 * real_bright:.1f} %."
    print(table)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    record = {"settings": vars(args), "rows": rows, "real_bright": real_bright}
    out.with_suffix(".json").write_text(json.dumps(record, indent=1))
    out.with_suffix(".md").write_text(table + "\n")
    return 0


def bright_share(images: torch.Tensor) -> float:
    """Share of pixels at the white end (> 0.99 in [-1, 1]): saturation shows up there, as the background
    of Fashion-MNIST is legitimately at -1."""
    return float((images > 0.99).float().mean())


def markdown(rows: list[dict], ws: list[float], variants: list[str]) -> str:
    """Agreement (%) per variant and w, share of white-saturated pixels (%) in brackets."""
    cell = {(r["variant"], r["w"]): f"{100 * r['agreement']:.0f} ({100 * r['saturated']:.0f})" for r in rows}
    lines = ["| sampler \\ w | " + " | ".join(f"{w:g}" for w in ws) + " |", "|---" * (len(ws) + 1) + "|"]
    lines += [f"| {v} | " + " | ".join(cell[(v, w)] for w in ws) + " |" for v in variants]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())

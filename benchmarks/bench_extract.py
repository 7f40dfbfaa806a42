"""Clean (CleanDIFT) vs noisy (DIFT) extraction cost, measured side by side.

    python benchmarks/bench_extract.py --arch sd15 --size 512 --dtypes fp32,bf16

Cases per image (SD architecture with random weights; cost does not depend on the weights):

* ``clean``          -- CleanExtractor: VAE mean once, student U-Net once, stopped after the tap.
* ``noisy-e1``       -- NoisyExtractor, ensemble 1 (DIFT with one draw).
* ``noisy-e8``       -- NoisyExtractor, ensemble 8: VAE once (8 posterior samples drawn from one
                         encoding), 8 U-Net passes batched, stopped after the tap.
* ``dift-reference`` -- DIFT's own procedure (Tsingularity/dift): the image repeated 8 times through
                         the VAE, the prompt encoded per call, 8 U-Net passes up to ``up_blocks[1]``.

Also images/s of ``clean`` over a folder-sized batch at several batch sizes. Every timing is the median
(and min) of ``--repeats`` interleaved rounds after ``--warmup`` rounds. Results are appended to
``benchmarks/results/extract-<arch>-<size>.md``.
"""

from __future__ import annotations

import argparse
import sys
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import append_report, environment_line, interleaved, peak_rss_mb, reset_peak_rss, summary  # noqa: E402

from cleandift.backbones.random_init import build_random_backbone  # noqa: E402
from cleandift.extract import CleanExtractor, NoisyExtractor  # noqa: E402
from cleandift.taps import run_to_taps  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def dift_reference(backbone, image: torch.Tensor, prompt: str, t: int, ensemble: int, tap: str) -> torch.Tensor:
    """DIFT's procedure: E copies through the VAE (posterior sample) and the U-Net, mean of the maps."""
    with torch.no_grad():
        batch = image.repeat(ensemble, 1, 1, 1).to(backbone.dtype)
        latents = backbone.vae.encode(batch).latent_dist.sample() * backbone.scaling_factor
        backbone.clear_prompt_cache()  # DIFT encodes the prompt on every call
        cond = backbone.encode_prompts(prompt, ensemble)
        tt = torch.full((ensemble,), t, dtype=torch.long)
        xt = backbone.add_noise(latents, torch.randn_like(latents), tt)
        feats = run_to_taps(backbone.unet, xt, tt, cond, backbone.taps.select([tap]))[tap]
        return feats.float().mean(0, keepdim=True)


def bench_dtype(arch: str, size: int, dtype_name: str, tap: str, warmup: int, repeats: int) -> list[str]:
    backbone = build_random_backbone(arch, dtype=DTYPES[dtype_name])
    image = torch.rand(1, 3, size, size) * 2 - 1
    prompt = "a photo of a cat"
    clean = CleanExtractor(backbone, taps=tap)
    noisy1 = NoisyExtractor(backbone, ensemble=1, taps=tap)
    noisy8 = NoisyExtractor(backbone, ensemble=8, taps=tap, chunk_size=8)
    cases = {
        "clean": lambda: clean(image, prompt),
        "noisy-e1": lambda: noisy1(image, prompt),
        "noisy-e8": lambda: noisy8(image, prompt),
        "dift-reference-e8": lambda: dift_reference(backbone, image, prompt, 261, 8, tap),
    }
    reset_peak_rss()
    times = interleaved(cases, warmup, repeats)
    rss = peak_rss_mb()
    med = {k: summary(v)[0] for k, v in times.items()}
    rows = [f"| {dtype_name} | {name} | {summary(v)[0]:.2f} | {summary(v)[1]:.2f} | "
            f"{med[name] / med['clean']:.2f}x | {' '.join(f'{x:.2f}' for x in v)} |" for name, v in times.items()]
    rows.append(f"| {dtype_name} | *speed-up of clean* | | | vs noisy-e1 {med['noisy-e1'] / med['clean']:.2f}x, "
                f"vs noisy-e8 {med['noisy-e8'] / med['clean']:.2f}x, vs dift-reference-e8 "
                f"{med['dift-reference-e8'] / med['clean']:.2f}x | peak RSS {rss:,.0f} MB |")
    return rows


def bench_throughput(arch: str, size: int, dtype_name: str, tap: str, batch_sizes: list[int], n_images: int,
                     warmup: int, repeats: int) -> list[str]:
    backbone = build_random_backbone(arch, dtype=DTYPES[dtype_name])
    images = torch.rand(n_images, 3, size, size) * 2 - 1
    extractor = CleanExtractor(backbone, taps=tap, chunk_size=max(batch_sizes))

    def run(bs: int):
        def go():
            for start in range(0, n_images, bs):
                extractor(images[start:start + bs], "a photo")
        return go

    times = interleaved({bs: run(bs) for bs in batch_sizes}, warmup, repeats)
    return [f"| {dtype_name} | {bs} | {n_images / summary(v)[0]:.3f} | {n_images / summary(v)[1]:.3f} |"
            for bs, v in times.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="sd15", help="sd15, sd21, tiny-sd15, tiny-sd21")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--tap", default="us6")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-sizes", default="1,4,8")
    parser.add_argument("--throughput-images", type=int, default=8)
    parser.add_argument("--throughput-dtype", default="fp32",
                        help="bf16 only where the CPU has native bf16 (torch.backends.cpu.get_cpu_capability())")
    parser.add_argument("--throughput-warmup", type=int, default=1)
    parser.add_argument("--throughput-repeats", type=int, default=3)
    parser.add_argument("--skip-throughput", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.manual_seed(0)

    lines = [f"## extract — {args.arch}, {args.size} px, tap {args.tap}, {date.today()}", "",
             f"{environment_line()}, CPU capability {torch.backends.cpu.get_cpu_capability()}; warm-up {args.warmup}, repeats {args.repeats} (interleaved); seconds per image.",
             "", "| dtype | case | median s | min s | / clean | all runs (s) |", "|---|---|---|---|---|---|"]
    for dtype_name in args.dtypes.split(","):
        lines += bench_dtype(args.arch, args.size, dtype_name, args.tap, args.warmup, args.repeats)
        print("\n".join(lines), flush=True)
    if not args.skip_throughput:
        sizes = [int(b) for b in args.batch_sizes.split(",")]
        lines += ["", f"Throughput of `clean` over {args.throughput_images} images (warm-up {args.throughput_warmup}, "
                      f"repeats {args.throughput_repeats}):", "",
                  "| dtype | batch size | images/s (median) | images/s (best) |", "|---|---|---|---|"]
        lines += bench_throughput(args.arch, args.size, args.throughput_dtype, args.tap, sizes,
                                  args.throughput_images, args.throughput_warmup, args.throughput_repeats)
    text = "\n".join(lines) + "\n"
    print(text)
    append_report(text, args.out or Path(__file__).parent / "results" / f"extract-{args.arch}-{args.size}.md")


if __name__ == "__main__":
    main()

"""Clean vs DIFT cost and early-stop savings of every backbone family, at real width, side by side.

    python benchmarks/bench_families.py --size 256 --repeats 3

Per family, a denoiser with the real released architecture (random weights: cost does not depend on
them) -- the SDXL U-Net at full size; SD3, PixArt-Sigma and Flux transformers at real width with
reduced depth (stated in the table, since 24 GB of RAM cannot hold them whole in fp32) -- and
conditioning tensors of the real shapes. Cases, per image:

* ``clean``   -- one denoiser pass on the clean latent, stopped after the family's default feature tap
  (what ``CleanExtractor`` runs after its single VAE encode);
* ``dift-e8`` -- eight passes (one batched call of 8 samples), stopped after the same tap (what
  ``NoisyExtractor(ensemble=8)`` runs after its single VAE encode);
* ``full``    -- one pass with no early stop, and one pass stopped after taps at 1/4, 1/2, 3/4 of the depth:
  the saving of stopping after the last requested tap.

``sd15-old-path`` times the pre-family call (``run_to_taps`` with a bare hidden-states tensor) against the
new ``backbone.run_taps`` on SD 1.5's real U-Net: the interface must cost nothing. Each family runs in its
own process (peak RSS per family). The VAE and text encoders are not timed (identical for clean and DIFT
here: one encode each). Results go to ``benchmarks/results/families-<size>.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment_line, interleaved, peak_rss_mb, reset_peak_rss, summary  # noqa: E402

from cleandift.backbones.conditioning import HIDDEN_STATES, Conditioning  # noqa: E402

FAMILIES = ("sd15", "sdxl", "sd3", "pixart", "flux")

#: Released denoiser configs (diffusers folders' ``config.json``), depth reduced where stated.
SDXL_UNET = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), use_linear_projection=True,
    cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816,
)
SD3_LAYERS, PIXART_LAYERS, FLUX_DOUBLE, FLUX_SINGLE = 6, 7, 2, 4
SD3_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=SD3_LAYERS,
                       attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                       caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)
PIXART_TRANSFORMER = dict(sample_size=128, patch_size=2, in_channels=4, out_channels=8, num_layers=PIXART_LAYERS,
                          attention_head_dim=72, num_attention_heads=16, cross_attention_dim=1152,
                          caption_channels=4096, attention_bias=True, activation_fn="gelu-approximate",
                          num_embeds_ada_norm=1000, norm_type="ada_norm_single", norm_elementwise_affine=False,
                          norm_eps=1e-6, interpolation_scale=2, use_additional_conditions=False)
FLUX_TRANSFORMER = dict(patch_size=1, in_channels=64, num_layers=FLUX_DOUBLE, num_single_layers=FLUX_SINGLE,
                        attention_head_dim=128, num_attention_heads=24, joint_attention_dim=4096,
                        pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
DEPTH = {"sd15": "full (SD 1.5 U-Net)", "sdxl": "full (SDXL base U-Net, 2.6 B)",
         "sd3": f"{SD3_LAYERS} of 24 blocks (SD3-medium width 1536)",
         "pixart": f"{PIXART_LAYERS} of 28 blocks (PixArt-Sigma width 1152)",
         "flux": f"{FLUX_DOUBLE}+{FLUX_SINGLE} of 19+38 blocks (FLUX.1 width 3072)"}


def build(family: str, folder: Path):
    """``(backbone, conditioning of one image, latent channels)`` with the real denoiser swapped in."""
    torch.manual_seed(0)
    if family == "sd15":
        from cleandift.backbones.random_init import build_random_backbone

        backbone = build_random_backbone("sd15")
        return backbone, Conditioning({HIDDEN_STATES: torch.randn(1, 77, 768)}), 4
    if family == "sdxl":
        from diffusers import UNet2DConditionModel

        from cleandift.backbones.sdxl import StableDiffusionXLBackbone
        from cleandift.testing import tiny_sdxl

        pipe = tiny_sdxl.build(folder)
        pipe.register_modules(unet=UNet2DConditionModel(**SDXL_UNET))
        cond = {HIDDEN_STATES: torch.randn(1, 77, 2048), "text_embeds": torch.randn(1, 1280)}
        return StableDiffusionXLBackbone(pipe), Conditioning(cond), 4
    if family == "sd3":
        from diffusers import SD3Transformer2DModel

        from cleandift.backbones.sd3 import StableDiffusion3Backbone
        from cleandift.testing import components, tiny_sd3

        pipe = tiny_sd3.build(folder)
        pipe.register_modules(transformer=SD3Transformer2DModel(**SD3_TRANSFORMER),
                              vae=components.vae(latent_channels=16, shift_factor=0.0609, scaling_factor=1.5305))
        cond = {HIDDEN_STATES: torch.randn(1, 333, 4096), "pooled_projections": torch.randn(1, 2048)}
        return StableDiffusion3Backbone(pipe), Conditioning(cond), 16
    if family == "pixart":
        from diffusers import PixArtTransformer2DModel

        from cleandift.backbones.pixart import PixArtBackbone
        from cleandift.testing import tiny_pixart

        pipe = tiny_pixart.build(folder)
        pipe.register_modules(transformer=PixArtTransformer2DModel(**PIXART_TRANSFORMER))
        cond = {HIDDEN_STATES: torch.randn(1, 300, 4096), "encoder_attention_mask": torch.ones(1, 300, dtype=torch.long)}
        return PixArtBackbone(pipe), Conditioning(cond), 4
    if family == "flux":
        from diffusers import FluxTransformer2DModel

        from cleandift.backbones.flux import FluxBackbone
        from cleandift.testing import components, tiny_flux

        pipe = tiny_flux.build(folder)
        pipe.register_modules(transformer=FluxTransformer2DModel(**FLUX_TRANSFORMER),
                              vae=components.vae(latent_channels=16, shift_factor=0.1159, scaling_factor=0.3611))
        cond = {HIDDEN_STATES: torch.randn(1, 512, 4096), "pooled_projections": torch.randn(1, 768),
                "txt_ids": torch.zeros(1, 512, 3)}
        return FluxBackbone(pipe), Conditioning(cond), 16
    raise ValueError(family)


@torch.no_grad()
def child(family: str, size: int, warmup: int, repeats: int) -> dict:
    """Time one family (run in its own process); returns the row data."""
    from cleandift.taps import run_to_taps

    reset_peak_rss()
    with tempfile.TemporaryDirectory() as folder:
        backbone, cond, channels = build(family, Path(folder))
    backbone.eval()
    side = size // backbone.latent_factor
    x1 = torch.randn(1, channels, side, side)
    x8 = torch.randn(8, channels, side, side)
    cond8 = cond.repeat_interleave(8)
    tap = backbone.taps.select(backbone.default_feature_taps)
    chain = list(backbone.taps)
    t1, t8 = torch.tensor([261]), torch.full((8,), 261)
    cases = {
        "clean": lambda: backbone.run_taps(x1, 261.0, cond, tap),
        "dift-e8": lambda: backbone.run_taps(x8, t8, cond8, tap),
        "full": lambda: backbone.run_taps(x1, t1, cond, [chain[-1]], stop_early=False),
    }
    depths = {}
    for fraction in (0.25, 0.5, 0.75):
        stop = chain[max(0, round(fraction * len(chain)) - 1)]
        depths[f"stop@{stop.name}"] = stop
        cases[f"stop@{stop.name}"] = lambda stop=stop: backbone.run_taps(x1, t1, cond, [stop])
    if family == "sd15":
        hidden = cond.hidden_states
        cases["sd15-old-path"] = lambda: run_to_taps(backbone.unet, x1, 261.0, hidden, tap)
    times = interleaved(cases, warmup, repeats)
    params = sum(p.numel() for p in backbone.denoiser.parameters())
    return {"family": family, "tap": tap[0].name, "taps": len(chain), "params": params,
            "times": times, "depths": {k: v.order for k, v in depths.items()}, "peak_rss_mb": peak_rss_mb()}


def table(rows: list[dict], size: int, warmup: int, repeats: int) -> str:
    lines = [f"### families — {size} px, fp32, {date.today().isoformat()}", "",
             f"{environment_line()}; warm-up {warmup}, repeats {repeats} (interleaved); seconds per image, "
             "denoiser only (random weights, real width).", "",
             "| family | denoiser (depth) | params | default tap | clean s | DIFT e8 s | DIFT e8 / clean | full pass s "
             "| early stop at 1/4, 1/2, 3/4 of the taps (/ full) | peak RSS MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        med = {name: summary(ts)[0] for name, ts in row["times"].items()}
        stops = ", ".join(f"{k.split('@')[1]} {med[k] / med['full']:.2f}" for k in row["depths"])
        lines.append(f"| {row['family']} | {DEPTH[row['family']]} | {row['params'] / 1e9:.2f} B | {row['tap']} | "
                     f"{med['clean']:.2f} | {med['dift-e8']:.2f} | {med['dift-e8'] / med['clean']:.2f}x | "
                     f"{med['full']:.2f} | {stops} | {row['peak_rss_mb']:,.0f} |")
        if "sd15-old-path" in med:
            lines.append(f"| sd15 (old path) | `run_to_taps` with a bare tensor, same tap | | {row['tap']} | "
                         f"{med['sd15-old-path']:.2f} | | new/old {med['clean'] / med['sd15-old-path']:.3f}x | | | |")
    lines.append("")
    lines.append("All runs (s): " + "; ".join(
        f"{r['family']} " + ", ".join(f"{k} {' '.join(f'{t:.2f}' for t in ts)}" for k, ts in r["times"].items())
        for r in rows))
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--families", default=",".join(FAMILIES))
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="results file (default benchmarks/results/families-SIZE.md)")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.size, args.warmup, args.repeats)))
        return
    rows = []
    for family in args.families.split(","):
        cmd = [sys.executable, __file__, "--child", family, "--size", str(args.size), "--warmup", str(args.warmup),
               "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
        print(f"{family}: done", file=sys.stderr)
    text = table(rows, args.size, args.warmup, args.repeats)
    print(text)
    out = Path(args.out or Path(__file__).parent / "results" / f"families-{args.size}.md")
    with out.open("a", encoding="utf-8") as f:
        f.write(text + "\n")


if __name__ == "__main__":
    main()

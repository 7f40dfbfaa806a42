"""One CleanDIFT training step: ours vs the reference algorithm, side by side in one process.

    python benchmarks/bench_train_step.py --arch tiny-sd15 --size 128 --batch-size 2 --repeats 5
    python benchmarks/bench_train_step.py --arch sd15 --size 256 --batch-size 1 --repeats 5   # ~18 GB RAM!

Cases (same student, teacher, heads and Adam optimizer; random weights -- cost does not depend on them):

* ``ours``      -- :class:`cleandift.distill.FeatureAligner`: student **once per image** on the clean
                   latent (features broadcast to the I heads); teacher stopped right after the last tap
                   (``us10``); teacher in ``--teacher-dtype``.
* ``reference`` -- the CompVis ``StableFeatureAligner.forward`` algorithm: the student runs on all
                   ``B*I`` copies of the clean latent; the fp32 teacher and the student both run all of
                   ``up_blocks[3]`` (their feature extractor stops right before ``conv_norm_out``).

Both include the VAE encode (once per image), prompt encoding (cached), heads, loss, backward and the
Adam update. Every timing is the median (and min) over ``--repeats`` interleaved rounds after
``--warmup`` rounds; peak RSS is VmHWM, reset through ``/proc/self/clear_refs`` before every step, so it
is the resident set during that step (weights + optimizer state + the step's transient memory).
Results are written to ``benchmarks/results/train_step-<arch>-<size>.md``.

Memory: at ``sd15`` size the process holds student + teacher + Adam state (~14 GB) before any step,
and a step peaks at ~18-20 GB; do not run it next to another large job on a 24 GB machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _timing import environment_line, peak_rss_mb, reset_peak_rss  # noqa: E402

from cleandift.backbones.random_init import build_random_backbone  # noqa: E402
from cleandift.distill import FeatureAligner  # noqa: E402
from cleandift.features import flatten_hw  # noqa: E402
from cleandift.loss import alignment_loss  # noqa: E402
from cleandift.taps import capture_taps  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


class _Stop(Exception):
    """Raised by a pre-hook on ``conv_norm_out``: the reference extractor never runs it."""


def run_through_up_blocks(unet, sample, timestep, cond, taps) -> dict[str, torch.Tensor]:
    """The reference extractor: capture the taps but run every up block to the end (no early stop)."""
    handle = unet.conv_norm_out.register_forward_pre_hook(lambda m, a: (_ for _ in ()).throw(_Stop()))
    if not isinstance(timestep, torch.Tensor):
        timestep = torch.tensor(float(timestep))
    if timestep.ndim == 0:
        timestep = timestep.expand(sample.shape[0])
    try:
        with capture_taps(unet, taps, stop_early=False) as feats:
            try:
                unet(sample, timestep, encoder_hidden_states=cond.hidden_states, return_dict=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    return {t.name: flatten_hw(feats[t.name]) for t in taps}


def reference_loss(aligner: FeatureAligner, teacher, images: torch.Tensor,
                   generator: torch.Generator) -> torch.Tensor:
    """``StableFeatureAligner.forward``: x0 repeated I times for the student too; fp32 teacher to the end."""
    backbone, i = aligner.backbone, aligner.num_timesteps
    b = images.shape[0]
    x0 = aligner.encode(images, generator)
    cond = backbone.encode_prompts(None, b).to(dtype=torch.float32)
    t = aligner.sample_timesteps(b, generator, x0.device).reshape(-1)
    x0_rep = x0.repeat_interleave(i, 0)
    cond_rep = cond.repeat_interleave(i, 0)
    eps = torch.randn(x0_rep.shape, generator=generator)
    with torch.no_grad():
        x_t = backbone.add_noise(x0_rep, eps, t)
        target = run_through_up_blocks(teacher, x_t, t, cond_rep, aligner.selected_taps)
    student = run_through_up_blocks(aligner.student, x0_rep, aligner.timestep, cond_rep, aligner.selected_taps)
    c = aligner.heads.condition(t)
    pred = {k: aligner.heads.project(k, v, c) for k, v in student.items()}
    return alignment_loss(pred, target)[0]


def breakdown(aligner: FeatureAligner, optimizer, images: torch.Tensor, rounds: int = 2) -> list[str]:
    """Seconds of each part of one ``ours`` step (the last of ``rounds``; the first pays one-off allocations)."""
    b, i = images.shape[0], aligner.num_timesteps
    parts: dict[str, float] = {}

    def timed(name, fn):
        t0 = time.perf_counter()
        out = fn()
        parts[name] = time.perf_counter() - t0
        return out

    for r in range(rounds):
        g = torch.Generator().manual_seed(r)
        x0 = timed(f"VAE encode ({b} images)", lambda: aligner.encode(images, g))
        cond = aligner.backbone.encode_prompts(None, b)
        t = aligner.sample_timesteps(b, g, x0.device).reshape(-1)
        eps = torch.randn((b * i, *x0.shape[1:]), generator=g)
        target = timed(f"teacher ({b * i} noisy latents, early stop)", lambda: aligner.teacher_features(x0, eps, t, cond))
        feats = timed(f"student forward ({b} clean latents)", lambda: aligner.student_features(x0, cond))
        pred = timed("heads forward", lambda: aligner.project(feats, t))
        loss = timed("loss", lambda: alignment_loss(pred, target)[0])
        timed("backward (student + heads)", loss.backward)
        timed("optimizer step", optimizer.step)
        optimizer.zero_grad(set_to_none=True)
    rows = [f"| {name} | {sec:.2f} |" for name, sec in parts.items()]
    return ["| part of one `ours` step | seconds |", "|---|---|", *rows, f"| **total** | **{sum(parts.values()):.2f}** |"]


def make_step(loss_fn, optimizer):
    def step():
        optimizer.zero_grad(set_to_none=True)
        loss_fn().backward()
        optimizer.step()
    return step


def measure(cases: dict, warmup: int, repeats: int, prepare: dict | None = None) -> dict[str, dict[str, list[float]]]:
    """Interleaved rounds; per case the step time and the peak RSS during the step.

    ``prepare[name]`` (untimed, before every step of that case) puts shared state in the form the case
    needs -- here the teacher's precision, so both cases share one teacher and memory stays bounded.
    """
    prepare = prepare or {}
    for _ in range(warmup):
        for name, fn in cases.items():
            prepare.get(name, lambda: None)()
            fn()
    out = {name: {"time": [], "rss": []} for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            prepare.get(name, lambda: None)()
            reset_peak_rss()
            t0 = time.perf_counter()
            fn()
            out[name]["time"].append(time.perf_counter() - t0)
            out[name]["rss"].append(peak_rss_mb())
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny-sd15", choices=("tiny-sd15", "tiny-sd21", "sd15", "sd21"))
    parser.add_argument("--size", type=int, default=None, help="image side in px (default: the arch's resolution)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--num-timesteps", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--teacher-dtype", choices=sorted(DTYPES), default="fp32",
                        help="teacher precision for `ours`; the one teacher is cast back to fp32 (untimed) before "
                             "every `reference` step, so no second copy is held. CAUTION (seen at sd15 size): the "
                             "per-step casts make oneDNN rebuild its kernels every step, which dominates the step "
                             "time; at real sizes compare with fp32 for both or run the cases in separate processes")
    parser.add_argument("--optimizer", choices=("adam-fused", "adam-foreach"), default="adam-fused",
                        help="the same optimizer for both cases (adam-fused: torch's fused kernel, what "
                             "`cleandift train` uses where available)")
    parser.add_argument("--keep-unused", action="store_true",
                        help="keep the VAE decoder and CLIP text encoder (`cleandift train` releases them when "
                             "the data has no captions; see cleandift.train.loop.release_unused_parts)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="for `ours` only")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cases", default="ours,reference",
                        help="which cases to run (e.g. only `ours` where the reference does not fit in memory)")
    parser.add_argument("--breakdown", action="store_true",
                        help="only time the parts of one `ours` step (VAE, teacher, student, heads, backward, optimizer)")
    parser.add_argument("--out", default=None,
                        help="results file (default benchmarks/results/train_step-<arch>-<size>.md)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    backbone = build_random_backbone(args.arch)
    if not args.keep_unused:  # what the trainer does for uncaptioned data (both cases use the empty prompt)
        backbone.release_decoder()
        backbone.release_prompt_encoder([""])
    size = args.size or backbone.resolution
    teacher_dtype = DTYPES[args.teacher_dtype]
    teacher = backbone.unet
    aligner = FeatureAligner(backbone, num_timesteps=args.num_timesteps, teacher_dtype=teacher_dtype,
                             gradient_checkpointing=args.gradient_checkpointing)
    fused = args.optimizer == "adam-fused"
    # tiny lr: weights barely move
    optimizer = torch.optim.Adam(aligner.trainable_parameters(), lr=1e-7, fused=fused, foreach=not fused)
    images = torch.rand(args.batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    counter = iter(range(10**9))

    def ours():
        return aligner(images, generator=torch.Generator().manual_seed(next(counter))).loss

    def reference():
        return reference_loss(aligner, teacher, images, torch.Generator().manual_seed(next(counter)))

    if args.breakdown:
        print("\n".join([environment_line(), "", *breakdown(aligner, optimizer, images)]))
        return
    cases = {"ours": make_step(ours, optimizer), "reference": make_step(reference, optimizer)}
    cases = {name: cases[name] for name in args.cases.split(",")}
    prepare = {"ours": lambda: teacher.to(teacher_dtype), "reference": lambda: teacher.to(torch.float32)}
    reset_peak_rss()
    resident = peak_rss_mb()
    results = measure(cases, args.warmup, args.repeats, prepare)

    rows = []
    for name, r in results.items():
        times, rss = r["time"], r["rss"]
        rows.append((name, statistics.median(times), min(times), statistics.median(rss), max(rss)))
    ratio = rows[1][1] / rows[0][1] if len(rows) == 2 else None
    lines = [
        f"## train step, {args.arch} @ {size} px, batch {args.batch_size} x {args.num_timesteps} timesteps "
        f"({date.today().isoformat()})",
        "",
        f"{environment_line()}; optimizer {args.optimizer} (both); VAE decoder and CLIP "
        f"{'kept' if args.keep_unused else 'released (empty prompt cached)'}; ours: teacher {args.teacher_dtype}, "
        f"early stop after the last tap"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; reference: fp32 teacher, "
        f"student on B*I copies, both through up_blocks[3]; {args.warmup} warm-ups, {args.repeats} interleaved "
        f"repeats; resident before the first step {resident:,.0f} MB (after build).",
        "",
        "| case | median s/step | min s/step | median peak RSS (MiB) | max peak RSS (MiB) |",
        "|---|---|---|---|---|",
        *[f"| {n} | {med:.3f} | {mn:.3f} | {rss:,.0f} | {rss_max:,.0f} |" for n, med, mn, rss, rss_max in rows],
        "",
        (f"ours / reference (median time): **{1 / ratio:.2f}x** (reference takes {ratio:.2f}x as long)"
         if ratio else "(reference not run)"),
        "",
    ]
    if args.arch.startswith("tiny"):
        lines[-1:-1] = ["(tiny model: peak RSS is dominated by memory the allocator keeps between steps; the "
                        "two cases only separate at real sizes)", ""]
    text = "\n".join(lines)
    print(text)
    out = Path(args.out) if args.out else Path(__file__).parent / "results" / f"train_step-{args.arch}-{size}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f:
        f.write(text + "\n")
    print(f"appended to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""One CleanDIFT training step with a full student vs a LoRA student: peak memory and step time.

    python benchmarks/bench_lora.py --arch tiny-sd15 --size 64 --warmup 1 --repeats 1 --rounds 1   # seconds
    python benchmarks/bench_lora.py --arch sd15 --size 256 --batch-size 2 --num-timesteps 3 --rank 64 \\
        --warmup 1 --repeats 3 --rounds 2 --threads 2                                # ~20 GB RAM (full case)
    python benchmarks/bench_lora.py --arch sdxl --size 256 --cases lora --rounds 1   # SDXL U-Net, ~12+ GB

Cases (same backbone, heads, taps, ``I`` and fused Adam; random weights -- cost does not depend on them):

* ``full``          -- ``FeatureAligner(student_kind="full")``: a trainable fp32 deep copy of the denoiser next
                       to the fp32 teacher (the reference recipe).
* ``lora``          -- ``FeatureAligner(student_kind="lora", lora=LoraSettings(rank))``: fp32 adapters inside the
                       backbone's own fp32 denoiser; the teacher is the same module with adapters switched off.
* ``lora+bf16-base`` -- the same with ``teacher_dtype=bf16``: the one shared base in bf16, adapters fp32.

A step is what the trainer does per batch: ``zero_grad`` + forward (VAE encode once per image, teacher on
``B*I`` noisy latents, student on ``B`` clean latents, heads, loss) + backward + ``optimizer.step()``. As in
the trainer, the VAE decoder and the text encoder(s) are released (the empty prompt is cached) before the
aligner is built.

Design -- why subprocesses, and why rounds:

* **Each case runs in its own subprocess** (``--worker``). VmHWM is per process, and glibc keeps freed
  memory mapped, so in a shared process the second case's "peak" would include the first case's weights
  or allocator leftovers. In its own process a case's peak RSS is exactly its own: weights + optimizer
  state + the step's transient memory (+ the interpreter and libraries, the same for every case).
  VmHWM is reset through ``/proc/self/clear_refs`` before every timed step (``_timing.reset_peak_rss``),
  so each step's number is the high-water mark *during that step*.
* **Cases alternate in rounds** (``--rounds``): ``full -> lora -> full -> lora ...``, one subprocess per
  (round, case), each doing ``--warmup`` untimed steps (first steps pay oneDNN primitive creation and
  allocator growth) and then ``--repeats`` timed steps. A slow drift of the machine (another job starting
  on this shared 2-core box) then hits every case alike instead of biasing whichever ran second; the
  per-round medians are reported too, so a disturbed round is visible. Running both cases in one process
  would interleave at step granularity but break the memory measurement (above) and could not hold a full
  SD1.5 student and a LoRA backbone at once within 24 GB anyway. Step times are pooled over rounds:
  median and min per case; the lora/full ratio is the ratio of the medians.
* Only one subprocess lives at a time. Before each real-size subprocess the orchestrator waits until
  ``MemAvailable`` >= ``--min-available-gb`` (``--lora-min-available-gb`` for the LoRA cases; sleeping
  ``60 s``, up to ``--wait-minutes``), and it samples
  the child's VmRSS twice a second, so a case that is killed for memory still leaves its RSS at failure.

Numbers reported per case: trainable parameter count (``aligner.trainable_parameters()``), resident memory
after building (VmRSS once backbone + aligner + optimizer exist, before any step: weights only, since Adam
allocates its state lazily), resident between steps (VmRSS after the timed steps with gradients freed:
weights + Adam state + what the allocator keeps), Adam state size (sum of its state tensors), peak RSS per
step (median / max), wall seconds per step (median / min) and CPU seconds per step (``time.process_time``,
all threads: less sensitive than wall time to other jobs taking a core, since a descheduled thread does not
accumulate it). Machine load (``os.getloadavg()``) is recorded at
the start and end of the run and of every subprocess.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CASES = ("full", "lora", "lora+bf16-base")
ARCHS = ("tiny-sd15", "tiny-sd21", "sd15", "sd21", "sdxl")
REAL_SIZE = ("sd15", "sd21", "sdxl")
RESULT_TAG = "BENCH_LORA_RESULT "


# ------------------------------------------------------------------------------------------ memory
def _status_kb(field: str, pid: int | str = "self") -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return float("nan")


def rss_mb(pid: int | str = "self") -> float:
    """Current resident set (VmRSS) in MiB."""
    return _status_kb("VmRSS", pid) / 1024


def mem_available_gb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024**2
    return float("nan")


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ------------------------------------------------------------------------------------------ worker
def run_case(arch: str, case: str, size: int, batch_size: int = 2, num_timesteps: int = 3, rank: int = 64,
             warmup: int = 1, repeats: int = 3, threads: int | None = None, gradient_checkpointing: bool = False,
             progress=None) -> dict:
    """Build one case and time ``warmup`` + ``repeats`` training steps in *this* process; returns a JSON-able dict.

    Call it in a fresh process (``--worker``) when the peak RSS matters.
    """
    import torch  # noqa: PLC0415

    from _timing import environment_line, peak_rss_mb, reset_peak_rss  # noqa: PLC0415
    from cleandift.backbones.random_init import build_random_backbone  # noqa: PLC0415
    from cleandift.distill import FeatureAligner  # noqa: PLC0415
    from cleandift.lora import LoraSettings  # noqa: PLC0415

    if case not in CASES:
        raise ValueError(f"unknown case {case!r}; one of {CASES}")
    say = progress or (lambda msg: None)
    if threads:
        torch.set_num_threads(int(threads))
    load_start = loadavg()
    t0 = time.perf_counter()
    backbone = build_random_backbone(arch)
    backbone.release_decoder()
    backbone.release_prompt_encoder([""])  # uncaptioned data: the empty prompt, encoded once
    unet_params = sum(p.numel() for p in backbone.denoiser.parameters())
    if case == "full":
        aligner = FeatureAligner(backbone, num_timesteps=num_timesteps, gradient_checkpointing=gradient_checkpointing)
    else:
        aligner = FeatureAligner(backbone, num_timesteps=num_timesteps, student_kind="lora",
                                 lora=LoraSettings(rank=rank), gradient_checkpointing=gradient_checkpointing,
                                 teacher_dtype=torch.bfloat16 if case == "lora+bf16-base" else None)
    aligner.train()
    trainable = aligner.trainable_parameters()
    optimizer = torch.optim.Adam(trainable, lr=1e-7, fused=True)  # tiny lr: the weights barely move
    build_s = time.perf_counter() - t0
    rss_after_build = rss_mb()
    say(f"[{case}] built in {build_s:.1f} s, RSS {rss_after_build:,.0f} MiB")

    heads_params = sum(p.numel() for p in aligner.heads.parameters()) if aligner.heads is not None else 0
    student_params = sum(p.numel() for p in (aligner.unet_feature_extractor_cleandift.parameters() if case == "full"
                                              else aligner.unet_feature_extractor_lora.parameters()))
    images = torch.rand(batch_size, 3, size, size, generator=torch.Generator().manual_seed(0)) * 2 - 1
    counter = iter(range(10**9))

    def step() -> float:
        optimizer.zero_grad(set_to_none=True)
        loss = aligner(images, generator=torch.Generator().manual_seed(next(counter))).loss
        loss.backward()
        optimizer.step()
        return float(loss.detach())

    for i in range(warmup):
        t1 = time.perf_counter()
        step()
        say(f"[{case}] warm-up {i + 1}/{warmup}: {time.perf_counter() - t1:.2f} s, RSS {rss_mb():,.0f} MiB")
    times, cpu_times, peaks = [], [], []
    for i in range(repeats):
        reset_peak_rss()
        c1, t1 = time.process_time(), time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t1)
        cpu_times.append(time.process_time() - c1)
        peaks.append(peak_rss_mb())
        say(f"[{case}] step {i + 1}/{repeats}: {times[-1]:.2f} s (CPU {cpu_times[-1]:.2f} s), "
            f"peak RSS {peaks[-1]:,.0f} MiB, loss {loss:.4f}")
    optimizer.zero_grad(set_to_none=True)
    adam_bytes = sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
                     if torch.is_tensor(t))
    return {
        "case": case, "arch": arch, "size": size, "batch_size": batch_size, "num_timesteps": num_timesteps,
        "rank": rank if case != "full" else None, "base_dtype": "bf16" if case == "lora+bf16-base" else "fp32",
        "gradient_checkpointing": gradient_checkpointing, "environment": environment_line(),
        "threads": torch.get_num_threads(), "taps": aligner.tap_names,
        "trainable_params": sum(p.numel() for p in trainable), "student_params": student_params,
        "heads_params": heads_params, "unet_params": unet_params,
        "build_s": build_s, "rss_after_build_mb": rss_after_build, "rss_between_steps_mb": rss_mb(),
        "adam_state_mb": adam_bytes / 2**20, "times": times, "cpu_times": cpu_times, "peaks_mb": peaks,
        "load_start": load_start, "load_end": loadavg(),
    }


# ------------------------------------------------------------------------------------------ orchestrator
def wait_for_memory(min_gb: float, wait_minutes: float, log=print) -> float:
    """Block until MemAvailable >= ``min_gb`` (checking every 60 s); returns the last reading."""
    deadline = time.monotonic() + 60 * wait_minutes
    while True:
        avail = mem_available_gb()
        if avail >= min_gb or min_gb <= 0:
            return avail
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {avail:.1f} GB available after waiting {wait_minutes} min (need {min_gb} GB)")
        log(f"MemAvailable {avail:.1f} GB < {min_gb} GB; waiting 60 s")
        time.sleep(60)


def spawn_case(case: str, args: argparse.Namespace, log=print) -> dict:
    """Run one case in a fresh interpreter; sample its RSS while it runs. Never raises for a failed case."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--case", case, "--arch", args.arch,
           "--size", str(args.size), "--batch-size", str(args.batch_size), "--num-timesteps", str(args.num_timesteps),
           "--rank", str(args.rank), "--warmup", str(args.warmup), "--repeats", str(args.repeats)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    if args.gradient_checkpointing:
        cmd.append("--gradient-checkpointing")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    with tempfile.TemporaryFile("w+") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=None if args.verbose else subprocess.DEVNULL, env=env)
        sampled = 0.0
        while proc.poll() is None:
            r = rss_mb(proc.pid)
            if r == r:  # not NaN
                sampled = max(sampled, r)
            time.sleep(0.5)
        out.seek(0)
        text = out.read()
    for line in text.splitlines():
        if line.startswith(RESULT_TAG):
            result = json.loads(line[len(RESULT_TAG):])
            result["sampled_max_rss_mb"] = sampled
            return result
    log(f"case {case} failed: exit code {proc.returncode}, max sampled RSS {sampled:,.0f} MiB")
    return {"case": case, "failed": True, "returncode": proc.returncode, "sampled_max_rss_mb": sampled,
            "stdout_tail": text[-2000:]}


def run_benchmark(args: argparse.Namespace, log=print) -> dict:
    """All rounds of all cases, one subprocess at a time; returns ``{"runs": [...], "rows": [...], ...}``."""
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    for c in cases:
        if c not in CASES:
            raise SystemExit(f"unknown case {c!r}; choose from {', '.join(CASES)}")
    start = {"load": loadavg(), "mem_available_gb": round(mem_available_gb(), 1), "time": time.time()}
    runs = []
    for r in range(args.rounds):
        for case in cases:
            need = args.min_available_gb if case == "full" else args.lora_min_available_gb
            avail = wait_for_memory(need, args.wait_minutes, log)
            log(f"round {r + 1}/{args.rounds}: {case} (MemAvailable {avail:.1f} GB, load {loadavg()})")
            result = spawn_case(case, args, log)
            result["round"] = r + 1
            runs.append(result)
            if result.get("failed") and not args.keep_going:
                break
    end = {"load": loadavg(), "time": time.time()}
    return {"runs": runs, "rows": summarize(runs, cases), "start": start, "end": end, "cases": cases}


def summarize(runs: list[dict], cases: list[str]) -> list[dict]:
    rows = []
    for case in cases:
        ok = [r for r in runs if r["case"] == case and not r.get("failed")]
        failed = [r for r in runs if r["case"] == case and r.get("failed")]
        if not ok:
            rows.append({"case": case, "failed": True,
                         "sampled_max_rss_mb": max((r["sampled_max_rss_mb"] for r in failed), default=float("nan")),
                         "returncode": failed[0]["returncode"] if failed else None})
            continue
        times = [t for r in ok for t in r["times"]]
        cpu = [t for r in ok for t in r.get("cpu_times", [])]
        peaks = [p for r in ok for p in r["peaks_mb"]]
        rows.append({
            "case": case, "failed": False, "runs": len(ok), "steps": len(times),
            "trainable_params": ok[0]["trainable_params"], "student_params": ok[0]["student_params"],
            "heads_params": ok[0]["heads_params"], "unet_params": ok[0]["unet_params"],
            "base_dtype": ok[0]["base_dtype"],
            "rss_after_build_mb": statistics.median(r["rss_after_build_mb"] for r in ok),
            "rss_between_steps_mb": statistics.median(r["rss_between_steps_mb"] for r in ok),
            "adam_state_mb": ok[0]["adam_state_mb"],
            "median_peak_mb": statistics.median(peaks), "max_peak_mb": max(peaks),
            "median_s": statistics.median(times), "min_s": min(times),
            "median_cpu_s": statistics.median(cpu) if cpu else float("nan"),
            "round_medians": [statistics.median(r["times"]) for r in ok],
        })
    return rows


def _mib(x: float) -> str:
    return f"{x:,.0f}"


def format_report(result: dict, args: argparse.Namespace, command: str) -> str:
    rows, runs = result["rows"], result["runs"]
    ok_runs = [r for r in runs if not r.get("failed")]
    env = ok_runs[0]["environment"] if ok_runs else "(no case completed)"
    taps = ",".join(ok_runs[0]["taps"]) if ok_runs else "?"
    lines = [
        f"## {args.arch} @ {args.size} px, batch {args.batch_size} x I = {args.num_timesteps}, LoRA rank {args.rank} "
        f"({date.today().isoformat()})",
        "",
        f"{env}; fused Adam; VAE decoder and text encoder(s) released (empty prompt cached); taps {taps}; "
        f"{'gradient checkpointing; ' if args.gradient_checkpointing else ''}"
        f"each case in its own process, {args.rounds} interleaved round(s) x ({args.warmup} warm-up + "
        f"{args.repeats} timed steps).",
        "",
        f"Machine load (1/5/15 min) at start {result['start']['load']}, at end {result['end']['load']}; "
        f"MemAvailable at start {result['start']['mem_available_gb']} GB; wall time "
        f"{(result['end']['time'] - result['start']['time']) / 60:.1f} min.",
        "",
        f"Command: `{command}`",
        "",
        "| case | base / teacher | trainable params | resident after build (MiB) | resident between steps (MiB) "
        "| Adam state (MiB) | median peak RSS (MiB) | max peak RSS (MiB) | median s/step | min s/step "
        "| median CPU s/step | steps |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if row["failed"]:
            lines.append(f"| {row['case']} | FAILED (exit {row['returncode']}); max sampled RSS "
                         f"{_mib(row['sampled_max_rss_mb'])} MiB | | | | | | | | | | |")
            continue
        lines.append(
            f"| {row['case']} | {row['base_dtype']} | {row['trainable_params']:,} | {_mib(row['rss_after_build_mb'])} "
            f"| {_mib(row['rss_between_steps_mb'])} | {_mib(row['adam_state_mb'])} | {_mib(row['median_peak_mb'])} "
            f"| {_mib(row['max_peak_mb'])} | {row['median_s']:.2f} | {row['min_s']:.2f} | {row['median_cpu_s']:.2f} "
            f"| {row['steps']} |")
    lines.append("")
    by = {r["case"]: r for r in rows if not r["failed"]}
    if "full" in by:
        for case in ("lora", "lora+bf16-base"):
            if case in by:
                lines.append(
                    f"* {case} / full: time (median) **{by[case]['median_s'] / by['full']['median_s']:.2f}x** "
                    f"(min {by[case]['min_s'] / by['full']['min_s']:.2f}x, CPU time "
                    f"{by[case]['median_cpu_s'] / by['full']['median_cpu_s']:.2f}x), "
                    f"peak RSS (max) **{by[case]['max_peak_mb'] / by['full']['max_peak_mb']:.2f}x**, "
                    f"trainable parameters {by[case]['trainable_params'] / by['full']['trainable_params']:.3f}x")
    if len(ok_runs) > 1:
        lines += ["", "Per process (round order): " + "; ".join(
            f"r{r['round']} {r['case']} median {statistics.median(r['times']):.2f} s, load {r['load_start'][0]}"
            f"->{r['load_end'][0]}" for r in ok_runs)]
    if any(r.get("failed") for r in runs):
        lines += ["", "Failed processes: " + "; ".join(
            f"r{r['round']} {r['case']} exit {r['returncode']}, max sampled RSS {_mib(r['sampled_max_rss_mb'])} MiB"
            for r in runs if r.get("failed"))]
    lines.append("")
    return "\n".join(lines)


def default_out(arch: str, size: int) -> Path | None:
    if arch == "sdxl":
        return HERE / "results" / "lora-sdxl.md"
    if arch in REAL_SIZE:
        return HERE / "results" / f"lora-{arch}-{size}.md"
    return None  # tiny runs are checks, not records


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="tiny-sd15", choices=ARCHS)
    parser.add_argument("--size", type=int, default=256, help="image side in px")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--num-timesteps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--cases", default="full,lora", help=f"comma list of {', '.join(CASES)}")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per process")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per process")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (one process per case per round)")
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and OMP_NUM_THREADS")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--min-available-gb", type=float, default=None,
                        help="wait until this much memory is available before each process "
                             "(default 22 for real-size archs, 0 for tiny)")
    parser.add_argument("--lora-min-available-gb", type=float, default=None,
                        help="the same for the LoRA cases (default: 12 for sd15/sd21, --min-available-gb otherwise)")
    parser.add_argument("--wait-minutes", type=float, default=20)
    parser.add_argument("--keep-going", action="store_true", help="continue after a failed process")
    parser.add_argument("--out", default=None, help="results file to append to (default: per real-size arch; "
                                                    "tiny runs write nothing)")
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--quiet", dest="verbose", action="store_false", help="hide the workers' progress lines")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--case", default=None, help=argparse.SUPPRESS)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        result = run_case(args.arch, args.case, args.size, args.batch_size, args.num_timesteps, args.rank,
                          args.warmup, args.repeats, args.threads, args.gradient_checkpointing,
                          progress=lambda msg: print(msg, file=sys.stderr, flush=True))
        print(RESULT_TAG + json.dumps(result), flush=True)
        return 0
    if args.min_available_gb is None:
        args.min_available_gb = 22.0 if args.arch in REAL_SIZE else 0.0
    if args.lora_min_available_gb is None:
        args.lora_min_available_gb = 12.0 if args.arch in ("sd15", "sd21") else args.min_available_gb
    command = "python benchmarks/bench_lora.py " + shlex.join(argv if argv is not None else sys.argv[1:])
    result = run_benchmark(args, log=lambda msg: print(msg, file=sys.stderr, flush=True))
    text = format_report(result, args, command)
    print(text)
    out = Path(args.out) if args.out else default_out(args.arch, args.size)
    if out is not None and not args.no_write:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a", encoding="utf-8") as f:
            f.write(text + "\n")
        print(f"appended to {out}", file=sys.stderr)
    return 0 if all(not r["failed"] for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())

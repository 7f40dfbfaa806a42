"""kNN probe of a ``pretrain-mini`` checkpoint: pooled U-Net features per tap vs raw pixels.

    python benchmarks/mini_knn_probe.py /work/runs/mini-pretrain            # last.safetensors (EMA weights)
    python benchmarks/mini_knn_probe.py RUN/step_004000.safetensors --bank 5000 --queries 1000 --t 0 261

Bank = the first ``--bank`` Fashion-MNIST training images, queries = the first ``--queries`` test
images; k=10 cosine majority vote on globally average-pooled features read with the null prompt.
Results are appended as one JSON line to ``RUN/knn_probe.jsonl`` (or ``--log``). Runs on 1 thread by
default so it does not starve a training run or the other users of the machine.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint", help="run directory (uses last.safetensors), that file, a step_*.safetensors "
                                      "snapshot (older runs: .pt, read weights-only), or an exported "
                                      "pixel-backbone folder")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist")
    p.add_argument("--bank", type=int, default=10000)
    p.add_argument("--queries", type=int, default=2000)
    p.add_argument("--t", type=int, nargs="+", default=[0, 100, 261])
    p.add_argument("--taps", default="all")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--log", default=None, help="JSON-lines file to append to (default: RUN/knn_probe.jsonl)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from cleandift.backbones.pixel import METADATA_FILE, load_pixel_backbone
    from cleandift.pretrain.idx import load_idx_dataset, to_model_range
    from cleandift.pretrain.probe import knn_probe
    from cleandift.pretrain.train import load_checkpoint_backbone

    ckpt = Path(args.checkpoint)
    if (ckpt / METADATA_FILE).is_file():
        backbone = load_pixel_backbone(ckpt)
        step = json.loads((ckpt / METADATA_FILE).read_text()).get("pretrain_step")
    else:
        backbone = load_checkpoint_backbone(ckpt)
        step = backbone.pretrain_step
    xb, yb = load_idx_dataset(args.data, "train")
    xq, yq = load_idx_dataset(args.data, "test")
    bank = (to_model_range(xb[: args.bank], backbone.resolution), yb[: args.bank])
    queries = (to_model_range(xq[: args.queries], backbone.resolution), yq[: args.queries])
    taps = list(backbone.taps.names) if args.taps == "all" else args.taps.split(",")
    t0 = time.time()
    results = knn_probe(backbone, bank, queries, taps=taps, timesteps=args.t)
    seconds = time.time() - t0
    pixels = max(v for k, v in results.items() if k.startswith("pixels"))
    best = max((k for k in results if not k.startswith("pixels")), key=results.get)
    print(f"checkpoint {ckpt} (step {step}), bank {args.bank}, queries {args.queries}, {seconds:.0f} s")
    for t in args.t:
        row = "  ".join(f"{name}={results[f't={t}/{name}']:.3f}" for name in taps)
        print(f"t={t:<4d} {row}")
    print("pixels: " + "  ".join(f"{k}={v:.3f}" for k, v in results.items() if k.startswith("pixels")))
    print(f"best: {best} = {results[best]:.3f}  ({100 * (results[best] - pixels):+.1f} points vs best pixels)")
    log = Path(args.log) if args.log else (ckpt if ckpt.is_dir() else ckpt.parent) / "knn_probe.jsonl"
    with log.open("a", encoding="utf-8") as fh:
        fh.write(json.dumps({"checkpoint": str(ckpt), "step": step, "bank": args.bank, "queries": args.queries,
                             "seconds": round(seconds, 1), "results": results}) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

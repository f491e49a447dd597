"""The three input paths on one folder, in images per second: the decoded cache, device decode, the DataLoader.

For each path (`set input_cache on | decode | off`) on the same data, model and device:
  input   batches ready on the device, nothing else (the pipeline's own ceiling)
  train   the model's training steps through Trainer.run (what a run gets)
The cache's one-off decode is timed apart. With augmentation on (the default), each path crops, flips and jitters.

    python benchmarks/input_paths.py --data DIR --model resnet50 --size 224 --batch 256 --workers 16   # a GPU
    python benchmarks/input_paths.py --data DIR --model test_resnet --size 32 --batch 8 --steps 3      # a CPU check
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgshell.engine import data as D  # noqa: E402
from pgshell.engine import models as M  # noqa: E402
from pgshell.engine.config import TrainConfig  # noqa: E402
from pgshell.engine.train.loop import Callbacks, Trainer  # noqa: E402

PATHS = (("cache", "on"), ("device decode", "decode"), ("DataLoader", "off"))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def input_rate(tr: Trainer, steps: int) -> float:
    """Images per second of the source's batches alone (after one warm-up batch)."""
    batches = tr.source.train_batches(0, 0, 0, 1, tr.cfg.batch_size)
    next(batches)
    sync(tr.runtime.device)
    t0, n = time.perf_counter(), 0
    for _, (x, _, _, _) in zip(range(steps), batches):
        n += 0 if x is None else len(x)
    sync(tr.runtime.device)
    return n / (time.perf_counter() - t0)


def train_rate(tr: Trainer, steps: int) -> float:
    tr.run(steps=2)  # warm-up (cudnn autotuning, allocator)
    sync(tr.runtime.device)
    res = tr.run(steps=steps, callbacks=Callbacks())
    sync(tr.runtime.device)
    return res.images / res.seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a folder of class folders")
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--workers", type=int, default=min(16, os.cpu_count() or 1))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    os.environ.setdefault("PGSHELL_CACHE", tempfile.mkdtemp())
    splits = D.scan_folder(args.data)
    spec = M.ModelSpec(args.model, len(splits.classes))
    torch.manual_seed(0)
    built = M.build_model(spec)
    print(f"{args.data}: {len(splits.train)} training images; {args.model} at {args.size} px, batch {args.batch}, "
          f"{args.workers} workers")
    for name, mode in PATHS:
        cfg = TrainConfig().replace(batch_size=args.batch, workers=args.workers, input_cache=mode, device=args.device)
        tr = Trainer(built, spec, splits, cfg, size=args.size)
        t0 = time.perf_counter()
        tr._prepare_batches(lambda m: print(f"  {m}"))
        built_s = time.perf_counter() - t0
        if tr.source.kind != {"on": "input cache", "decode": "device decode", "off": "DataLoader"}[mode]:
            print(f"{name:14s} not used here (the trainer chose the {tr.source.kind})")
            continue
        rate_in = input_rate(tr, args.steps)
        rate_train = train_rate(tr, args.steps)
        print(f"{name:14s} input {rate_in:9.1f} img/s   train {rate_train:9.1f} img/s   "
              f"[{tr.runtime.describe()}; ready in {built_s:.1f} s]", flush=True)


if __name__ == "__main__":
    main()

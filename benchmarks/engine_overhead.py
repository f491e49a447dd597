"""Engine overhead: pgshell's training loop against a bare PyTorch loop, same model, same data, same device.

Both loops read the same images through the same dataset, transform and batch size, and run the same forward,
loss, backward and SGD step; the difference is what the engine adds (position tracking, per-step seeding, metrics
rows, pause checks, schedule). Runs alternate (bare, engine, bare, engine, ...) so machine noise hits both; the
figure is the ratio of the medians.

    python benchmarks/engine_overhead.py [--data FOLDER] [--model resnet18] [--size 64] [--batch 32] [--rounds 3]

Without --data it writes a synthetic image folder (512 images, 4 classes) to a temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgshell.engine import data as D  # noqa: E402
from pgshell.engine import models as M  # noqa: E402
from pgshell.engine.config import TrainConfig  # noqa: E402
from pgshell.engine.train.metrics import MetricsLog  # noqa: E402
from pgshell.engine.train.loop import Trainer  # noqa: E402


def synthetic_folder(root: Path, n: int = 512, classes: int = 4, px: int = 96) -> Path:
    rng = np.random.default_rng(0)
    for c in range(classes):
        d = root / f"c{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(n // classes):
            Image.fromarray(rng.integers(0, 255, (px, px, 3), dtype=np.uint8)).save(d / f"{i}.jpg", quality=90)
    return root


def bare_loop(model, dataset, batch: int, workers: int, steps: int) -> float:
    """What a user writes by hand: DataLoader, forward, loss, backward, step."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                         collate_fn=D.collate)
    opt = torch.optim.SGD(model.parameters(), lr=0.001, momentum=0.9)
    loss_fn = torch.nn.CrossEntropyLoss()
    model.train()
    n, t0 = 0, time.perf_counter()
    for i, (x, y, _) in enumerate(loader):
        if i == steps:
            break
        out = model(x)
        loss = loss_fn(out, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
        n += len(y)
    return n / (time.perf_counter() - t0)


def engine_loop(built, spec, splits, cfg, steps: int, log_path: Path) -> float:
    trainer = Trainer(built, spec, splits, cfg, log=MetricsLog(log_path), size=cfg_size)
    res = trainer.run(steps=steps)
    return res.images / res.seconds


def main() -> None:
    global cfg_size
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cfg_size = args.size
    tmp = Path(tempfile.mkdtemp())
    folder = Path(args.data) if args.data else synthetic_folder(tmp / "imgs")
    splits = D.scan_folder(str(folder), split=0.1, seed=0)
    spec = M.ModelSpec(args.model, len(splits.classes))
    torch.manual_seed(0)
    built = M.build_model(spec)
    cfg = TrainConfig(batch_size=args.batch, workers=args.workers, scheduler="none", device="cpu", amp="off")
    ds = D.ImageDataset(splits.train, D.build_transform(built.data_config, train=True, size=args.size))
    bare_model = M.build_model(spec).module
    bare_loop(bare_model, ds, args.batch, args.workers, 2)  # warm-up both
    engine_loop(built, spec, splits, cfg, 2, tmp / "warm.csv")
    bare, engine = [], []
    for r in range(args.rounds):
        bare.append(bare_loop(bare_model, ds, args.batch, args.workers, args.steps))
        engine.append(engine_loop(built, spec, splits, cfg, args.steps, tmp / f"m{r}.csv"))
    b, e = statistics.median(bare), statistics.median(engine)
    print(f"model {args.model}, {args.size} px, batch {args.batch}, workers {args.workers}, {args.steps} steps x "
          f"{args.rounds} rounds, CPU threads {torch.get_num_threads()}")
    print(f"bare PyTorch loop: {b:8.1f} img/s   (rounds: {', '.join(f'{v:.1f}' for v in bare)})")
    print(f"pgshell engine:    {e:8.1f} img/s   (rounds: {', '.join(f'{v:.1f}' for v in engine)})")
    print(f"engine / bare: {e / b:.3f}  (overhead {100 * (1 - e / b):+.1f}%)")


cfg_size = 0

if __name__ == "__main__":
    main()

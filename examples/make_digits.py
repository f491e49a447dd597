"""Write scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as an image folder: OUT/0/*.png ... OUT/9/.

The quickstart trains on it: a real dataset that ships inside a dependency, so the demo needs no download.
`--train N --val M` writes a few-shot split instead, OUT/train/<class>/ and OUT/val/<class>/ with N and M images of
each class (drawn with a fixed seed): the transfer demo's data, where pretrained features have something to add.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(out: str = "data/digits", px: int = 32, train: int = 0, val: int = 0) -> None:
    root = Path(out)
    digits = load_digits()
    picks = _few_shot(digits.target, train, val) if train else {"": range(len(digits.images))}
    wanted = sum(len(ix) for ix in picks.values())
    if root.exists() and sum(1 for _ in root.rglob("*.png")) == wanted:
        print(f"{root}: already written ({wanted} images)")
        return
    if root.exists() and any(root.iterdir()):  # another split, or other files: never mix two, never delete
        raise SystemExit(f"{root} already holds other images: remove it or name another folder")
    for split, indices in picks.items():
        for i in indices:
            d = root / split / str(digits.target[i])
            d.mkdir(parents=True, exist_ok=True)
            a = (digits.images[i] / 16.0 * 255).astype(np.uint8)
            Image.fromarray(a, "L").resize((px, px), Image.BILINEAR).convert("RGB").save(d / f"{i:04d}.png")
    where = " and ".join(f"{split}/ ({len(ix)})" for split, ix in picks.items()) if train else "10 class folders"
    print(f"{root}: wrote {wanted} images in {where}")


def _few_shot(target: np.ndarray, train: int, val: int) -> dict[str, list[int]]:
    rng = np.random.default_rng(0)
    out: dict[str, list[int]] = {"train": [], "val": []}
    for c in np.unique(target):
        ix = rng.permutation(np.flatnonzero(target == c))
        out["train"] += sorted(ix[:train].tolist())
        out["val"] += sorted(ix[train:train + val].tolist())
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", nargs="?", default="data/digits")
    ap.add_argument("--train", type=int, default=0, help="images of each class in train/ (0: one folder of all)")
    ap.add_argument("--val", type=int, default=0, help="images of each class in val/")
    args = ap.parse_args()
    main(args.out, train=args.train, val=args.val)

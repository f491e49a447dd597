"""Write scikit-learn's handwritten digits (1,797 8x8 images, 10 classes) as an image folder: OUT/0/*.png ... OUT/9/.

The quickstart trains on it: a real dataset that ships inside a dependency, so the demo needs no download.
"""

import sys
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits


def main(out: str = "data/digits", px: int = 32) -> None:
    root = Path(out)
    digits = load_digits()
    if root.exists() and sum(1 for _ in root.rglob("*.png")) == len(digits.images):
        print(f"{root}: already written ({len(digits.images)} images)")
        return
    for i, (img, label) in enumerate(zip(digits.images, digits.target)):
        d = root / str(label)
        d.mkdir(parents=True, exist_ok=True)
        a = (img / 16.0 * 255).astype(np.uint8)
        Image.fromarray(a, "L").resize((px, px), Image.BILINEAR).convert("RGB").save(d / f"{i:04d}.png")
    print(f"{root}: wrote {len(digits.images)} images in 10 class folders")


if __name__ == "__main__":
    main(*sys.argv[1:2])

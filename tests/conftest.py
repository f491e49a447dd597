"""Shared fixtures: tiny image folders made by the tests themselves (no network, no ../shared)."""

import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network


def make_images(root: Path, classes=("cat", "dog", "fox"), per_class=10, px=32, seed=0, fmt="png") -> Path:
    """Class folders of small learnable images: each class has its own colour and stripe direction, plus noise."""
    rng = np.random.default_rng(seed)
    colours = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (200, 200, 40), (200, 40, 200)]
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.zeros((px, px, 3), np.float32) + colours[c % len(colours)]
            stripes = (np.arange(px) // 4 % 2)[:, None] if c % 2 else (np.arange(px) // 4 % 2)[None, :]
            a = a * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 20, a.shape)
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(d / f"{name}_{i:03d}.{fmt}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """3 classes x 10 images, one class-folder root (split by ratio)."""
    return make_images(tmp_path / "imgs")


@pytest.fixture
def split_folder(tmp_path) -> Path:
    """train/ (3 x 10) and val/ (3 x 4) folders: 30 training images, 4 batches of 8 per epoch."""
    root = tmp_path / "tv"
    make_images(root / "train", per_class=10, seed=1)
    make_images(root / "val", per_class=4, seed=2)
    return root

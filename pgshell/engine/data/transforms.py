"""The augmentation and evaluation policy -> timm transforms: the model's data config with the session's policy
settings (`crop_pct`, `interpolation`, `normalize`, the train-time augmentations), `build_transform` and
`eval_transform` (the one place an evaluation transform is built), what the device augmentation cannot honour, and the
hint about small images.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from PIL import Image
from timm.data import create_transform

from ..errors import PgError
from .folders import Splits
from .images import image_side


# --------------------------------------------------------------------------------------------------------------
# Transforms
# --------------------------------------------------------------------------------------------------------------

_CONFIG_KEYS = ("input_size", "interpolation", "mean", "std", "crop_pct", "crop_mode")
_NO_NORMALISATION = ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # an identity Normalize: the pipeline keeps its shape
_SMALL_IMAGES = 64  # px: at or below this, timm's ImageNet crops (down to 8% of the area) leave little to learn from
_TRAIN_POLICY = ("crop_scale", "crop_ratio", "hflip", "vflip", "color_jitter", "auto_augment", "random_erasing",
                 "interpolation")
# The policy settings engine/batches/inputcache.py's device augmentation takes as parameters. None yet: it draws timm's
# default crop (0.08-1, 3/4-4/3), flip (0.5) and jitter (0.4). Its rewrite adds the ones it reads; auto_augment and
# random_erasing are PIL/per-image operations it is not expected to do.
DEVICE_AUGMENT_READS: tuple[str, ...] = ()


def policy_data_config(data_config: dict, policy=None) -> dict:
    """The model's data config (timm's resolve_model_data_config) with the settings' evaluation policy in force:
    `crop_pct`, `interpolation` and `normalize` replace the model's own values unless they say `model` (or 0).

    Evaluation, prediction, export and the decoded-input cache all start from this, so they agree with training."""
    out = dict(data_config)
    if policy is None:
        return out
    if policy.crop_pct > 0:
        out["crop_pct"] = policy.crop_pct
    if policy.interpolation != "model":
        out["interpolation"] = policy.interpolation
    if policy.normalize != "model":
        out["mean"], out["std"] = normalisation(policy.normalize)
    return out


def normalisation(value: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) for a `normalize` setting other than `model`: imagenet, none, or MEAN/STD (1 or 3 numbers each)."""
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    if value == "imagenet":
        return tuple(IMAGENET_DEFAULT_MEAN), tuple(IMAGENET_DEFAULT_STD)
    if value == "none":
        return _NO_NORMALISATION
    mean, std = ([float(v) for v in part.split(",")] for part in value.split("/"))
    return tuple(mean * (3 // len(mean))), tuple(std * (3 // len(std)))


def train_policy(policy) -> dict:
    """The training augmentation of the settings, as timm's create_transform arguments."""
    return {"scale": (policy.crop_scale, 1.0), "ratio": (1.0 / policy.crop_ratio, policy.crop_ratio),
            "hflip": policy.hflip, "vflip": policy.vflip, "color_jitter": policy.color_jitter or None,
            "auto_augment": None if policy.auto_augment == "none" else policy.auto_augment,
            "re_prob": policy.random_erasing, "re_mode": "pixel"}  # timm train.py's --remode default


def build_transform(data_config: dict, train: bool, size: int = 0, augment: bool = True,
                    policy=None) -> Callable[[Image.Image], torch.Tensor]:
    """timm's transform for a model's data config (from timm.data.resolve_model_data_config) and the settings'
    augmentation policy (`policy`: a TrainConfig; None keeps timm's defaults).

    Training with augment: random resized crop, flips, colour jitter, auto-augment, random erasing as the policy says
    (timm's ImageNet policy by default). Evaluation, and training without augment: resize + centre crop by crop_pct.
    size > 0 replaces the model's input size (small, fast runs).
    """
    config = policy_data_config(data_config, policy)
    cfg = {key: config[key] for key in _CONFIG_KEYS if key in config}
    if size > 0:
        cfg["input_size"] = (3, size, size)
    training = train and augment
    if training and policy is not None:
        cfg.update(train_policy(policy))
    try:
        return create_transform(**cfg, is_training=training)
    except (AssertionError, ValueError, KeyError, IndexError) as exc:  # timm checks auto_augment's sections here
        raise PgError(f"timm cannot build the augmentation (auto_augment {getattr(policy, 'auto_augment', '')!r}: "
                      f"{exc or type(exc).__name__}): try rand-m9-mstd0.5, original or augmix-m5-w4-d2") from None


def eval_transform(data_config: dict, size: int = 0, policy=None) -> Callable[[Image.Image], torch.Tensor]:
    """The evaluation transform: resize and centre crop by the data config with the settings' evaluation policy
    (`crop_pct`, `interpolation`, `normalize`; `policy`: a TrainConfig, None for a config that already has it in
    force). The one place it is built: the epoch-end validation (sources.DataSpec), `eval`, `errors`, `probe`,
    `predict` and `explain` all get it here, so they agree."""
    return build_transform(data_config, train=False, size=size, policy=policy)


def describe_policy(data_config: dict, policy, size: int = 0) -> dict[str, str]:
    """The augmentation in force, in words, for `show`."""
    config = policy_data_config(data_config, policy)
    side = size or config.get("input_size", (3, 224, 224))[-1]
    if not policy.augment:
        train = "none (augment off): resize and centre crop as for evaluation"
    else:
        p = train_policy(policy)
        train = (f"random resized crop to {side}px, area {p['scale'][0]:g}-1, ratio {p['ratio'][0]:.3g}-"
                 f"{p['ratio'][1]:.3g}; hflip {policy.hflip:g}, vflip {policy.vflip:g}")
        if p["auto_augment"] and "3a" not in p["auto_augment"]:
            train += f"; {p['auto_augment']} (timm turns colour jitter off with it)"
        else:
            train += f"; colour jitter {policy.color_jitter:g}"
            train += f"; {p['auto_augment']}" if p["auto_augment"] else ""
        if policy.random_erasing:
            train += f"; random erasing {policy.random_erasing:g}"
    crop_pct = config.get("crop_pct", 0.875)
    return {"training": train,
            "evaluation": f"resize to {math.floor(side / crop_pct)}px ({config.get('interpolation', 'bilinear')}), "
                          f"centre crop {side}px (crop_pct {crop_pct:g})",
            "normalisation": f"mean {_triple(config.get('mean'))} std {_triple(config.get('std'))}"
                             + (f" ({policy.normalize})" if policy.normalize != "model" else " (the model's)")}


def _triple(values) -> str:
    return ",".join(f"{v:.4g}" for v in values or ())


def input_cache_unsupported(policy, reads: tuple[str, ...] | None = None) -> list[str]:
    """The training-policy settings, away from their defaults, that the decoded-input cache's batched device
    augmentation (engine/batches/inputcache.py) does not honour: those it does not take as parameters (`reads`, default
    DEVICE_AUGMENT_READS), and a resize filter other than bilinear (its crops are resampled by roi_align). Evaluation
    settings are honoured through `policy_data_config`. A trainer falls back to the DataLoader, saying so, when this
    is not empty."""
    from ..config import TrainConfig

    reads = DEVICE_AUGMENT_READS if reads is None else reads
    default = TrainConfig()
    out = []
    for name in _TRAIN_POLICY:
        value = getattr(policy, name)
        if name in reads or (name == "interpolation" and value in ("model", "bilinear")):
            continue
        if value != getattr(default, name):
            out.append(name)
    return out


def small_image_hint(splits: Splits, size: int, policy) -> str:
    """A line suggesting a milder policy when the images (or the training size) are at most 64 px and the policy
    still has timm's ImageNet strength; "" otherwise."""
    native = image_side(splits.train)
    side = min(s for s in (native, size or None) if s) if (native or size) else None
    if side is None or side > _SMALL_IMAGES or not policy.augment:
        return ""
    fixes = [f"`set {name} {value:g}`" for name, value, harsher in (
        ("crop_scale", 0.5, policy.crop_scale < 0.5), ("color_jitter", 0, policy.color_jitter > 0.1),
        ("crop_pct", 1.0, policy.crop_pct != 1.0)) if harsher]
    if not fixes:
        return ""
    return (f"the images are small ({side} px): timm's ImageNet policy (crops down to {policy.crop_scale:g} of the "
            f"area, colour jitter {policy.color_jitter:g}, a border cut at evaluation) leaves little to learn from — "
            f"a milder one usually does better here: {', '.join(fixes)}")

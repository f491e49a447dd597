"""The run's settings: one typed dataclass. `set` changes it, `show` prints it, session files and checkpoints store it.

Importing this module does not import torch, so the shell can list and validate settings before torch is loaded.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import PgError


def _setting(default, help: str, choices=None, minimum=None, maximum=None, live: bool = False, listed=None):
    """A dataclass field that also carries its help text, its allowed values and whether it may change mid-run.

    live=True: a change while training applies at the next batch. live=False: it applies when training next starts.
    listed: a function giving every allowed value where knowing them imports torch (timm's optimizers); `choices` are
    then the common ones, accepted without calling it, and Tab completion lists all.
    """
    meta = {"help": help, "choices": choices, "min": minimum, "max": maximum, "live": live, "listed": listed}
    return field(default=default, metadata=meta)


def optimizer_names() -> tuple[str, ...]:
    """Every optimizer `set optimizer` takes: timm's (engine/train/timm_optimizers.py; imported on first use, as it imports torch)."""
    from .train.timm_optimizers import optimizer_names as names

    return names()


@dataclass
class TrainConfig:
    # --- optimizer (the seed: SGD lr 0.001 momentum 0.9) ---
    optimizer: str = _setting("sgd", "sgd | adam | adamw | any of timm's optimizers: lamb, lion, adan, ... (Tab lists "
                                     "them)", choices=("sgd", "adam", "adamw"), listed=optimizer_names)
    lr: float = _setting(0.001, "learning rate of the head (and the backbone, times backbone_lr_scale)", minimum=0.0, live=True)
    momentum: float = _setting(0.9, "SGD momentum (optimizers with betas, Adam/AdamW...: beta1)", minimum=0.0, maximum=1.0, live=True)
    nesterov: bool = _setting(False, "sgd with Nesterov momentum (timm's `nesterov` optimizer always is)")
    weight_decay: float = _setting(0.0, "weight decay (decoupled for adamw)", minimum=0.0, live=True)
    backbone_lr_scale: float = _setting(1.0, "backbone lr = lr x this: discriminative fine-tuning (e.g. 0.1)", minimum=0.0, live=True)
    # --- scheduler (the seed: StepLR step_size 7, gamma 0.1) ---
    scheduler: str = _setting("step", "step | cosine | onecycle | none", choices=("step", "cosine", "onecycle", "none"))
    step_size: int = _setting(7, "StepLR: decay the lr every step_size epochs", minimum=1)
    gamma: float = _setting(0.1, "StepLR: multiply the lr by gamma", minimum=0.0)
    warmup_epochs: float = _setting(0.0, "cosine: linear warm-up length in epochs", minimum=0.0)
    epochs: int = _setting(25, "planned run length: cosine/onecycle span it, `train` with no N trains up to it", minimum=1)
    schedule_start: int = _setting(0, "the epoch the lr schedule counts from: a new phase restarts it there "
                                      "(`train --restart` sets it to now)", minimum=0)
    # --- loss ---
    criterion: str = _setting("cross_entropy", "cross_entropy | l1 | mse (l1/mse on one-hot targets)",
                              choices=("cross_entropy", "l1", "mse"))
    label_smoothing: float = _setting(0.0, "label smoothing (cross_entropy; l1/mse smooth their one-hot targets)",
                                      minimum=0.0, maximum=0.99, live=True)
    # --- data ---
    batch_size: int = _setting(32, "images per batch", minimum=1, maximum=2**31 - 1)  # the data loader's limit
    workers: int = _setting(0, "data loader worker processes (0: load in the training thread)", minimum=0, maximum=256)
    augment: bool = _setting(True, "random crop/flip/colour jitter on the training split")
    seed: int = _setting(0, "seed of data order, augmentation and initialisation: same seed, same run", minimum=0,
                         maximum=2**63 - 1)  # sample seeds pack it as a signed 64-bit number
    # --- augmentation policy: timm's create_transform; the defaults are timm's ImageNet policy, `model` defers to
    #     the model's own data config (pretrained_cfg) ---
    crop_scale: float = _setting(0.08, "training crop: smallest area kept, as a fraction of the image (timm 0.08; "
                                       "small images: 0.5)", minimum=0.01, maximum=1.0)
    crop_ratio: float = _setting(4 / 3, "training crop: aspect ratios from 1/r to r (timm 4/3; 1: square crops)",
                                 minimum=1.0, maximum=10.0)
    hflip: float = _setting(0.5, "training: probability of a horizontal flip", minimum=0.0, maximum=1.0)
    vflip: float = _setting(0.0, "training: probability of a vertical flip", minimum=0.0, maximum=1.0)
    color_jitter: float = _setting(0.4, "training: brightness/contrast/saturation jitter strength (0: off)",
                                   minimum=0.0, maximum=2.0)
    auto_augment: str = _setting("none", "training: none | timm's RandAugment (rand-m9-mstd0.5; TrivialAugment-like: "
                                         "rand-n1-mstd101) | AutoAugment (original, v0) | augmix-m5-w4-d2")
    random_erasing: float = _setting(0.0, "training: probability of erasing a random rectangle (timm's RandomErasing, "
                                          "pixel mode)", minimum=0.0, maximum=1.0)
    crop_pct: float = _setting(0.0, "evaluation: centre crop after resizing, as a fraction (1.0: no border cut; 0: the "
                                    "model's own)", minimum=0.0, maximum=1.0)
    interpolation: str = _setting("model", "resize filter: model (its own) | bilinear | bicubic | nearest | lanczos",
                                  choices=("model", "bilinear", "bicubic", "nearest", "lanczos"))
    normalize: str = _setting("model", "normalisation: model (its mean/std) | imagenet | none | MEAN/STD, e.g. "
                                       "0.5,0.5,0.5/0.25,0.25,0.25")
    # --- recipes: handlers attached to the loop (engine/train/recipes.py) ---
    ema: float = _setting(0.0, "weight EMA decay, e.g. 0.9998 (0: off): validation uses the averaged weights",
                          minimum=0.0, maximum=0.999999)
    ema_warmup: bool = _setting(True, "EMA decay warm-up (timm's 1 - (1 + updates)^(-2/3), capped at `ema`)")
    mixup: float = _setting(0.0, "mixup alpha, e.g. 0.8 (0: off)", minimum=0.0, maximum=10.0)
    cutmix: float = _setting(0.0, "cutmix alpha, e.g. 1.0 (0: off)", minimum=0.0, maximum=10.0)
    mix_prob: float = _setting(1.0, "probability that a batch is mixed (mixup/cutmix)", minimum=0.0, maximum=1.0)
    layer_decay: float = _setting(1.0, "layer-wise lr decay, e.g. 0.75: each block towards the input gets this "
                                       "factor more (1: off)", minimum=0.0, maximum=1.0)
    accumulate: int = _setting(1, "gradient accumulation: an optimizer step every K batches (effective batch K x "
                                  "batch_size)", minimum=1, maximum=1024)
    clip_grad: float = _setting(0.0, "clip gradients to this norm (or value, see clip_mode) before each step (0: off)",
                                minimum=0.0)
    clip_mode: str = _setting("norm", "norm | value: what clip_grad limits", choices=("norm", "value"))
    patience: int = _setting(0, "early stopping: stop after N epochs without an improvement of best_metric (0: off)",
                             minimum=0)
    min_delta: float = _setting(0.0, "early stopping: the smallest change of best_metric that counts as better",
                                minimum=0.0)
    class_weights: str = _setting("none", "none | balanced: weigh the training loss by inverse class frequency",
                                  choices=("none", "balanced"))
    sampler: str = _setting("shuffle", "shuffle | balanced: draw training images so each class comes equally often",
                            choices=("shuffle", "balanced"))
    tta: str = _setting("none", "test-time augmentation at validation: none | flip (mean of plain and flipped logits)",
                        choices=("none", "flip"))
    # --- device and precision (decided in one place: engine/train/device.py) ---
    device: str = _setting("auto", "auto | cpu | cuda | cuda:N")
    amp: str = _setting("auto", "auto (bf16 on a GPU, off on CPU) | bf16 | fp16 | off", choices=("auto", "bf16", "fp16", "off"))
    channels_last: str = _setting("auto", "auto (convnets on a GPU) | on | off", choices=("auto", "on", "off"))
    compile: bool = _setting(False, "torch.compile the model (GPU; slow first batches)")
    devices: str = _setting("all", "GPUs for DataParallel: all | 0,1,...")
    input_cache: str = _setting("auto", "decode images once into a uint8 cache, augment on the device: auto (a GPU: the "
                                        "cache if it fits, else decode on the GPU) | on (CPU too) | decode (decode on "
                                        "the device every epoch) | off", choices=("auto", "on", "decode", "off"))
    bn_stats: str = _setting("auto", "BatchNorm while training: auto (frozen on loaded weights — pretrained or "
                                     "--weights —, update on random ones) | update (batch statistics; the running "
                                     "averages learn the new data: PyTorch's default) | frozen (the loaded running "
                                     "statistics, as Keras' fine-tuning guide advises; scale and shift still train)",
                             choices=("auto", "update", "frozen"))
    feature_cache: bool = _setting(True, "frozen backbone: compute its features once and train the head on them")
    feature_views: int = _setting(1, "feature cache: 1 = one unaugmented view; K > 1 = K augmented views (epoch e uses "
                                     "view e mod K)", minimum=1, maximum=64)
    # --- checkpoints and logs ---
    keep_last: int = _setting(0, "keep the last K epoch checkpoints and the best (0: keep all)", minimum=0)
    best_metric: str = _setting("val_accuracy", "val_accuracy | val_loss: which checkpoint is 'best'",
                                choices=("val_accuracy", "val_loss"))
    log_every: int = _setting(0, "scripts: a progress line every N batches (0: one per epoch)", minimum=0, live=True)
    tensorboard: bool = _setting(False, "write TensorBoard event files into the session folder")

    # ------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainConfig":
        """Build from a stored dict; unknown keys are refused, missing ones take the default."""
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PgError(f"unknown settings {', '.join(unknown)}: the file was written by another version or edited")
        cfg = cls()
        for k, v in d.items():
            setattr(cfg, k, parse_value(k, v))
        return cfg

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **{k: parse_value(k, v) for k, v in changes.items()})


SETTINGS = {f.name: f for f in fields(TrainConfig)}
_FLOAT32_MAX = 3.4028234663852886e38  # a larger lr or scale would only fail inside torch, as an overflow


def setting_names() -> list[str]:
    return list(SETTINGS)


def is_live(name: str) -> bool:
    return bool(SETTINGS[name].metadata["live"])


def parse_value(name: str, value: Any) -> Any:
    """Convert `value` (a string from the shell or a JSON value from a file) to the setting's type and check it."""
    f = SETTINGS.get(name)
    if f is None:
        raise PgError(f"unknown setting {name!r}: type `set` to list them")
    meta, kind = f.metadata, type(f.default)
    try:
        if kind is bool:
            if isinstance(value, bool):
                out = value
            elif str(value).strip().lower() in ("1", "true", "on", "yes"):
                out = True
            elif str(value).strip().lower() in ("0", "false", "off", "no"):
                out = False
            else:
                raise ValueError
        elif kind is int:
            if isinstance(value, bool):
                raise ValueError
            try:
                out = int(str(value).strip())  # exact: through float, 2**53 + 1 would become 2**53
            except ValueError:
                fv = float(value)  # "1e3", "2.0"
                if not fv.is_integer():
                    raise ValueError from None
                out = int(fv)
        elif kind is float:
            if isinstance(value, bool):
                raise ValueError
            out = float(value)
            if out != out or out in (float("inf"), float("-inf")):
                raise ValueError
        else:
            out = str(value).strip()
    except (TypeError, ValueError):
        raise PgError(f"{name} takes {kind.__name__} values, not {value!r}") from None
    if kind is float and abs(out) > _FLOAT32_MAX:
        raise PgError(f"{name} must be at most {_FLOAT32_MAX:.3g} (training computes in float32), not {out:g}")
    if meta["choices"] and out not in meta["choices"]:
        allowed = meta["listed"]() if meta["listed"] else meta["choices"]
        if out not in allowed:
            raise PgError(f"{name} must be one of {', '.join(allowed)}, not {out!r}")
    if meta["min"] is not None and out < meta["min"]:
        raise PgError(f"{name} must be at least {meta['min']}, not {out}")
    if meta["max"] is not None and out > meta["max"]:
        raise PgError(f"{name} must be at most {meta['max']}, not {out}")
    if name == "device":
        _check_device(out)
    if name == "auto_augment":
        out = _check_auto_augment(out)
    if name == "normalize":
        out = _check_normalize(out)
    if name == "devices" and out != "all":
        parts = out.split(",")
        if not all(p.strip().isdigit() for p in parts):
            raise PgError(f"devices must be 'all' or GPU numbers like 0,1 — not {out!r}")
    return out


def _check_device(value: str) -> None:
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return
    raise PgError(f"device must be auto, cpu, cuda or cuda:N — not {value!r}")


_AA_POLICIES = ("rand", "augmix", "original", "originalr", "v0", "v0r", "3a")  # timm's first config sections


def _check_auto_augment(value: str) -> str:
    """timm's auto-augment strings by their first section; timm itself checks the rest when the transform is built."""
    if value.lower() in ("none", ""):
        return "none"
    if value.split("-")[0] not in _AA_POLICIES:
        raise PgError(f"auto_augment must be none or a timm policy string (rand-m9-mstd0.5, original, v0, "
                      f"augmix-m5-w4-d2), not {value!r}")
    return value


def _check_normalize(value: str) -> str:
    if value.lower() in ("model", "imagenet", "none"):
        return value.lower()
    parts = value.split("/")
    try:
        numbers = [[float(v) for v in part.split(",")] for part in parts]
    except ValueError:
        numbers = []
    if len(numbers) != 2 or any(len(n) not in (1, 3) for n in numbers) or not all(v > 0 for v in numbers[1]) \
            or not all(math.isfinite(v) for n in numbers for v in n):
        raise PgError(f"normalize must be model, imagenet, none or MEAN/STD with 1 or 3 numbers each (std > 0), e.g. "
                      f"0.5,0.5,0.5/0.25,0.25,0.25 — not {value!r}")
    return value

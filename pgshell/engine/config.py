"""The run's settings: one typed dataclass. `set` changes it, `show` prints it, session files and checkpoints store it.

Importing this module does not import torch, so the shell can list and validate settings before torch is loaded.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from typing import Any

from .errors import PgError


def _setting(default, help: str, choices=None, minimum=None, maximum=None, live: bool = False):
    """A dataclass field that also carries its help text, its allowed values and whether it may change mid-run.

    live=True: a change while training applies at the next batch. live=False: it applies when training next starts.
    """
    meta = {"help": help, "choices": choices, "min": minimum, "max": maximum, "live": live}
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # --- optimizer (the seed: SGD lr 0.001 momentum 0.9) ---
    optimizer: str = _setting("sgd", "sgd | adam | adamw", choices=("sgd", "adam", "adamw"))
    lr: float = _setting(0.001, "learning rate of the head (and the backbone, times backbone_lr_scale)", minimum=0.0, live=True)
    momentum: float = _setting(0.9, "SGD momentum (Adam/AdamW: beta1)", minimum=0.0, maximum=1.0, live=True)
    nesterov: bool = _setting(False, "SGD with Nesterov momentum")
    weight_decay: float = _setting(0.0, "weight decay (decoupled for adamw)", minimum=0.0, live=True)
    backbone_lr_scale: float = _setting(1.0, "backbone lr = lr x this: discriminative fine-tuning (e.g. 0.1)", minimum=0.0, live=True)
    # --- scheduler (the seed: StepLR step_size 7, gamma 0.1) ---
    scheduler: str = _setting("step", "step | cosine | onecycle | none", choices=("step", "cosine", "onecycle", "none"))
    step_size: int = _setting(7, "StepLR: decay the lr every step_size epochs", minimum=1)
    gamma: float = _setting(0.1, "StepLR: multiply the lr by gamma", minimum=0.0)
    warmup_epochs: float = _setting(0.0, "cosine: linear warm-up length in epochs", minimum=0.0)
    epochs: int = _setting(25, "planned run length: cosine/onecycle span it, `train` with no N trains up to it", minimum=1)
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
    # --- device and precision (decided in one place: engine/device.py) ---
    device: str = _setting("auto", "auto | cpu | cuda | cuda:N")
    amp: str = _setting("auto", "auto (bf16 on a GPU, off on CPU) | bf16 | fp16 | off", choices=("auto", "bf16", "fp16", "off"))
    channels_last: str = _setting("auto", "auto (convnets on a GPU) | on | off", choices=("auto", "on", "off"))
    compile: bool = _setting(False, "torch.compile the model (GPU; slow first batches)")
    devices: str = _setting("all", "GPUs for DataParallel: all | 0,1,...")
    input_cache: str = _setting("auto", "decode images once into a uint8 cache, augment on the device: auto (a GPU: the "
                                        "cache if it fits, else decode on the GPU) | on (CPU too) | decode (decode on "
                                        "the device every epoch) | off", choices=("auto", "on", "decode", "off"))
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
        raise PgError(f"{name} must be one of {', '.join(meta['choices'])}, not {out!r}")
    if meta["min"] is not None and out < meta["min"]:
        raise PgError(f"{name} must be at least {meta['min']}, not {out}")
    if meta["max"] is not None and out > meta["max"]:
        raise PgError(f"{name} must be at most {meta['max']}, not {out}")
    if name == "device":
        _check_device(out)
    if name == "devices" and out != "all":
        parts = out.split(",")
        if not all(p.strip().isdigit() for p in parts):
            raise PgError(f"devices must be 'all' or GPU numbers like 0,1 — not {out!r}")
    return out


def _check_device(value: str) -> None:
    if value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit()):
        return
    raise PgError(f"device must be auto, cpu, cuda or cuda:N — not {value!r}")

"""Hostile sizes, refused before a byte is inflated or allocated.

- A weights file declares its tensors' sizes before they are read: a zip archive (torch.save's format) in its
  central directory, safetensors in its JSON header. A 2.4 MB zip of deflated zeros inflates to 1 GB; a file declaring
  far more than the model it is loaded into holds is refused by that declaration (`check_weights_file`).
- A model folder's config.json chooses the architecture's arguments (`model_args`): huge widths would make timm
  allocate tens of GB. The model is built on the meta device first (shapes only, no memory), and one whose weights
  alone exceed the machine's memory is refused (`check_model_folder`).
"""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import torch

from ..errors import PgError

# a training checkpoint holds the weights, an EMA copy and Adam's two moments: about 4x the model; beyond 6x (and a
# little for small models' buffers and counters), the file is not this model's weights
_TIMES, _SLACK = 6, 16 * 2**20
_HEADER_LIMIT = 100 * 2**20  # safetensors' own limit on its JSON header
_FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
                        "open_clip_model.safetensors", "open_clip_pytorch_model.bin")  # as weights.py reads


def size_text(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def model_bytes(module: torch.nn.Module) -> int:
    """The bytes of a module's parameters and buffers (meta tensors too: their shapes and dtypes)."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def machine_memory() -> int:
    """The machine's physical memory in bytes (0 when the OS does not say)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


def declared_bytes(file: Path) -> int | None:
    """The tensor bytes a zip archive or a safetensors header declares, read from their directories alone; None for
    other files (a legacy torch.save pickle declares nothing up front)."""
    try:
        with open(file, "rb") as f:
            head = f.read(8)
            if head.startswith(b"PK\x03\x04"):
                with zipfile.ZipFile(f) as z:
                    return sum(i.file_size for i in z.infolist())
            length = int.from_bytes(head, "little") if len(head) == 8 else 0
            if not 0 < length <= min(_HEADER_LIMIT, file.stat().st_size - 8):
                return None
            header = json.loads(f.read(length))
    except (OSError, zipfile.BadZipFile, ValueError, UnicodeDecodeError):
        return None  # the readers say what is wrong with it, in their own words
    if not isinstance(header, dict):
        return None
    total = 0
    for name, entry in header.items():
        offsets = entry.get("data_offsets") if isinstance(entry, dict) and name != "__metadata__" else None
        if isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) for o in offsets):
            total += max(0, offsets[1] - offsets[0])
    return total


def check_weights_file(path: str | os.PathLike, module: torch.nn.Module) -> None:
    """Refuse a weights file (or a model folder's) whose declared tensors far exceed `module`'s, before reading it."""
    file = Path(path).expanduser()
    if file.is_dir():
        file = next((file / n for n in _FOLDER_WEIGHT_FILES if (file / n).is_file()), file)
    if not file.is_file():
        return  # read_weights says what is missing
    declared, own = declared_bytes(file), model_bytes(module)
    if declared is not None and declared > _TIMES * own + _SLACK:
        raise PgError(f"{file} declares {size_text(declared)} of tensors, and the model holds {size_text(own)}: not "
                      "this model's weights (nothing was read) — a file much bigger than its weights when unpacked "
                      "is refused; load the weights file saved from this model")


def check_model_folder(folder: str | os.PathLike, num_classes: int) -> None:
    """Build a model folder's model on the meta device (no memory) and refuse it when its weights alone exceed the
    machine's memory, or when its weights file declares far more than it holds; before timm allocates anything."""
    import timm

    folder = Path(folder).expanduser()
    try:
        with torch.device("meta"):
            module = timm.create_model(f"local-dir:{folder}", pretrained=False, num_classes=num_classes)
    except Exception:  # noqa: BLE001 - a model that cannot be built on meta: the real build says what is wrong
        return
    need, have = model_bytes(module), machine_memory()
    if have and need > have:
        try:
            args = json.loads((folder / "config.json").read_text()).get("model_args") or {}
        except (OSError, ValueError, AttributeError):
            args = {}
        shown = json.dumps(args)[:120] if isinstance(args, dict) else ""
        raise PgError(f"{folder}/config.json asks for a model of {size_text(need)} of weights"
                      + (f" (model_args {shown})" if shown and shown != "{}" else "")
                      + f", beyond this machine's {size_text(have)} of memory: nothing was built — fix its "
                      "model_args, or load it on a machine that can hold it")
    check_weights_file(folder, module)

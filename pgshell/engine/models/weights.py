"""Weight files read by content, never by name: safetensors, or torch.save read with `weights_only=True` (never
arbitrary pickles); checkpoint containers and EMA copies unwrapped, key prefixes of wrapping modules found, weights in
another key layout lined up by order when every shape agrees. `load_weights_file` for `load --weights`,
`restore_weights` for a checkpoint's.
"""

from __future__ import annotations

import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import nn

from ..errors import PgError
from . import _weightguard
from .catalogue import FOLDER_WEIGHT_FILES
from .spec import BuiltModel


# where training code keeps the weights inside a checkpoint; EMA weights first, as timm's own loader prefers them
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# what wrapping modules put before every key: DataParallel/DDP, Lightning's attribute, a backbone inside a bigger net
_KEY_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


# ----------------------------------------------------------------------------------------------------------------
# Local weight files


def load_weights_file(built: BuiltModel, path: str | os.PathLike) -> str:
    """Load a local weights file (or a timm/Hugging Face model folder) into `built`; return a one-line report.

    The format is read from the content, never the name (see `read_weights`). A common prefix (`module.`, `model.`,
    ...) is removed when that makes the keys name the model's tensors; with a prefix, tensors outside it belong to
    other parts of the training code (a Lightning module's loss, metrics) and are left out. The head is loaded when
    its shapes match and skipped on a class-count mismatch (fine-tuning a checkpoint on new classes). Any other
    tensor that does not fit means the file belongs to another model: PgError, nothing loaded.
    """
    file = Path(path).expanduser()
    _weightguard.check_weights_file(file, built.module)  # sizes declared far beyond the model: refused unread
    state, where = read_weights(file)
    own = built.module.state_dict()
    prefix = _best_prefix(list(state), own)
    ours = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    head = set(built.head)
    to_load = {k: v for k, v in ours.items() if k in own and own[k].shape == v.shape}
    skipped_head = [k for k in ours if k in head and k not in to_load]
    unfit = [k for k in ours if k not in to_load and k not in head]
    if unfit or not to_load:
        by_order = _line_up_by_order(state, own, head)
        if by_order is None:
            raise _mismatch(file, built, ours, to_load, unfit, prefix)
        return _load_by_order(built, file, where, state, by_order)
    built.module.load_state_dict(to_load, strict=False)
    notes = [f"loaded {len(to_load)} tensors from {file.name}"]
    notes += [f"the weights under {where!r}"] if where else []
    notes += [f"prefix {prefix!r} removed"] if prefix else []
    if len(ours) < len(state):
        notes.append(f"{len(state) - len(ours)} other tensors of the checkpoint left out")
    if skipped_head:
        notes.append(f"head skipped ({', '.join(skipped_head)}: another class count, trained from scratch)")
    missing = [k for k in own if k not in ours and k not in head]
    if missing:
        notes.append(f"{len(missing)} model tensors not in the file keep their initial values")
    return "; ".join(notes)


@dataclass
class _LineUp:
    """How a file written by another implementation of the same architecture maps onto the model, by order."""

    pairs: list[tuple[str, str]]  # (file key, model key) of every tensor loaded
    head: list[str]  # the model's head tensors left out: another class count (or none in the file)
    file_classes: int  # outputs of the file's classifier; 0 when the file has none


# What a state dict counts rather than learns: BatchNorm's step counter. Implementations differ on keeping it (timm
# and torchvision do, some ports drop it), so a line-up by order skips it on both sides; the model keeps its own.
_COUNTERS = ("num_batches_tracked",)


def _line_up_by_order(state: dict[str, torch.Tensor], own: dict[str, torch.Tensor], head: set[str]) -> _LineUp | None:
    """The file's tensors paired with the model's in order, when names differ but the architecture is the same
    (lukemelas' `_conv_stem.weight` ... `_fc.weight` for timm's `conv_stem.weight` ... `classifier.weight`).

    Only a perfect line-up counts: the same number of tensors with identical shapes, one to one. The head may differ
    in shape only (a file for 1000 classes, a model for 2; both at the end of the model's order) or be missing from
    the file; the backbone then still lines up in full and the head keeps its fresh initialisation. Anything else is
    None: a near line-up (one tensor more, one shape changed) is another architecture and is refused.
    """
    theirs = [(k, v) for k, v in state.items() if k.rpartition(".")[2] not in _COUNTERS]
    mine = [(k, v) for k, v in own.items() if k.rpartition(".")[2] not in _COUNTERS]
    head_at = [i for i, (k, _) in enumerate(mine) if k in head]
    trailing_head = bool(head_at) and head_at == list(range(len(mine) - len(head_at), len(mine)))
    if len(theirs) == len(mine):
        differ = [i for i, ((_, a), (_, b)) in enumerate(zip(theirs, mine)) if a.shape != b.shape]
        if not differ:
            return _LineUp([(a, b) for (a, _), (b, _) in zip(theirs, mine)], [], 0)
        if not trailing_head or set(differ) - set(head_at) or not _only_outputs_differ(theirs, mine, head_at):
            return None
        body = len(mine) - len(head_at)
        return _LineUp([(a, b) for (a, _), (b, _) in zip(theirs[:body], mine[:body])],
                       [k for k, _ in mine[body:]], int(theirs[head_at[0]][1].shape[0]))
    if trailing_head and len(theirs) == len(mine) - len(head_at) and theirs and all(
            a.shape == b.shape for (_, a), (_, b) in zip(theirs, mine)):
        return _LineUp([(a, b) for (a, _), (b, _) in zip(theirs, mine)], [k for k, _ in mine[len(theirs):]], 0)
    return None


def _only_outputs_differ(theirs: list, mine: list, head_at: list[int]) -> bool:
    """The file's head and the model's differ only in their number of outputs (the first dimension), as a classifier
    for another class count does."""
    return all(theirs[i][1].shape[1:] == mine[i][1].shape[1:] for i in head_at)


def _load_by_order(built: BuiltModel, file: Path, where: str, state: dict, line_up: _LineUp) -> str:
    """Load a line-up found by `_line_up_by_order` and say so in one line, with the first renamed pair as the
    example a user can check."""
    built.module.load_state_dict({mine: state[theirs] for theirs, mine in line_up.pairs}, strict=False)
    first = next(((a, b) for a, b in line_up.pairs if a != b), line_up.pairs[0])
    notes = [f"matched {len(line_up.pairs)} tensors of {file.name} by order and shape: names differ (file "
             f"`{first[0]}` → model `{first[1]}`)"]
    notes += [f"the weights under {where!r}"] if where else []
    if line_up.head and line_up.file_classes:
        notes.append(f"head skipped ({', '.join(line_up.head)}: {line_up.file_classes} classes in the file, "
                     f"{built.module.state_dict()[line_up.head[0]].shape[0]} here; trained from scratch)")
    elif line_up.head:
        notes.append(f"the file has no head: {', '.join(line_up.head)} trained from scratch")
    return "; ".join(notes)


def _mismatch(file: Path, built: BuiltModel, ours: dict, fitting: dict, unfit: list[str], prefix: str) -> PgError:
    """Say how much matched, with two examples of each side, so the user can tell a prefix problem from a wrong
    model."""
    own = built.module.state_dict()
    only_model = [k for k in own if k not in fitting and k not in built.head][:2]
    shapes = [f"{k} {tuple(ours[k].shape)} vs {tuple(own[k].shape)}" for k in unfit if k in own][:2]
    only_file = [k for k in unfit if k not in own][:2]
    sides = [f"only in the file: {', '.join(only_file)}" if only_file else "",
             f"only in the model: {', '.join(only_model)}" if only_model else "",
             f"other shapes: {'; '.join(shapes)}" if shapes else ""]
    removed = f" after removing the prefix {prefix!r}" if prefix else ""
    return PgError(f"{len(ours) - len(fitting)} of {len(ours)} tensors in {file} don't match {built.full_name} "
                   f"({len(fitting)} match{removed}; {'; '.join(s for s in sides if s)}): is this file for another "
                   "model? Load the model it was saved from")


def _best_prefix(keys: list[str], own: dict[str, torch.Tensor]) -> str:
    """The prefix ('' for none) whose removal makes the most keys name a tensor of the model: `module.` (DataParallel),
    `model.` (Lightning), `backbone.`/`encoder.` (a feature extractor inside a bigger model), nested ones too."""
    candidates: set[str] = set()
    for key in keys:
        prefix = ""
        while True:
            word = next((p for p in _KEY_PREFIXES if key.startswith(prefix + p)), None)
            if word is None:
                break
            prefix += word
            candidates.add(prefix)

    def hits(prefix: str) -> int:
        return sum(1 for k in keys if k.startswith(prefix) and k[len(prefix):] in own)

    best, best_hits = "", hits("")
    for prefix in sorted(candidates, key=len):  # the shortest of equally good prefixes
        if hits(prefix) > best_hits:
            best, best_hits = prefix, hits(prefix)
    return best


def read_weights(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], str]:
    """({name: tensor}, the container it came from, '' for a plain state dict) from a weights file or model folder.

    Recognised by content, whatever the extension (.th, .pth.tar, .ckpt, .bin, ...): safetensors (its JSON header),
    a torch.save file (zip or legacy), always with weights_only=True so no pickled code ever runs; a folder in the
    timm / Hugging Face layout (config.json beside model.safetensors or pytorch_model.bin). Training checkpoints keep
    the weights in containers (`state_dict`, `model`, `module`; EMA weights under `ema`, `model_ema`,
    `state_dict_ema`): they are stepped into, EMA first, as timm's own loader does.
    """
    file = Path(path).expanduser()
    if file.is_dir():
        file = _weights_in_folder(file)
    if not file.is_file():
        raise PgError(f"weights file {file} does not exist: check the path")
    kind = _sniff(file)
    if kind == "safetensors":
        try:
            obj: Any = safetensors.torch.load_file(str(file), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise PgError(f"{file} is not a readable safetensors file ({exc}): re-save it with "
                          "safetensors.torch.save_file(model.state_dict(), FILE)") from exc
    elif kind == "torch":
        obj = _torch_load(file)
    else:
        raise PgError(f"{file} is not a weights file (unknown weights format: neither safetensors nor a torch.save "
                      "file): save the weights with torch.save(model.state_dict(), FILE) or safetensors")
    obj, where = _unwrap_checkpoint(obj)
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(obj, dict) else {}
    if not state:
        raise PgError(f"{file} holds no tensors: save it with torch.save(model.state_dict(), FILE)")
    return state, where


def _sniff(file: Path) -> str:
    """'safetensors' | 'torch' | '' from the first bytes: a name says nothing (.th, .ckpt, .pth.tar are all
    torch.save files)."""
    with open(file, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):  # torch.save's zip format (torch >= 1.6)
        return "torch"
    if head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") <= file.stat().st_size - 8:
        return "safetensors"  # an 8-byte little-endian header length, then the JSON header
    if head[:2] == b"\x80\x02":  # a protocol-2 pickle: torch.save's legacy format (the magic number comes first)
        return "torch"
    return ""


def _torch_load(file: Path) -> Any:
    try:
        with open(file, "rb") as f:  # a file object: torch.load must not pick a reader by the name either
            return torch.load(f, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        found = next((line.strip() for line in str(exc).splitlines() if "GLOBAL" in line), "")
        raise PgError(f"{file} is not a plain state dict (it holds pickled objects{': ' + found if found else ''}, "
                      "which are not loaded for safety): re-save it with torch.save(model.state_dict(), FILE)"
                      ) from None
    except (RuntimeError, EOFError, OSError, ValueError, SafetensorError) as exc:
        raise PgError(f"{file} is not a readable PyTorch file ({str(exc).splitlines()[0] if str(exc) else exc}): "
                      "re-save it with torch.save(model.state_dict(), FILE)") from None


def _weights_in_folder(folder: Path) -> Path:
    for name in FOLDER_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise PgError(f"{folder} holds none of {', '.join(FOLDER_WEIGHT_FILES[:2])}: give the weights file itself, "
                  "or a model folder in the timm / Hugging Face layout")


def _unwrap_checkpoint(obj: Any) -> tuple[Any, str]:
    """Step into the containers training checkpoints keep the weights in; EMA weights first. Returns the state dict
    and where it was ('ema/module'; '' when the file is a plain state dict)."""
    path: list[str] = []
    for _ in range(4):
        if not isinstance(obj, dict):
            break
        # a container key holding a dict of tensors, even beside stray tensors ({"epoch": tensor(3), ...}); a state
        # dict's own keys are dotted parameter names, never a bare "model" holding a dict
        key = next((k for k in (*_EMA_KEYS, *_CONTAINER_KEYS) if _holds_tensors(obj.get(k))), None)
        if key is None:
            break
        path.append(key)
        obj = obj[key]
    return obj, "/".join(path)


def _holds_tensors(obj: Any, depth: int = 4) -> bool:
    """A dict with tensors in it, at most `depth` containers down (an EMA's settings hold none)."""
    return isinstance(obj, dict) and depth > 0 and any(
        isinstance(v, torch.Tensor) or _holds_tensors(v, depth - 1) for v in obj.values())


def restore_weights(module: nn.Module, weights: dict, frozen: list[str], what: str = "the checkpoint") -> None:
    """Load a saved state dict exactly (every tensor, nothing extra) and restore which parameters were frozen: the
    one place that does both, for reopening, resuming, evaluating a checkpoint and starting a tuning trial."""
    try:
        missing, unexpected = module.load_state_dict(weights, strict=False)
    except RuntimeError as e:  # torch's first line is only "Error(s) in loading state_dict for ResNet:"
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][1:2] or [str(e)]
        raise PgError(f"{what}'s weights do not fit this model: {detail[0]}") from None
    if missing or unexpected:
        raise PgError(f"{what}'s weights do not fit this model ({len(missing)} missing, {len(unexpected)} "
                      "unexpected tensors): was it saved from another model?")
    frozen_set = set(frozen)
    for n, p in module.named_parameters():
        p.requires_grad = n not in frozen_set

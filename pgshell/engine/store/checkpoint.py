"""One checkpoint format: a single safetensors file, written atomically, with a checksum read back on load.

A checkpoint is a nested plain structure (dicts, lists, numbers, strings, tensors). Its tensors are stored as
safetensors tensors under their path ("model/fc.weight", "optimizer/state/fc.weight/momentum_buffer"); everything
else is JSON in the safetensors header's metadata, with each tensor replaced by a reference. Nothing is ever
unpickled, so a checkpoint from a stranger cannot execute code. The file is written to a temporary name, fsynced and
renamed: a kill leaves either the old file or the new one, never half of one; the checksum catches the rest
(a disk that lied, a hand edit).
"""

from __future__ import annotations

import errno
import glob
import hashlib
import json
import os
import re
import signal
import stat
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ..errors import PgError

FORMAT = "pgshell-checkpoint"
VERSION = 1
_REF = "__tensor__"
_TMP_SUFFIX = ".tmp"


class CheckpointError(PgError):
    """The file is not a usable checkpoint (truncated, corrupt, wrong version, edited by hand)."""


# ---------------------------------------------------------------- flatten / unflatten
def _flatten(obj: Any, path: str, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, torch.Tensor):
        key = path or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_REF: key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint keys must be str or int, got {type(k).__name__} at {path}")
            # JSON keys are strings: int keys are tagged so they come back as ints (optimizer state ids).
            jk = k if isinstance(k, str) else f"__int__{k}"
            out[jk] = _flatten(v, f"{path}/{k}" if path else str(k), tensors)
        return out
    if isinstance(obj, (list, tuple)):
        return [_flatten(v, f"{path}/{i}", tensors) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store a {type(obj).__name__} in a checkpoint (at {path})")


def _unflatten(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(obj, dict):
        if set(obj) == {_REF}:
            key = obj[_REF]
            if key not in tensors:
                raise CheckpointError(f"checkpoint refers to a tensor {key!r} it does not contain")
            return tensors[key]
        return {(int(k[7:]) if k.startswith("__int__") else k): _unflatten(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_unflatten(v, tensors) for v in obj]
    return obj


def _checksum(tensors: dict[str, torch.Tensor], body: str) -> str:
    h = hashlib.sha256(body.encode())
    for key in sorted(tensors):
        t = tensors[key]
        h.update(key.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# ---------------------------------------------------------------- atomic write
def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that a crash leaves either the old file or the complete new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}{_TMP_SUFFIX}")
    try:
        tmp.unlink()  # a stale one, or a link someone planted there: the write below must not follow it
    except FileNotFoundError:
        pass
    try:
        with open(tmp, "wb") as f:
            if _fault_now(path):  # test-only: die halfway through this write, as `kill -9` or a power cut would
                f.write(data[: len(data) // 2])
                f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def open_append(path: str | os.PathLike, newline: str | None = None):
    """Open a file of the session folder for appending text (created if missing), refusing anything but a regular
    file: a symbolic link planted as metrics.csv, quarantine.txt or errors.log must not send writes elsewhere."""
    path = Path(path)
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)  # O_NONBLOCK: a FIFO without a reader fails at once instead of hanging
    except OSError as e:
        if e.errno in (errno.ELOOP, errno.ENXIO, errno.EISDIR):
            raise PgError(_not_regular(path)) from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise PgError(_not_regular(path))
    os.set_blocking(fd, True)
    return os.fdopen(fd, "a", encoding="utf-8", newline=newline)


def _not_regular(path: Path) -> str:
    return (f"{path} is a symbolic link or not a regular file: pgshell writes only regular files inside the session "
            "folder — remove it and try again")


_FAULT_KINDS = {".safetensors": "kill-during-checkpoint-write", ".session": "kill-during-session-write"}
_fault_counts: dict[str, int] = {}


def _fault_now(path: Path) -> bool:
    """Test-only fault injection (tests/test_faults.py): with PGSHELL_FAULT=kill-during-checkpoint-write:N
    (or kill-during-session-write:N) set, the Nth such write of this process kills it halfway through."""
    fault = os.environ.get("PGSHELL_FAULT")
    kind = _FAULT_KINDS.get(path.suffix)
    if not fault or kind is None or not fault.startswith(kind + ":"):
        return False
    _fault_counts[kind] = _fault_counts.get(kind, 0) + 1
    return str(_fault_counts[kind]) == fault.rpartition(":")[2]


def clean_partial_writes(folder: str | os.PathLike, name: str | None = None) -> list[Path]:
    """Remove temporary files left by writes (of `name` only, if given) in `folder` that a kill interrupted; returns
    what was removed."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".{glob.escape(name) if name else '*'}.*{_TMP_SUFFIX}"):
        try:
            p.unlink()
            removed.append(p)
        except OSError:
            pass
    return removed


# ---------------------------------------------------------------- save / load
def save_checkpoint(path: str | os.PathLike, state: dict[str, Any], summary: dict[str, Any] | None = None) -> int:
    """Write `state` (a nested plain structure with tensors) to `path` atomically; returns the file size in bytes.

    `summary` (step, epoch, kind, metrics) goes into the header as plain strings so listings need not load tensors.
    """
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _flatten(state, "", tensors)
    body = json.dumps(skeleton, sort_keys=True)
    meta = {k: str(v) for k, v in (summary or {}).items()}
    meta.update({"format": FORMAT, "version": str(VERSION), "state": body, "sha256": _checksum(tensors, body)})
    data = st_save(tensors, metadata=meta)
    atomic_write_bytes(path, data)
    return len(data)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The header alone (no tensor data): cheap, for listing checkpoints."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if n <= 0 or n > _MAX_HEADER:
                raise ValueError
            header = json.loads(f.read(n))
        return header.get("__metadata__", {}) or {}
    except (OSError, ValueError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is not a readable checkpoint ({e.__class__.__name__})") from None


def check_size(path: str | os.PathLike) -> int:
    """The file's size, once its safetensors header (read alone, bounded) accounts for every byte of it and it fits
    in this machine's memory: a huge file named like a checkpoint is refused before it is read."""
    path = Path(path)
    try:
        size = os.stat(path).st_size
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise ValueError("header length")
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, UnicodeDecodeError):
        raise CheckpointError(f"{path} is damaged or not a pgshell checkpoint (no readable header)") from None
    if 8 + n + end != size:
        raise CheckpointError(f"{path} is {size:,} bytes but its header accounts for {8 + n + end:,}: damaged or "
                              "not a pgshell checkpoint")
    memory = _physical_memory()
    if memory and size > memory:
        raise CheckpointError(f"{path} is {size / 2**30:.1f} GiB, more than this machine's memory "
                              f"({memory / 2**30:.1f} GiB): not loaded")
    return size


_MAX_HEADER = 100_000_000  # bytes of JSON header: far above any real checkpoint's


def _physical_memory() -> int:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 0


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read and verify a checkpoint; raises CheckpointError naming what is wrong."""
    path = Path(path)
    check_size(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    except MemoryError:
        raise CheckpointError(f"{path} does not fit in memory here: not loaded") from None
    try:
        tensors = st_load(data)
    except (SafetensorError, ValueError, RuntimeError, Exception) as e:  # truncated or not safetensors at all
        raise CheckpointError(f"{path} is damaged or not a pgshell checkpoint ({str(e)[:80]})") from None
    meta = _header_metadata(data)
    if meta.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a pgshell checkpoint (no '{FORMAT}' marker)")
    if meta.get("version") != str(VERSION):
        raise CheckpointError(f"{path} has checkpoint version {meta.get('version')!r}; this pgshell reads {VERSION}")
    body = meta.get("state", "")
    if _checksum(tensors, body) != meta.get("sha256"):
        raise CheckpointError(f"{path} fails its checksum: it was damaged or edited")
    try:
        return _unflatten(json.loads(body), tensors)
    except json.JSONDecodeError:
        raise CheckpointError(f"{path} has an unreadable state header") from None


def _header_metadata(data: bytes) -> dict[str, str]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]).get("__metadata__", {}) or {}


_CKPT_RE = re.compile(r"^(epoch|step)-(\d+)(-[0-9a-f]+)?\.safetensors$")  # -LINEAGE: a new run's, beside another's


def list_checkpoint_files(folder: str | os.PathLike) -> list[Path]:
    """Checkpoint files of a folder, oldest first by training step (then epoch files after pause files of that step)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        m = _CKPT_RE.match(p.name)
        if m:
            try:
                step = int(read_metadata(p).get("step", "-1"))
            except CheckpointError:
                step = -1
            found.append((step, p.stat().st_mtime_ns, p))
    return [p for _, _, p in sorted(found)]


def load_latest(folder: str | os.PathLike, warn=lambda msg: None, accept=None) -> tuple[Path, dict[str, Any]] | None:
    """The newest checkpoint of `folder` that loads and verifies, preferring one that keeps the full training state
    (older ones are rewritten slim once superseded: saver.py); damaged newer ones are reported through `warn`.
    `accept(path, header metadata or None when the header is unreadable)` leaves out the files it returns False for."""
    files = [p for p in reversed(list_checkpoint_files(folder)) if accept is None or accept(p, _metadata_or_none(p))]
    full = [p for p in files if _resumable(p)]
    for p in full + [p for p in files if p not in full]:
        try:
            return p, load_checkpoint(p)
        except CheckpointError as e:
            warn(f"skipping {p.name}: {e}; using the previous checkpoint")
    return None


def _metadata_or_none(path: Path) -> dict | None:
    try:
        return read_metadata(path)
    except CheckpointError:
        return None


def _resumable(path: Path) -> bool:
    try:
        return read_metadata(path).get("resumable", "True") == "True"  # older files did not say: they were full
    except CheckpointError:
        return True  # let load_checkpoint name what is wrong with it

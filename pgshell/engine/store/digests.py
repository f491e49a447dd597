"""Fingerprints of what a training run starts from: a model's weights, a file, an image folder's contents.

The change log (session/changelog.py) stores them so that a replay can prove it starts from the same things, and
name what differs when it does not: the file of a data folder that changed, the weights file that is not the one
loaded. Content is hashed (BLAKE2b), never mtimes: a data folder copied to another machine keeps its fingerprint.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..names import escape, unescape

Manifest = list[tuple[str, int, str]]  # (path relative to the data folder, size in bytes, content digest)


def _blake() -> "hashlib._Hash":
    return hashlib.blake2b(digest_size=16)


def file_sha256(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def weights_digest(module) -> str:
    """A digest of every tensor of a module's state (names, dtypes, shapes and bytes): equal exactly when the
    weights and buffers are bit for bit the same."""
    import torch

    h = _blake()
    with torch.no_grad():
        for name, t in sorted(module.state_dict().items()):
            t = t.detach().to("cpu").contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def data_manifest(root: str | os.PathLike, paths: list[str]) -> Manifest:
    """(relative path, size, content digest) of every file in `paths`, sorted by path."""
    root = os.path.abspath(root)
    rows = []
    for p in sorted(set(paths)):
        try:
            with open(p, "rb") as f:
                digest = hashlib.file_digest(f, _blake).hexdigest()
            size = os.path.getsize(p)
        except OSError as e:
            digest, size = f"unreadable:{e.strerror or type(e).__name__}", -1
        rows.append((os.path.relpath(p, root), size, digest))
    return rows


def manifest_digest(rows: Manifest) -> str:
    h = _blake()
    for rel, size, digest in rows:
        h.update(f"{rel}\t{size}\t{digest}\n".encode("utf-8", "surrogateescape"))  # names need not be UTF-8
    return h.hexdigest()


def manifest_changes(then: Manifest, now: Manifest) -> list[str]:
    """What differs between two manifests of a folder, one phrase per file, in path order."""
    a = {rel: (size, digest) for rel, size, digest in then}
    b = {rel: (size, digest) for rel, size, digest in now}
    out = []
    for rel in sorted(a.keys() | b.keys()):
        if rel not in b:
            out.append(f"{rel} is missing")
        elif rel not in a:
            out.append(f"{rel} is new")
        elif a[rel] != b[rel]:
            (s0, _), (s1, _) = a[rel], b[rel]
            out.append(f"{rel} changed ({s0:,} -> {s1:,} bytes)" if s0 != s1 else f"{rel} changed (same size, "
                                                                                  "other content)")
    return out


def write_manifest(path: str | os.PathLike, rows: Manifest, title: str) -> None:
    from .checkpoint import atomic_write_bytes

    lines = [f"# {title}", f"# {len(rows)} files, fingerprint {manifest_digest(rows)}"]
    lines += [f"{escape(rel)}\t{size}\t{digest}" for rel, size, digest in rows]  # any name fits one line
    atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode())


def read_manifest(path: str | os.PathLike) -> tuple[str, Manifest]:
    """(title, rows) of a manifest file; ValueError if it is not one."""
    text = Path(path).read_text()
    lines = text.splitlines()
    if len(lines) < 2 or not lines[0].startswith("# ") or not lines[1].startswith("# "):
        raise ValueError("not a pgshell data manifest")
    rows = []
    for line in lines[2:]:
        rel, size, digest = line.split("\t")
        rows.append((unescape(rel), int(size), digest))
    return lines[0][2:], rows

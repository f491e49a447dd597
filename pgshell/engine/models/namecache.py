"""The model names `load` accepts, for tab completion: the seed short names first, then timm's (architectures and
pretrained tags), then torchvision's as `tv:NAME`.

Listing them needs timm and torchvision imported (seconds at the first Tab of a session), so the list is kept in
`$PGSHELL_CACHE/model-names.json` (default `~/.cache/pgshell`), keyed by the library versions: after the first time
a completion reads one small file and imports nothing.
"""

from __future__ import annotations

import json
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path


def cache_file() -> Path:
    return Path(os.environ.get("PGSHELL_CACHE", Path.home() / ".cache" / "pgshell")) / "model-names.json"


def _key() -> str:
    parts = []
    for package in ("pgshell", "timm", "torchvision"):
        try:
            parts.append(f"{package}=={version(package)}")
        except PackageNotFoundError:
            parts.append(f"{package}==?")
    return " ".join(parts)


def model_names() -> list[str]:
    """Every name `load` takes, in completion order: seed names, timm names, `tv:` names."""
    file, key = cache_file(), _key()
    try:
        doc = json.loads(file.read_text())
        if doc.get("key") == key and isinstance(doc.get("names"), list):
            return doc["names"]
    except (OSError, ValueError):
        pass
    names = _list_names()
    try:  # a cache that cannot be written only costs the next session the same seconds
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "names": names}))
        os.replace(tmp, file)
    except OSError:
        pass
    return names


def _list_names() -> list[str]:
    import timm
    import torchvision

    from .catalogue import SEED_FAMILIES

    seeds = [row["name"] for row in SEED_FAMILIES]
    timm_names = sorted((set(timm.list_models()) | set(timm.list_models(pretrained=True))) - set(seeds))
    tv_names = torchvision.models.list_models(module=torchvision.models)
    return seeds + timm_names + [f"tv:{n}" for n in tv_names]

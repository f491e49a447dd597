"""The one place choosing where a run's batches come from (`choose`), once per run: the feature cache when only the
head trains; else, by `set input_cache`, the decoded cache if it fits (`inputcache.budget`), else device decode on a
GPU, else the DataLoader. The cache modules are imported only when a run needs them.
"""

from __future__ import annotations

from .interface import BatchSource, DataSpec, LoaderSource, Report


def choose(spec: DataSpec, current: BatchSource | None, loader: LoaderSource, report: Report,
           budget: int | None = None) -> BatchSource:
    """The one place deciding where a run's batches come from (see the module's docstring). `current` is reused while
    it is valid; `budget` (bytes, default `inputcache.budget()`) is what a decoded cache may take."""
    if spec.distributed:
        return loader
    from . import features as FC  # imported when needed: a run on the DataLoader never loads the cache modules

    if FC.FeatureSource.applies(spec):
        if isinstance(current, FC.FeatureSource) and current.valid_for(spec):
            return current.bind(spec)
        return FC.FeatureSource.build(spec, loader, report)
    return _image_source(spec, current, loader, report, budget)


def input_path(mode: str, device_type: str, fits: bool) -> str:
    """`set input_cache` -> "cache" | "decode" | "loader". auto: on a GPU the cache if it fits, else device decode;
    on a CPU the DataLoader (the reference path). on: the cache if it fits (CPU too), else as auto. decode: always."""
    if mode == "off" or (mode == "auto" and device_type != "cuda"):
        return "loader"
    if mode == "decode":
        return "decode"
    if fits:
        return "cache"
    return "decode" if device_type == "cuda" else "loader"


def _image_source(spec: DataSpec, current: BatchSource | None, loader: LoaderSource, report: Report,
                  budget: int | None) -> BatchSource:
    from . import inputcache as IC

    mode, device_type = spec.cfg.input_cache, spec.runtime.device.type
    if input_path(mode, device_type, True) == "loader":
        return loader
    wanted = ("device decode",) if mode == "decode" else ("input cache", "device decode")
    if current is not None and current.kind in wanted and current.valid_for(spec):
        return current.bind(spec)
    try:
        aug = IC.DeviceAugment.for_spec(spec)
    except IC.Unsupported as e:
        report.notify(f"input cache: {e}, which the device augmentation does not do: using the DataLoader")
        return loader
    budget = IC.budget() if budget is None else budget
    if mode != "decode":
        cached = IC.CacheSource.build(spec, aug, budget, report)
        if cached is not None:
            return cached
    if input_path(mode, device_type, False) == "loader":
        return loader
    from .decode import DecodeSource

    report.notify(f"input: decoding {len(spec.splits.train)} training images on {spec.runtime.device} every epoch "
                  "(evaluation stays on the DataLoader)")
    return DecodeSource(spec, aug, loader)

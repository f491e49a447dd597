"""Batch sources behind one interface: the DataLoader, the decoded-input cache, device decode and the frozen-backbone
feature cache, and the one place choosing among them. Names are re-exported here lazily."""

from importlib import import_module

_EXPORTS = {
    "Report": "interface", "DataSpec": "interface", "BatchSource": "interface", "data_key": "interface",
    "train_sampler": "interface", "eval_keys": "interface", "LoaderSource": "interface", "choose": "choice",
    "input_path": "choice", "head_module_name": "features", "frozen_state": "features", "CachedSplit": "features",
    "FeatureSource": "features", "cpu_threads": "features", "cores_beside": "features",
    "compute_features": "features", "cache_dir": "inputcache", "budget": "inputcache", "Unsupported": "inputcache",
    "EvalCrop": "inputcache", "DeviceAugment": "inputcache", "crop_box": "inputcache", "augment_batch": "inputcache",
    "jitter": "inputcache", "normalise": "inputcache", "plain_batch": "inputcache", "stored_size": "inputcache",
    "Layout": "inputcache", "Stored": "inputcache", "CacheSource": "inputcache", "to_image": "inputcache",
    "decode_batch": "decode", "stage": "decode", "eval_crops": "decode", "DecodeSource": "decode",
}

__all__ = [*_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Batch sources behind one interface: the DataLoader, the decoded-input cache, device decode and the frozen-backbone
feature cache, and the one place choosing among them. Names are re-exported here lazily."""

from ..lazy import exports, lazy_getattr

_EXPORTS = exports("""
    interface: Report DataSpec BatchSource data_key train_sampler eval_keys LoaderSource
    choice: choose input_path
    features: head_module_name frozen_state CachedSplit FeatureSource cpu_threads cores_beside compute_features
    inputcache: cache_dir budget Unsupported EvalCrop DeviceAugment crop_box augment_batch jitter normalise
    inputcache: plain_batch stored_size Layout Stored CacheSource to_image
    decode: decode_batch stage eval_crops DecodeSource
""")

__all__ = [*_EXPORTS]

__getattr__ = lazy_getattr(__name__, _EXPORTS)

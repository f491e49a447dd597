"""Data: any source (image folders, label files, Hugging Face datasets, Arrow rows) -> Splits; images, the
augmentation policy -> timm transforms, seeded sampling. Names are re-exported here lazily."""

from importlib import import_module

_EXPORTS = {
    "IMG_EXTENSIONS": "folders", "ARROW_PREFIX": "folders", "BadImage": "folders", "ScanError": "folders",
    "Splits": "folders", "resolve_data": "folders", "data_location": "folders", "scan_folder": "folders",
    "Terms": "folders", "assemble": "folders", "images_under": "folders", "split_class": "folders",
    "check_image": "folders", "sample_file": "folders", "find_undecodable": "folders", "DRAFT_FACTOR": "folders",
    "draft_side": "folders", "load_image": "folders", "DEVICE_AUGMENT_READS": "folders",
    "policy_data_config": "folders", "normalisation": "folders", "train_policy": "folders",
    "build_transform": "folders", "eval_transform": "folders", "describe_policy": "folders",
    "input_cache_unsupported": "folders", "image_side": "folders", "small_image_hint": "folders",
    "class_counts": "folders", "imbalance_warning": "folders", "balanced_sample_weights": "folders",
    "derived_seed": "folders", "sample_seed": "folders", "epoch_permutation": "folders", "EpochSampler": "folders",
    "seeded": "folders", "ImageDataset": "folders", "collate": "folders", "make_loader": "folders",
    "LABEL_SUFFIXES": "labelfiles", "kind_of": "labelfiles", "scan_label_file": "labelfiles", "scan_hf": "labelfiles",
}

__all__ = [*_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

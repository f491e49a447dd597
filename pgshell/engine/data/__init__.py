"""Data: any source (image folders, label files, Hugging Face datasets, Arrow rows) -> Splits; reading images safely,
the augmentation policy -> timm transforms, seeded sampling and loading. Names are re-exported here lazily."""

from importlib import import_module

_EXPORTS = {
    "resolve_data": "resolve", "data_location": "resolve", "kind_of": "resolve", "IMG_EXTENSIONS": "folders",
    "ScanError": "folders", "Splits": "folders", "scan_folder": "folders", "Terms": "folders", "assemble": "folders",
    "images_under": "folders", "split_class": "folders", "assemble_per_split": "folders",
    "scan_label_file": "labelfiles", "scan_hf": "hub", "BadImage": "images", "check_image": "images",
    "sample_file": "images", "find_undecodable": "images", "draft_side": "images", "load_image": "images",
    "image_side": "images", "policy_data_config": "transforms", "normalisation": "transforms",
    "train_policy": "transforms", "build_transform": "transforms", "eval_transform": "transforms",
    "describe_policy": "transforms", "input_cache_unsupported": "transforms", "small_image_hint": "transforms",
    "class_counts": "sampling", "imbalance_warning": "sampling", "balanced_sample_weights": "sampling",
    "derived_seed": "sampling", "sample_seed": "sampling", "epoch_permutation": "sampling",
    "EpochSampler": "sampling", "seeded": "sampling", "ImageDataset": "loading", "collate": "loading",
    "make_loader": "loading",
}

# not the package's API: names the tests reach through it (PIL's Image)
_FOR_TESTS = {"Image": "images"}

__all__ = [*_EXPORTS]


def __getattr__(name):
    where = _EXPORTS.get(name) or _FOR_TESTS.get(name)
    if where:
        return getattr(import_module(f".{where}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

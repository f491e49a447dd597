"""Data: any source (image folders, label files, Hugging Face datasets, Arrow rows) -> Splits; reading images safely,
the augmentation policy -> timm transforms, seeded sampling and loading. Names are re-exported here lazily."""

from ..lazy import exports, lazy_getattr

_EXPORTS = exports("""
    resolve: resolve_data data_location kind_of
    folders: IMG_EXTENSIONS ScanError Splits scan_folder Terms assemble images_under split_class assemble_per_split
    labelfiles: scan_label_file
    hub: scan_hf
    images: BadImage check_image sample_file find_undecodable draft_side load_image image_side
    transforms: policy_data_config normalisation train_policy build_transform eval_transform describe_policy
    transforms: input_cache_unsupported small_image_hint
    sampling: class_counts imbalance_warning balanced_sample_weights derived_seed sample_seed epoch_permutation
    sampling: EpochSampler seeded
    loading: ImageDataset collate make_loader
""")

# not the package's API: names the tests reach through it (PIL's Image)
_FOR_TESTS = {"Image": "images"}

_FOR_TESTS = exports("""
    images: Image
""")

__getattr__ = lazy_getattr(__name__, _EXPORTS, _FOR_TESTS)

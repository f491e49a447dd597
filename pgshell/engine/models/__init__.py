"""Models: the catalogue (seed families, timm, torchvision, model folders, files), building a model and its head,
weight files read by content, freezing, model soups. Names are re-exported here lazily: importing the package does not
import torch."""

from ..lazy import exports, lazy_getattr

_EXPORTS = exports("""
    spec: ModelSpec BuiltModel
    catalogue: SEED_FAMILIES resolve_name split_file_name list_models weights_status package_weights
    catalogue: timm_weights_status torch_hub_file weights_cache_dir online tv_name tv_default_weights tv_data_config
    catalogue: default_data_config
    build: build_model reset_head set_linear_head build_skeleton check_input_size
    weights: load_weights_file read_weights restore_weights
    freezing: freeze random_backbone_warning unfreeze stages count_params frozen_bn_to_eval
    namecache: cache_file model_names
    soup: check_ingredients average_weights rank GreedyStep greedy_soup batchnorm_layers differing_batchnorm
    soup: recompute_batchnorm
""")

# not the package's API: names the tests reach through it
_FOR_TESTS = {"_count_params_on_meta": "catalogue", "_best_prefix": "weights"}
_FOR_TESTS = exports("""
    catalogue: _count_params_on_meta
    weights: _best_prefix
""")
__all__ = [*_EXPORTS]

__getattr__ = lazy_getattr(__name__, _EXPORTS, _FOR_TESTS)

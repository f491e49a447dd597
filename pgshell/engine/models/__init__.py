"""Models: the catalogue (seed families, timm, torchvision, model folders, files), building a model and its head,
weight files read by content, freezing, model soups. Names are re-exported here lazily: importing the package does not
import torch."""

from importlib import import_module

_EXPORTS = {
    "ModelSpec": "spec", "BuiltModel": "spec", "SEED_FAMILIES": "catalogue", "resolve_name": "catalogue",
    "split_file_name": "catalogue", "list_models": "catalogue", "weights_status": "catalogue",
    "package_weights": "catalogue", "timm_weights_status": "catalogue", "torch_hub_file": "catalogue",
    "weights_cache_dir": "catalogue", "online": "catalogue", "tv_name": "catalogue",
    "tv_default_weights": "catalogue", "tv_data_config": "catalogue", "default_data_config": "catalogue",
    "build_model": "build", "reset_head": "build", "build_skeleton": "build", "check_input_size": "build",
    "load_weights_file": "weights", "read_weights": "weights", "restore_weights": "weights", "freeze": "freezing",
    "random_backbone_warning": "freezing", "unfreeze": "freezing", "stages": "freezing", "count_params": "freezing",
    "frozen_bn_to_eval": "freezing", "cache_file": "namecache", "model_names": "namecache",
    "check_ingredients": "soup", "average_weights": "soup", "rank": "soup", "GreedyStep": "soup",
    "greedy_soup": "soup", "batchnorm_layers": "soup", "differing_batchnorm": "soup", "recompute_batchnorm": "soup",
}

# not the package's API: names the tests reach through it
_FOR_TESTS = {"_count_params_on_meta": "catalogue", "_best_prefix": "weights"}

__all__ = [*_EXPORTS]


def __getattr__(name):
    where = _EXPORTS.get(name) or _FOR_TESTS.get(name)
    if where:
        return getattr(import_module(f".{where}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

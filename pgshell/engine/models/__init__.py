"""Models: the catalogue (seed families, timm, torchvision, model folders, files), building a model and its head,
weight files read by content, freezing, model soups. Names are re-exported here lazily: importing the package does not
import torch."""

from importlib import import_module

_EXPORTS = {
    "SEED_FAMILIES": "build", "ModelSpec": "build", "BuiltModel": "build", "resolve_name": "build",
    "list_models": "build", "weights_status": "build", "package_weights": "build", "build_model": "build",
    "reset_head": "build", "build_skeleton": "build", "load_weights_file": "build", "read_weights": "build",
    "freeze": "build", "random_backbone_warning": "build", "unfreeze": "build", "stages": "build",
    "check_input_size": "build", "count_params": "build", "frozen_bn_to_eval": "build", "restore_weights": "build",
    "cache_file": "namecache", "model_names": "namecache", "check_ingredients": "soup", "average_weights": "soup",
    "rank": "soup", "GreedyStep": "soup", "greedy_soup": "soup", "batchnorm_layers": "soup",
    "differing_batchnorm": "soup", "recompute_batchnorm": "soup",
}
_EXPORTS_FOR_TESTS = {"_count_params_on_meta": "build", "_best_prefix": "build"}  # tests clear/check these

__all__ = [*_EXPORTS]


def __getattr__(name):
    where = _EXPORTS.get(name) or _EXPORTS_FOR_TESTS.get(name)
    if where:
        return getattr(import_module(f".{where}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

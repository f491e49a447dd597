"""Reading a model: the evaluation sum, classification reports, predictions, graphs, export, class-activation
maps, probes, the data audit, TensorBoard. Names are re-exported here lazily."""

from importlib import import_module

_EXPORTS = {
    "eval_batch_size": "evaluate", "EvalMode": "evaluate", "forward_tta": "evaluate", "evaluate_dataset": "evaluate",
    "accumulate": "evaluate", "classification_report": "evaluate", "image_files": "evaluate",
    "predict_files": "evaluate", "METRICS": "plot", "smooth_values": "plot", "plot_series": "plot", "X_AXES": "plot",
    "draw_png": "plot", "confusion_png": "plot", "save_png": "plot", "contact_sheet_png": "plot",
    "activation_png": "plot", "draw_text": "plot", "draw_heat_text": "plot", "FORMATS": "export",
    "preprocessing": "export", "export_model": "export", "timm_architecture": "export", "export_timm": "export",
    "check_timm": "export", "METHODS": "explain", "INSTALL": "explain", "target_layer": "explain",
    "activation_map": "explain", "to_image_frame": "explain", "KNN_K": "probe", "KNN_TEMPERATURE": "probe",
    "WEIGHT_DECAYS": "probe", "HOLDOUT": "probe", "accuracy": "probe", "knn_scores": "probe", "LinearProbe": "probe",
    "fit_linear": "probe", "HASH_SIDE": "audit", "HASH_LOW": "audit", "THUMB_SIDE": "audit", "CROPS": "audit",
    "NEAR_BITS": "audit", "NEAR_CORRELATION": "audit", "FEATURE_COSINE": "audit", "BLANK_STD": "audit",
    "TINY_SIDE": "audit", "HUGE_FACTOR": "audit", "ASPECT": "audit", "IMBALANCE": "audit", "phash": "audit",
    "Facts": "audit", "image_facts": "audit", "exact_groups": "audit", "hash_pairs": "audit", "near_pairs": "audit",
    "feature_pairs": "audit", "groups_of": "audit", "odd_images": "audit", "thresholds": "audit",
    "confident_joint": "audit", "calibrate_joint": "audit", "find_label_issues": "audit",
    "rank_label_issues": "audit", "out_of_fold_probs": "audit", "SMALL_FIT": "audit", "EXCLUDE_HEADER": "audit",
    "write_exclude": "audit", "read_exclude": "audit", "available": "tensorboard", "TensorBoardLog": "tensorboard",
    "TensorBoardHandler": "tensorboard",
}

__all__ = [*_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""Reading a model: the evaluation sum, classification reports, predictions, graphs, export, class-activation
maps, probes, the data audit, TensorBoard. Names are re-exported here lazily."""

from importlib import import_module

_EXPORTS = {
    "eval_batch_size": "evaluate", "EvalMode": "evaluate", "forward_tta": "evaluate", "evaluate_dataset": "evaluate",
    "accumulate": "evaluate", "classification_report": "evaluate", "image_files": "evaluate",
    "predict_files": "evaluate", "smooth_values": "plot", "plot_series": "plot", "draw_png": "plot",
    "confusion_png": "plot", "save_png": "plot", "contact_sheet_png": "plot", "activation_png": "plot",
    "draw_text": "plot", "draw_heat_text": "plot", "preprocessing": "export", "export_model": "export",
    "timm_architecture": "export", "export_timm": "export", "check_timm": "export", "target_layer": "explain",
    "activation_map": "explain", "to_image_frame": "explain", "accuracy": "probe", "knn_scores": "probe",
    "LinearProbe": "probe", "fit_linear": "probe", "phash": "audit", "Facts": "audit", "image_facts": "audit",
    "exact_groups": "audit", "hash_pairs": "audit", "near_pairs": "audit", "feature_pairs": "audit",
    "groups_of": "audit", "odd_images": "audit", "thresholds": "audit", "confident_joint": "audit",
    "calibrate_joint": "audit", "find_label_issues": "audit", "rank_label_issues": "audit",
    "out_of_fold_probs": "audit", "write_exclude": "audit", "read_exclude": "audit", "available": "tensorboard",
    "TensorBoardLog": "tensorboard", "TensorBoardHandler": "tensorboard",
}

__all__ = [*_EXPORTS]


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

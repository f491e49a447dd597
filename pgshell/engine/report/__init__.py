"""Reading a model: the evaluation sum, classification reports, predictions, graphs, export, class-activation
maps, probes, the data audit, TensorBoard. Names are re-exported here lazily."""

from ..lazy import exports, lazy_getattr

_EXPORTS = exports("""
    evaluate: eval_batch_size EvalMode forward_tta evaluate_dataset accumulate classification_report image_files
    evaluate: predict_files
    plot: smooth_values plot_series draw_png confusion_png save_png contact_sheet_png activation_png draw_text
    plot: draw_heat_text
    export: preprocessing export_model timm_architecture export_timm check_timm
    explain: target_layer activation_map to_image_frame
    probe: accuracy knn_scores LinearProbe fit_linear
    audit: phash Facts image_facts exact_groups hash_pairs near_pairs feature_pairs groups_of odd_images thresholds
    audit: confident_joint calibrate_joint find_label_issues rank_label_issues out_of_fold_probs write_exclude
    audit: read_exclude
    tensorboard: available TensorBoardLog TensorBoardHandler
""")

__all__ = [*_EXPORTS]

__getattr__ = lazy_getattr(__name__, _EXPORTS)

"""Training: the one loop (Trainer), its events and handlers (recipes, progress, the metrics log), lr schedules,
the device/precision runtime, DDP, the LR range test. Names are re-exported here lazily."""

from ..lazy import exports, lazy_getattr

_EXPORTS = exports("""
    loop: Position RunResult fresh_state position_rng restore_rng step_seed make_loss Trainer
    events: EVENTS Handler Ctx Events
    recipes: config_handlers needs_images sample_weights class_loss_weights soft_target_loss WeightedLoss mix_seed
    recipes: mix_batch MixupCutmix optimizer_steps_per_epoch Accumulate ClipGrad WeightEma ema_module
    recipes: live_ema_module EarlyStopping layer_scales no_weight_decay describe_groups
    schedule: total_steps lr_factor cosine_factor onecycle_factor schedule_notice phase_notice
    device: Runtime resolve_runtime
    distributed: World world init_from_env shutdown all_sum agree
    progress: Progress phase_status
    metrics: MetricsLog MetricsLogger read_rows read_rows_counted
    lrfind: RangeTest suggest range_test_trainer RangeTestSchedule run_range_test
    optim: build_optimizer param_groups
    timm_optimizers: optimizer_names
""")

__all__ = [*_EXPORTS]

__getattr__ = lazy_getattr(__name__, _EXPORTS)

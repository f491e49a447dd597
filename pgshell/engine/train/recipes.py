"""Training recipes as loop handlers, built from the settings: weight EMA, mixup/cutmix, class-weighted loss,
gradient accumulation and clipping, early stopping; and the layer-wise lr decay grouping the optimizer uses.

`config_handlers(tr)` is called by `Trainer.setup()`; each handler it returns is attached to the trainer's events for
the run (see engine/train/events.py). Every random draw a handler makes is a function of (seed, position), and every
handler with memory keeps it in the checkpoint (`key`), so a run paused anywhere resumes exactly.

Orders (lower runs first within an event): mixup 40 (before_batch: the batch must be mixed before anything reads it),
accumulation 45 and clipping 55 (before_step: the summed gradients are averaged before they are clipped), EMA 60,
early stopping 80 (after_epoch: before the checkpoint handler at 90 stores its counter).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..data.sampling import balanced_sample_weights, class_counts, derived_seed, seeded
from ..errors import PgError
from .events import Handler


def config_handlers(tr) -> list[Handler]:
    """The handlers the trainer's settings (`tr.cfg`) ask for."""
    cfg = tr.cfg
    handlers: list[Handler] = []
    weights = class_loss_weights(tr.splits.train, len(tr.splits.classes)) if cfg.class_weights == "balanced" else None
    if cfg.mixup > 0 or cfg.cutmix > 0:
        handlers.append(MixupCutmix(tr, weights))
    elif weights is not None:
        handlers.append(WeightedLoss(tr, weights))
    if cfg.accumulate > 1:
        handlers.append(Accumulate(tr, cfg.accumulate))
    if cfg.clip_grad > 0:
        handlers.append(ClipGrad())
    if cfg.ema > 0:
        handlers.append(WeightEma(cfg.ema, cfg.ema_warmup))
    if cfg.patience > 0:
        handlers.append(EarlyStopping(cfg.patience, cfg.min_delta, cfg.best_metric))
    return handlers


def needs_images(cfg) -> bool:
    """True when a setting works on the images themselves, so the frozen-backbone feature cache (which trains the
    head on stored features) must not replace them: mixup/cutmix mix pixels, flip TTA flips them."""
    return cfg.mixup > 0 or cfg.cutmix > 0 or cfg.tta != "none"


def sample_weights(cfg, splits) -> list[float] | None:
    """The training sampler's weights (`set sampler balanced`), for engine.data.EpochSampler(weights=...)."""
    if cfg.sampler != "balanced":
        return None
    return balanced_sample_weights(splits.train, len(splits.classes))


# ---------------------------------------------------------------- the loss: soft targets and class weights
def class_loss_weights(samples: list[tuple[str, int]], num_classes: int) -> torch.Tensor:
    """scikit-learn's 'balanced' class weights, n / (classes present x count); a class with no training image gets 0
    (no training loss can involve it)."""
    counts = torch.tensor(class_counts(samples, num_classes), dtype=torch.float32)
    present = int((counts > 0).sum())
    return torch.where(counts > 0, len(samples) / (present * counts.clamp(min=1)), torch.zeros(()))


def soft_target_loss(out: torch.Tensor, target: torch.Tensor, weights: torch.Tensor | None = None,
                     criterion: str = "cross_entropy") -> torch.Tensor:
    """The batch loss against per-class target probabilities (mixed, smoothed or one-hot).

    cross_entropy: timm's SoftTargetCrossEntropy; l1/mse: the distance of the softmax to the target, as the plain
    loss computes it. With class `weights`, each image weighs sum_c target_c * weight_c and the mean is normalised
    by the weights' sum, as torch's weighted cross-entropy is for hard labels."""
    out = out.float()
    if criterion == "cross_entropy":
        per_image = -(target * F.log_softmax(out, dim=1)).sum(1)
    else:
        dist = F.l1_loss if criterion == "l1" else F.mse_loss
        per_image = dist(out.softmax(dim=1), target, reduction="none").mean(1)
    if weights is None:
        return per_image.mean()
    w = target @ weights.to(target.device, target.dtype)
    return (per_image * w).sum() / w.sum().clamp(min=1e-12)


def _one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    from timm.data.mixup import mixup_target

    return mixup_target(y, num_classes, 1.0, smoothing)


class WeightedLoss(Handler):
    """`set class_weights balanced` without mixup: the training loss weighs each class by its inverse frequency.
    Validation keeps the plain loss, so val_loss stays comparable between runs."""

    order = 45

    def __init__(self, tr, weights: torch.Tensor):
        self.weights, self.classes = weights, len(tr.splits.classes)

    def after_loss(self, tr, ctx) -> None:
        target = _one_hot(ctx.y, self.classes, tr.cfg.label_smoothing)
        ctx.loss = soft_target_loss(ctx.out, target, self.weights, tr.cfg.criterion)


# ---------------------------------------------------------------- mixup / cutmix
def mix_seed(seed: int, epoch: int, sample: int) -> int:
    """The seed of one batch's mixup/cutmix draw: a function of the position (epoch, samples consumed), like the
    data's own seeds, so a resumed run mixes exactly as it would have (with or without gradient accumulation)."""
    return derived_seed("pgshell-mixup", seed, epoch, sample)


def mix_batch(mixer, x: torch.Tensor, y: torch.Tensor, num_classes: int, smoothing: float, seed: int):
    """(mixed x, soft targets) from timm's `Mixup`, its numpy draws seeded by `seed`. timm mixes a batch with its own
    reverse, which needs an even count: an odd batch's last image stays as it is, with its (smoothed) one-hot target.
    `x` is mixed in place, as timm does."""
    even = len(x) - len(x) % 2
    rest = _one_hot(y[even:], num_classes, smoothing)
    if even == 0:
        return x, rest
    mixer.label_smoothing = smoothing
    with seeded(seed):  # timm draws from numpy's global generator: seed it, then restore it
        _, target = mixer(x[:even], y[:even])
    return x, torch.cat([target, rest.to(target.dtype)])


class MixupCutmix(Handler):
    """`set mixup A` / `set cutmix A` / `set mix_prob P`: timm's Mixup (per batch: mixup or cutmix, switch
    probability 0.5 when both are on) and the soft-target loss. ctx.y becomes the dominant label of each mixed image,
    so the logged accuracy is against it; ctx.loss is replaced by the loss against the mixed targets."""

    order = 40

    def __init__(self, tr, class_weights: torch.Tensor | None = None):
        from timm.data import Mixup

        cfg = tr.cfg
        self.classes = len(tr.splits.classes)
        self.mixer = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix, prob=cfg.mix_prob,
                           label_smoothing=cfg.label_smoothing, num_classes=self.classes)
        self.weights = class_weights
        self.target: torch.Tensor | None = None

    def before_batch(self, tr, ctx) -> None:
        if ctx.x is None:  # every image of the batch was bad: nothing to mix
            return
        if ctx.x.ndim != 4:
            raise PgError("mixup/cutmix mix images, but this batch holds cached features: `set feature_cache off`")
        seed = mix_seed(tr.cfg.seed, tr.pos.epoch, tr.pos.sample)
        ctx.x, self.target = mix_batch(self.mixer, ctx.x, ctx.y, self.classes, tr.cfg.label_smoothing, seed)
        ctx.y = self.target.argmax(1)

    def after_loss(self, tr, ctx) -> None:
        ctx.loss = soft_target_loss(ctx.out, self.target.to(ctx.out.device), self.weights, tr.cfg.criterion)


# ---------------------------------------------------------------- gradient accumulation and clipping
def optimizer_steps_per_epoch(batches: int, accumulate: int) -> int:
    """Optimizer steps in an epoch of `batches` batches: one per group of `accumulate`, the last group shorter."""
    return math.ceil(batches / max(1, accumulate))


class Accumulate(Handler):
    """`set accumulate K`: an optimizer step every K batches, on the mean of their gradients (an effective batch of
    K x batch_size). Groups are counted within the epoch, so an epoch ends with a step; its last group may be
    shorter and is averaged over its own length.

    The gradients are averaged in before_step (divided by the group's length) rather than by scaling each loss: the
    same sum, and the logged loss stays each batch's own. The partial sum of a group is held after each batch (a copy:
    a batch that raises after its backward pass must not leave its share in it) and put back when a run starts — the
    loop clears gradients then — and it is in every checkpoint written mid-group, so a resumed run steps on exactly
    the gradients it would have."""

    order = 45
    key = "accumulate"

    def __init__(self, tr, k: int):
        self.k = k
        self.held: dict[str, torch.Tensor] | None = None  # the group's gradient sum so far, by parameter name

    def _group(self, tr) -> tuple[int, bool]:
        """(length of the current batch's group, whether this batch ends it)."""
        batch, total = tr.pos.batch, tr.steps_per_epoch
        start = batch - batch % self.k
        return min(self.k, total - start), (batch + 1) % self.k == 0 or batch + 1 >= total

    def before_fit(self, tr, ctx) -> None:
        for name, p in tr.built.module.named_parameters():
            if self.held and name in self.held:
                p.grad = self.held[name].to(p.device, p.dtype).clone()

    def before_step(self, tr, ctx) -> None:
        length, last = self._group(tr)
        ctx.skip_step = not last
        if last and length > 1:
            grads = [p.grad for g in tr.optimizer.param_groups for p in g["params"] if p.grad is not None]
            torch._foreach_div_(grads, float(length))

    def after_batch(self, tr, ctx) -> None:
        if ctx.out is None:  # a batch of bad images only: no backward pass, the group goes on
            return
        module = tr.built.module
        self.held = {n: p.grad.detach().clone() for n, p in module.named_parameters() if p.grad is not None} \
            if ctx.skip_step else None

    def state_dict(self) -> dict:
        return {"grads": self.held} if self.held else {}

    def load_state_dict(self, state: dict) -> None:
        self.held = dict(state.get("grads") or {}) or None


class ClipGrad(Handler):
    """`set clip_grad C` (`clip_mode norm|value`): timm's dispatch_clip_grad on the gradients about to be stepped.
    Under fp16 the gradients are unscaled first (Trainer.unscale_gradients; the GradScaler then steps without
    unscaling again)."""

    order = 55

    def before_step(self, tr, ctx) -> None:
        if ctx.skip_step:
            return
        from timm.utils import dispatch_clip_grad

        tr.unscale_gradients()
        params = [p for g in tr.optimizer.param_groups for p in g["params"] if p.grad is not None]
        dispatch_clip_grad(params, tr.cfg.clip_grad, mode=tr.cfg.clip_mode)


# ---------------------------------------------------------------- weight EMA
class WeightEma(Handler):
    """`set ema D`: timm's ModelEmaV3 of every weight and buffer, updated after each optimizer step (the first update
    copies the model; with `ema_warmup` the decay is 1 - (1 + updates)^(-2/3) until it reaches D), and evaluated at
    epoch ends in place of the live weights. Its weights and update count are in every checkpoint."""

    order = 60
    key = "ema"

    def __init__(self, decay: float, warmup: bool = True):
        self.decay, self.warmup = decay, warmup
        self.ema = None  # timm's ModelEmaV3, made at the first update (the model is on its device by then)
        self.updates = 0
        self._pending: dict | None = None

    def _ensure(self, module: torch.nn.Module):
        if self.ema is None:
            from timm.utils import ModelEmaV3

            self.ema = ModelEmaV3(module, decay=self.decay, use_warmup=self.warmup)
        if self._pending:
            self.ema.module.load_state_dict(self._pending)
            self._pending = None
        return self.ema

    def after_step(self, tr, ctx) -> None:
        if ctx.skip_step:
            return
        ema = self._ensure(tr.built.module)
        ema.update(tr.built.module, step=self.updates + 1)
        self.updates += 1  # after the update: one that raises leaves the count of the weights kept

    def before_validate(self, tr, ctx) -> None:
        if self.updates:
            ctx.eval_module = self._ensure(tr.built.module).module

    @property
    def module(self) -> torch.nn.Module | None:
        return None if self.ema is None else self.ema.module


    def state_dict(self) -> dict:
        weights = self._pending if self.ema is None else dict(self.ema.module.state_dict())
        return {"updates": self.updates, "weights": weights or {}}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state.get("updates", 0))
        self._pending = dict(state.get("weights") or {}) or None
        if self.ema is not None and self._pending:
            self.ema.module.load_state_dict(self._pending)
            self._pending = None


def ema_module(module: torch.nn.Module, state: dict | None) -> torch.nn.Module:
    """A copy of `module` holding the EMA weights of a checkpoint's handler state (`state["handlers"]["ema"]`), for
    `eval --weights ema`; PgError when the checkpoint has none."""
    import copy

    weights = ((state or {}).get("handlers") or {}).get("ema", {}).get("weights")
    if not weights:
        raise PgError("no EMA weights here: `set ema 0.9998` and train first (EMA weights exist after a step)")
    twin = copy.deepcopy(module)
    twin.load_state_dict(weights)
    return twin


def live_ema_module(tr) -> torch.nn.Module:
    """The running EMA of a trainer, for `eval --weights ema` on the current weights."""
    h = tr.events.find(WeightEma)
    if h is not None and h.updates:
        return h.module if h.module is not None else ema_module(tr.built.module, {"handlers": {"ema": h.state_dict()}})
    raise PgError("no EMA weights yet: `set ema 0.9998` and train first (EMA weights exist after a step)")


# ---------------------------------------------------------------- early stopping
class EarlyStopping(Handler):
    """`set patience N` (`min_delta`): stop once `best_metric` has not improved by more than min_delta for N epochs,
    with a line naming the best epoch. The best value, its epoch and the count are checkpointed; a new `train` after
    an early stop starts a fresh count (the best stays)."""

    order = 80
    key = "early_stopping"

    def __init__(self, patience: int, min_delta: float = 0.0, metric: str = "val_accuracy"):
        self.patience, self.min_delta, self.metric = patience, min_delta, metric
        self.best: float | None = None
        self.best_epoch = 0
        self.bad = 0

    def improved(self, value: float) -> bool:
        if not math.isfinite(value):
            return False
        if self.best is None:
            return True
        if self.metric == "val_loss":
            return value < self.best - self.min_delta
        return value > self.best + self.min_delta

    def before_fit(self, tr, ctx) -> None:
        if self.bad >= self.patience:
            self.bad = 0

    def after_epoch(self, tr, ctx) -> None:
        info = ctx.info or {}
        val = info.get("val") or ctx.val
        if not val:
            return
        value = float(val["loss"] if self.metric == "val_loss" else val["accuracy"])
        if self.improved(value):
            self.best, self.best_epoch, self.bad = value, int(info.get("epoch", tr.pos.epoch)), 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            tr.notify(self.reason())
            tr.request("stop", self.reason())

    def reason(self) -> str:
        best = "none yet" if self.best is None else f"{self.best:.4f} at epoch {self.best_epoch}"
        return (f"early stop: {self.metric} has not improved by more than {self.min_delta:g} for {self.bad} epochs; "
                f"best {best} — `eval --checkpoint {self.best_epoch}` to see it, `train` to go on")

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad": self.bad}

    def load_state_dict(self, state: dict) -> None:
        self.best = state.get("best")
        self.best_epoch, self.bad = int(state.get("best_epoch", 0)), int(state.get("bad", 0))


# ---------------------------------------------------------------- layer-wise lr decay
def layer_scales(module: torch.nn.Module, head: set[str], decay: float) -> dict[str, float]:
    """Each trainable parameter's lr factor under layer-wise decay: timm's param_groups_layer_decay grouping (ViT,
    DeiT, DINO blocks; ResNet stages: the model's group_matcher), the head at 1 and each layer towards the input
    `decay` times the one above. Models without a group_matcher (torchvision, your own) are grouped by their
    top-level stages in order, the head last."""
    if hasattr(module, "group_matcher"):
        from timm.optim import param_groups_layer_decay

        groups = param_groups_layer_decay(module, weight_decay=0.0, layer_decay=decay, weight_decay_exclude_1d=False)
        names = {id(p): n for n, p in module.named_parameters()}
        return {names[id(p)]: g["lr_scale"] for g in groups for p in g["params"]}
    stages: dict[str, None] = {}
    for name, p in module.named_parameters():
        if name not in head:
            stages.setdefault(name.split(".", 1)[0])
    order = {stage: i for i, stage in enumerate(stages)}
    top = len(order)
    return {name: 1.0 if name in head else decay ** (top - order[name.split(".", 1)[0]])
            for name, p in module.named_parameters() if p.requires_grad}


def no_weight_decay(module: torch.nn.Module) -> set[str]:
    """Trainable parameters that take no weight decay, by timm's own grouping (param_groups_weight_decay, as its
    optimizer factory calls it): norm weights, biases and other 1-d tensors, and what the model's `no_weight_decay()`
    names (a ViT's pos_embed, cls_token)."""
    from timm.optim import param_groups_weight_decay

    listed = module.no_weight_decay() if hasattr(module, "no_weight_decay") else ()
    groups = param_groups_weight_decay(module, weight_decay=1.0, no_weight_decay_list=listed)
    exempt = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    return {n for n, p in module.named_parameters() if id(p) in exempt}


def describe_groups(optimizer) -> dict[str, str]:
    """The optimizer's parameter groups and their learning rates now, for `show`."""
    if optimizer is None:
        return {}
    out = {}
    for g in optimizer.param_groups:
        label = g.get("role", "params") + (f" x{g['layer_scale']:.3g}" if g.get("layer_scale", 1.0) != 1.0 else "")
        label += " (no weight decay)" if g.get("decay") is False else ""
        names = g.get("names") or []
        first = f": {names[0]}" + (" ..." if len(names) > 1 else "") if names else ""
        out[label] = f"lr {g['lr']:.3g} ({len(g['params'])} tensors{first})"
    return out

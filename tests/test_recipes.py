"""Recipes (engine/recipes.py), the augmentation policy (engine/data.py), layer decay (train.build_optimizer), TTA
(engine/evaluate.py) and the guard rails, each checked against a hand computation or the library it follows.

The handlers are driven the way Trainer.run fires its events (engine/events.py), by a small loop in this file
(`FakeTrainer`) with the trainer attributes the handlers use: cfg, pos, built, optimizer, scaler, splits, request."""

import copy
import io
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgshell.engine import data as D
from pgshell.engine.train import recipes as R
from pgshell.engine.config import TrainConfig, parse_value
from pgshell.engine.errors import PgError
from pgshell.engine.train.events import Ctx, Events
from pgshell.engine.train.loop import build_optimizer

from conftest import make_images, new_session, train_to_end


def _net(classes=3, seed=0) -> torch.nn.Module:
    """A small convnet without BatchNorm or dropout: its batch gradient is the mean of per-image gradients."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                               torch.nn.Flatten(), torch.nn.Linear(4, classes))


HEAD = {"4.weight", "4.bias"}


class FakeTrainer:
    """The lead's loop in miniature: before_batch -> forward -> loss -> after_loss -> backward -> before_step ->
    step unless skip_step -> after_step -> position -> after_batch; at an epoch's end before_validate -> evaluate ->
    after_validate -> after_epoch. Data: fixed random tensors, ordered by engine.data.EpochSampler."""

    def __init__(self, cfg: TrainConfig, n=22, classes=3):
        self.cfg, self.n = cfg, n
        gen = torch.Generator().manual_seed(1)
        self.x = torch.randn(n, 3, 8, 8, generator=gen)
        self.labels = [i % classes if i < n - 4 else 0 for i in range(n)]  # class 0 is the largest
        self.splits = SimpleNamespace(train=[(str(i), lab) for i, lab in enumerate(self.labels)],
                                      classes=[f"c{c}" for c in range(classes)])
        self.val_x = torch.randn(9, 3, 8, 8, generator=gen)
        self.val_y = torch.arange(9) % classes
        self.built = SimpleNamespace(module=_net(classes), head=sorted(HEAD))
        self.optimizer = build_optimizer(self.built.module, HEAD, cfg)
        self.scaler = None
        self.pos = SimpleNamespace(epoch=0, batch=0, sample=0, step=0)
        self.events, self.requests, self.losses, self.vals = Events(), [], [], []
        for h in R.config_handlers(self):
            self.events.add(h)

    @property
    def steps_per_epoch(self) -> int:
        return math.ceil(self.n / self.cfg.batch_size)

    def request(self, what: str, reason: str = "") -> None:
        self.requests.append((what, reason))

    def notify(self, msg: str) -> None:
        pass

    def unscale_gradients(self) -> None:
        pass

    def run(self, batches: int) -> None:
        self.optimizer.zero_grad(set_to_none=True)  # as Trainer.run: nothing is carried over in .grad
        self.events.fire("before_fit", self, Ctx())
        for _ in range(batches):
            if self.requests:
                break
            sampler = D.EpochSampler(self.n, self.cfg.seed, self.pos.epoch, start=self.pos.sample,
                                     weights=R.sample_weights(self.cfg, self.splits))
            idx = [i for i, _ in sampler][: self.cfg.batch_size]
            self._batch(self.x[idx].clone(), torch.tensor([self.labels[i] for i in idx]))
            self.pos.batch += 1
            self.pos.sample += len(idx)
            self.events.fire("after_batch", self, self.ctx)
            if self.pos.sample >= self.n:
                self._end_epoch()

    def _batch(self, x, y) -> None:
        self.ctx = ctx = Ctx(x=x, y=y)
        self.events.fire("before_batch", self, ctx)
        ctx.out = self.built.module(ctx.x)
        ctx.loss = F.cross_entropy(ctx.out, ctx.y)
        self.events.fire("after_loss", self, ctx)
        ctx.loss.backward()
        self.events.fire("before_step", self, ctx)
        if not ctx.skip_step:
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.pos.step += 1
        self.events.fire("after_step", self, ctx)
        self.losses.append(ctx.loss.item())

    def _end_epoch(self) -> None:
        ctx = Ctx()
        self.events.fire("before_validate", self, ctx)
        net = ctx.eval_module or self.built.module
        with torch.no_grad():
            out = net(self.val_x)
        ctx.val = {"loss": F.cross_entropy(out, self.val_y).item(), "accuracy": (out.argmax(1) == self.val_y)
                   .float().mean().item(), "n": 9, "bad": []}
        self.vals.append(ctx.val)
        self.events.fire("after_validate", self, ctx)
        self.pos.epoch, self.pos.batch, self.pos.sample = self.pos.epoch + 1, 0, 0
        ctx.info = {"epoch": self.pos.epoch, "step": self.pos.step, "val": ctx.val}
        self.events.fire("after_epoch", self, ctx)

    def state(self) -> dict:
        return copy.deepcopy({"model": self.built.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                              "pos": vars(self.pos), "handlers": self.events.state_dict()})

    def load(self, state: dict) -> None:
        self.built.module.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.pos = SimpleNamespace(**state["pos"])
        self.events.load_state_dict(state["handlers"])


def _fake(**settings):
    return SimpleNamespace(cfg=TrainConfig(**settings), splits=SimpleNamespace(classes=["a", "b", "c"]),
                           pos=SimpleNamespace(epoch=0, batch=0, sample=0, step=0))


# ------------------------------------------------------------------ every feature at once, paused mid-group
def test_every_recipe_at_once_resumes_exactly_from_a_checkpoint_written_mid_accumulation():
    cfg = dict(batch_size=4, mixup=0.8, cutmix=1.0, mix_prob=0.7, label_smoothing=0.1, accumulate=2, clip_grad=0.5,
               ema=0.9, patience=5, class_weights="balanced", sampler="balanced", layer_decay=0.5, lr=0.05, seed=3)
    whole = FakeTrainer(TrainConfig(**cfg))
    kinds = [type(h).__name__ for h in whole.events.handlers]
    assert kinds == ["MixupCutmix", "Accumulate", "ClipGrad", "WeightEma", "EarlyStopping"]
    whole.run(14)  # 6 batches an epoch (22 images by 4): 2 epochs and 2 batches
    first = FakeTrainer(TrainConfig(**cfg))
    first.run(9)  # epoch 2, batch 3: the second batch of a group of 2 is still to come
    assert first.pos.batch % 2 == 1 and first.state()["handlers"]["accumulate"]["grads"]
    state = first.state()
    first.run(5)  # a pause and a continue in the same process: the run's start clears .grad, the group survives
    resumed = FakeTrainer(TrainConfig(**cfg))  # and a new process from the checkpoint
    resumed.load(state)
    resumed.run(5)
    assert first.losses == whole.losses and resumed.losses == whole.losses[9:]
    assert whole.vals == first.vals and whole.vals[1:] == resumed.vals and len(whole.vals) == 2
    for other in (first, resumed):
        for a, b in zip(whole.built.module.state_dict().values(), other.built.module.state_dict().values()):
            assert torch.equal(a, b)
    ema_a, ema_b = whole.events.state_dict()["ema"], resumed.events.state_dict()["ema"]
    assert ema_a["updates"] == ema_b["updates"] == 7 == whole.pos.step  # 3 steps an epoch (groups 2, 2, 2) + 1
    assert all(torch.equal(ema_a["weights"][k], ema_b["weights"][k]) for k in ema_a["weights"])
    assert whole.events.state_dict()["early_stopping"] == resumed.events.state_dict()["early_stopping"]


# ------------------------------------------------------------------ EMA
@pytest.mark.parametrize("warmup", [False, True])
def test_ema_equals_a_hand_computed_ema(warmup):
    module = torch.nn.Linear(3, 2)
    tr = SimpleNamespace(built=SimpleNamespace(module=module))
    h = R.WeightEma(0.9, warmup=warmup)
    expected = None
    for t in range(1, 7):
        with torch.no_grad():
            module.weight.copy_(torch.arange(6.0).view(2, 3) * t ** 1.5)
            module.bias.fill_(-t)
        h.after_step(tr, Ctx())
        # timm ModelEmaV3: the first update copies; then decay d (warm-up: min(d, 1 - t^(-2/3)))
        d = 0.0 if t == 1 else (min(0.9, 1 - t ** (-2 / 3)) if warmup else 0.9)
        now = {"weight": module.weight.detach().clone(), "bias": module.bias.detach().clone()}
        expected = now if expected is None else {k: d * expected[k] + (1 - d) * now[k] for k in now}
        for k in now:
            assert torch.allclose(getattr(h.module, k), expected[k], atol=1e-5), (t, k)
    h.after_step(tr, Ctx(skip_step=True))  # an accumulation step without an optimizer step: no update
    assert h.updates == 6
    ctx = Ctx()
    h.before_validate(tr, ctx)
    assert ctx.eval_module is h.module
    again = R.WeightEma(0.9, warmup=warmup)
    again.load_state_dict(copy.deepcopy(h.state_dict()))
    assert again.updates == 6
    for t in (h, again):
        t.after_step(tr, Ctx())
    assert torch.equal(h.module.weight, again.module.weight)


# ------------------------------------------------------------------ mixup / cutmix
def test_mixup_cutmix_draws_are_a_function_of_seed_and_position_and_leave_global_rngs_alone():
    tr = _fake(mixup=0.8, cutmix=1.0, label_smoothing=0.1, seed=5)
    x, y = torch.randn(5, 3, 8, 8), torch.tensor([0, 1, 2, 1, 0])

    def draw(epoch, sample):
        tr.pos.epoch, tr.pos.sample = epoch, sample
        h, ctx = R.MixupCutmix(tr), Ctx(x=x.clone(), y=y)
        h.before_batch(tr, ctx)
        return ctx, h.target

    empty = Ctx(x=None, y=None)  # a batch of bad images only
    R.MixupCutmix(tr).before_batch(tr, empty)
    assert empty.x is None and empty.y is None
    np_state, torch_state = np.random.get_state(), torch.get_rng_state()
    (a, ta), (b, tb) = draw(1, 8), draw(1, 8)
    assert torch.equal(a.x, b.x) and torch.equal(ta, tb)
    assert np.array_equal(np.random.get_state()[1], np_state[1]) and torch.equal(torch.get_rng_state(), torch_state)
    others = [draw(1, s) for s in (0, 4, 12, 16)] + [draw(2, 8)]
    assert any(not torch.equal(o.x, a.x) for o, _ in others)
    assert not torch.equal(a.x[:4], x[:4])  # prob 1: the even part is mixed
    assert torch.equal(a.x[4], x[4])  # an odd batch's last image stays, with its smoothed one-hot target
    assert torch.allclose(ta[4], torch.tensor([0.1 / 3 + 0.9, 0.1 / 3, 0.1 / 3]))
    assert torch.allclose(ta.sum(1), torch.ones(5)) and torch.equal(a.y, ta.argmax(1))  # accuracy: dominant label
    out = torch.randn(5, 3)
    a.out, a.loss = out, torch.tensor(0.0)
    h = R.MixupCutmix(tr)
    h.target = ta
    h.after_loss(tr, a)
    from timm.loss import SoftTargetCrossEntropy

    assert torch.allclose(a.loss, SoftTargetCrossEntropy()(out, ta))


def test_class_weights_are_sklearns_balanced_and_the_loss_equals_torchs_weighted_cross_entropy():
    samples = [("", 0)] * 6 + [("", 1)] * 2 + [("", 2)] * 4
    w = R.class_loss_weights(samples, 4)  # 3 classes present, as scikit-learn counts them
    assert torch.allclose(w, torch.tensor([12 / 18, 12 / 6, 12 / 12, 0.0]))
    tr = _fake(class_weights="balanced")
    tr.splits.classes = ["a", "b", "c", "d"]
    h = R.WeightedLoss(tr, w)
    out, y = torch.randn(7, 4), torch.tensor([0, 1, 2, 0, 1, 2, 2])
    ctx = Ctx(out=out, y=y, loss=F.cross_entropy(out, y))
    h.after_loss(tr, ctx)
    assert torch.allclose(ctx.loss, F.cross_entropy(out, y, weight=w))


# ------------------------------------------------------------------ accumulation and clipping
def _accumulated(k: int, micro: list[torch.Tensor], labels: list[torch.Tensor], batches_in_epoch: int):
    module = _net()
    opt = torch.optim.SGD(module.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    tr = SimpleNamespace(pos=SimpleNamespace(batch=0), steps_per_epoch=batches_in_epoch, optimizer=opt,
                         built=SimpleNamespace(module=module))
    h = R.Accumulate(tr, k)
    steps = 0
    for x, y in zip(micro, labels):
        F.cross_entropy(module(x), y).backward()
        ctx = Ctx()
        h.before_step(tr, ctx)
        if not ctx.skip_step:
            opt.step()
            opt.zero_grad()
            steps += 1
        tr.pos.batch += 1
    return module, steps


def test_accumulating_k_batches_of_b_equals_one_batch_of_k_times_b():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 3, 8, 8, generator=gen), torch.randint(0, 3, (10,), generator=gen)
    # 5 batches of 2 in an epoch with K 3: a group of 3 (6 images), then the epoch's last, shorter group of 2 (4)
    acc, steps = _accumulated(3, list(x.split(2)), list(y.split(2)), 5)
    assert steps == 2 == R.optimizer_steps_per_epoch(5, 3)
    ref = _net()
    opt = torch.optim.SGD(ref.parameters(), lr=0.5, momentum=0.9, weight_decay=1e-3)
    for part in (slice(0, 6), slice(6, 10)):  # the same two steps on batches of 6 and 4
        F.cross_entropy(ref(x[part]), y[part]).backward()
        opt.step()
        opt.zero_grad()
    for a, b in zip(acc.parameters(), ref.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    moved = _net()
    assert any(not torch.allclose(a, b, atol=1e-3) for a, b in zip(moved.parameters(), ref.parameters()))


@pytest.mark.parametrize("mode", ["norm", "value"])
def test_clipping_limits_the_gradients_and_waits_for_the_real_step(mode):
    module = _net()
    F.cross_entropy(module(torch.randn(4, 3, 8, 8) * 50), torch.tensor([0, 1, 2, 0])).backward()
    params = list(module.parameters())
    raw = [p.grad.clone() for p in params]
    tr = SimpleNamespace(cfg=TrainConfig(clip_grad=0.01, clip_mode=mode), unscale_gradients=lambda: None,
                         optimizer=torch.optim.SGD(params, lr=0.1))
    R.ClipGrad().before_step(tr, Ctx(skip_step=True))
    assert all(torch.equal(p.grad, g) for p, g in zip(params, raw))
    R.ClipGrad().before_step(tr, Ctx())
    if mode == "norm":
        total = torch.cat([g.flatten() for g in raw]).norm()
        assert total > 0.01 and math.isclose(torch.cat([p.grad.flatten() for p in params]).norm().item(), 0.01,
                                             rel_tol=1e-4)
        assert all(torch.allclose(p.grad, g * 0.01 / total, atol=1e-9) for p, g in zip(params, raw))
    else:
        assert all(torch.equal(p.grad, g.clamp(-0.01, 0.01)) for p, g in zip(params, raw))


# ------------------------------------------------------------------ early stopping
def _epochs(h, values, metric="accuracy"):
    tr = SimpleNamespace(requests=[], pos=SimpleNamespace(epoch=0), notes=[])
    tr.request = lambda what, reason="": tr.requests.append((what, reason))
    tr.notify = tr.notes.append
    stopped = None
    for epoch, v in values:
        h.after_epoch(tr, Ctx(info={"epoch": epoch, "val": {metric: v}}))
        if tr.requests and stopped is None:
            stopped = epoch
    return stopped, tr.requests


def test_early_stopping_stops_at_the_right_epoch_names_the_best_and_resumes_its_count():
    accs = [0.5, 0.6, 0.6, 0.65, 0.64, 0.64, 0.7]
    seq = list(enumerate(accs, start=1))
    h = R.EarlyStopping(patience=2, min_delta=0.01)
    stopped, requests = _epochs(h, seq)
    assert stopped == 6 and len(requests) == 1 and requests[0][0] == "stop"  # 0.6 -> 0.6 is no gain > 0.01
    assert "best 0.6500 at epoch 4" in requests[0][1] and "eval --checkpoint 4" in requests[0][1]
    half = R.EarlyStopping(patience=2, min_delta=0.01)
    _epochs(half, seq[:5])
    again = R.EarlyStopping(patience=2, min_delta=0.01)
    again.load_state_dict(copy.deepcopy(half.state_dict()))
    assert _epochs(again, seq[5:])[0] == 6
    loss = R.EarlyStopping(patience=1, metric="val_loss")
    assert _epochs(loss, [(1, 1.0), (2, 0.9), (3, float("nan"))], metric="loss")[0] == 3
    loss.before_fit(None, Ctx())  # a new `train` after the stop: a fresh count, the best kept
    assert loss.bad == 0 and loss.best == 0.9 and loss.best_epoch == 2


# ------------------------------------------------------------------ class balance
def test_the_balanced_sampler_draws_each_class_equally_is_seeded_and_resumes_mid_epoch():
    labels = [0] * 90 + [1] * 10
    samples = [("", lab) for lab in labels]
    w = D.balanced_sample_weights(samples, 2)
    counts = [0, 0]
    for epoch in range(40):
        for i, _ in D.EpochSampler(100, 7, epoch, weights=w):
            counts[labels[i]] += 1
    assert abs(counts[1] / sum(counts) - 0.5) < 0.02  # 4,000 draws: the standard deviation is 0.008
    full = list(D.EpochSampler(100, 7, 3, weights=w))
    assert full == list(D.EpochSampler(100, 7, 3, weights=w)) and full != list(D.EpochSampler(100, 7, 4, weights=w))
    assert list(D.EpochSampler(100, 7, 3, start=40, weights=w)) == full[40:]
    shards = [list(D.EpochSampler(100, 7, 3, start=40, weights=w, rank=r, world=2)) for r in range(2)]
    assert sorted(shards[0] + shards[1]) == sorted(full[40:])
    seeds = {}
    for i, s in full:
        seeds.setdefault(i, set()).add(s)
    assert any(len(v) > 1 for v in seeds.values())  # an image drawn twice is augmented twice, differently
    assert D.imbalance_warning(SimpleNamespace(train=samples, classes=["big", "small"])).startswith(
        "the classes are imbalanced: 'big' has 90 training images, 'small' 10 (9.0x)")
    assert D.imbalance_warning(SimpleNamespace(train=samples[:45] + samples[-10:], classes=["a", "b"])) == ""


# ------------------------------------------------------------------ layer-wise lr decay
@pytest.mark.parametrize("name", ["test_vit", "test_resnet"])
def test_layer_decay_groups_have_timms_layer_scales_times_the_backbone_scale(name):
    import timm
    from timm.optim import param_groups_layer_decay

    model = timm.create_model(name, num_classes=3)
    head = {n for n, p in model.named_parameters() if any(p is q for q in model.get_classifier().parameters())}
    model.get_parameter(sorted(n for n, _ in model.named_parameters())[0]).requires_grad_(False)  # one frozen tensor
    cfg = TrainConfig(lr=0.1, layer_decay=0.5, backbone_lr_scale=0.2)
    opt = build_optimizer(model, head, cfg)
    theirs = {}
    ids = {id(p): n for n, p in model.named_parameters()}
    for g in param_groups_layer_decay(model, weight_decay=0.0, layer_decay=0.5):
        theirs.update({ids[id(p)]: g["lr_scale"] for p in g["params"]})
    ours = {n: g["lr"] for g in opt.param_groups for n in g["names"]}
    assert ours.keys() == theirs.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    for n, lr in ours.items():
        assert math.isclose(lr, 0.1 * theirs[n] * (1.0 if n in head else 0.2)), n
    assert opt.param_groups[0]["role"] == "head" and opt.param_groups[0]["lr"] == 0.1
    assert len({s for s in theirs.values()}) >= 5 and len(opt.param_groups) == len(set(theirs.values()))
    plain = build_optimizer(model, head, cfg.replace(layer_decay=1.0))
    assert [g["role"] for g in plain.param_groups] == ["head", "backbone"]
    assert [g["lr"] for g in plain.param_groups] == [0.1, 0.1 * 0.2]
    assert "x0.0625" in " ".join(R.describe_groups(opt))


def test_layer_decay_without_a_group_matcher_goes_by_top_level_stages():
    scales = R.layer_scales(_net(), HEAD, 0.5)
    assert scales == {"0.weight": 0.5, "0.bias": 0.5, "4.weight": 1.0, "4.bias": 1.0}


# ------------------------------------------------------------------ TTA
def test_flip_tta_is_the_mean_of_the_plain_and_the_flipped_logits(tmp_path):
    import timm

    from pgshell.engine.train.device import resolve_runtime
    from pgshell.engine.report.evaluate import evaluate_dataset

    root = make_images(tmp_path / "imgs", per_class=4)
    samples = [(str(p), c) for c, name in enumerate(("cat", "dog", "fox")) for p in sorted((root / name).iterdir())]
    torch.manual_seed(0)
    net = timm.create_model("test_resnet", num_classes=3)
    ds = D.ImageDataset(samples, D.build_transform(D.policy_data_config(net.pretrained_cfg), train=False, size=32))
    rt = resolve_runtime("cpu", "off", "off")
    plain = evaluate_dataset(net, ds, torch.nn.CrossEntropyLoss(), rt, 8, collect=True)
    tta = evaluate_dataset(net, ds, torch.nn.CrossEntropyLoss(), rt, 8, collect=True, tta="flip")
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    net.eval()
    with torch.no_grad():
        expected = (net(x) + net(x.flip(-1))) / 2
    assert torch.allclose(plain["logits"], net(x).detach(), atol=1e-5)
    assert torch.allclose(tta["logits"], expected, atol=1e-5) and not torch.allclose(tta["logits"], plain["logits"])
    assert tta["loss"] == pytest.approx(F.cross_entropy(expected, tta["labels"]).item(), rel=1e-5)


# ------------------------------------------------------------------ the augmentation policy
DATA_CONFIG = {"input_size": (3, 160, 160), "interpolation": "bicubic", "mean": (0.5, 0.5, 0.5),
               "std": (0.5, 0.5, 0.5), "crop_pct": 0.875, "crop_mode": "center"}


def test_the_default_policy_is_exactly_timms_transform_and_each_setting_reaches_it():
    for train in (True, False):
        assert repr(D.build_transform(DATA_CONFIG, train, 32, policy=TrainConfig())) == \
            repr(D.build_transform(DATA_CONFIG, train, 32))
    cfg = TrainConfig(crop_scale=0.5, crop_ratio=1.0, hflip=0.0, vflip=0.3, color_jitter=0.0, random_erasing=0.25,
                      auto_augment="rand-m9-mstd0.5", crop_pct=1.0, interpolation="nearest", normalize="none")
    text = repr(D.build_transform(DATA_CONFIG, True, 32, policy=cfg))
    assert "scale=(0.5, 1.0)" in text and "ratio=(1.0, 1.0)" in text and "interpolation=nearest" in text
    assert "RandomHorizontalFlip" not in text and "RandomVerticalFlip(p=0.3)" in text and "ColorJitter" not in text
    assert "RandAugment" in text and "RandomErasing" in text
    ev = D.build_transform(DATA_CONFIG, False, 32, policy=cfg)
    img = D.Image.fromarray(np.arange(32 * 32 * 3, dtype=np.uint8).reshape(32, 32, 3) % 251)
    from torchvision.transforms.functional import to_tensor

    assert torch.equal(ev(img), to_tensor(img))  # no border cut, no resampling at 32 px, no normalisation
    assert D.policy_data_config(DATA_CONFIG, TrainConfig(normalize="imagenet"))["mean"] == (0.485, 0.456, 0.406)
    assert D.normalisation(parse_value("normalize", "0.5/0.25")) == ((0.5,) * 3, (0.25,) * 3)
    assert D.input_cache_unsupported(TrainConfig()) == []
    assert D.input_cache_unsupported(cfg) == ["crop_scale", "crop_ratio", "hflip", "vflip", "color_jitter",
                                              "auto_augment", "random_erasing", "interpolation"]
    reads = ("crop_scale", "crop_ratio", "hflip", "vflip", "color_jitter")
    assert D.input_cache_unsupported(cfg, reads) == ["auto_augment", "random_erasing", "interpolation"]
    assert D.input_cache_unsupported(TrainConfig(interpolation="bilinear", crop_pct=1.0, normalize="none")) == []
    shown = D.describe_policy(DATA_CONFIG, TrainConfig(), 32)
    assert shown["training"].startswith("random resized crop to 32px, area 0.08-1, ratio 0.75-1.33; hflip 0.5")
    assert shown["evaluation"] == "resize to 36px (bicubic), centre crop 32px (crop_pct 0.875)"


def test_bad_policy_values_are_one_clear_line():
    for name, value in (("auto_augment", "x"), ("normalize", "x"), ("normalize", "0.5/0"), ("normalize", "1,2/3,4"),
                        ("crop_scale", "0"), ("interpolation", "cubic"), ("ema", "1")):
        with pytest.raises(PgError):
            parse_value(name, value)
    assert parse_value("auto_augment", "None") == "none"
    with pytest.raises(PgError, match="timm cannot build the augmentation"):
        D.build_transform(DATA_CONFIG, True, 32, policy=TrainConfig(auto_augment="rand-zz9"))


def test_small_images_get_a_hint_for_a_milder_policy(tmp_path):
    root = make_images(tmp_path / "imgs", per_class=3, px=32)
    splits = D.scan_folder(str(root), split=0.34)
    hint = D.small_image_hint(splits, 0, TrainConfig())
    assert "(32 px)" in hint and "`set crop_scale 0.5`, `set color_jitter 0`, `set crop_pct 1`" in hint
    assert D.small_image_hint(splits, 0, TrainConfig(crop_scale=0.5, color_jitter=0.0, crop_pct=1.0)) == ""
    assert D.small_image_hint(splits, 0, TrainConfig(augment=False)) == ""
    big = D.scan_folder(str(make_images(tmp_path / "big", per_class=3, px=96)), split=0.34)
    assert D.small_image_hint(big, 0, TrainConfig()) == "" and "(48 px)" in D.small_image_hint(big, 48, TrainConfig())


# ------------------------------------------------------------------ guard rails
def test_load_without_weights_says_random_initialisation_and_freezing_it_warns(tmp_path):
    from pgshell.shell import PgShell

    app = PgShell(interactive=False, sessions_dir=str(tmp_path / "s"), stdout=io.StringIO())
    try:
        assert app.onecmd_plus_hooks("load test_resnet --classes 3") is False
        out = app.stdout.getvalue()
        assert "random initialisation: no pretrained weights loaded" in out
        app.onecmd_plus_hooks("freeze")
        assert "warning: the frozen backbone of test_resnet" in app.stdout.getvalue()
        app.onecmd_plus_hooks("freeze none")
        assert app.session.random_backbone_warning() == ""
        app.session.spec.weights = "trained.safetensors"
        app.onecmd_plus_hooks("freeze layer1")
        assert app.session.random_backbone_warning() == ""
    finally:
        app.session.close(save=False)


def test_data_hints_at_a_milder_policy_and_show_prints_the_policy_and_the_lr_groups(tmp_path):
    from pgshell.shell import PgShell

    root = make_images(tmp_path / "imgs", per_class=6)
    app = PgShell(interactive=False, sessions_dir=str(tmp_path / "s"), stdout=io.StringIO())
    try:
        for line in (f"data {root} --split 0.34", "load test_resnet", "set layer_decay 0.5", "set crop_pct 1.0",
                     "train --steps 1", "show"):
            assert app.onecmd_plus_hooks(line) is False, line
        out = app.stdout.getvalue()
        assert "the images are small (32 px)" in out and "`set crop_scale 0.5`, `set color_jitter 0`" in out
        shown = app.last_result
        assert shown["augmentation"]["evaluation"] == "resize to 160px (bilinear), centre crop 160px (crop_pct 1)"
        groups = shown["lr groups"]
        assert list(groups)[:2] == ["head", "backbone x0.5"] and len(groups) == 6  # stem, 4 stages, head
        assert groups["backbone x0.5"].startswith("lr 0.0005 ")
    finally:
        app.session.close(save=False)


def test_lrfind_suggestions_lie_before_the_divergence_and_the_legend_says_minimum_over_10(tmp_path, monkeypatch):
    from pgshell.engine.train.lrfind import suggest
    from pgshell.session.study import write_lrfind_png

    # falls to its lowest at 1e-2, climbs to 5.5 by 0.3, then falls steeply to 3.5 (still above its start, 3):
    # the steepest slope of the whole curve lies past the divergence
    lrs = [10 ** (-5 + 6 * i / 100) for i in range(101)]

    def loss(lr):
        t = math.log10(lr)
        if t <= -2:
            return 2 - math.tanh(2 * (t + 3.5))
        if t <= -0.5:
            return 1.0 + 2.0 * (t + 2) ** 2
        return max(3.5, 5.5 - 10 * (t + 0.5))

    curve = [loss(lr) for lr in lrs]
    low = lrs[curve.index(min(curve))]
    s = suggest(lrs, curve)
    assert all(s[k] <= low for k in ("steepest", "valley")) and math.isclose(s["minimum"], low / 10)
    assert math.isclose(math.log10(s["steepest"]), -3.5, abs_tol=0.07)
    labels = []
    monkeypatch.setattr("matplotlib.figure.Figure.savefig", lambda fig, *a, **k: labels.extend(
        t.get_text() for t in fig.axes[0].get_legend().get_texts()))
    write_lrfind_png({"lrs": lrs, "losses": curve, "smoothed": curve, **s}, str(tmp_path / "lr.png"))
    assert labels[2:] == [f"valley {s['valley']:.2e}", f"steepest descent {s['steepest']:.2e}",
                          f"minimum/10 {s['minimum']:.2e}"]
    with pytest.raises(PgError, match="never fell"):
        suggest(lrs, [1 + 0.01 * i for i in range(101)])


def test_tune_can_search_the_policy_and_the_recipes():
    from pgshell.engine.search.space import parse_space

    space = parse_space("mixup=0:0.8 ema=0,0.999 crop_scale=0.08:0.8 auto_augment=none,rand-m9-mstd0.5 accumulate=1:4",
                        100)
    assert space["mixup"].kind == "range" and (space["mixup"].low, space["mixup"].high) == (0.0, 0.8)
    assert space["ema"].choices == (0.0, 0.999) and space["auto_augment"].choices == ("none", "rand-m9-mstd0.5")
    assert space["accumulate"].integer and space["crop_scale"].high == 0.8
    with pytest.raises(PgError, match="auto_augment"):
        parse_space("auto_augment=none,x", 100)


# ------------------------------------------------------------------ end to end, through the session and Trainer.run
WAIT = 300  # seconds: a tiny run on a loaded 2-core machine
ALL = dict(batch_size=8, lr=0.05, mixup=0.8, cutmix=1.0, mix_prob=0.8, label_smoothing=0.1, accumulate=2,
           clip_grad=1.0, ema=0.9, patience=5, class_weights="balanced", sampler="balanced", layer_decay=0.8,
           tta="flip", crop_scale=0.5, color_jitter=0.0, random_erasing=0.25, vflip=0.5)


def _session(tmp_path, folder, name, **settings):
    settings.setdefault("batch_size", None)  # the default batch size unless the test sets one
    return new_session(tmp_path / "sessions", folder, name, **settings)


def _train(s, **kw):
    train_to_end(s, **kw)


class _PauseAt:
    """Asks for a pause once the position reaches (epoch, batch): a cut anywhere, whatever a step counts."""

    order = 50
    key = None

    def __init__(self, epoch: int, batch: int):
        self.at = (epoch, batch)

    def after_batch(self, tr, ctx):
        if (tr.pos.epoch, tr.pos.batch) == self.at:
            tr.request("pause")


def _snapshot(s):
    from pgshell.engine.train.metrics import EXACT_COLUMNS, read_rows

    tr = s.trainer
    states = copy.deepcopy(tr.events.state_dict())
    return ({k: v.clone() for k, v in s.built.module.state_dict().items()},
            [tuple(r[c] for c in EXACT_COLUMNS) for r in read_rows(s.folder / "metrics.csv")], states)


def _same(a, b) -> None:
    weights_a, rows_a, states_a = a
    weights_b, rows_b, states_b = b
    assert all(torch.equal(weights_a[n], weights_b[n]) for n in weights_a)
    assert rows_a == rows_b
    ema_a, ema_b = states_a["ema"], states_b["ema"]
    assert ema_a["updates"] == ema_b["updates"] and ema_a["weights"].keys() == ema_b["weights"].keys()
    assert all(torch.equal(ema_a["weights"][k], ema_b["weights"][k]) for k in ema_a["weights"])
    assert states_a["early_stopping"] == states_b["early_stopping"]


@pytest.mark.parametrize("cut", [(0, 1), (0, 3), (1, 1)])  # mid-group each: batch 1 or 3 of an epoch, accumulate 2
def test_exact_mid_epoch_resume_in_a_new_session_with_every_recipe_on(tmp_path, split_folder, cut):
    from pgshell.session import Session

    ref = _session(tmp_path, split_folder, "ref", **ALL)
    _train(ref, epochs=2)
    kinds = [type(h).__name__ for h in ref.trainer.events.handlers]
    assert {"MixupCutmix", "Accumulate", "ClipGrad", "WeightEma", "EarlyStopping"} <= set(kinds)
    reference = _snapshot(ref)
    assert reference[2]["ema"]["updates"] == 4  # 4 batches an epoch (30 images by 8), a step every 2
    ref.close(save=False)
    s = _session(tmp_path, split_folder, "cut", **ALL)
    s.ensure_trainer().add_handler(_PauseAt(*cut))
    _train(s, epochs=2)
    assert s.paused and (s.trainer.pos.epoch, s.trainer.pos.batch) == cut
    assert s.trainer.events.state_dict()["accumulate"]["grads"]  # the cut holds half a group
    file = s.save()
    s.close(save=False)
    torch.manual_seed(12345)  # disturb the global RNG: resuming must not depend on the process's history
    r = Session.open(file)
    _train(r, epochs=2 - r.trainer.pos.epoch)
    assert r.trainer.pos.epoch == 2
    _same(_snapshot(r), reference)
    r.close(save=False)


def test_a_per_step_schedule_under_accumulation_resumes_exactly(tmp_path, split_folder):
    from pgshell.session import Session

    settings = dict(batch_size=8, accumulate=2, scheduler="cosine", epochs=2, lr=0.05)
    ref = _session(tmp_path, split_folder, "ref", **settings)
    _train(ref, epochs=2)
    reference = _snapshot(ref)[:2]
    assert ref.trainer.lr == pytest.approx(0.0, abs=1e-12)  # the cosine ends at the run's last optimizer step
    ref.close(save=False)
    s = _session(tmp_path, split_folder, "cut", **settings)
    s.ensure_trainer().add_handler(_PauseAt(1, 1))
    _train(s, epochs=2)
    file = s.save()
    s.close(save=False)
    r = Session.open(file)
    _train(r, epochs=2 - r.trainer.pos.epoch)
    weights, rows, _ = _snapshot(r)
    assert rows == reference[1] and all(torch.equal(weights[n], reference[0][n]) for n in weights)
    r.close(save=False)


def test_early_stopping_through_the_loop_stops_with_a_line_naming_the_best_epoch(tmp_path, split_folder):
    notes = []
    s = _session(tmp_path, split_folder, "es", batch_size=8, lr=0.0, patience=2)
    s.notify = notes.append
    _train(s, epochs=6)  # lr 0: the validation never improves after epoch 1
    assert s.trainer.pos.epoch == 3 and s.target is None
    assert any(n.startswith("early stop: val_accuracy has not improved by more than 0 for 2 epochs; best")
               and "at epoch 1" in n for n in notes), notes
    s.close(save=False)


# ------------------------------------------------------------------ the Trainer's wiring of the policy and recipes


def _trainer(tmp_path, folder, **settings):
    s = _session(tmp_path, folder, "w", **settings)
    return s, s.ensure_trainer()


def test_the_trainer_uses_the_policy_tta_and_keeps_layer_scales_live(tmp_path, split_folder):
    from pgshell.engine.report import evaluate as E

    policy = dict(crop_scale=0.5, hflip=0.0, color_jitter=0.0, crop_pct=1.0, normalize="imagenet", tta="flip",
                  layer_decay=0.5, batch_size=8)
    s, tr = _trainer(tmp_path, split_folder, **policy)
    cfg = s.config
    spec = tr.data_spec()
    assert repr(spec.transform(True)) == repr(D.build_transform(s.built.data_config, True, 32, policy=cfg))
    assert repr(spec.transform(False)) == repr(D.build_transform(s.built.data_config, False, 32, policy=cfg))
    res = tr.evaluate("val", collect=True)
    ref = E.evaluate_dataset(tr.net, spec.dataset("val"), tr.loss_fn, tr.runtime, 8, collect=True, tta="flip")
    assert torch.equal(res["logits"], ref["logits"])
    scales = [g["lr"] / 0.001 for g in tr.optimizer.param_groups]
    tr.apply_live("lr", 0.01)
    assert [g["lr"] / 0.01 for g in tr.optimizer.param_groups] == pytest.approx(scales) and len(set(scales)) > 2
    s.close(save=False)


def test_the_balanced_sampler_reaches_the_loop_and_images_are_kept_for_mixup_and_tta(tmp_path):
    from pgshell.engine.batches.features import FeatureSource

    root = make_images(tmp_path / "imb", classes=("big",), per_class=20)
    make_images(root, classes=("small",), per_class=4, seed=3)
    s, tr = _trainer(tmp_path, root, sampler="balanced", batch_size=8, lr=0.0)
    seen = []

    class Count:
        order, key = 50, None

        def before_batch(self, tr, ctx):
            seen.extend(ctx.y.tolist())

    tr.add_handler(Count())
    s.train(epochs=4)
    assert s.wait(WAIT) and "error" not in s.status
    small = s.splits.classes.index("small")
    assert abs(seen.count(small) / len(seen) - 0.5) < 0.2 and len(seen) == 4 * len(s.splits.train)
    s.freeze(["backbone"])
    for name, value in (("mixup", 0.8), ("tta", "flip")):
        s.set(name, value)
        assert not FeatureSource.applies(s.ensure_trainer().data_spec())  # it would hand the loop features
        s.set(name, {"mixup": 0.0, "tta": "none"}[name])
    assert FeatureSource.applies(s.ensure_trainer().data_spec())
    s.close(save=False)


# ------------------------------------------------------------------ finetune
def test_finetune_as_one_command_equals_the_same_steps_typed_by_hand_and_resumes_in_its_first_phase(
        tmp_path, split_folder):
    from pgshell.engine.train.metrics import read_rows
    from pgshell.session import Session
    from pgshell.shell import PgShell

    hand = PgShell(interactive=False, sessions_dir=str(tmp_path / "hand"), stdout=io.StringIO())
    one = PgShell(interactive=False, sessions_dir=str(tmp_path / "one"), stdout=io.StringIO())
    try:
        for app in (hand, one):
            for line in ("set batch_size 8", f"data {split_folder} --size 32", "load test_resnet"):
                assert app.onecmd_plus_hooks(line) is False
        for line in ("freeze", "train 1", "unfreeze all", "set backbone_lr_scale 0.1", "train 2"):
            hand.onecmd_plus_hooks(line)
        one.onecmd_plus_hooks("finetune 2 --head-epochs 1")
        out = one.stdout.getvalue()
        assert "finetune: the head for 1 epoch with the backbone frozen (epoch 1 to 1)" in out
        assert "finetune: the backbone unfrozen (backbone lr x 0.1), epoch 2 to 3" in out
        a, b = _snapshot(hand.session)[:2], _snapshot(one.session)[:2]
        assert a[1] == b[1] and len(a[1]) == 3 * 4 + 3 and all(torch.equal(a[0][n], b[0][n]) for n in a[0])
        runs = [[r["run"] for r in read_rows(app.session.folder / "metrics.csv") if r["split"] == "train"]
                for app in (hand, one)]
        assert runs[0] == runs[1] == runs[1][:1] * 4 + [str(int(runs[1][0]) + 1)] * 8  # two phases, two runs
        assert one.session.config.backbone_lr_scale == 0.1 and all(
            p.requires_grad for p in one.session.built.module.parameters())
        # paused in the first phase, reopened in a new session: the rest of the recipe follows
        cut = _session(tmp_path, split_folder, "cut", batch_size=8)
        cut.ensure_trainer().add_handler(_PauseAt(0, 2))
        cut.finetune(2, head_epochs=1)
        assert cut.wait(WAIT) and cut.paused and cut.target["unfreeze_at"] == 1
        file = cut.save()
        cut.close(save=False)
        r = Session.open(file)
        r.resume()
        assert r.wait(WAIT) and "error" not in r.status and r.target is None
        c = _snapshot(r)[:2]
        assert c[1] == b[1] and all(torch.equal(c[0][n], b[0][n]) for n in b[0])
        r.close(save=False)
    finally:
        hand.session.close(save=False)
        one.session.close(save=False)


def test_eval_weights_ema_gives_the_validation_logged_with_ema_on_and_live_differs(tmp_path, split_folder):
    from pgshell.session import review as A

    s = _session(tmp_path, split_folder, "ema", batch_size=8, ema=0.9, lr=0.05)
    _train(s, epochs=1)
    logged = (s.trainer.last["val_loss"], s.trainer.last["val_accuracy"])
    for checkpoint in (None, "1"):
        ema = A.evaluate(s, ["val"], checkpoint, weights="ema")[0]
        assert (ema["loss"], ema["accuracy"]) == logged
    live = A.evaluate(s, ["val"], weights="live")[0]
    assert live["loss"] != logged[0]
    plain = _session(tmp_path, split_folder, "plain", batch_size=8)
    with pytest.raises(PgError, match="no EMA weights yet"):
        A.evaluate(plain, ["val"], weights="ema")
    s.close(save=False)
    plain.close(save=False)


def test_export_describes_the_evaluation_policy_of_the_live_model_and_of_a_checkpoint(tmp_path, split_folder):
    from pgshell.session import review as A

    s = _session(tmp_path, split_folder, "pol", batch_size=8, crop_pct=1.0, normalize="0.5/0.25",
                 interpolation="nearest")
    _train(s, steps=1)
    s.save()
    for checkpoint in (None, "last"):
        pre = A.export(s, "torchscript", str(tmp_path / f"m-{checkpoint}.pt"), checkpoint)["preprocessing"]
        assert (pre["crop_pct"], pre["mean"], pre["std"], pre["interpolation"]) == (1.0, [0.5] * 3, [0.25] * 3,
                                                                                      "nearest")
    s.close(save=False)


def test_eval_tta_flip_is_the_flip_mean_also_where_the_run_trains_on_stored_features(app, split_folder):
    from pgshell.engine.report import evaluate as E

    from conftest import run

    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "set augment off",
                 "freeze backbone", "train 1"):
        assert run(app, line)[0], line
    app.session.wait()
    tr = app.session.trainer
    assert tr.source.kind == "feature cache"  # the head trains on stored features: they cannot be mirrored
    ds = tr.data_spec().dataset("val")
    ref = {t: E.evaluate_dataset(tr.built.module, ds, tr.loss_fn, tr.runtime, 8, collect=True, tta=t)
           for t in ("none", "flip")}
    ok, plain = run(app, "eval")
    ok2, flip = run(app, "eval --tta flip")
    assert ok and ok2
    assert plain["val"]["loss"] == pytest.approx(ref["none"]["loss"], rel=1e-5)
    assert flip["val"]["loss"] == pytest.approx(ref["flip"]["loss"], rel=1e-5)
    assert flip["val"]["loss"] != pytest.approx(plain["val"]["loss"], rel=1e-5)
    assert flip["val"]["tta"] == "flip" and plain["val"]["tta"] == "none"
    assert app.session.config.tta == "none"  # the option is for this evaluation only


def test_the_parity_benchmark_runs_both_loops_alike(split_folder):
    """benchmarks/parity.py on a model without BatchNorm at lr 0: no step changes anything, so the plain loop and
    pgshell evaluate the same initial weights with the same evaluation transform, to the same accuracy."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    from conftest import ROOT, pgshell_env

    cmd = [sys.executable, str(Path(ROOT) / "benchmarks" / "parity.py"), "--data", str(split_folder), "--model",
           "test_vit", "--size", "32", "--epochs", "1", "--seeds", "0", "--set", "lr=0", "--set", "batch_size=8"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=pgshell_env(OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "warning" not in r.stdout, r.stdout
    plain, ours = re.search(r"seed 0: plain\s+([\d.]+)%.*pgshell\s+([\d.]+)%", r.stdout).groups()
    assert plain == ours and "difference of the means: +0.0 points" in r.stdout

"""The lr schedules against torch's own schedulers at every step, and the notice about a schedule's span."""

import math
import warnings

import pytest
import torch
from torch.optim import lr_scheduler as L

from pgshell.engine.config import TrainConfig
from pgshell.engine.train.schedule import lr_factor, schedule_notice

LRS = (0.1, 0.01)  # a head group and a backbone group at backbone_lr_scale 0.1: the factor scales both alike


def _optimizer():
    groups = [{"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr, "initial_lr": lr} for lr in LRS]
    return torch.optim.SGD(groups, lr=LRS[0])


def _torch_lrs(make, n):
    """Each group's lr at counts 0 .. n-1 under a torch scheduler stepped once per count."""
    opt = _optimizer()
    with warnings.catch_warnings():  # SequentialLR's internal step(0) warns about the epoch argument
        warnings.simplefilter("ignore")
        sched, out = make(opt), []
        for _ in range(n):
            out.append([g["lr"] for g in opt.param_groups])
            opt.step()
            sched.step()
    return out


def _ours(cfg, spe, n, start=0):
    """The same as the Trainer drives it: LambdaLR over our factor, built at count `start` (a resume) and stepped."""
    fn, unit = lr_factor(cfg, spe)
    opt = _optimizer()
    sched, out = L.LambdaLR(opt, fn, last_epoch=start - 1), []
    for _ in range(start, n):
        out.append([g["lr"] for g in opt.param_groups])
        opt.step()
        sched.step()
    return out, unit


def _same(ours, ref):
    assert len(ours) == len(ref)
    for s, (a, b) in enumerate(zip(ours, ref)):
        assert a == pytest.approx(b, rel=1e-9, abs=1e-15), f"count {s}: {a} != {b}"


@pytest.mark.parametrize("step_size,gamma", [(7, 0.1), (1, 0.5), (3, 0.0), (2, 1.5)])
def test_step_equals_torch_steplr_every_epoch(step_size, gamma):
    cfg = TrainConfig(lr=LRS[0], scheduler="step", step_size=step_size, gamma=gamma)
    ours, unit = _ours(cfg, 5, 30)
    assert unit == "epoch"
    _same(ours, _torch_lrs(lambda o: L.StepLR(o, step_size=step_size, gamma=gamma), 30))


def _torch_cosine(total, warm):
    """SequentialLR of LinearLR (warm-up to the peak on its last step) and CosineAnnealingLR over the rest."""
    if warm == 0:
        return lambda o: L.CosineAnnealingLR(o, T_max=total)
    return lambda o: L.SequentialLR(o, [L.LinearLR(o, start_factor=1 / warm, end_factor=1.0, total_iters=warm - 1),
                                        L.CosineAnnealingLR(o, T_max=total - warm)], milestones=[warm])


@pytest.mark.parametrize("epochs,spe,warmup", [(2, 4, 1), (25, 3, 0), (5, 7, 0.5), (3, 10, 2), (4, 1, 1), (1, 1, 0)])
def test_cosine_equals_torch_warmup_then_cosine_every_step(epochs, spe, warmup):
    cfg = TrainConfig(lr=LRS[0], scheduler="cosine", epochs=epochs, warmup_epochs=warmup)
    total, warm = epochs * spe, int(warmup * spe)
    ours, unit = _ours(cfg, spe, total)
    assert unit == "step"
    _same(ours, _torch_lrs(_torch_cosine(total, warm), total))
    # past the span torch's cosine climbs back up; ours holds the value torch reaches at T_max: 0
    fn, _ = lr_factor(cfg, spe)
    assert [fn(s) for s in range(total, total + 2 * spe)] == [0.0] * (2 * spe)


def _torch_onecycle(total):
    return lambda o: L.OneCycleLR(o, max_lr=list(LRS), total_steps=total, pct_start=0.3, div_factor=25,
                                  final_div_factor=1e4, anneal_strategy="cos", three_phase=False,
                                  cycle_momentum=False)


@pytest.mark.parametrize("epochs,spe", [(1, 1), (2, 1), (3, 1), (4, 1), (2, 4), (10, 3), (3, 33), (25, 12)])
def test_onecycle_equals_torch_onecyclelr_every_step(epochs, spe):
    cfg = TrainConfig(lr=LRS[0], scheduler="onecycle", epochs=epochs)
    total = epochs * spe
    ours, unit = _ours(cfg, spe, total)
    assert unit == "step"
    _same(ours, _torch_lrs(_torch_onecycle(total), total))
    fn, _ = lr_factor(cfg, spe)  # past the end (torch raises): the final lr is held
    assert [fn(s) for s in range(total, total + 3)] == [fn(total - 1)] * 3


def test_onecycle_over_30_steps_peaks_at_step_8_and_ends_at_lr_over_250000():
    """The defect: the peak came a step late and the final lr was 5.6e-4 where torch reaches 4e-7."""
    fn, _ = lr_factor(TrainConfig(lr=0.1, scheduler="onecycle", epochs=30), 1)
    lrs = [0.1 * fn(s) for s in range(30)]
    assert max(range(30), key=lrs.__getitem__) == 8 and lrs[8] == pytest.approx(0.1)
    assert lrs[0] == pytest.approx(0.004) and lrs[-1] == pytest.approx(4e-7, rel=1e-9)
    # the old code's last lr, 5.6e-4, is torch's one step earlier
    assert lrs[-2] == pytest.approx(4e-7 + (0.1 - 4e-7) * 0.5 * (1 + math.cos(math.pi * 20 / 21)), rel=1e-9)


@pytest.mark.parametrize("cfg", [TrainConfig(scheduler="onecycle", epochs=3, lr=0.1),
                                 TrainConfig(scheduler="cosine", epochs=3, warmup_epochs=1, lr=0.1),
                                 TrainConfig(scheduler="step", step_size=1, gamma=0.5, lr=0.1)])
def test_schedule_rebuilt_mid_run_continues_exactly(cfg):
    """Resume and freeze changes rebuild the scheduler at the current count: the lrs go on as if never rebuilt."""
    straight, _ = _ours(cfg, 5, 15)
    for k in (1, 4, 5, 11):
        resumed, _ = _ours(cfg, 5, 15, start=k)
        assert resumed == straight[k:]


# ---------------------------------------------------------------- the notice about the schedule's span
def _notice(spe, start, end, **settings):
    return schedule_notice(TrainConfig(**settings), spe, start, end)


def test_notice_when_a_run_stops_before_the_schedule_ends():
    # the case: 96 batches an epoch, `train 8` with the default 25 epochs, lr 0.01
    lr_end = 0.01 * 0.5 * (1 + math.cos(math.pi * 767 / 2400))  # the lr of the run's last step
    assert f"{lr_end:.2g}" == "0.0077"
    assert _notice(96, 0, 768, scheduler="cosine", lr=0.01) == (
        "the cosine schedule spans 25 epochs; this run stops at epoch 8 with lr 0.0077 — `set epochs 8` to end it there")
    # a later chunk says where that one stops; one-cycle the same way (step 11 of 30 at lr 0.1: 0.095)
    assert "stops at epoch 16 with lr 0.0029 — `set epochs 16`" in _notice(96, 768, 1536, scheduler="cosine", lr=0.01)
    assert _notice(3, 0, 12, scheduler="onecycle", epochs=10, lr=0.1) == (
        "the one-cycle schedule spans 10 epochs; this run stops at epoch 4 with lr 0.095 — `set epochs 4` to end it "
        "there")


def test_notice_when_a_run_goes_past_the_schedules_end():
    # `set scheduler cosine`, `set epochs 4`, `train`, `train 2` (4 batches an epoch): epochs 5-6 at lr 0
    assert _notice(4, 16, 24, scheduler="cosine", epochs=4, lr=0.01) == (
        "the cosine schedule ended at epoch 4: this run trains at lr 0 — `set epochs 6` to stretch the schedule to "
        "the end of this run")
    assert _notice(4, 0, 24, scheduler="cosine", epochs=4, lr=0.01) == (
        "the cosine schedule spans 4 epochs: from epoch 5 this run trains at lr 0 — `set epochs 6` to stretch the "
        "schedule to the end of this run")
    assert _notice(4, 12, 18, scheduler="onecycle", epochs=4, lr=0.1).startswith(
        "the one-cycle schedule spans 4 epochs: from epoch 5 this run trains at lr 4e-07 — `set epochs 5`")


def test_no_notice_when_the_run_ends_with_the_schedule_or_the_schedule_has_no_span():
    assert _notice(96, 0, 2400, scheduler="cosine") is None  # `train` alone: up to `epochs`
    assert _notice(96, 768, 2400, scheduler="onecycle") is None  # the rest of it
    assert _notice(96, 0, 5, scheduler="cosine") is None  # `train --steps 5`: a probe that stops mid-epoch
    assert _notice(96, 0, 96 * 30, scheduler="step") is None  # StepLR and constant lr do not span `epochs`
    assert _notice(96, 0, 96 * 30, scheduler="none") is None
    assert _notice(96, 768, 768, scheduler="cosine") is None  # nothing to train

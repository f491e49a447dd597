"""The engine: exact resume, checkpoints, metrics log, criteria/optimizers/schedulers, pause latency."""

import math
import os
import subprocess
import sys
import threading

import pytest
import torch

from pgshell.engine.store import checkpoint as C
from pgshell.engine.config import TrainConfig
from pgshell.engine.errors import PgError
from pgshell.engine.train.metrics import read_rows
from pgshell.session import Session

from conftest import WAIT, exact_rows, new_session, weights_of, train_to_end


def _train(s, **kw):
    train_to_end(s, **kw)


@pytest.fixture
def reference(tmp_path, split_folder):
    """Two epochs straight: the weights and metrics rows every interrupted run must reproduce bit for bit."""
    s = new_session(tmp_path / "sessions", split_folder, "ref")
    _train(s, epochs=2)
    out = weights_of(s.built.module), exact_rows(s.folder)
    s.close(save=False)
    return out


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6])  # first batch, middle, before the last, epoch boundary, 2nd epoch
def test_exact_resume_in_a_new_session(tmp_path, split_folder, reference, k):
    ref_weights, ref_rows = reference
    s = new_session(tmp_path / "sessions", split_folder, "cut")
    _train(s, steps=k)
    assert s.trainer.pos.step == k
    file = s.save()
    s.close(save=False)
    del s
    torch.manual_seed(12345)  # disturb the global RNG: resuming must not depend on the process's history
    r = Session.open(file)
    assert r.trainer.pos.step == k
    _train(r, epochs=2 - r.trainer.pos.epoch)  # N more epochs, counted from the current position
    assert r.trainer.pos.epoch == 2
    w = weights_of(r.built.module)
    assert all(torch.equal(w[n], ref_weights[n]) for n in ref_weights)
    assert exact_rows(r.folder) == ref_rows
    assert len([x for x in ref_rows if x[3] == "train"]) == 8 and len([x for x in ref_rows if x[3] == "val"]) == 2
    r.close(save=False)


def test_resume_independent_of_workers(tmp_path, split_folder, reference):
    ref_weights, ref_rows = reference
    s = new_session(tmp_path / "sessions", split_folder, "w2", workers=2)
    _train(s, epochs=2)
    assert exact_rows(s.folder) == ref_rows
    assert all(torch.equal(v, ref_weights[n]) for n, v in weights_of(s.built.module).items())
    s.close(save=False)


def test_metrics_rows_dropped_past_the_resumed_checkpoint(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder)
    _train(s, steps=2)
    file = s.save()
    _train(s, steps=3)  # rows 3..5 are written, then the process "dies" without saving
    s._log.sync()
    assert [int(r["step"]) for r in read_rows(s.folder / "metrics.csv") if r["split"] == "train"] == [1, 2, 3, 4, 5]
    # the step-5 checkpoint exists; remove it to simulate a kill before it was written
    (s.folder / "checkpoints" / "step-0000005.safetensors").unlink()
    (s.folder / "checkpoints" / "epoch-0001.safetensors").unlink()
    s.close(save=False)
    r = Session.open(file)
    assert r.trainer.pos.step == 2
    assert [int(x["step"]) for x in read_rows(r.folder / "metrics.csv")] == [1, 2]
    r.close(save=False)


def test_corrupt_newest_checkpoint_falls_back(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder)
    _train(s, epochs=1)
    _train(s, steps=1)
    file = s.save()
    s.close(save=False)
    ck = s.folder / "checkpoints"
    newest = C.list_checkpoint_files(ck)[-1]
    data = bytearray(newest.read_bytes())
    data[-10] ^= 0xFF  # flip one byte inside the tensor data
    newest.write_bytes(bytes(data))
    with pytest.raises(C.CheckpointError, match="checksum"):
        C.load_checkpoint(newest)
    messages = []
    r = Session.open(file, notify=messages.append)
    assert r.trainer.pos.step == 4 and r.trainer.pos.epoch == 1
    assert any("skipping" in m and newest.name in m for m in messages)
    r.close(save=False)


def test_truncated_checkpoint_is_detected(tmp_path):
    p = tmp_path / "c.safetensors"
    C.save_checkpoint(p, {"a": torch.arange(1000.0), "b": {"x": 1, 2: [torch.ones(2), "s"]}})
    state = C.load_checkpoint(p)
    assert torch.equal(state["a"], torch.arange(1000.0)) and state["b"][2][1] == "s" and state["b"]["x"] == 1
    p.write_bytes(p.read_bytes()[:2000])
    with pytest.raises(C.CheckpointError):
        C.load_checkpoint(p)


def test_atomic_write_leaves_old_file_on_failure(tmp_path, monkeypatch):
    p = tmp_path / "x.safetensors"
    C.save_checkpoint(p, {"v": torch.zeros(3)})
    before = p.read_bytes()

    def boom(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(C.os, "fsync", boom)
    with pytest.raises(OSError):
        C.save_checkpoint(p, {"v": torch.ones(3)})
    assert p.read_bytes() == before
    assert [f.name for f in tmp_path.iterdir()] == ["x.safetensors"]  # no temp file left behind


def test_pickle_is_never_loaded(tmp_path):
    """A .safetensors-named pickle carrying a payload is refused without running it."""
    import pickle

    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    p = tmp_path / "epoch-0001.safetensors"
    p.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(C.CheckpointError):
        C.load_checkpoint(p)
    assert not marker.exists()


@pytest.mark.parametrize("settings", [
    {"criterion": "cross_entropy", "label_smoothing": 0.1},
    {"criterion": "l1"},
    {"criterion": "mse", "label_smoothing": 0.1},
    {"optimizer": "sgd", "nesterov": True, "weight_decay": 1e-4},
    {"optimizer": "adam", "lr": 1e-3},
    {"optimizer": "adamw", "weight_decay": 0.05},
])
def test_each_criterion_and_optimizer_learns(tmp_path, split_folder, settings):
    s = new_session(tmp_path / "sessions", split_folder, **{"lr": 0.01, **settings})
    _train(s, epochs=3)
    rows = read_rows(s.folder / "metrics.csv")
    train = [float(r["loss"]) for r in rows if r["split"] == "train"]
    assert len(train) == 12 and all(math.isfinite(x) for x in train)
    # learning happened: the last epoch's mean loss is below the first epoch's
    assert sum(train[-4:]) < sum(train[:4])
    s.close(save=False)


def test_schedulers_follow_their_formulas(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder, scheduler="step", step_size=1, gamma=0.5, lr=0.1)
    _train(s, epochs=3)
    lrs = [float(r["lr"]) for r in read_rows(s.folder / "metrics.csv") if r["split"] == "train"]
    assert lrs == [0.1] * 4 + [0.05] * 4 + [0.025] * 4
    s.close(save=False)

    s = new_session(tmp_path / "sessions", split_folder, "cos", scheduler="cosine", warmup_epochs=1, epochs=2, lr=0.1)
    _train(s, epochs=2)
    lrs = [float(r["lr"]) for r in read_rows(s.folder / "metrics.csv") if r["split"] == "train"]
    assert lrs[:4] == pytest.approx([0.025, 0.05, 0.075, 0.1])  # linear warm-up over the first epoch
    assert lrs[4] == pytest.approx(0.1) and lrs[7] == pytest.approx(0.1 * 0.5 * (1 + math.cos(math.pi * 3 / 4)))
    s.close(save=False)

    # 5 epochs x 4 batches: torch's OneCycleLR ends its warm-up exactly on a step (with 8 steps its peak falls
    # between two steps and no batch trains at exactly lr)
    s = new_session(tmp_path / "sessions", split_folder, "one", scheduler="onecycle", epochs=5, lr=0.1)
    _train(s, epochs=5)
    lrs = [float(r["lr"]) for r in read_rows(s.folder / "metrics.csv") if r["split"] == "train"]
    assert lrs[0] == pytest.approx(0.1 / 25) and max(lrs) == pytest.approx(0.1) and lrs[-1] < 0.01
    s.close(save=False)


def test_live_lr_change_applies_at_next_batch(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder, scheduler="none", lr=0.01)
    hit = threading.Event()
    release = threading.Event()

    def at_batch(info):
        if info["step"] == 2:
            hit.set()
            release.wait(WAIT)

    s.batch_listeners.append(at_batch)
    s.train(epochs=1)
    assert hit.wait(WAIT)
    t = threading.Thread(target=s.set, args=("lr", 0.5))
    t.start()
    release.set()
    t.join(WAIT)
    assert s.wait(WAIT)
    lrs = [float(r["lr"]) for r in read_rows(s.folder / "metrics.csv") if r["split"] == "train"]
    assert lrs == [0.01, 0.01, 0.5, 0.5]
    s.close(save=False)


def test_pause_takes_effect_within_one_batch(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder)
    asked_at = []
    at_step = threading.Event()

    def at_batch(info):
        if info["step"] == 3 and not asked_at:
            asked_at.append(info["step"])
            s.request_pause()
            at_step.set()

    s.batch_listeners.append(at_batch)
    s.train(epochs=5)
    assert at_step.wait(WAIT) and s.wait(WAIT)
    assert s.paused and s.trainer.pos.step == 3  # the pause was asked during step 3: no further batch ran
    assert (s.folder / "checkpoints" / "step-0000003.safetensors").exists()
    s.resume()
    assert s.wait(WAIT) and s.trainer.pos.epoch == 5
    s.close(save=False)


def test_frozen_backbone_trains_only_the_head(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder, lr=0.05)
    before = weights_of(s.built.module)
    s.freeze(["backbone"])
    _train(s, epochs=1)
    after = weights_of(s.built.module)
    head = set(s.built.head)
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and {n for n in changed if n.endswith(("weight", "bias"))} <= head
    assert not any("running_mean" in n for n in changed)  # frozen BatchNorm statistics stay frozen
    s.close(save=False)


def test_config_validation():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.momentum, cfg.scheduler, cfg.step_size, cfg.gamma) == (0.001, 0.9, "step", 7, 0.1)
    with pytest.raises(PgError, match="one of"):
        cfg.replace(optimizer="rmsprop-ish")  # rmsprop itself is one of timm's optimizers now (engine/train/optim.py)
    with pytest.raises(PgError, match="at least"):
        cfg.replace(batch_size=0)
    with pytest.raises(PgError, match="float"):
        cfg.replace(lr="fast")
    assert cfg.replace(lr="1e-2").lr == 0.01


def test_engine_imports_without_cmd2():
    code = ("import sys; sys.modules['cmd2'] = None; sys.modules['prompt_toolkit'] = None\n"
            "import pgshell.engine as e, pgshell.engine.train.loop, pgshell.engine.models.build\n"
            "import pgshell.engine.data.resolve\n"
            "import pgshell.session\n"
            "assert 'cmd2' not in [m for m in sys.modules if sys.modules[m] is not None]\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# ------------------------------------------------------------------ the frozen-backbone feature cache
def _frozen_run(tmp_path, folder, name, epochs=3, **settings):
    s = new_session(tmp_path / "sessions", folder, name, lr=0.05, **settings)
    s.freeze(["backbone"])
    notes = []
    s.notify = notes.append
    _train(s, epochs=epochs)
    return s, notes


@pytest.mark.parametrize("augment, views", [("off", 1), ("on", 3)])
def test_feature_cache_equals_uncached_training(tmp_path, split_folder, augment, views):
    """Cached head training gives the uncached path's metrics and weights (within float tolerance): with no
    augmentation always, with K augmented views for the first K epochs (the views are seeded like those epochs)."""
    a, notes = _frozen_run(tmp_path, split_folder, "cached", augment=augment, feature_views=views)
    b, _ = _frozen_run(tmp_path, split_folder, "plain", augment=augment, feature_views=views, feature_cache=False)
    assert any("feature cache: 30 training images x %d view" % views in m for m in notes)
    ra, rb = read_rows(a.folder / "metrics.csv"), read_rows(b.folder / "metrics.csv")
    assert len(ra) == len(rb) == 15
    for x, y in zip(ra, rb):
        assert (x["step"], x["split"]) == (y["step"], y["split"])
        assert float(x["loss"]) == pytest.approx(float(y["loss"]), rel=1e-4, abs=1e-5)
        assert float(x["accuracy"]) == pytest.approx(float(y["accuracy"]))
    wa, wb = weights_of(a.built.module), weights_of(b.built.module)
    assert all(torch.allclose(wa[k].float(), wb[k].float(), atol=1e-5) for k in wa)
    a.close(save=False)
    b.close(save=False)


def test_feature_cache_reused_and_invalidated(tmp_path, split_folder):
    s, notes = _frozen_run(tmp_path, split_folder, "c", epochs=1)

    def builds():
        return len([m for m in notes if m.startswith("feature cache")])

    assert builds() == 1
    _train(s, epochs=1)  # the same frozen backbone: reused
    assert builds() == 1
    key = s.trainer.source.key
    s.freeze(["all"], unfreeze=True)  # unfreeze: the cache no longer applies
    assert not s.trainer.source.valid_for(s.trainer.data_spec())
    _train(s, epochs=1)  # the whole model trains (and the backbone's weights change)
    assert builds() == 1
    s.freeze(["backbone"])
    _train(s, epochs=1)  # frozen again, but on other weights: rebuilt
    assert builds() == 2 and s.trainer.source.key != key
    s.set("feature_views", 2)
    _train(s, epochs=1)  # another transform setting: rebuilt
    assert builds() == 3 and len(s.trainer.source.train.views) == 2
    s.close(save=False)


def test_feature_cache_resume_is_exact(tmp_path, split_folder):
    ref, _ = _frozen_run(tmp_path, split_folder, "ref", epochs=2)
    s = new_session(tmp_path / "sessions", split_folder, "cut", lr=0.05)
    s.freeze(["backbone"])
    _train(s, steps=3)
    file = s.save()
    s.close(save=False)
    r = Session.open(file)
    _train(r, epochs=2)
    assert all(torch.equal(v, weights_of(ref.built.module)[k]) for k, v in weights_of(r.built.module).items())
    assert exact_rows(r.folder) == exact_rows(ref.folder)
    ref.close(save=False)
    r.close(save=False)


# ------------------------------------------------------------------ precision (the CPU side of the GPU fast path)
def test_bf16_autocast_trains_on_cpu(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder, amp="bf16", lr=0.01)
    _train(s, epochs=2)
    assert s.trainer.runtime.describe() == "cpu bf16"
    losses = [float(r["loss"]) for r in read_rows(s.folder / "metrics.csv") if r["split"] == "train"]
    assert len(losses) == 8 and all(math.isfinite(x) for x in losses)
    s.close(save=False)


def test_fp16_grad_scaler_state_is_checkpointed_and_restored(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder, amp="fp16")
    _train(s, steps=3)
    scaler = s.trainer.scaler.state_dict()
    assert scaler["_growth_tracker"] == 3 and scaler["scale"] == 65536.0
    file = s.save()
    s.close(save=False)
    _, state = C.load_latest(file.parent / "s" / "checkpoints")
    assert state["scaler"]["_growth_tracker"] == 3 and state["scaler"]["scale"] == 65536.0
    r = Session.open(file)
    assert r.trainer.scaler.state_dict() == scaler
    _train(r, steps=1)
    assert r.trainer.scaler.state_dict()["_growth_tracker"] == 4
    r.close(save=False)


# ------------------------------------------------------------------ the decoded-image (uint8) input cache
@pytest.fixture
def input_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PGSHELL_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "inputs"


def test_input_cache_equals_pil_path(tmp_path, split_folder, input_cache_dir):
    """Without augmentation the cache stores exactly the eval crops: the same training, bit for bit."""
    a = new_session(tmp_path / "sessions", split_folder, "cached", input_cache="on", augment=False)
    notes = []
    a.notify = notes.append
    _train(a, epochs=2)
    b = new_session(tmp_path / "sessions", split_folder, "plain", input_cache="off", augment=False)
    _train(b, epochs=2)
    assert any(m.startswith("input cache: decoded 30 images") for m in notes)
    assert len(list(input_cache_dir.glob("*.u8"))) == 2  # train and val
    assert exact_rows(a.folder) == exact_rows(b.folder)
    assert all(torch.equal(v, weights_of(b.built.module)[k]) for k, v in weights_of(a.built.module).items())
    a.close(save=False)
    b.close(save=False)


def test_input_cache_hit_invalidation_and_exact_resume(tmp_path, split_folder, input_cache_dir):
    ref = new_session(tmp_path / "sessions", split_folder, "ref", input_cache="on")  # augmentation on the device
    notes = []
    ref.notify = notes.append
    _train(ref, epochs=2)
    assert len([m for m in notes if m.startswith("input cache: decoded")]) == 2
    s = new_session(tmp_path / "sessions", split_folder, "cut", input_cache="on")
    s.notify = notes.append
    _train(s, steps=3)
    assert len([m for m in notes if m.startswith("input cache: decoded")]) == 2  # hit: decoded once only
    file = s.save()
    s.close(save=False)
    r = Session.open(file)
    _train(r, epochs=2)
    assert exact_rows(r.folder) == exact_rows(ref.folder)
    assert all(torch.equal(v, weights_of(ref.built.module)[k]) for k, v in weights_of(r.built.module).items())
    # a changed image changes the key: decoded again
    img = sorted((split_folder / "train" / "cat").iterdir())[0]
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10**9))
    r.notify = notes.append
    r.attach_data(str(split_folder), size=32)
    _train(r, steps=1)
    assert len([m for m in notes if m.startswith("input cache: decoded")]) == 3
    ref.close(save=False)
    r.close(save=False)


@pytest.mark.slow
def test_compiled_model_trains_and_checkpoints_the_plain_module(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder, compile=True)
    _train(s, steps=2)
    assert s.trainer.net is not s.built.module
    assert not any(k.startswith("_orig_mod") for k in s.trainer.state_dict()["model"])
    s.close(save=False)

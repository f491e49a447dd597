"""The event system: the engine's Trainer driven by handlers alone (no Session), and the session's worker around it.

Also the defects the skeleton issue found: a change from the worker thread itself, a failing handler, a failed job
reported as such, a command waiting on a long phase says so, and checkpoints that hold nothing history-dependent.
"""

import threading

import pytest
import torch

from pgshell.engine.store import checkpoint as C
from pgshell.engine import data as D
from pgshell.engine import models as M
from pgshell.engine.config import TrainConfig
from pgshell.engine.train.events import EVENTS, Events, Handler
from pgshell.engine.train.metrics import EXACT_COLUMNS, read_rows
from pgshell.engine.train.loop import Trainer
from pgshell.session import Session
from pgshell.session import worker as W

WAIT = 120


def _trainer(folder, log=None, **settings) -> Trainer:
    splits = D.scan_folder(str(folder), seed=0)
    spec = M.ModelSpec("test_resnet", len(splits.classes))
    torch.manual_seed(0)
    cfg = TrainConfig(batch_size=8, **settings)
    return Trainer(M.build_model(spec), spec, splits, cfg, log=log, size=32)


class Recorder(Handler):
    """Every event it sees, in order, with the position at that moment."""

    def __init__(self, order=50):
        self.order, self.seen = order, []

    def __getattr__(self, event):
        if event not in EVENTS:
            raise AttributeError(event)
        return lambda tr, ctx: self.seen.append((event, tr.pos.step))


class Counter(Handler):
    """A handler with memory: counts batches; its count goes into the checkpoint."""

    key = "counter"

    def __init__(self):
        self.batches = 0

    def after_batch(self, tr, ctx):
        self.batches += 1

    def state_dict(self):
        return {"batches": self.batches}

    def load_state_dict(self, state):
        self.batches = state["batches"]


def test_events_fire_in_order_on_a_bare_trainer(split_folder):
    tr = _trainer(split_folder)
    rec = Recorder()
    res = tr.run(epochs=1, handlers=[rec])
    names = [e for e, _ in rec.seen]
    assert res.outcome == "done" and res.batches == 4 and tr.pos.step == 4
    per_batch = ["before_batch", "after_loss", "before_step", "after_step", "after_batch"]
    assert names == (["before_fit", "before_epoch"] + per_batch * 4
                     + ["before_validate", "after_validate", "after_epoch", "after_fit"])
    assert [s for e, s in rec.seen if e == "after_batch"] == [1, 2, 3, 4]  # the position advanced before it
    assert rec not in tr.events.handlers  # a run's handlers leave with it


def test_handlers_run_by_order_and_a_request_pauses_at_the_next_batch(split_folder):
    tr = _trainer(split_folder)
    calls = []

    class Named(Handler):
        def __init__(self, name, order):
            self.name, self.order = name, order

        def after_batch(self, tr, ctx):
            calls.append(self.name)
            if tr.pos.step == 2 and self.name == "late":
                tr.request("pause", "the test asked")

    res = tr.run(epochs=3, handlers=[Named("late", 70), Named("early", 5)])
    assert res.outcome == "paused" and tr.pos.step == 2 and res.batches == 2
    assert calls == ["early", "late", "early", "late"] and tr.request_reason == "the test asked"
    res = tr.run(epochs=3 - tr.pos.epoch)  # the request does not outlive its run
    assert res.outcome == "done" and tr.pos.epoch == 3


def test_handler_state_goes_into_the_checkpoint_and_resumes_exactly(tmp_path, split_folder):
    tr = _trainer(split_folder)
    counter = tr.add_handler(Counter())
    tr.run(steps=3)
    C.save_checkpoint(tmp_path / "c.safetensors", tr.state_dict())
    assert tr.state_dict()["handlers"] == {"counter": {"batches": 3}}
    again = _trainer(split_folder)
    again.load_state_dict(C.load_checkpoint(tmp_path / "c.safetensors"))
    assert again.state_dict()["handlers"] == {"counter": {"batches": 3}}  # kept though no such handler is attached
    fresh = again.add_handler(Counter())
    assert fresh.batches == 3
    again.run(steps=2)
    assert fresh.batches == 5 and counter.batches == 3


def test_a_failing_handler_is_reported_once_and_training_goes_on(split_folder):
    tr = _trainer(split_folder)
    reports = []
    tr.on_handler_error = reports.append

    class Broken(Handler):
        def after_batch(self, tr, ctx):
            raise OSError(28, "No space left on device")

    res = tr.run(epochs=1, handlers=[Broken()])
    assert res.outcome == "done" and tr.pos.step == 4
    assert len(reports) == 1 and "Broken failed in after_batch" in reports[0] and "training goes on" in reports[0]


def test_an_essential_handler_failing_ends_the_run_and_after_fit_hears_failed(split_folder):
    tr = _trainer(split_folder)
    outcomes, errors = [], []

    class Essential(Handler):
        essential = True

        def after_batch(self, tr, ctx):
            if tr.pos.step == 2:
                raise RuntimeError("essential trouble")

    class Watch(Handler):
        def after_fit(self, tr, ctx):
            outcomes.append(ctx.outcome)

        def on_exception(self, tr, ctx):
            errors.append(str(ctx.error))

    with pytest.raises(RuntimeError, match="essential trouble"):
        tr.run(epochs=1, handlers=[Essential(), Watch()])
    assert outcomes == ["failed"] and errors == ["essential trouble"] and tr.pos.step == 2


def test_events_keep_pending_state_for_handlers_not_attached_yet():
    ev = Events()
    ev.load_state_dict({"counter": {"batches": 7}, "other": {"x": 1}})
    c = ev.add(Counter())
    assert c.batches == 7 and ev.state_dict() == {"counter": {"batches": 7}, "other": {"x": 1}}
    ev.remove(c, keep_state=True)
    c.batches = 9  # after detaching: its state was taken when it left
    assert ev.state_dict()["counter"] == {"batches": 7}
    with pytest.raises(ValueError):
        ev.add(Counter()) and ev.add(Counter())


# ---------------------------------------------------------------- the session's worker
def _session(tmp_path, folder, **settings):
    s = Session(root=tmp_path / "sessions")
    s.set("batch_size", 8)
    for k, v in settings.items():
        s.set(k, v)
    s.attach_data(str(folder), size=32)
    s.load_model("test_resnet")
    s.use_name("s")
    return s


def test_a_change_from_the_worker_thread_applies_at_once(tmp_path, split_folder):
    s = _session(tmp_path, split_folder, scheduler="none", lr=0.01)

    def from_the_worker(info):  # a batch handler changing a setting: it must not queue to itself
        if info["step"] == 1:
            s.set("lr", 0.2)

    s.batch_listeners.append(from_the_worker)
    s.train(epochs=1)
    assert s.wait(30) and "error" not in s.status, s.status  # was a 600 s deadlock
    lrs = [float(r["lr"]) for r in read_rows(s.folder / "metrics.csv") if r["split"] == "train"]
    assert lrs == [0.01, 0.2, 0.2, 0.2]
    s.close(save=False)


def test_a_failing_batch_listener_does_not_stop_training(tmp_path, split_folder):
    messages = []
    s = _session(tmp_path, split_folder)
    s.notify = messages.append
    s.batch_listeners.append(lambda info: 1 / 0)
    s.train(epochs=1)
    assert s.wait(WAIT) and "error" not in s.status and s.trainer.pos.epoch == 1
    warnings = [m for m in messages if m.startswith("warning:")]
    assert len(warnings) == 1 and "ZeroDivisionError" in warnings[0]
    assert not any("training stopped by an error" in m for m in messages)
    s.close(save=False)


class _HeldJob:
    """A job that stays in one phase until released, then reaches a batch boundary."""

    label = "held"

    def __init__(self):
        self.inside, self.release = threading.Event(), threading.Event()

    def run(self, worker):
        worker.status = {"state": "training", "job": "held", "phase": "validation pass"}
        self.inside.set()
        assert self.release.wait(WAIT)
        worker.check()
        return "done"


def test_a_command_waiting_on_a_long_phase_says_what_it_waits_for(monkeypatch):
    monkeypatch.setattr(W, "WAIT_NOTICE", 0.05)
    said = []
    worker = W.Worker(said.append, lambda e: (str(e), None))
    job = _HeldJob()
    worker.start(job)
    assert job.inside.wait(WAIT)
    result = {}
    t = threading.Thread(target=lambda: result.update(v=worker.apply(lambda: 42)))
    t.start()
    for _ in range(200):  # the notice comes after WAIT_NOTICE; wait for it on the thread, not with a sleep
        t.join(0.05)
        if said:
            break
    assert said == ["waiting for the validation pass to finish …"]
    job.release.set()
    t.join(WAIT)
    assert result == {"v": 42} and worker.idle.wait(WAIT)
    worker.close()


def test_a_failed_job_stays_paused_with_its_error_line():
    said = []
    worker = W.Worker(said.append, lambda e: (f"triaged {e}", "a note"))

    class Failing:
        label = "train"

        def run(self, worker):
            raise RuntimeError("boom")

    worker.start(Failing())
    assert worker.idle.wait(WAIT)
    assert worker.status == {"state": "paused", "error": "triaged boom"} and worker.job is not None
    assert said == ["error: triaged boom", "a note"]
    worker.close()


def _flat(state):
    tensors = {}
    body = C._flatten(state, "", tensors)
    return body, tensors


def test_a_checkpoint_holds_nothing_that_depends_on_history(tmp_path, split_folder):
    straight = _session(tmp_path / "a", split_folder)
    straight.train(epochs=1)
    assert straight.wait(WAIT)
    cut = _session(tmp_path / "b", split_folder)
    cut.train(steps=2)
    assert cut.wait(WAIT)
    file = cut.save()
    cut.close(save=False)
    torch.manual_seed(999)
    import numpy as np
    import random

    np.random.seed(7)
    random.seed(7)  # disturb every global generator: nothing stored may follow them
    r = Session.open(file)
    r.train(epochs=1)
    assert r.wait(WAIT)
    a, b = straight.trainer.state_dict(), r.trainer.state_dict()
    a.pop("run"), b.pop("run")  # the resume counter is history by design (it draws the pause marks)
    for s in (a, b):  # and so is the change log's length (it rewinds the log to the checkpoint on reopen)
        s["handlers"].pop("changelog")
    (ja, ta), (jb, tb) = _flat(a), _flat(b)
    assert ja == jb and ta.keys() == tb.keys()
    assert all(torch.equal(ta[k], tb[k]) for k in ta)
    assert [tuple(x[c] for c in EXACT_COLUMNS) for x in read_rows(r.folder / "metrics.csv")] == \
        [tuple(x[c] for c in EXACT_COLUMNS) for x in read_rows(straight.folder / "metrics.csv")]
    straight.close(save=False)
    r.close(save=False)


def test_only_the_resume_point_keeps_the_optimizer_and_old_epochs_still_evaluate(tmp_path, split_folder):
    from pgshell.session import review as A

    s = _session(tmp_path, split_folder)
    s.train(epochs=3)
    assert s.wait(WAIT) and "error" not in s.status
    files = C.list_checkpoint_files(s.folder / "checkpoints")
    assert [p.name for p in files] == ["epoch-0001.safetensors", "epoch-0002.safetensors", "epoch-0003.safetensors"]
    states = [C.load_checkpoint(p) for p in files]
    assert [st["optimizer"] is not None for st in states] == [False, False, True]  # the resume point only
    assert [C.read_metadata(p)["resumable"] for p in files] == ["False", "False", "True"]
    assert all(set(st["model"]) == set(states[-1]["model"]) for st in states)  # every epoch's weights are kept
    assert files[0].stat().st_size < 0.75 * files[-1].stat().st_size
    logged = [r for r in read_rows(s.folder / "metrics.csv") if r["split"] == "val"]
    report = A.evaluate(s, ["val"], "1")[0]  # an old, slim epoch evaluates to what was logged at that epoch
    assert report["loss"] == float(logged[0]["loss"]) and report["accuracy"] == float(logged[0]["accuracy"])
    s.close(save=False)

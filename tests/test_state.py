"""One owner for each piece of the session's state (issue 23): the run's position (change log, replay), the
evaluation transform, what a "step" is, handler state in checkpoints, the session lock after a kill, read-only
commands, and the session document."""

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import WAIT, exact_rows, make_split, new_app, new_session, run, train_to_end


def ok(app, line):
    """One command in-process; fails the test (with the shell's output) if the command failed."""
    good, result = run(app, line)
    assert good, f"`{line}` failed: {app.stdout.getvalue()[-600:]}"
    return result


def latest_state(folder: Path) -> dict:
    from pgshell.engine.store import checkpoint as C

    return C.load_latest(folder / "checkpoints")[1]


# ---------------------------------------------------------------- 1. the position: one answer
def test_export_plan_after_a_second_run_replays_to_the_same_step_and_weights(tmp_path, split_folder, monkeypatch):
    """`train --steps 4`, `load` again (a new run that carries the position on), `set lr`, `train --steps 3`: the
    log puts `set lr` at step 4, the plan trains 4 + 3 steps, and replaying it gives the session's weights."""
    from pgshell.shell.cli import run_plan

    monkeypatch.chdir(tmp_path)
    app = new_app(tmp_path / "sessions")
    for line in ["set batch_size 8", f"data {split_folder} --size 32", "load test_resnet", "train --steps 4",
                 "load test_resnet", "set lr 0.01", "train --steps 3", "save first"]:
        ok(app, line)
    s = app.session
    assert s.trainer.pos.step == 7
    assert [(e["cmd"], e["step"]) for e in s.changes.entries if e["kind"] == "set" and e["name"] == "lr"] == \
        [("set lr 0.01", 4)]
    plan = tmp_path / "p.plan"
    assert ok(app, f"export plan {plan}")["step"] == 7
    trains = [int(line.split()[-1]) for line in plan.read_text().splitlines() if line.startswith("train --steps")]
    assert trains == [4, 3]
    first = latest_state(s.folder)
    app.session.close(save=False)

    replayed = new_app(tmp_path / "replayed")
    assert run_plan(replayed, plan.read_text().splitlines()) == 0, replayed.stdout.getvalue()[-800:]
    (file,) = (tmp_path / "replayed").glob("*.session")
    second = latest_state(file.with_suffix(""))
    assert second["position"] == first["position"] and second["position"]["step"] == 7
    assert all(torch.equal(first["model"][k], second["model"][k]) for k in first["model"])


# ---------------------------------------------------------------- 2. one evaluation transform
def test_errors_and_probe_see_the_evaluation_policy_that_eval_uses(app, split_folder):
    """Under `normalize none` and `crop_pct 1` the mean of `errors`' per-image losses is `eval`'s val loss, and
    `probe`'s features are those of the policy's transform (not the model's default one)."""
    from pgshell.engine import data as D
    from pgshell.session import review as RV

    for line in ["set batch_size 8", f"data {split_folder} --size 32", "load test_resnet", "train --steps 2"]:
        ok(app, line)
    ok(app, "probe knn")
    default_val = RV._probe_features_cache[next(iter(RV._probe_features_cache))]["val"][0].clone()
    for line in ["set normalize none", "set crop_pct 1.0"]:
        ok(app, line)
    val = ok(app, "eval --split val")["val"]
    errors = ok(app, "errors --top 1000")
    assert errors["n"] == val["n"] == 12 and len(errors["rows"]) == 12
    mean = sum(r["loss"] for r in errors["rows"]) / len(errors["rows"])
    assert mean == pytest.approx(val["loss"], rel=1e-5, abs=1e-6)

    ok(app, "probe knn")
    s = app.session
    features = RV._probe_features_cache[next(iter(RV._probe_features_cache))]["val"][0]
    transform = D.eval_transform(s.built.data_config, 32, s.config)
    x = torch.stack([transform(D.load_image(p)) for p, _ in s.splits.val])
    assert x.min() >= 0 and x.max() <= 1  # normalize none: pixels stay in [0, 1]
    captured = []
    head = s.built.module.get_classifier()
    hook = head.register_forward_pre_hook(lambda m, args: captured.append(args[0].detach()))
    with torch.no_grad():
        s.built.module.eval()(x)
    hook.remove()
    assert torch.allclose(features, captured[0].flatten(1), atol=1e-5)
    assert not torch.allclose(features, default_val, atol=1e-3)


# ---------------------------------------------------------------- 3. a step is an optimizer step, for every reader
def test_under_accumulate_2_a_step_is_an_optimizer_step_for_train_help_notice_and_trials(tmp_path, split_folder, app):
    """30 images in batches of 8 with `accumulate 2`: 4 batches and 2 optimizer steps an epoch. `train --steps 2`
    trains 4 batches, as its help says; the cosine notice of `train 2` names the lr the run ends with; a trial of 3
    steps spans 2 epochs."""
    from pgshell.engine.train.metrics import read_rows
    from pgshell.engine.search.trials import trial_trainer

    s = new_session(tmp_path / "sessions", split_folder, accumulate=2, scheduler="cosine", epochs=3)
    said = s.train(steps=2)
    assert s.wait(WAIT) and "error" not in s.status
    assert said.startswith("training 2 steps") and (s.trainer.pos.step, s.trainer.pos.epoch) == (2, 1)
    rows = [r for r in read_rows(s.folder / "metrics.csv") if r["split"] == "train"]
    assert len(rows) == 4  # 2 optimizer steps of 2 batches each

    said = s.train(epochs=1)  # to the end of epoch 2 of 3: 4 optimizer steps of 6, the cosine half-way down
    assert s.wait(WAIT) and "error" not in s.status
    last = [r for r in read_rows(s.folder / "metrics.csv") if r["split"] == "train"][-1]
    assert float(last["lr"]) == pytest.approx(0.0005)
    assert f"with lr {float(last['lr']):.2g}" in said, said

    ok(app, "help train")
    assert "optimizer step" in app.stdout.getvalue()

    tr = trial_trainer(s.built, s.spec, s.splits, s.config, {}, 32, None, "t", epochs=None, steps=3)
    assert tr.cfg.epochs == 2  # cosine spans the trial: 3 optimizer steps need 2 epochs of 2
    s.close(save=False)


# ---------------------------------------------------------------- 4. handler state in checkpoints
def test_a_keyed_handler_of_one_run_has_its_state_in_the_checkpoint_written_after_the_run(tmp_path, split_folder):
    from pgshell.engine.train.events import Handler

    class Counter(Handler):
        key = "counter"

        def __init__(self):
            self.n = 0

        def after_batch(self, tr, ctx):
            self.n += 1

        def state_dict(self):
            return {"n": self.n}

        def load_state_dict(self, state):
            self.n = state["n"]

    s = new_session(tmp_path / "sessions", split_folder)
    tr = s.ensure_trainer()
    counter = Counter()
    assert tr.run(steps=3, handlers=[counter]).outcome == "done"
    s.write_checkpoint("pause")  # as TrainJob does once the run has returned paused
    assert latest_state(s.folder)["handlers"]["counter"] == {"n": 3}
    tr.run(steps=2, handlers=[counter])  # attached again, it goes on from its own count
    assert counter.n == 5 and tr.state_dict()["handlers"]["counter"] == {"n": 5}
    s.close(save=False)


def test_an_ema_that_fails_once_keeps_its_averaged_weights_in_later_checkpoints(tmp_path, split_folder, monkeypatch):
    from timm.utils import ModelEmaV3

    from pgshell.engine.train.recipes import WeightEma

    calls, real = [], ModelEmaV3.update

    def update(self, model, step=None):
        calls.append(step)
        if len(calls) == 3:
            raise RuntimeError("injected")
        return real(self, model, step=step)

    monkeypatch.setattr(ModelEmaV3, "update", update)
    s = new_session(tmp_path / "sessions", split_folder, ema=0.9)
    warnings = []
    s.notify = warnings.append
    tr = s.ensure_trainer()
    ema = tr.events.find(WeightEma)
    tr.run(steps=2)
    good = {k: v.clone() for k, v in ema.module.state_dict().items()}
    tr.run(steps=3)  # the 3rd update raises: the EMA is dropped for the run, training goes on
    assert tr.pos.step == 5 and calls == [1, 2, 3] and any("WeightEma" in w for w in warnings)
    s.write_checkpoint("pause")
    state = latest_state(s.folder)["handlers"]["ema"]
    assert state["updates"] == 2
    assert all(torch.equal(state["weights"][k], good[k]) for k in good)
    s.close(save=False)


# ---------------------------------------------------------------- 5. the lock ends with its process
_HOLDER = """
import multiprocessing as mp, signal, sys
from pathlib import Path
from pgshell.session.lock import SessionLock

def child():  # a DataLoader worker: forked while the lock is held, outliving a kill -9 of its parent for a while
    signal.pause()

if __name__ == "__main__":
    lock = SessionLock()
    lock.acquire(Path(sys.argv[1]), "k.session")
    p = mp.get_context("fork").Process(target=child, daemon=True)
    p.start()
    print(p.pid, flush=True)
    signal.pause()
"""


def test_kill_9_with_forked_workers_then_reopen_at_once(tmp_path):
    from conftest import pgshell_env
    from pgshell.session.lock import SessionLock

    folder = tmp_path / "k"
    script = tmp_path / "holder.py"
    script.write_text(_HOLDER)
    proc = subprocess.Popen([sys.executable, str(script), str(folder)], stdout=subprocess.PIPE, text=True,
                            env=pgshell_env())
    child = None
    try:
        child = int(proc.stdout.readline())
        proc.kill()
        assert proc.wait(WAIT) == -9
        os.kill(child, 0)  # the forked worker still runs
        lock = SessionLock()
        lock.acquire(folder, "k.session")  # at once: the dead process's lock is gone with it
        assert lock.holds(folder)
        lock.release()
    finally:
        proc.kill()
        if child is not None:
            try:
                os.kill(child, 9)
            except ProcessLookupError:
                pass


# ---------------------------------------------------------------- 6. reads write nothing; the engine's names exist
def test_eval_errors_and_probe_leave_no_session_folder_and_training_after_them_logs(app, split_folder, tmp_path):
    from pgshell.engine.train.metrics import read_rows

    for line in ["set batch_size 8", f"data {split_folder} --size 32", "load test_resnet", "eval", "errors",
                 "probe knn"]:
        ok(app, line)
    sessions = tmp_path / "sessions"
    assert not sessions.exists() or list(sessions.iterdir()) == []
    assert app.session.name is None
    ok(app, "train --steps 2")
    rows = read_rows(app.session.folder / "metrics.csv")
    assert [(r["split"], int(r["step"])) for r in rows] == [("train", 1), ("train", 2)]


def test_every_public_engine_name_exists():
    import pgshell.engine as engine

    missing = [name for name in engine.__all__ if not hasattr(engine, name)]
    assert missing == []


# ---------------------------------------------------------------- the session document
def test_the_session_file_is_a_session_doc_that_reopens_to_the_same_document(tmp_path, split_folder):
    """What `save` writes reads back as a SessionDoc equal to the session's own (to_dict/from_dict round trip),
    and the reopened session describes itself with the same document."""
    import json

    from pgshell.session import DataBinding, Session, SessionDoc
    from pgshell.session.document import read_document

    s = new_session(tmp_path / "sessions", split_folder, name="doc")
    train_to_end(s, steps=2)
    file = s.save()
    mine, pos = s.document(), s.position()
    s.close(save=False)
    assert (pos["step"], pos["batch"]) == (2, 2)
    raw = json.loads(file.read_text())
    doc = read_document(file)
    assert isinstance(doc.data, DataBinding) and doc.data.path == str(split_folder) and doc.data.size == 32
    assert doc.data.identity["fingerprint"] == mine.data.identity["fingerprint"] and doc.data.lists is None
    assert {k: v for k, v in doc.to_dict().items() if k != "saved"} == {k: v for k, v in raw.items() if k != "saved"}
    assert SessionDoc.from_dict(doc.to_dict()) == doc
    assert doc.replace(saved="") == mine.replace(data=doc.data, saved="")

    again = Session.open(file)
    try:
        assert again.document().replace(saved="") == doc.replace(saved="")
        assert again.data == {"path": str(split_folder), "split": 0.2, "size": 32, "seed": 0}
        assert again.binding.lists is not None  # the lists behind the fingerprint, read from data-files.json
        assert again.position() == pos
    finally:
        again.close(save=False)


def test_a_hand_edited_data_binding_is_named_when_the_session_opens(tmp_path, split_folder):
    import json

    from pgshell.engine.errors import PgError
    from pgshell.session import Session

    s = new_session(tmp_path / "sessions", split_folder, name="edited")
    file = s.save()
    s.close(save=False)
    raw = json.loads(file.read_text())
    raw["data"]["size"] = "large"
    file.write_text(json.dumps(raw))
    with pytest.raises(PgError, match=r"damaged or was edited by hand .*'data' size should be int"):
        Session.open(file)


@pytest.mark.slow
def test_kill_9_of_pgshell_training_with_workers_then_pgshell_s_at_once(tmp_path, split_folder):
    """The real thing: `pgshell` trains with `workers 2` (loader processes forked), is killed with SIGKILL mid-epoch,
    and the session opens at once in a new Session."""
    from conftest import pgshell_env
    from pgshell.session import Session

    plan = (f"set batch_size 2\nset workers 2\nset log_every 1\ndata {split_folder} --size 32\nload test_resnet\n"
            "save k\ntrain 50\n")
    proc = subprocess.Popen([sys.executable, "-m", "pgshell"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=pgshell_env())
    try:
        proc.stdin.write(plan)
        proc.stdin.close()
        for line in proc.stdout:  # per-batch lines once the loader's workers deliver batches
            if line.startswith("epoch 1 batch 3/"):
                break
        proc.kill()
        assert proc.wait(WAIT) == -9
    finally:
        proc.kill()
    s = Session.open(tmp_path / "sessions" / "k.session")
    s.close(save=False)

"""Hyperparameter selection: the LR range test and the Optuna search (space syntax, the study in SQLite, pruning,
resuming after a quit, pause/continue of a trial), all on `test_resnet` at 32 px and images the tests make."""

import copy
import math
import subprocess
import sys
import threading
from dataclasses import asdict

import optuna
import pytest
import torch

from pgshell.session import study as T
from pgshell.engine.store.checkpoint import load_checkpoint
from pgshell.engine.errors import PgError
from pgshell.engine.train.lrfind import RangeTest, suggest
from pgshell.engine.train.metrics import EXACT_COLUMNS, read_rows
from pgshell.engine.search.space import Dim, format_space, parse_space
from pgshell.session import Session

from conftest import new_session, run, weights_of

WAIT = 180  # seconds: a generous bound for a tiny search on a loaded 2-core machine
# Every setting a trial may vary is fixed (the session's own weight_decay and label_smoothing, 0): all trials are the
# same run, so they must give the same metrics — a check that each starts from the same weights and data.
FIXED = "lr=0.05 optimizer=sgd batch_size=8 freeze=none weight_decay=- label_smoothing=-"
COMPLETE, PRUNED, FAIL, RUNNING = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                                   optuna.trial.TrialState.FAIL, optuna.trial.TrialState.RUNNING)


@pytest.fixture
def app(app, split_folder):
    """conftest's shell with the data and model loaded."""
    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8"):
        assert run(app, line)[0], line
    return app


def _study(s):
    return optuna.load_study(study_name=s.name, storage=f"sqlite:///{s.folder / 'tune.db'}")


def _trial_rows(s, trial, split="train"):
    return [tuple(r[c] for c in EXACT_COLUMNS) for r in read_rows(s.folder / "trials" / "metrics.csv")
            if r["trial"] == str(trial) and r["split"] == split]


def _wait(s):
    assert s.wait(WAIT), "the job did not finish in time"
    assert "error" not in s.status, s.status


# ------------------------------------------------------------------ the pieces, without training
def test_space_default_overrides_and_round_trip():
    assert format_space(parse_space(None, 100)) == ("lr=1e-05:0.1:log weight_decay=1e-06:0.01:log "
                                                    "optimizer=sgd,adamw batch_size=16,32,64 freeze=backbone,none "
                                                    "label_smoothing=0.0:0.2")
    assert parse_space(None, 24)["batch_size"] == Dim("batch_size", "fixed", value=16)  # capped by the train set
    sp = parse_space("lr=1e-4:1e-2:log optimizer=sgd batch_size=8,16 momentum=0.8:0.99 freeze=- label_smoothing=0 "
                     "step_size=2:9", 24)
    assert sp["lr"] == Dim("lr", "range", 1e-4, 1e-2, log=True)
    assert sp["optimizer"] == Dim("optimizer", "fixed", value="sgd")
    assert sp["batch_size"] == Dim("batch_size", "choice", choices=(8, 16))
    assert sp["momentum"] == Dim("momentum", "range", 0.8, 0.99) and not sp["step_size"].log
    assert sp["step_size"].integer and not sp["momentum"].integer
    assert "freeze" not in sp and sp["label_smoothing"] == Dim("label_smoothing", "fixed", value=0.0)
    assert parse_space(format_space(sp), 24) == sp


@pytest.mark.parametrize("spec, message", [
    ("lr", "look like"), ("lr=fast", "lr takes float"), ("lr=0:1:log", "above 0"), ("lr=1:0.1", "low end"),
    ("lr=1:2:lin", "LOW:HIGH:log"), ("optimizer=sgd:adamw", "takes choices"), ("optimizer=rmsprop-ish", "must be one of"),
    ("device=cpu", "cannot search"), ("freeze=layer1", "freeze is one of"), ("batch_size=0,8", "at least 1"),
])
def test_space_errors_are_one_line(spec, message):
    with pytest.raises(PgError, match=message) as e:
        parse_space(spec, 30)
    assert "\n" not in str(e.value) and spec.split()[0] in str(e.value)


def test_range_test_schedule_divergence_and_suggestions():
    t = RangeTest(1e-6, 1.0, 61)
    assert t.lr(0) == 1e-6 and math.isclose(t.lr(60), 1.0) and math.isclose(t.lr(30), 1e-3)
    for i in range(20):  # a flat loss, then a blow-up: stops when the smoothed loss passes 4x its best
        t.record(t.next_lr(), 1.0)
    assert not t.done
    while not t.done:
        t.record(t.next_lr(), 100.0)
    assert t.stop_reason == "diverged" and t.smoothed[-1] > 4 * t.best and t.smoothed[-2] <= 4 * t.best
    nan = RangeTest(1e-6, 1.0, 20)
    nan.record(nan.next_lr(), float("nan"))
    assert nan.done and nan.next_lr() is None
    # A known curve: a tanh step falling fastest at lr 1e-3, then a parabola rising after 1e-1 (minimum near 1e-1)
    lrs = [10 ** (-6 + 6 * i / 120) for i in range(121)]
    curve = [2 - math.tanh(3 * (math.log10(lr) + 3)) + (5 * (math.log10(lr) + 1) ** 2 if lr > 0.1 else 0)
             for lr in lrs]
    s = suggest(lrs, curve)
    assert math.isclose(math.log10(s["steepest"]), -3, abs_tol=0.06)  # the grid is 0.05 decades
    assert 1e-4 < s["valley"] < 1e-2  # halfway down the long descent from 1e-5.4 to ~1e-1
    assert 5e-3 < s["minimum"] < 2e-2  # a tenth of the lowest point
    with pytest.raises(PgError, match="too soon"):
        suggest(lrs[:8], curve[:8])


# ------------------------------------------------------------------ lrfind
def test_lrfind_leaves_the_session_bit_identical_and_suggests_a_sane_lr(app, tmp_path):
    s = app.session
    assert run(app, "train --steps 3")[0]  # momentum buffers exist: the optimizer state is worth protecting
    weights = weights_of(s.built.module)
    opt = copy.deepcopy(s.trainer.state_dict()["optimizer"])
    pos, cfg, rows = asdict(s.trainer.pos), s.config.to_dict(), read_rows(s.folder / "metrics.csv")
    rng = torch.get_rng_state()
    png = tmp_path / "lr.png"
    ok, res = run(app, f"lrfind --out {png}")
    assert ok, app.stdout.getvalue()
    after = s.built.module.state_dict()
    assert weights.keys() == after.keys() and all(torch.equal(weights[k], after[k]) for k in weights)
    opt_after = s.trainer.state_dict()["optimizer"]
    assert opt["type"] == opt_after["type"] == "sgd" and opt["state"].keys() == opt_after["state"].keys()
    assert len(opt["state"]) == len([p for p in s.built.module.parameters() if p.requires_grad])
    for name, st in opt["state"].items():
        assert all(torch.equal(v, opt_after["state"][name][k]) for k, v in st.items())
    assert asdict(s.trainer.pos) == pos == {"epoch": 0, "batch": 3, "sample": 24, "step": 3}
    assert s.config.to_dict() == cfg and read_rows(s.folder / "metrics.csv") == rows
    assert torch.equal(torch.get_rng_state(), rng)
    # SGD with momentum learns this problem at lr 0.01-0.05 and blows up from about 0.3 (see the pruning test):
    # the suggestions must land within the four decades around that.
    assert res["stop"] == "diverged" and 20 < len(res["lrs"]) < 100
    assert min(res["smoothed"]) < 0.8 * res["smoothed"][0]  # the copy did learn before diverging
    for key in ("valley", "steepest"):
        assert 1e-4 <= res[key] <= 1.0, res
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "suggested lr" in app.stdout.getvalue() and "v: valley" in app.stdout.getvalue()
    assert run(app, "lrfind apply")[1] == res["valley"] == s.config.lr
    assert run(app, "lrfind apply steepest")[1] == res["steepest"] == s.config.lr


# ------------------------------------------------------------------ tune
def test_tune_table_matches_the_sqlite_study(app):
    s = app.session
    weights = weights_of(s.built.module)
    ok, table = run(app, "tune --trials 3 --epochs 1 --space batch_size=8")
    assert ok, app.stdout.getvalue()
    assert run(app, "tune show")[1] == table
    study = _study(s)
    trials = {t.number: t for t in study.trials}
    assert sorted(trials) == [0, 1, 2] and table["metric"] == "val_accuracy" and table["budget"] == {"epochs": 1}
    for row in table["trials"]:
        t = trials[row["number"]]
        assert row["state"] == t.state.name.lower() == "complete"
        assert row["value"] == t.value == t.intermediate_values[1]
        assert row["params"] == {"batch_size": 8, **t.params} and set(t.params) == {
            "lr", "weight_decay", "optimizer", "freeze", "label_smoothing"}
        assert row["duration"] == t.duration.total_seconds() and row["reached"] == 1
        # the trial's rows in trials/metrics.csv: 4 batches of 8 (30 images) and one validation equal to its value
        assert len(_trial_rows(s, t.number)) == 4
        (val,) = _trial_rows(s, t.number, "val")
        assert float(val[EXACT_COLUMNS.index("accuracy")]) == t.value
    values = [r["value"] for r in table["trials"]]
    assert values == sorted(values, reverse=True)  # best first
    # the session's own model and metrics were not touched
    assert all(torch.equal(v, s.built.module.state_dict()[k]) for k, v in weights.items())
    assert all(r["trial"] == "" for r in read_rows(s.folder / "metrics.csv"))
    # apply: the best, then a named trial
    ok, res = run(app, "tune apply")
    best = study.best_trial
    assert ok and res["trial"] == best.number
    assert (s.config.lr, s.config.optimizer, s.config.weight_decay) == (
        best.params["lr"], best.params["optimizer"], best.params["weight_decay"])
    frozen = any(not p.requires_grad for p in s.built.module.parameters())
    assert frozen == (best.params["freeze"] == "backbone")
    other = next(n for n in trials if n != best.number)
    assert run(app, f"tune apply {other}")[1]["trial"] == other and s.config.lr == trials[other].params["lr"]
    # a study keeps its metric and its budget
    assert not run(app, "tune --metric val_loss")[0] and not run(app, "tune --epochs 2")[0]
    assert len(_study(s).trials) == 3


def test_a_hopeless_lr_is_pruned(app):
    s = app.session
    assert run(app, f"tune --trials 2 --epochs 2 --metric val_loss --space {FIXED}")[0]
    ok, table = run(app, f"tune --trials 1 --space {FIXED.replace('lr=0.05', 'lr=10')}")
    assert ok, app.stdout.getvalue()
    study = _study(s)
    t = study.trials[2]
    assert [x.state for x in study.trials] == [COMPLETE, COMPLETE, PRUNED]
    good = study.trials[0].intermediate_values[1]
    assert list(t.intermediate_values) == [1] and t.intermediate_values[1] > 100 * good  # stopped after epoch 1 of 2
    assert t.user_attrs["reason"] == "pruned" and t.user_attrs["fixed"]["lr"] == 10.0
    assert len(_trial_rows(s, 2)) == 4 and len(_trial_rows(s, 0)) == 8
    assert table["trials"][-1]["state"] == "pruned" and table["trials"][-1]["number"] == 2
    assert "trial 2 pruned at epoch 1" in app.stdout.getvalue()


def test_a_study_resumed_after_quit_does_not_repeat_trials(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder)
    start_weights = weights_of(s.built.module)
    T.start_tune(s, trials=2, epochs=1, space=FIXED)
    _wait(s)
    file = s.close(save=True)
    before = {t.number: (t.state, t.value, t.params, t.datetime_start, t.datetime_complete) for t in _study(s).trials}
    assert sorted(before) == [0, 1]
    r = Session.open(file)
    r.train(steps=2)  # the live model moves on; the study's trials still start from its initial weights
    _wait(r)
    msg = T.start_tune(r, trials=2)  # metric, budget and space come from the study
    assert "(2 trials so far)" in msg and "batch_size=8" in msg
    _wait(r)
    after = _study(r).trials
    assert [t.number for t in after if t.state == COMPLETE] == [0, 1, 2, 3]
    assert {n: (t.state, t.value, t.params, t.datetime_start, t.datetime_complete)
            for n, t in enumerate(after) if n < 2} == before
    assert len({t.value for t in after}) == 1  # the same run four times: same weights, same data
    assert len({tuple(_trial_rows(r, n)) for n in range(4)}) == 1 and len(_trial_rows(r, 3)) == 4
    assert r.trainer.pos.step == 2  # the session's own run is where `train` left it
    init = load_checkpoint(r.folder / "trials" / f"{r.name}.initial.safetensors")["model"]
    assert all(torch.equal(init[k], v) for k, v in start_weights.items())
    r.close(save=False)


def test_pause_and_continue_during_a_trial(app):
    s = app.session
    seen = []

    def pause_in_trial_1(info):
        seen.append((info.get("trial"), info["step"]))
        if info.get("job") == "tune" and info["trial"] == 1 and info["step"] == 2:
            s.request_pause()

    s.batch_listeners.append(pause_in_trial_1)
    ok, _ = run(app, f"tune --trials 3 --epochs 2 --space {FIXED}")
    assert ok and s.paused and not s.running
    assert [t.state for t in _study(s).trials] == [COMPLETE, RUNNING]  # paused, not failed
    assert len(_trial_rows(s, 1)) == 2 and "trial 1 paused at epoch 1 batch 2" in app.stdout.getvalue()
    ok, table = run(app, "continue")
    assert ok and not s.paused, app.stdout.getvalue()
    trials = _study(s).trials
    assert [t.state for t in trials] == [COMPLETE] * 3 and [t.number for t in trials] == [0, 1, 2]
    # the paused trial went on exactly where it stopped: its rows are trial 0's, step by step, none twice
    assert _trial_rows(s, 1) == _trial_rows(s, 0) == _trial_rows(s, 2)
    assert [int(r[0]) for r in _trial_rows(s, 1)] == list(range(1, 9))
    assert len({t.value for t in trials}) == 1 and seen.count((1, 2)) == 1
    assert [r["number"] for r in run(app, "tune show")[1]["trials"]] == [0, 1, 2]


def test_a_trial_interrupted_by_quit_runs_again_first(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder)

    def pause_in_trial_1(info):
        if info.get("trial") == 1 and info["step"] == 2:
            s.request_pause()

    s.batch_listeners.append(pause_in_trial_1)
    T.start_tune(s, trials=2, epochs=1, space=FIXED.replace("lr=0.05", "lr=0.01,0.05"))
    assert s.wait(WAIT) and s.paused
    file = s.close(save=True)  # quit while the trial is paused: Optuna still says RUNNING
    lost = _study(s).trials[1]
    assert lost.state == RUNNING
    r = Session.open(file)
    assert "re-running interrupted trial 1 first" in T.start_tune(r, trials=1)
    _wait(r)
    t0, t1, t2 = _study(r).trials
    assert (t0.state, t1.state, t2.state) == (COMPLETE, FAIL, COMPLETE)
    assert t2.user_attrs["retry_of"] == 1 and t2.params == lost.params
    rows = {x["number"]: x for x in T.trials_table(r)["trials"]}
    assert rows[1]["state"] == "fail" and rows[1]["reason"] == "interrupted"
    r.close(save=False)


def test_a_session_keeps_its_trial_key_when_renamed_or_reopened_and_a_copy_gets_its_own(tmp_path, split_folder):
    import json
    import socket

    root = tmp_path / "sessions"
    s = Session(root=root)
    s.attach_data(str(split_folder), size=32)
    s.load_model("test_resnet")
    s.save()  # auto-named
    key = T.session_key(s)
    s.save(str(root / "renamed.session"))  # renames the auto-named folder: the same session
    assert T.session_key(s) == key
    s.close(save=True)
    file = root / "renamed.session"
    r = Session.open(file)
    assert T.session_key(r) == key
    r.save(str(root / "copy.session"))  # save-as of a named session: another session from here on
    assert T.session_key(r) not in (key, "") and json.loads(file.read_text())["id"] == key.split(":", 1)[1]
    r.close(save=True)
    doc = json.loads(file.read_text())
    del doc["id"]  # a file from before session ids: identified by its folder, as then
    file.write_text(json.dumps(doc))
    old = Session.open(file)
    assert T.session_key(old) == f"{socket.gethostname()}:{(root / 'renamed').resolve()}"
    old.close(save=False)


def test_save_during_a_search_keeps_the_session_and_the_search(tmp_path, split_folder):
    s = new_session(tmp_path / "sessions", split_folder)
    weights = weights_of(s.built.module)
    saved = threading.Event()

    def save_in_trial_0(info):  # `save` from another thread, as the shell's would be: pause, save, continue
        if info.get("trial") == 0 and info["step"] == 1:
            threading.Thread(target=lambda: (s.save(), saved.set())).start()

    s.batch_listeners.append(save_in_trial_0)
    T.start_tune(s, trials=2, epochs=2, space=FIXED)
    assert saved.wait(WAIT)
    _wait(s)
    assert [t.state for t in _study(s).trials] == [COMPLETE, COMPLETE]
    assert len(_trial_rows(s, 0)) == len(_trial_rows(s, 1)) == 8
    s.close(save=False)
    r = Session.open(s.file)  # the session's own (untrained) model was saved, not lost to the search
    assert all(torch.equal(v, r.built.module.state_dict()[k]) for k, v in weights.items())
    r.close(save=False)


def test_steps_budget_and_two_sessions_sharing_one_study(tmp_path, split_folder):
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    a, b = new_session(tmp_path / "sessions", split_folder, "a"), new_session(tmp_path / "sessions", split_folder, "b")
    space = FIXED.replace("lr=0.05", "lr=0.01,0.05")
    T.start_tune(a, trials=1, steps=3, space=space, storage=url, study="shared")
    _wait(a)
    assert "(1 trials so far)" in T.start_tune(b, trials=1, storage=url, study="shared")  # the study's budget: 3 steps
    _wait(b)
    study = optuna.load_study(study_name="shared", storage=url)
    t0, t1 = study.trials
    assert (t0.state, t1.state) == (COMPLETE, COMPLETE) and t0.user_attrs["session"] != t1.user_attrs["session"]
    for s, t in ((a, t0), (b, t1)):  # 3 batches, one validation at the end, reported at step 3
        assert list(t.intermediate_values) == [3] and t.value == t.intermediate_values[3]
        assert len(_trial_rows(s, f"shared#{t.number}")) == 3 and not (s.folder / "tune.db").exists()
        table = T.trials_table(s)  # tune.json remembers the storage and the study
        assert table["study"] == "shared" and table["budget"] == {"steps": 3} and len(table["trials"]) == 2
    a.close(save=False)
    b.close(save=False)


@pytest.mark.parametrize("line, message", [
    ("tune --space lr", "look like"), ("tune --space lr=1:0.1", "low end"), ("tune show", "no study yet"),
    ("tune apply", "no study yet"), ("tune --trials 0", "positive"), ("tune --epochs 2 --steps 3", "not both"),
    ("tune --pruner hyperband", "invalid choice"), ("tune 3", "invalid choice"),
    ("lrfind apply", "no learning-rate range test yet"), ("lrfind --start 1 --end 0.1", "0 < --start < --end"),
    ("lrfind --steps 3", "at least 10"), ("lrfind --out lr.jpg", "png"), ("lrfind show valley", "goes with apply"),
    ("lrfind valley", "invalid choice"),
])
def test_bad_tuning_input_gives_one_clear_line(app, capsys, line, message):
    ok, _ = run(app, line)
    err = capsys.readouterr().err
    assert not ok and message in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 or err.startswith("Usage:"), err  # ours: one line; argparse's: usage
    assert not app.session.running


def test_tuning_engine_imports_without_cmd2():
    code = ("import sys; sys.modules['cmd2'] = None; sys.modules['prompt_toolkit'] = None\n"
            "import pgshell.engine.train.lrfind, pgshell.engine.search, pgshell.session.study\n"
            "assert 'cmd2' not in [m for m in sys.modules if sys.modules[m] is not None]\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

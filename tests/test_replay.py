"""The change log, `history`, `export plan` and its replay (in a new process once, in-process otherwise), `expect`,
`fork`, and `plot`'s marks."""

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pgshell.engine.store import checkpoint as C
from pgshell.engine.train.metrics import EXACT_COLUMNS, read_rows
from pgshell.session import Session
from pgshell.session.replay import export_plan, history
from pgshell.shell import PgShell

from conftest import pgshell_here
from conftest import run as run_line
from test_interactive import spawn

ROOT = Path(__file__).resolve().parent.parent
TOOLBAR = r"epoch \d+ +batch \d+/8 +loss"  # batch_size 4: 30 training images make 8 batches


# ---------------------------------------------------------------- helpers
@pytest.fixture
def app(tmp_path):
    a = PgShell(interactive=False, sessions_dir=str(tmp_path / "sessions"), stdout=io.StringIO())
    yield a
    a.session.close(save=False)


def run(app, line):
    """One command in-process; returns last_result, and fails the test if the command failed."""
    ok, result = run_line(app, line)
    assert ok, f"`{line}` failed: {app.stdout.getvalue()[-600:]}"
    return result


def rows_of(folder: Path) -> list[tuple]:
    return [tuple(r[c] for c in EXACT_COLUMNS) for r in read_rows(folder / "metrics.csv")]


def latest(folder: Path) -> dict:
    return C.load_latest(folder / "checkpoints")[1]


def replay(plan: Path, cwd: Path, new_process: bool = False) -> subprocess.CompletedProcess:
    """`pgshell PLAN` in an empty folder: in this process (its `main`), or in a new process."""
    cwd.mkdir(parents=True, exist_ok=True)
    if not new_process:
        return pgshell_here(str(plan), cwd=cwd)
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
    return subprocess.run([sys.executable, "-m", "pgshell", str(plan)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def replayed_folder(cwd: Path) -> Path:
    (file,) = (cwd / "sessions").glob("*.session")
    return file.with_suffix("")


def assert_same_run(a: Path, b: Path) -> None:
    """Bit-identical weights (and position) at the end, and identical metrics rows (all but seconds and run)."""
    sa, sb = latest(a), latest(b)
    assert sa["position"] == sb["position"]
    assert sa["model"].keys() == sb["model"].keys()
    assert all(torch.equal(sa["model"][k], sb["model"][k]) for k in sa["model"]), "weights differ"
    ra, rb = rows_of(a), rows_of(b)
    assert len(ra) == sa["position"]["step"] + sa["position"]["epoch"] and ra == rb


def log_of(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "changes.jsonl").read_text().splitlines()][1:]


# ---------------------------------------------------------------- the interactive session, replayed
def test_changes_typed_while_training_paused_reopened_then_replayed_bit_for_bit(tmp_path, split_folder):
    """`set lr`, `set weight_decay`, `freeze`, `unfreeze` typed while the run goes on (each after the toolbar shows
    progress: the moment is the test's, the position the loop's), pause, quit, reopen, continue, pause, `export
    plan`: a new process running the plan ends with the same weights and the same metrics rows."""
    sh = spawn(tmp_path)
    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 4"):
        sh.cmd(line)
    sh.cmd("train 1000", expect="training 1000 epochs")  # far more than it trains before the test pauses it
    for line, said in (("set lr 0.01", "applies at the next batch"), ("set weight_decay 0.0005", "applies at the"),
                       ("freeze layer1", "trainable"), ("unfreeze all", "trainable")):
        sh.expect(TOOLBAR)
        sh.cmd(line, expect=said)
    sh.expect(TOOLBAR)
    sh.cmd("pause", expect="paused at epoch")
    sh.cmd("save cut.session", expect="saved")
    sh.child.sendline("quit")
    assert sh.finish() == 0

    sh = spawn(tmp_path, "-s", "cut.session")
    sh.cmd("continue", expect="training")
    sh.expect(TOOLBAR)
    sh.cmd("set lr 0.003", expect="applies at the next batch")
    sh.expect(TOOLBAR)
    sh.cmd("pause", expect="paused at epoch")
    sh.cmd(f"export plan {tmp_path / 'cut.plan'}", expect="wrote")
    sh.child.sendline("quit")
    assert sh.finish() == 0

    changes = [e for e in log_of(tmp_path / "cut") if e["kind"] != "train"]
    assert [e["cmd"] for e in changes][-5:] == ["set lr 0.01", "set weight_decay 0.0005", "freeze layer1",
                                                "unfreeze all", "set lr 0.003"]
    end = latest(tmp_path / "cut")["position"]["step"]
    live = [e["step"] for e in changes[-5:]]
    assert live == sorted(live) and 0 < live[0] and live[-1] < end  # each applied while the run went on

    r = replay(tmp_path / "cut.plan", tmp_path / "again", new_process=True)  # nothing carried over in memory
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(tmp_path / "cut", replayed_folder(tmp_path / "again"))


# ---------------------------------------------------------------- tune apply, lrfind apply
def test_replay_after_lrfind_apply_and_tune_apply_is_bit_identical(app, split_folder, tmp_path):
    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "train --steps 2",
                 "lrfind --steps 12 --start 1e-5 --end 0.1", "lrfind apply", "train --steps 3",
                 "tune --trials 1 --steps 2 --space lr=1e-3:1e-1:log weight_decay=1e-5:1e-2:log optimizer=- "
                 "batch_size=- freeze=none label_smoothing=-", "tune apply", "train --steps 3"):
        run(app, line)
    s = app.session
    via = [(e["cmd"].split()[1], e.get("via")) for e in s.changes.entries if e.get("via")]
    assert via[0] == ("lr", "lrfind apply valley")
    assert {name for name, v in via[1:]} >= {"lr", "weight_decay"} and {v for _, v in via[1:]} == {"tune apply 0"}
    assert s.config.lr == [e["value"] for e in s.changes.entries if e["kind"] == "set" and e["name"] == "lr"][-1]
    res = run(app, f"export plan {tmp_path / 'tuned.plan'}")
    assert res["warnings"] == [] and res["step"] == 8
    folder = s.folder
    s.close(save=True)

    r = replay(tmp_path / "tuned.plan", tmp_path / "again")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(folder, replayed_folder(tmp_path / "again"))


def test_a_probe_applied_as_the_head_scores_as_the_probe_reopens_and_replays_bit_identical(app, split_folder,
                                                                                             tmp_path):
    """`probe linear --apply` (LP-FT): the model's val accuracy is the probe's before any training, the head survives
    a reopen at step 0, and a plan refits the same probe so the replay trains the same weights."""
    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8"):
        run(app, line)
    s = app.session
    before = s.built.module.fc.weight.detach().clone()
    res = run(app, "probe linear --apply")
    assert res["head"] == "fc" and not torch.equal(s.built.module.fc.weight, before)
    assert run(app, "eval --split val")["val"]["accuracy"] == pytest.approx(res["accuracy"])
    assert [e["cmd"] for e in s.changes.entries][-1] == "probe linear --apply"
    head = s.built.module.fc.weight.detach().clone()
    run(app, "save")  # names the session and writes it
    file = s.folder.with_suffix(".session")
    s.close(save=True)
    again = Session.open(file)  # reopened at step 0: the head is the probe's, not the load's
    try:
        assert torch.equal(again.built.module.fc.weight, head)
        again.train(steps=3)
        again.wait()
        res = export_plan(again, str(tmp_path / "lpft.plan"))
    finally:
        again.close(save=True)
    assert res["warnings"] == [] and res["step"] == 3
    assert "probe linear --apply" in (tmp_path / "lpft.plan").read_text()
    folder = s.folder
    r = replay(tmp_path / "lpft.plan", tmp_path / "again")
    assert r.returncode == 0, r.stderr[-2000:]
    assert_same_run(folder, replayed_folder(tmp_path / "again"))


# ---------------------------------------------------------------- what cannot replay is named
def _repaint(path: Path) -> None:
    a = np.asarray(Image.open(path)).copy()
    a[0, 0] = 255 - a[0, 0]
    Image.fromarray(a).save(path)


def test_a_replay_with_one_data_file_changed_names_it_and_stops(app, split_folder, tmp_path):
    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "train --steps 2"):
        run(app, line)
    plan = tmp_path / "p.plan"
    assert run(app, f"export plan {plan}")["warnings"] == []
    _repaint(split_folder / "train" / "dog" / "dog_003.png")

    # export says it too, naming the plan line and the file
    warnings = run(app, f"export plan {plan}")["warnings"]
    expect_line = next(i for i, ln in enumerate(plan.read_text().splitlines(), 1) if ln.startswith("expect data"))
    assert len(warnings) == 1 and warnings[0].startswith(f"plan line {expect_line} (`expect data ")
    assert "train/dog/dog_003.png changed" in warnings[0]

    r = replay(plan, tmp_path / "again")
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 1 and len(errors) == 1, r.stderr
    assert errors[0].startswith(f"{plan}:{expect_line}: expect data ")  # the plan's line, then the error
    assert f": error: the data of `data {split_folder}" in errors[0]
    assert "train/dog/dog_003.png changed" in errors[0] and "stops here" in errors[0]
    assert "training" not in r.stdout  # nothing after the failing line ran


def test_expect_names_a_weights_file_that_changed_and_weights_that_differ(app, tmp_path, capsys):
    import timm
    from safetensors.torch import save_file

    from pgshell.engine.store.digests import file_sha256

    weights = tmp_path / "w.safetensors"
    for seed in (3, 4):  # the file the session loads, then another one under its name
        torch.manual_seed(seed)
        save_file(timm.create_model("test_resnet", num_classes=3).state_dict(), str(weights))
        if seed == 3:
            run(app, f"load test_resnet --weights {weights} --classes 3")
            (entry,) = app.session.changes.entries
            assert entry["weights_sha256"] == file_sha256(weights)
            assert run(app, f"expect file {weights} {entry['weights_sha256']}") is True
            assert run(app, f"expect weights {entry['digest']}") is True
    for line in (f"expect file {weights} {entry['weights_sha256']}", f"expect file {tmp_path / 'gone.pth'} 00ff"):
        app.failed.clear()
        app.onecmd_plus_hooks(line)
        assert app.failed.is_set()
    run(app, f"load test_resnet --weights {weights} --classes 3")
    app.failed.clear()
    app.plan_line = "plan.txt:7: expect weights"  # in a plan, the error names the plan's line first
    app.onecmd_plus_hooks(f"expect weights {entry['digest']}")
    errors = capsys.readouterr().err.splitlines()
    assert errors[0].startswith(f"error: {weights} differs by checksum from the file the session loaded")
    assert errors[1].startswith(f"error: {tmp_path / 'gone.pth'} is missing")
    assert errors[2].startswith("plan.txt:7: expect weights: error: the weights differ from the session's")
    assert len(errors) == 3


# ---------------------------------------------------------------- fork
def test_a_fork_from_epoch_2_matches_the_parent_before_and_differs_from_its_first_step_after(app, split_folder,
                                                                                           tmp_path):
    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "train 3"):
        run(app, line)
    parent = app.session
    parent_rows, parent_file = rows_of(parent.folder), parent.file
    epoch3 = C.load_checkpoint(parent.folder / "checkpoints" / "epoch-0003.safetensors")
    n_parent = len(parent.changes.entries)

    run(app, "fork lower --checkpoint 2")
    fork = app.session
    assert fork.name == "lower" and fork.trainer.pos.step == 8 and not parent.worker.thread.is_alive()
    assert rows_of(fork.folder) == [r for r in parent_rows if int(r[0]) <= 8]
    assert [e["kind"] for e in fork.changes.entries] == [e["kind"] for e in parent.changes.entries] + ["fork"]
    assert fork.changes.entries[-1]["step"] == 8 and len(fork.changes.entries) == n_parent + 1
    run(app, "set lr 0.05")
    run(app, "train 1")
    after = {int(r[0]): r for r in rows_of(fork.folder) if r[3] == "train"}
    before = {int(r[0]): r for r in parent_rows if r[3] == "train"}
    assert after[9][4] == before[9][4]  # step 9 starts from the same weights: the same loss ...
    assert float(after[9][6]) == 0.05 != float(before[9][6])  # ... with the new lr
    assert all(after[k][4] != before[k][4] for k in (10, 11, 12))  # from then on the runs differ
    forked = latest(fork.folder)["model"]
    assert not all(torch.equal(forked[k], epoch3["model"][k]) for k in forked)

    # epoch 2 keeps its weights only (retention: the optimizer state lives at the resume point), so a fork from it
    # restarts the momentum and says so; a fork from the resume point continues as the parent would, bit for bit
    said = []
    other = PgShell(session=Session.open(parent_file), interactive=False, stdout=io.StringIO())
    other.session.notify = said.append
    try:
        run(other, "fork same --checkpoint last")
        assert any("keeps the weights only" in m for m in other.stdout.getvalue().splitlines() + said) is False
        run(other, "train 1")
        same_rows = rows_of(other.session.folder)
    finally:
        other.session.close(save=False)
    ref = Session.open(parent_file)
    try:
        ref.train(epochs=1)
        assert ref.wait(120) and "error" not in ref.status
        assert same_rows == rows_of(ref.folder) and len(same_rows) > len(parent_rows)
    finally:
        ref.close(save=False)


# ---------------------------------------------------------------- history and plot marks
def test_history_and_plot_marks_are_at_the_logged_steps(app, split_folder, tmp_path):
    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "train --steps 3",
                 "set lr 0.01", "freeze layer1", "train --steps 2", "unfreeze all", "train --steps 1"):
        run(app, line)
    hist = run(app, "history")
    assert [(e["cmd"], e["step"], e["where"]) for e in hist if e["step"]] == [
        ("set lr 0.01", 3, "epoch 1 batch 3"), ("freeze layer1", 3, "epoch 1 batch 3"),
        ("train --steps 2", 3, "epoch 1 batch 3"), ("unfreeze all", 5, "epoch 2 batch 1"),
        ("train --steps 1", 5, "epoch 2 batch 1")]
    assert "set lr 0.01" in app.stdout.getvalue() and "was 0.001" in app.stdout.getvalue()
    logged = [(e["step"], e["cmd"]) for e in log_of(app.session.folder) if e["step"] and e["kind"] != "train"]

    res = run(app, "plot")
    marks = res["series"][app.session.name]["changes"]
    assert [(m["step"], m["label"]) for m in marks] == [(3, "lr 0.01"), (3, "freeze layer1"), (5, "unfreeze all")]
    assert [m["step"] for m in marks] == [step for step, _ in logged]
    assert "◆ 3 lr 0.01 · 3 freeze layer1 · 5 unfreeze all" in res["text"]
    png = tmp_path / "p.png"
    res = run(app, f"plot --out {png} {app.session.folder}")  # read back from the folder's changes.jsonl
    assert png.stat().st_size > 10_000 and res["series"][app.session.name]["changes"] == marks


def test_a_reopened_session_drops_changes_logged_after_its_checkpoint(split_folder, tmp_path):
    """A change logged after the last checkpoint by a process that then died is not part of the session."""
    s = Session(root=tmp_path / "s")
    s.attach_data(str(split_folder), size=32)
    s.load_model("test_resnet")
    s.set("batch_size", 8)
    s.train(steps=2)
    s.wait()
    s.set("lr", 0.05)  # logged, never checkpointed: the process dies
    file = s.file
    s.close(save=False)
    assert [e["cmd"] for e in log_of(file.with_suffix(""))][-1] == "set lr 0.05"
    with open(file.with_suffix("") / "changes.jsonl", "a") as f:
        f.write('{"n": 6, "kind": "set", "cmd": "set lr 0.')  # killed in the middle of an append
    seen = []
    s = Session.open(file, notify=seen.append)
    try:
        assert s.config.lr == 0.001 and [e["cmd"] for e in s.changes.entries][-1] == "train --steps 2"
        assert "dropped 1 change-log entry written after the checkpoint" in seen
        s.set("momentum", 0.8)
        assert [e["cmd"] for e in log_of(s.folder)][-2:] == ["train --steps 2", "set momentum 0.8"]
    finally:
        s.close(save=False)


@pytest.mark.parametrize("what", [["layer1"], ["backbone"]])
def test_a_freeze_applied_mid_run_trains_as_one_made_between_two_runs(split_folder, tmp_path, what):
    """What a replay relies on: `freeze` between two batches of a run (it restarts the run there: frozen BatchNorm
    layers, the feature cache for a frozen backbone) gives the weights `freeze` between two runs gives."""
    def session(name):
        s = Session(root=tmp_path / name)
        s.attach_data(str(split_folder), size=32)
        s.load_model("test_resnet")
        s.set("batch_size", 8)
        return s

    between = session("between")
    between.train(steps=5)
    between.wait()
    between.freeze(what)
    between.train(steps=5)
    between.wait()
    mid = session("mid")
    mid.batch_listeners.append(lambda row: row["step"] == 5 and mid.freeze(what))  # from the worker, mid-run
    mid.train(steps=10)
    mid.wait()
    try:
        assert [e["step"] for e in mid.changes.entries if e["kind"] == "freeze"] == [5]
        a, b = between.built.module.state_dict(), mid.built.module.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)
        assert rows_of(between.folder) == rows_of(mid.folder)
    finally:
        between.close(save=False)
        mid.close(save=False)


def test_a_setting_that_waits_for_the_next_start_is_logged_where_it_applies(split_folder, tmp_path):
    s = Session(root=tmp_path / "s")
    s.attach_data(str(split_folder), size=32)
    s.load_model("test_resnet")
    s.set("batch_size", 8)
    said = []
    s.batch_listeners.append(lambda row: row["step"] == 2 and said.append(s.set("batch_size", 4)))
    s.train(steps=3)
    s.wait()
    try:
        assert said == ["batch_size applies when training next starts: `pause` then `continue` to use it now"]
        assert [e["cmd"] for e in s.changes.entries][-1] == "train --steps 3"  # held, not yet logged ...
        assert [(e["cmd"], e["where"]) for e in history(s)][-1] == ("set batch_size 4", "when training next starts")
        s.train(steps=1)
        s.wait()
        (entry,) = [e for e in s.changes.entries if e["cmd"] == "set batch_size 4"]
        assert (entry["step"], entry["epoch"], entry["batch"]) == (3, 0, 3)  # ... but where the next run began
        assert s.trainer.cfg.batch_size == 4 and s.changes.pending == []
    finally:
        s.close(save=False)

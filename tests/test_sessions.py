"""Sessions nothing can corrupt: a new `data`/`load` after training is a new run (never an overwrite), reopening takes
the checkpoint the session file names, `save` onto another session asks or refuses, one process writes a session at
a time, changed data is named on reopen with the choices, SIGTERM/SIGHUP pause and save, and a session's device is a
preference.

The fast tests work in-process (Session, or PgShell.onecmd_plus_hooks); the two-process race and the real-signal
test start `pgshell` subprocesses and are marked slow.
"""

import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from conftest import make_images, run_out

from pgshell.engine.store import checkpoint as C
from pgshell.engine.errors import PgError
from pgshell.engine.train.metrics import read_rows
from pgshell.session import Session

ROOT = Path(__file__).resolve().parent.parent
WAIT = 120
BATCHES = 4  # a training epoch of the train/val folders below: 30 images at batch_size 8


def _session(root: Path, data: Path, name: str | None = None) -> Session:
    s = Session(root=root)
    s.set("batch_size", 8)
    s.attach_data(str(data), size=32)
    s.load_model("test_resnet")
    if name:
        s.use_name(name)
    return s


def _train(s: Session, **kw) -> None:
    s.train(**kw)
    assert s.wait(WAIT) and "error" not in s.status, s.status


def _steps(folder: Path) -> list[int]:
    return [int(r["step"]) for r in read_rows(folder / "metrics.csv") if r["split"] == "train"]


def _weights(s: Session) -> dict:
    return {k: v.clone() for k, v in s.built.module.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _tv(root: Path) -> Path:
    make_images(root / "train", per_class=10, seed=1)
    make_images(root / "val", per_class=4, seed=2)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """sessions/s trained one epoch (4 steps) on tv/; copied for each test by `work`."""
    base = tmp_path_factory.mktemp("trained")
    s = _session(base / "sessions", _tv(base / "tv"), "s")
    _train(s, epochs=1)
    s.close(save=False)  # the epoch's checkpoint wrote the session file
    return base


@pytest.fixture
def work(trained, tmp_path) -> Path:
    """A private copy of `trained` whose session file points at the copy's own data folder."""
    dst = tmp_path / "w"
    shutil.copytree(trained, dst)
    file = dst / "sessions" / "s.session"
    doc = json.loads(file.read_text())
    doc["data"]["path"] = str(dst / "tv")
    file.write_text(json.dumps(doc))
    return dst


def _open(file: Path) -> tuple[Session, list[str]]:
    notes: list[str] = []
    return Session.open(file, notify=notes.append), notes


@pytest.fixture
def app(tmp_path, monkeypatch):
    from pgshell.shell import PgShell

    monkeypatch.chdir(tmp_path)
    a = PgShell(interactive=False, sessions_dir=str(tmp_path / "sessions"), stdout=io.StringIO())
    yield a
    a.session.close(save=False)


def run(app, capsys, line):
    return run_out(app, capsys, line)


def _one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("PGSHELL_FAULT", None)
    return env


# ------------------------------------------------------------------ a new data/load is a new run
def test_other_data_or_a_new_model_after_training_is_a_new_run_that_overwrites_nothing(tmp_path, split_folder):
    s = _session(tmp_path, split_folder, "r")
    _train(s, epochs=1)
    ck = s.folder / "checkpoints"
    first = C.load_checkpoint(ck / "epoch-0001.safetensors")["model"]
    notes: list[str] = []
    s.notify = notes.append
    s.attach_data(str(split_folder), size=32)  # the same data again: the run goes on
    assert s.ensure_trainer().pos.step == BATCHES and not notes
    other = make_images(tmp_path / "other", per_class=12, seed=5)  # class folders: 10 train + 2 val each
    s.attach_data(str(other), size=32)
    assert any("new run" in m and f"step {BATCHES}" in m for m in notes), notes
    _train(s, epochs=1)  # epochs and steps count on: epoch-0002, steps 5..8
    assert s.trainer.pos.epoch == 2 and s.trainer.pos.step == 2 * BATCHES
    s.load_model("test_resnet")  # a new model: another new run
    _train(s, steps=2)
    kept = C.load_checkpoint(ck / "epoch-0001.safetensors")["model"]  # slimmed once superseded, never overwritten
    assert kept.keys() == first.keys() and all(torch.equal(kept[k], first[k]) for k in first)
    assert C.read_metadata(ck / "epoch-0002.safetensors")["step"] == str(2 * BATCHES)
    assert _steps(s.folder) == list(range(1, 2 * BATCHES + 3))  # every step once, none written twice
    pos, weights = s.trainer.pos, _weights(s)
    file = s.save()
    s.close(save=False)
    r, notes = _open(file)
    assert r.trainer.pos == pos and _same(_weights(r), weights)  # reopened where the last run stopped
    assert r.splits.classes == ["cat", "dog", "fox"] and r.data["path"] == str(other)
    r.close(save=False)


def test_reopen_loads_the_checkpoint_the_file_names_never_another_runs(work):
    file = work / "sessions" / "s.session"
    ck = work / "sessions" / "s" / "checkpoints"
    named = C.load_checkpoint(ck / "epoch-0001.safetensors")
    # a newer checkpoint of another run in the folder (another session's, copied in): higher step, other weights
    stranger = dict(named, position={"epoch": 3, "batch": 0, "sample": 0, "step": 12},
                    model={k: torch.zeros_like(v) if v.is_floating_point() else v for k, v in named["model"].items()})
    C.save_checkpoint(ck / "epoch-0003.safetensors", stranger, {"step": 12, "epoch": 3, "lineage": "0ther"})
    r, notes = _open(file)
    assert r.trainer.pos.step == BATCHES and r.latest_checkpoint.name == "epoch-0001.safetensors"
    assert _same(dict(r.built.module.state_dict()), named["model"])
    assert any("another run" in m for m in notes) and not any("data changed" in m for m in notes), notes
    _train(r, steps=1)  # continuing writes its own files, never over the stranger's
    assert C.load_checkpoint(ck / "epoch-0003.safetensors")["position"]["step"] == 12
    r.close(save=False)


def test_the_model_the_session_file_names_is_the_one_reopened(app, capsys, split_folder, tmp_path):
    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "train 1",
                 "load test_vit", f"save {tmp_path}/m.session"):
        assert run(app, capsys, line)[0], line
    ok, _, err = run(app, capsys, "eval --checkpoint 1")  # the first run's checkpoint: another model
    assert not ok and "another model" in _one_error(err)
    app.session.close(save=False)
    r, _ = _open(tmp_path / "m.session")
    assert r.spec.name == "test_vit" and type(r.built.module).__name__ == "VisionTransformer"
    assert r.trainer.pos.step == BATCHES  # the new run starts where the first stopped
    r.close(save=False)


# ------------------------------------------------------------------ save onto another session, save NAME
def test_save_onto_another_session_refuses_in_a_plan_asks_interactively_and_force_replaces_it_whole(
        app, capsys, work, monkeypatch):
    k = work / "sessions" / "s.session"
    folder = k.parent / "s"
    before = {p: p.read_bytes() for p in [k, folder / "metrics.csv", *(folder / "checkpoints").iterdir()]}
    for line in (f"data {work / 'tv'} --size 32", "load test_resnet", "set batch_size 8", "set lr 0.05",
                 "train --steps 2"):
        assert run(app, capsys, line)[0], line
    ok, _, err = run(app, capsys, f"save {k}")
    assert not ok and "another session" in _one_error(err) and "--force" in err
    app.interactive = True  # at a terminal it asks
    monkeypatch.setattr(app, "read_input", lambda prompt: "n")
    ok, out, _ = run(app, capsys, f"save {k}")
    assert ok and "not saved" in out
    assert all(p.read_bytes() == b for p, b in before.items())  # k untouched, not merged into
    monkeypatch.setattr(app, "read_input", lambda prompt: "y")
    assert run(app, capsys, f"save {k}")[0]
    app.interactive = False
    assert run(app, capsys, f"save {k} --force")[0]
    app.session.close(save=False)
    assert [int(r["step"]) for r in read_rows(folder / "metrics.csv")] == [1, 2]  # ours alone
    assert sorted(p.name for p in (folder / "checkpoints").iterdir()) == ["step-0000002.safetensors"]
    r, _ = _open(k)
    assert r.config.lr == 0.05 and r.trainer.pos.step == 2
    r.close(save=False)


def test_save_name_renames_an_auto_named_session_and_copies_a_named_one(app, capsys, split_folder, tmp_path):
    sessions = tmp_path / "sessions"
    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "train --steps 1"):
        assert run(app, capsys, line)[0], line
    auto = app.session.name
    assert auto.startswith("test_resnet-") and (sessions / auto).is_dir()
    assert run(app, capsys, f"save {sessions}/good.session")[0]
    assert sorted(p.name for p in sessions.iterdir()) == ["good", "good.session"]  # moved, not copied
    assert _steps(sessions / "good") == [1]
    assert run(app, capsys, f"save {sessions}/copy.session")[0]  # a named session: save-as keeps the old one
    assert sorted(p.name for p in sessions.iterdir()) == ["copy", "copy.session", "good", "good.session"]
    ok, out, _ = run(app, capsys, "save named")  # a bare name: sessions/NAME.session, as `fork NAME`
    assert ok and out.strip().endswith(f"saved {sessions / 'named.session'}")
    assert sorted(p.name for p in sessions.iterdir()) == ["copy", "copy.session", "good", "good.session", "named",
                                                          "named.session"]
    assert _steps(sessions / "named") == [1]


def test_a_plan_that_fails_before_training_leaves_no_session_behind(tmp_path, split_folder, monkeypatch):
    from pgshell.shell import PgShell, run_plan

    monkeypatch.chdir(tmp_path)
    app = PgShell(interactive=False, sessions_dir=str(tmp_path / "sessions"), stdout=io.StringIO())
    plan = [f"data {split_folder} --size 32\n", "load test_resnet\n", "set lr banana\n"]
    assert run_plan(app, plan) == 1
    assert not (tmp_path / "sessions").exists() or list((tmp_path / "sessions").iterdir()) == []


# ------------------------------------------------------------------ one writer per session
def test_a_second_opener_gets_one_line_and_nothing_of_the_session_is_rewritten(work, app, capsys):
    file = work / "sessions" / "s.session"
    metrics = work / "sessions" / "s" / "metrics.csv"
    holder, _ = _open(file)
    with open(metrics, "a") as f:  # rows the holder wrote after its checkpoint (a run going on)
        f.write("5,2,1,train,0.9,0.5,0.001,8,0.1,2,\n")
    before, inode = metrics.read_bytes(), metrics.stat().st_ino
    with pytest.raises(PgError) as e:
        Session.open(file)
    msg = str(e.value)
    assert "\n" not in msg and "open in another pgshell" in msg and f"pid {os.getpid()}" in msg
    assert metrics.read_bytes() == before and metrics.stat().st_ino == inode  # not truncated, not replaced
    for line in (f"data {work / 'tv'} --size 32", "load test_resnet"):
        assert run(app, capsys, line)[0]
    ok, _, err = run(app, capsys, f"save {file} --force")  # not even --force takes a session in use
    assert not ok and "open in another pgshell" in _one_error(err) and file.exists()
    holder.close(save=False)
    r, _ = _open(file)  # released on close
    r.close(save=False)


@pytest.mark.slow
def test_two_processes_racing_on_one_session_one_trains_the_other_is_refused(work):
    file = work / "sessions" / "s.session"
    procs = [subprocess.Popen([sys.executable, "-m", "pgshell", "-s", str(file)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=work)
             for _ in range(2)]
    for p in procs:  # both start at once; whichever opens second is refused, whatever the timing
        p.stdin.write("train 3\n")
        p.stdin.close()
    results = [(p.wait(WAIT), p.stdout.read(), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _, _ in results)
    refused = [err for rc, _, err in results if rc == 1]
    if codes == [0, 1]:
        assert "open in another pgshell" in refused[0] and len(refused[0].strip().splitlines()) == 1
    else:  # the first had finished before the second opened: they ran one after the other
        assert codes == [0, 0]
    steps = _steps(work / "sessions" / "s")
    assert steps == list(range(1, len(steps) + 1)) and len(steps) == BATCHES * (4 if codes == [0, 1] else 7)


# ------------------------------------------------------------------ data changed between sessions
def _rename_class(tv: Path) -> str:
    for split in ("train", "val"):
        (tv / split / "fox").rename(tv / split / "zfox")
    return "classes cat, dog, fox -> cat, dog, zfox (fox gone; zfox new)"


def _new_class(tv: Path) -> str:
    make_images(tv / "train", classes=("owl",), per_class=10, seed=7)
    make_images(tv / "val", classes=("owl",), per_class=4, seed=8)
    return "owl new"


def _deleted_images(tv: Path) -> str:
    for p in sorted((tv / "train" / "dog").iterdir())[:5]:
        p.unlink()
    return "5 images gone"


@pytest.mark.parametrize("change", [_rename_class, _new_class, _deleted_images])
def test_data_changed_between_sessions_is_named_and_never_silently_relabelled(work, change):
    file = work / "sessions" / "s.session"
    said = change(work / "tv")
    r, notes = _open(file)
    note = next(m for m in notes if "data changed" in m)
    assert said in note and "data --keep" in note and "new run" in note, note
    assert r.splits is None  # detached until the user chooses
    with pytest.raises(PgError, match="data changed"):
        r.train(steps=1)
    r.attach_data(keep=True)  # the recorded images that still exist, with their recorded classes
    assert r.splits.classes == ["cat", "dog", "fox"]
    _train(r, steps=1)
    assert r.trainer.pos.step == BATCHES + 1  # the same run went on from its checkpoint
    r.close()
    r, notes = _open(file)  # kept: the next reopen takes the kept lists without asking again
    assert r.splits is not None and not any("data changed" in m for m in notes), notes
    notes.clear()
    r.notify = notes.append
    r.attach_data(str(work / "tv"), size=32)  # or: the folder as it is now, as a new run
    assert any("new run" in m for m in notes), notes
    assert (r.splits.classes == ["cat", "dog", "fox"]) == (change is _deleted_images)
    r.close(save=False)


def test_new_images_in_a_ratio_split_folder_would_move_validation_images_and_are_named(tmp_path):
    data = make_images(tmp_path / "imgs", classes=("ants", "bees"), per_class=20)
    s = _session(tmp_path / "sessions", data, "ratio")
    file = s.save()
    s.close(save=False)
    make_images(tmp_path / "more", classes=("ants",), per_class=25)
    for p in sorted((tmp_path / "more" / "ants").iterdir())[20:]:  # 5 new images of ants
        p.rename(data / "ants" / f"new_{p.name}")
    r, notes = _open(file)
    note = next(m for m in notes if "data changed" in m)
    assert "5 images added" in note and "moved from val to train" in note, note
    r.close(save=False)


# ------------------------------------------------------------------ SIGTERM / SIGHUP
SIGNAL_MODEL = '''
import os
import signal

from torch import nn


class Net(nn.Module):
    def __init__(self, num_classes):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)
        self.calls = 0

    def forward(self, x):
        if self.training and x.shape[0] > 1:
            self.calls += 1
            if self.calls == 3:  # during the third training batch: as if `kill -TERM` came then
                if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                    raise RuntimeError("no SIGTERM handler: the signal would end the process unsaved")
                os.kill(os.getpid(), signal.SIGTERM)
        return self.fc(self.features(x))


def sends_sigterm(num_classes):
    return Net(num_classes)
'''


def test_sigterm_pauses_at_the_batch_boundary_saves_and_exits(tmp_path, split_folder, monkeypatch):
    from pgshell.shell import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "net.py").write_text(SIGNAL_MODEL)
    plan = tmp_path / "plan.txt"
    plan.write_text(f"data {split_folder} --size 32\nload {tmp_path}/net.py:sends_sigterm\nset batch_size 8\n"
                    "save sig.session\ntrain 3\nshow\n")
    handler = signal.getsignal(signal.SIGTERM)
    assert main([str(plan)]) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == handler  # restored
    doc = json.loads((tmp_path / "sig.session").read_text())
    assert doc["checkpoint"] == "sig/checkpoints/step-0000003.safetensors"  # batch 3 finished, then the pause
    assert _steps(tmp_path / "sig") == [1, 2, 3]
    r, _ = _open(tmp_path / "sig.session")
    assert r.trainer.pos.step == 3 and r.paused and r.target == {"epoch": 3}
    r.close(save=False)


@pytest.mark.slow
def test_sighup_from_a_closed_terminal_saves_the_run_in_a_real_process(tmp_path, split_folder):
    plan = f"data {split_folder} --size 32\nload test_resnet\nset batch_size 8\nsave h.session\ntrain 200\n"
    p = subprocess.Popen([sys.executable, "-m", "pgshell"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=_env(), cwd=tmp_path)
    p.stdin.write(plan)
    p.stdin.close()
    epochs_done = threading.Event()
    lines: list[str] = []

    def read():
        for line in p.stdout:
            lines.append(line)
            if line.startswith("epoch 2 done"):
                epochs_done.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert epochs_done.wait(WAIT), "".join(lines)
    p.send_signal(signal.SIGHUP)
    assert p.wait(WAIT) == 128 + signal.SIGHUP, p.stderr.read()
    reader.join(WAIT)
    err = p.stderr.read()
    assert "SIGHUP: paused and saved" in err and "Traceback" not in err, err
    doc = json.loads((tmp_path / "h.session").read_text())
    state = C.load_checkpoint(tmp_path / doc["checkpoint"])
    step = state["position"]["step"]
    assert step > 2 * BATCHES and _steps(tmp_path / "h") == list(range(1, step + 1))  # nothing lost, nothing extra
    r, _ = _open(tmp_path / "h.session")
    assert r.trainer.pos.step == step and r.paused
    r.close(save=False)


# ------------------------------------------------------------------ device is a preference
def test_a_device_that_is_not_here_reopens_on_what_exists_with_a_note(work, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a laptop, whatever this machine has
    file = work / "sessions" / "s.session"
    ckpt = work / "sessions" / "s" / "checkpoints" / "epoch-0001.safetensors"
    state = C.load_checkpoint(ckpt)  # the checkpoint came from a GPU machine
    state["config"].update(device="cuda:0", amp="bf16")
    C.save_checkpoint(ckpt, state, C.read_metadata(ckpt))
    doc = json.loads(file.read_text())
    doc["config"].update(device="cuda:0", amp="bf16")
    file.write_text(json.dumps(doc))
    r, notes = _open(file)
    assert any("device cuda:0" in m and "not here" in m and "cpu" in m for m in notes), notes
    assert r.trainer.runtime.device.type == "cpu" and r.config.device == "cuda:0"  # the preference is kept
    _train(r, steps=1)
    r.close()
    assert json.loads(file.read_text())["config"]["device"] == "cuda:0"
    r, _ = _open(file)
    r.set("device", "cuda")  # asked for here and now: it must exist
    with pytest.raises(PgError, match="no GPU is visible"):
        r.train(steps=1)
    r.close(save=False)


@pytest.mark.slow
def test_sighup_while_training_from_the_interactive_prompt_saves_the_run(tmp_path, split_folder):
    import pexpect
    from test_interactive import Screen

    screen = Screen(tmp_path)
    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "save i.session",
                 "train 200"):
        screen.cmd(line)  # `train` returns to the prompt at once: the run goes on in the background
    screen.expect("epoch 2 done")
    screen.child.kill(signal.SIGHUP)  # the terminal window closed
    screen.child.expect(pexpect.EOF, timeout=WAIT)
    screen.child.close()
    assert screen.child.exitstatus == 128 + signal.SIGHUP, screen.text[-800:]
    doc = json.loads((tmp_path / "i.session").read_text())
    step = C.load_checkpoint(tmp_path / doc["checkpoint"])["position"]["step"]
    assert step > 2 * BATCHES and _steps(tmp_path / "i") == list(range(1, step + 1))


def test_a_closed_session_refuses_to_train_instead_of_waiting_forever(tmp_path, split_folder):
    from pgshell.session import Session

    s = Session(root=tmp_path / "sessions")
    s.attach_data(str(split_folder), size=32)
    s.load_model("test_resnet")
    s.close(save=False)
    with pytest.raises(PgError, match="this session is closed"):
        s.train(1)
    assert s.wait(timeout=5) and not s.running

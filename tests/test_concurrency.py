"""Commands from the shell while the worker trains: hundreds of them interleaved with a running training change
nothing they should not — the metrics log has every training step exactly once, the end equals a run left alone,
and the newest checkpoint holds exactly the final weights. A soak test (slow) cycles pause/continue thousands of
times and checks that memory and threads stay flat.

The shell runs in-process in script mode, but with `train`/`continue` returning at once as they do interactively
(after_start is the one difference between the two modes), so commands really overlap the run.
"""

import contextlib
import io
import os
import random
import threading
from pathlib import Path

import pytest
import torch

from pgshell.engine.store import checkpoint as C
from pgshell.session import Session

from conftest import exact_rows, new_app, weights_of

WAIT = 300
EPOCHS, BATCH = 6, 3  # split_folder: 30 training images -> 10 steps per epoch, 60 in all


def _configure(s: Session, folder: Path) -> None:
    s.set("batch_size", BATCH)
    s.set("epochs", EPOCHS)
    s.attach_data(str(folder), size=32)
    s.load_model("test_resnet")


def _one(app, line: str) -> tuple[bool, str]:
    app.failed.clear()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        app.onecmd_plus_hooks(line)
    return not app.failed.is_set(), err.getvalue()


# Errors a command may meet for racing the run, by design (e.g. `pause` just as the run ended)
BENIGN = ("nothing is training", "already running", "nothing to continue", "already trained", "nothing to stop",
          "still finishing")


def test_hundreds_of_commands_while_training_lose_nothing(tmp_path, split_folder, monkeypatch):
    ref = Session(root=tmp_path / "ref")
    _configure(ref, split_folder)
    ref.use_name("ref")
    ref.train()
    assert ref.wait(WAIT) and "error" not in ref.status
    ref_weights = weights_of(ref.built.module)
    ref_rows = exact_rows(ref.folder)
    ref.close(save=False)

    monkeypatch.chdir(tmp_path)
    app = new_app(tmp_path / "sessions")
    app.after_start = lambda: None  # train/continue return at once, as at the prompt
    s = app.session
    _configure(s, split_folder)
    s.use_name("stress")
    rng = random.Random(0)
    commands = (["show"] * 6 + ["eval"] * 2 + ["set log_every 3", "set log_every 0", "set momentum 0.9",
                "set keep_last 2", "set keep_last 0"] * 2 + ["pause"] * 3 + ["continue"] * 3 + ["save"] * 2
                + ["stop", "train"])
    ran, overlapped, failures = 0, 0, []
    try:
        assert _one(app, "train")[0]
        for i in range(400):
            line = rng.choice(commands)
            if not s.running and rng.random() < 0.7:  # mostly keep it running: that is where races live
                line = "continue" if s.paused else "train"
            if i == 150:
                line = "save moved.session"  # a new name mid-run: the folder moves under the worker's feet
            running = s.running
            ok, err = _one(app, line)
            ran += 1
            overlapped += running
            assert "Traceback" not in err and "internal error" not in err, (i, line, err)
            if not ok:
                assert err.startswith("error: ") and any(b in err for b in BENIGN), (i, line, err)
                failures.append(line)
            if not s.running and not s.paused and s.trainer.pos.epoch >= EPOCHS:
                break  # the run reached its end
        assert s.wait(WAIT)
        if s.trainer.pos.epoch < EPOCHS:  # finish what the last pause or stop left
            assert _one(app, "continue" if s.paused else "train")[0]
        assert s.wait(WAIT) and "error" not in s.status, s.status
        assert overlapped >= 100, f"only {overlapped} of {ran} commands ran while training"
        folder = s.folder
        assert folder.name == "moved"
        rows = exact_rows(folder)
        train_steps = [int(r[0]) for r in rows if r[3] == "train"]
        assert train_steps == list(range(1, EPOCHS * 10 + 1))  # every step once: none lost, none repeated
        assert rows == ref_rows
        w = s.built.module.state_dict()
        assert all(torch.equal(w[k], v) for k, v in ref_weights.items())  # as if nobody had touched it
        path, state = C.load_latest(folder / "checkpoints")
        assert state["position"] == {"epoch": EPOCHS, "batch": 0, "sample": 0, "step": EPOCHS * 10}
        assert all(torch.equal(state["model"][k], v) for k, v in w.items())
    finally:
        s.close(save=False)


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


MODEL_FILE = '''
from torch import nn


def build(num_classes):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))
'''


@pytest.mark.slow
def test_thousands_of_pause_continue_cycles_keep_memory_and_threads_flat(tmp_path, split_folder):
    model = tmp_path / "tiny.py"
    model.write_text(MODEL_FILE)
    s = Session(root=tmp_path / "sessions")
    s.set("batch_size", 2)
    s.set("epochs", 10_000)  # longer than the test: it is always mid-run
    s.set("keep_last", 2)  # every pause writes a checkpoint: retention keeps the disk flat too
    s.attach_data(str(split_folder), size=16)
    s.load_model(f"{model}:build")
    s.use_name("soak")
    stepped = threading.Event()
    s.batch_listeners.append(lambda info: stepped.set())
    s.train()
    samples = {}
    try:
        for cycle in range(3000):
            stepped.clear()
            assert stepped.wait(WAIT), "no batch since the last continue"  # the run really runs between cycles
            assert s.pause(WAIT) and s.paused
            if cycle % 50 == 0:
                s.describe()
            s.resume()
            if cycle in (300, 2999):
                samples[cycle] = (_rss_kib(), threading.active_count(), len(os.listdir("/proc/self/task")))
        (rss0, py0, os0), (rss1, py1, os1) = samples[300], samples[2999]
        assert (py1, os1) == (py0, os0), samples  # no thread left behind by a cycle
        assert rss1 - rss0 < 40 * 1024, samples  # KiB: no per-cycle growth (40 MiB over 2700 cycles is noise)
        assert len(list((s.folder / "checkpoints").iterdir())) <= 2 + 2  # the last 2 epochs, the best, the latest
        print(f"soak: {samples}")  # (RSS KiB, Python threads, OS threads) at cycles 300 and 2999; shown with -s
    finally:
        s.close(save=False)

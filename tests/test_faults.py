"""Faults: kill -9 at any moment, a full disk, out of memory, a model that raises. Nothing saved is lost, no partial
file is taken for a good one, and the shell survives.

The kills are real: `pgshell -s X.session` runs as a subprocess and gets SIGKILL, either at a precise moment through
the test-only PGSHELL_FAULT hook in engine/checkpoint.py (halfway through a checkpoint or session-file write), or
after a delay drawn from a seeded RNG once training has started. Each time the session is reopened and training goes
on to the same absolute target (`set epochs E` + `train`); the end must equal, bit for bit, a run never killed.
"""

import errno
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pgshell.engine.store import checkpoint as C
from pgshell.engine.train.metrics import read_rows
from pgshell.session import Session

from conftest import WAIT, exact_rows, make_split, new_session, pgshell, pgshell_env, run_out, weights_of

BATCHES = 4  # per epoch: split_folder's 30 training images at batch_size 8


def _reference(tmp_path: Path, folder: Path, epochs: int):
    """Weights and metrics rows of a run that was never interrupted."""
    s = new_session(tmp_path / "ref", folder, "ref", epochs=epochs)  # the same settings as the killed session
    s.train()
    assert s.wait(WAIT * max(1, epochs // 4)) and "error" not in s.status, s.status
    weights, rows = weights_of(s.built.module), exact_rows(s.folder)
    s.close(save=False)
    return weights, rows


def _newest(folder: Path):
    found = C.load_latest(folder / "checkpoints")
    return found[1] if found else None


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.name.endswith(".tmp")]


class _Pgshell:
    """`pgshell -s FILE` as a subprocess fed `plan` on stdin; its stdout is read line by line in a thread."""

    def __init__(self, session_file: Path, plan: str, fault: str = ""):
        env = pgshell_env(PYTHONUNBUFFERED="1")
        if fault:
            env["PGSHELL_FAULT"] = fault
        self.proc = subprocess.Popen([sys.executable, "-m", "pgshell", "-s", str(session_file)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, cwd=session_file.parent, env=env)
        self.proc.stdin.write(plan)
        self.proc.stdin.close()
        self.lines: list[str] = []
        self.training = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("training "):
                self.training.set()

    def finish(self) -> tuple[int, str, str]:
        rc = self.proc.wait(WAIT)
        self._reader.join(WAIT)
        return rc, "".join(self.lines), self.proc.stderr.read()


def _reopen_and_train(session_file: Path, folder: Path, epochs: int, fault: str = "", delay: float | None = None):
    """Reopen the session and train towards `epochs`, killed by `fault` or after `delay` s of training."""
    before = _newest(folder)
    plan = "train\n" if before["position"]["epoch"] < epochs else "show\n"
    run = _Pgshell(session_file, plan, fault)
    if delay is not None and plan == "train\n":
        assert run.training.wait(WAIT), "training never started"
        time.sleep(delay)  # the fault being injected: a kill at an arbitrary moment
        run.proc.send_signal(signal.SIGKILL)
    rc, out, err = run.finish()
    # reopening took the newest checkpoint that verifies, whatever the session file said
    reopened = next(line for line in out.splitlines() if line.startswith("reopened"))
    assert f"step {before['position']['step']}" in reopened, (reopened, before["position"])
    assert "Traceback" not in err and "internal error" not in err, err
    return rc, out, err


@pytest.fixture(scope="module")
def kill_data(tmp_path_factory) -> Path:
    """split_folder's images, made once for both kill tests."""
    return make_split(tmp_path_factory.mktemp("kill") / "tv")


def _kill_and_compare(tmp_path: Path, data: Path, epochs: int, kills: list[dict]) -> None:
    ref_weights, ref_rows = _reference(tmp_path, data, epochs)
    s = new_session(tmp_path, data, "k", epochs=epochs)
    session_file = s.save()
    s.close(save=False)
    folder = tmp_path / "k"
    for kill in kills + [{}]:
        left = epochs - _newest(folder)["position"]["epoch"]
        partial = _leftovers(tmp_path)
        rc, out, _ = _reopen_and_train(session_file, folder, epochs, **kill)
        # the reopen removed what the last kill left half written (and said so), whatever was half written
        assert (f"removed {len(partial)} partial file" in out) == bool(partial), (partial, out)
        fault = kill.get("fault", "")
        if fault and left >= int(fault.rpartition(":")[2]):  # enough training left for the Nth write to happen
            assert rc == -signal.SIGKILL, f"the fault {fault} did not fire:\n{out}"
            assert len(_leftovers(tmp_path)) == 1, "the kill left its half-written temporary file"
        elif not kill:
            assert rc == 0, out
    assert _leftovers(tmp_path) == [], "every partial write was cleaned up"
    state = _newest(folder)
    assert state["position"] == {"epoch": epochs, "batch": 0, "sample": 0, "step": epochs * BATCHES}
    assert all(torch.equal(state["model"][k], v) for k, v in ref_weights.items())
    rows = exact_rows(folder)
    assert rows == ref_rows  # no row lost or repeated across the kills


def test_kill_9_during_checkpoint_write_session_write_and_training_then_resume_is_exact(tmp_path, kill_data):
    """Three kills (the default suite's share): halfway through a checkpoint write, halfway through the session-file
    write that follows a complete checkpoint (the session file then lags behind it), and at a seeded random moment
    of training. Each reopen loads the newest checkpoint that verifies and cleans the partial files."""
    rng = random.Random(7)
    kills = [{"fault": "kill-during-checkpoint-write:2"},  # epoch 1 saved, epoch 2's file half written
             {"fault": "kill-during-session-write:1"},  # epoch 2 saved, the session file still says epoch 1
             {"delay": rng.uniform(0.2, 1.2)}]  # somewhere in epoch 3
    _kill_and_compare(tmp_path, kill_data, 4, kills)


@pytest.mark.slow
def test_kill_9_twenty_times_at_random_moments_then_resume_is_exact(tmp_path, kill_data):
    rng = random.Random(2024)
    kills = []
    for i in range(20):
        if i % 5 == 3:
            kills.append({"fault": f"kill-during-checkpoint-write:{rng.randint(1, 2)}"})
        elif i % 5 == 4:
            kills.append({"fault": f"kill-during-session-write:{rng.randint(1, 2)}"})
        else:
            kills.append({"delay": rng.uniform(0.0, 1.5)})
    _kill_and_compare(tmp_path, kill_data, 16, kills)


# ------------------------------------------------------------------ the shell in-process, for the faults below
def run(app, capsys, line):
    return run_out(app, capsys, line)


def _error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err  # one clear line
    return lines[0]


def _train_rows(app):
    return [r for r in read_rows(app.session.folder / "metrics.csv") if r["split"] == "train"]


# ------------------------------------------------------------------ disk full
class _FullDiskFile:
    """A file on a disk that fills up halfway through the write: what `open` returns for a checkpoint's temp file."""

    def __init__(self, f):
        self._f = f

    def write(self, data):
        self._f.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_disk_full_while_saving_pauses_with_one_error_and_keeps_the_last_checkpoint(app, capsys, split_folder,
                                                                                  tmp_path, monkeypatch):
    ref_weights, ref_rows = _reference(tmp_path, split_folder, 3)
    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "set epochs 3"):
        assert run(app, capsys, line)[0]
    assert run(app, capsys, "train 1")[0]
    ckdir = app.session.folder / "checkpoints"
    good = ckdir / "epoch-0001.safetensors"
    good_bytes = good.read_bytes()

    full = {"on": True}
    real_open = open
    monkeypatch.setattr(C, "open", lambda path, mode="r", *a, **k: _FullDiskFile(real_open(path, mode, *a, **k))
                        if full["on"] and "w" in mode else real_open(path, mode, *a, **k), raising=False)
    ok, _, err = run(app, capsys, "continue" if app.session.paused else "train")  # epoch 2's checkpoint fails
    assert not ok
    assert "disk is full" in _error_line(err) and "free some space" in err
    assert app.session.paused and not app.session.running  # paused, not crashed; the shell goes on
    assert good.read_bytes() == good_bytes and C.load_checkpoint(good)["position"]["epoch"] == 1
    assert sorted(p.name for p in ckdir.iterdir()) == ["epoch-0001.safetensors"]  # the partial file was removed
    assert run(app, capsys, "show")[0]
    ok, _, err = run(app, capsys, "save")  # still full: the same one line, nothing else broken
    assert not ok and "disk is full" in _error_line(err)

    full["on"] = False  # space freed
    ok, out, _ = run(app, capsys, "save")
    assert ok and "saved" in out
    assert C.load_latest(ckdir)[1]["position"]["epoch"] == 2
    assert run(app, capsys, "continue")[0]
    w = app.session.built.module.state_dict()
    assert all(torch.equal(w[k], v) for k, v in ref_weights.items())  # the failed write cost nothing
    assert exact_rows(app.session.folder) == ref_rows


def _tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True).returncode == 0


@pytest.mark.slow
def test_disk_full_on_a_real_small_filesystem(tmp_path, split_folder):
    """The same on a real 5 MiB tmpfs (one checkpoint fits, two do not) when this machine lets us mount one."""
    disk = tmp_path / "disk"
    if not _tmpfs(disk, "5m"):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        plan = f"data {split_folder} --size 32\nload test_resnet\nset batch_size 8\nset epochs 3\ntrain\n"
        r = pgshell("--sessions-dir", str(disk), stdin=plan, timeout=WAIT)
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
        errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
        assert errors and all("disk is full" in ln for ln in errors), r.stderr  # the failed run, the failed quit
        (session_file,) = disk.glob("*.session")
        folder = disk / session_file.stem
        assert [p.name for p in (folder / "checkpoints").iterdir()] == ["epoch-0001.safetensors"]
        assert C.load_checkpoint(folder / "checkpoints" / "epoch-0001.safetensors")["position"]["step"] == BATCHES
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)  # space freed
        r = pgshell("-s", str(session_file), stdin="train\n", timeout=WAIT)
        assert r.returncode == 0, r.stderr
        assert C.load_latest(folder / "checkpoints")[1]["position"]["epoch"] == 3
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ------------------------------------------------------------------ out of memory, a model that raises
MODEL_FILE = '''
import torch
from torch import nn


class Net(nn.Module):
    """A tiny convnet that misbehaves on cue: `oom_above` images in a training batch raise CUDA's out-of-memory
    error; the `fail_at`-th forward in training (or evaluation) mode raises a plain bug."""

    def __init__(self, num_classes, oom_above=0, fail_at=0, fail_in="train"):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(8, num_classes)
        self.oom_above, self.fail_at, self.fail_in, self.calls = oom_above, fail_at, fail_in, 0

    def forward(self, x):
        if self.training and self.oom_above and x.shape[0] > self.oom_above:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        if self.training == (self.fail_in == "train") and x.shape[0] > 1:  # 1 image: pgshell's size check
            self.calls += 1
            if self.calls == self.fail_at:
                raise RuntimeError(f"boom in call {self.calls}")
        return self.fc(self.features(x))


def steady(num_classes):
    return Net(num_classes)


def oom(num_classes):
    return Net(num_classes, oom_above=4)


def bug_in_training(num_classes):
    return Net(num_classes, fail_at=6)  # epoch 2, batch 2


def bug_in_validation(num_classes):
    return Net(num_classes, fail_at=1, fail_in="eval")  # the end of epoch 1


class CpuOom(Net):
    def forward(self, x):
        if self.training and x.shape[0] > 4:  # what torch's CPU allocator raises
            raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: not enough memory: "
                               "you tried to allocate 21474836480 bytes.")
        return super().forward(x)


def cpu_oom(num_classes):
    return CpuOom(num_classes)


def exits(num_classes):
    import sys

    sys.exit(3)


def interrupts(num_classes):
    raise KeyboardInterrupt


class Warns(Net):
    def forward(self, x):
        import warnings

        warnings.warn("a library's UserWarning that must not reach the output", UserWarning)
        return super().forward(x)


def warns(num_classes):
    return Warns(num_classes)
'''


@pytest.fixture
def model_file(tmp_path) -> Path:
    p = tmp_path / "net.py"
    p.write_text(MODEL_FILE)
    return p


def _reference_with(tmp_path, folder, factory, epochs, batch_size=8):
    s = Session(root=tmp_path / "ref")
    s.set("batch_size", batch_size)
    s.attach_data(str(folder), size=32)
    s.load_model(factory)
    s.use_name("ref")
    s.train(epochs=epochs)
    assert s.wait(WAIT) and "error" not in s.status, s.status
    out = weights_of(s.built.module)
    s.close(save=False)
    return out


def test_out_of_memory_names_the_batch_size_and_the_session_stays_usable(app, capsys, split_folder, model_file):
    for line in (f"data {split_folder} --size 32", f"load {model_file}:oom", "set batch_size 8"):
        assert run(app, capsys, line)[0]
    ok, _, err = run(app, capsys, "train 2")
    assert not ok
    assert "out of memory at batch_size 8" in _error_line(err) and "set batch_size 4" in err
    assert app.session.paused and app.session.trainer.pos.step == 0
    assert app.session.trainer.pos.sample == 0  # the batch that failed is not counted as seen
    assert run(app, capsys, "show")[0]
    assert run(app, capsys, "set batch_size 4")[0]
    ok, out, _ = run(app, capsys, "continue")
    assert ok and "epoch 2 done" in out
    rows = _train_rows(app)
    assert [int(r["step"]) for r in rows] == list(range(1, 17))  # 8 batches of 4 (the last of 2) per epoch
    for epoch in ("1", "2"):  # every image of each epoch trained on, none skipped by the failed batch
        assert sum(int(r["images"]) for r in rows if r["epoch"] == epoch) == 30


@pytest.mark.parametrize("factory, step", [("bug_in_training", 5), ("bug_in_validation", 4)])
def test_an_exception_in_the_loop_pauses_logs_the_trace_and_continue_finishes_exactly(
        app, capsys, split_folder, model_file, tmp_path, factory, step):
    reference = _reference_with(tmp_path, split_folder, f"{model_file}:steady", 2)
    for line in (f"data {split_folder} --size 32", f"load {model_file}:{factory}", "set batch_size 8"):
        assert run(app, capsys, line)[0]
    ok, out, err = run(app, capsys, "train 2")
    assert not ok
    assert "RuntimeError: boom" not in out  # printed once: the error line below, not also as the alert
    line = _error_line(err)
    assert "RuntimeError: boom in call" in line and "errors.log" in line
    log = (app.session.folder / "errors.log").read_text()
    assert "Traceback" in log and "boom in call" in log and str(model_file) in log  # the full trace
    s = app.session
    assert s.paused and s.trainer.pos.step == step  # no batch lost or half counted
    newest = C.load_latest(s.folder / "checkpoints")
    assert newest is None or newest[1]["position"]["step"] <= step  # the last checkpoint is intact
    assert run(app, capsys, "show")[0]  # the shell is alive
    ok, out, _ = run(app, capsys, "continue")
    assert ok and "epoch 2 done" in out
    w = s.built.module.state_dict()
    assert all(torch.equal(w[k], v) for k, v in reference.items())
    assert [int(r["step"]) for r in _train_rows(app)] == list(range(1, 9))


def test_a_torn_last_metrics_row_is_dropped_on_reopen_not_glued_to_the_next(tmp_path, split_folder):
    """A power cut in the middle of an append leaves half a row; the resumed run's rows must not extend it."""
    s = new_session(tmp_path, split_folder, "torn", epochs=2)
    s.train(epochs=1)
    assert s.wait(WAIT)
    file = s.save()
    s.close(save=False)
    with open(s.folder / "metrics.csv", "a") as f:
        f.write("5,2,1,train,0.43")  # half of step 5's row
    r = Session.open(file)
    r.train()
    assert r.wait(WAIT) and "error" not in r.status
    r.close(save=False)
    from pgshell.engine.train.metrics import COLUMNS

    assert all(line.count(",") == len(COLUMNS) - 1 for line in (s.folder / "metrics.csv").read_text().splitlines())
    steps = [int(row["step"]) for row in read_rows(s.folder / "metrics.csv") if row["split"] == "train"]
    assert steps == list(range(1, 2 * BATCHES + 1))


@pytest.mark.parametrize("factory", ["oom", "cpu_oom"])
def test_out_of_memory_on_a_gpu_or_the_cpu_gives_batch_size_advice(app, capsys, split_folder, model_file, factory):
    for line in (f"data {split_folder} --size 32", f"load {model_file}:{factory}", "set batch_size 8"):
        assert run(app, capsys, line)[0]
    ok, _, err = run(app, capsys, "train 1")
    assert not ok and "out of memory at batch_size 8" in _error_line(err) and "set batch_size 4" in err


@pytest.mark.parametrize("factory, said", [("exits", "called sys.exit(3)"), ("interrupts", "interrupted")])
def test_a_model_factory_calling_sys_exit_or_raising_keyboardinterrupt_is_a_failed_command(
        app, capsys, model_file, factory, said):
    from pgshell.shell import run_plan

    ok, _, err = run(app, capsys, f"load {model_file}:{factory} --classes 3")
    assert not ok and said in _error_line(err)
    assert run(app, capsys, "show")[0]  # the shell is still there
    assert run_plan(app, [f"load {model_file}:{factory} --classes 3\n", "set lr 0.5\n"]) == 1  # the plan stops
    assert app.session.config.lr == 0.001


def test_a_huge_plan_line_is_refused_at_once_in_one_short_line(app, capsys):
    from pgshell.shell import run_plan

    t0 = time.perf_counter()
    assert run_plan(app, ["set lr " + "9" * 400_000 + "\n", "set lr 0.5\n"]) == 1
    assert time.perf_counter() - t0 < 2.0  # cmd2's tokenizer took 3.3 s on it (5 MB: a hang)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]  # one clear line, naming the plan's line
    assert len(lines) == 1 and lines[0].startswith("line 1: set lr 999") and ": error: a command line of" in lines[0]
    assert len(lines[0]) < 200 and "limited to 65,536" in err  # the line is not echoed back
    assert app.session.config.lr == 0.001


def test_warnings_of_libraries_go_to_errors_log_never_to_the_output(tmp_path, split_folder, model_file, capsys,
                                                                    monkeypatch):
    from pgshell.shell import main

    monkeypatch.chdir(tmp_path)
    plan = tmp_path / "plan.txt"
    plan.write_text(f"data {split_folder} --size 32\nload {model_file}:warns\nset batch_size 8\nsave w.session\n"
                    "train --steps 2\n")
    assert main([str(plan)]) == 0
    out, err = capsys.readouterr()
    assert "Warning" not in out + err and "trained" not in err
    assert "UserWarning: a library's UserWarning" in (tmp_path / "w" / "errors.log").read_text()


def test_outputs_are_written_atomically_and_a_full_disk_is_one_line(app, capsys, split_folder, tmp_path,
                                                                    monkeypatch):
    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "train --steps 2"):
        assert run(app, capsys, line)[0]
    d = tmp_path / "out"
    d.mkdir()
    commands = {f"export torchscript {d}/m.pt": ["m.pt", "m.pt.json"], f"plot --out {d}/c.png": ["c.png"],
                f"eval --out {d}/e.png": ["e.png"], f"predict {split_folder} --out {d}/p.csv": ["p.csv"]}
    for name in sum(commands.values(), []):
        (d / name).write_bytes(b"the earlier " + name.encode())
    full = {"on": True}
    real_open = open
    monkeypatch.setattr(C, "open", lambda path, mode="r", *a, **k: _FullDiskFile(real_open(path, mode, *a, **k))
                        if full["on"] and "w" in mode else real_open(path, mode, *a, **k), raising=False)
    for line in commands:
        ok, _, err = run(app, capsys, line)
        assert not ok and "disk is full" in _error_line(err), (line, err)
    assert all((d / n).read_bytes() == b"the earlier " + n.encode() for n in sum(commands.values(), []))
    assert sorted(p.name for p in d.iterdir()) == sorted(sum(commands.values(), []))  # no partial file left
    full["on"] = False
    for line, names in commands.items():
        assert run(app, capsys, line)[0], line
        assert all(not (d / n).read_bytes().startswith(b"the earlier") for n in names)
    import json

    assert json.loads((d / "m.pt.json").read_text())["file"] == "m.pt"

"""Faults: kill -9 at any moment, a full disk, out of memory, a model that raises. Nothing saved is lost, no partial
file is taken for a good one, and the shell survives.

The kills are real: `pgshell -s X.session` runs as a subprocess and gets SIGKILL, either at a precise moment through
the test-only PGSHELL_FAULT hook in engine/checkpoint.py (halfway through a checkpoint or session-file write), or
after a delay drawn from a seeded RNG once training has started. Each time the session is reopened and training goes
on to the same absolute target (`set epochs E` + `train`); the end must equal, bit for bit, a run never killed.
"""

import errno
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from pgshell.engine import checkpoint as C
from pgshell.engine.metrics import EXACT_COLUMNS, read_rows
from pgshell.session import Session

ROOT = Path(__file__).resolve().parent.parent
WAIT = 120  # seconds: a generous bound for tiny runs on a loaded 2-core machine
BATCHES = 4  # per epoch: split_folder's 30 training images at batch_size 8


def _session(root: Path, folder: Path, name: str, epochs: int) -> Session:
    """The same settings, in the same order, for the reference run and the session that gets killed."""
    s = Session(root=root)
    s.set("batch_size", 8)
    s.set("epochs", epochs)
    s.attach_data(str(folder), size=32)
    s.load_model("test_resnet")
    s.use_name(name)
    return s


def _reference(tmp_path: Path, folder: Path, epochs: int):
    """Weights and metrics rows of a run that was never interrupted."""
    s = _session(tmp_path / "ref", folder, "ref", epochs)
    s.train()
    assert s.wait(WAIT) and "error" not in s.status, s.status
    weights = {k: v.clone() for k, v in s.built.module.state_dict().items()}
    rows = [tuple(r[c] for c in EXACT_COLUMNS) for r in read_rows(s.folder / "metrics.csv")]
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
        env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.pop("PGSHELL_FAULT", None)
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
    if delay is not None:
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
def folder_and_reference(tmp_path_factory):
    from conftest import make_images

    root = tmp_path_factory.mktemp("kill")
    data = root / "tv"
    make_images(data / "train", per_class=10, seed=1)
    make_images(data / "val", per_class=4, seed=2)
    return root, data


def _kill_and_compare(tmp_path: Path, data: Path, epochs: int, kills: list[dict]) -> None:
    ref_weights, ref_rows = _reference(tmp_path, data, epochs)
    s = _session(tmp_path, data, "k", epochs)
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
    rows = [tuple(r[c] for c in EXACT_COLUMNS) for r in read_rows(folder / "metrics.csv")]
    assert rows == ref_rows  # no row lost or repeated across the kills


def test_kill_9_during_checkpoint_write_session_write_and_training_then_resume_is_exact(tmp_path,
                                                                                        folder_and_reference):
    """Three kills (the default suite's share): halfway through a checkpoint write, halfway through the session-file
    write that follows a complete checkpoint (the session file then lags behind it), and at a seeded random moment
    of training. Each reopen loads the newest checkpoint that verifies and cleans the partial files."""
    _, data = folder_and_reference
    rng = random.Random(7)
    kills = [{"fault": "kill-during-checkpoint-write:2"},  # epoch 1 saved, epoch 2's file half written
             {"fault": "kill-during-session-write:1"},  # epoch 2 saved, the session file still says epoch 1
             {"delay": rng.uniform(0.2, 1.2)}]  # somewhere in epoch 3
    _kill_and_compare(tmp_path, data, 4, kills)


@pytest.mark.slow
def test_kill_9_twenty_times_at_random_moments_then_resume_is_exact(tmp_path, folder_and_reference):
    _, data = folder_and_reference
    rng = random.Random(2024)
    kills = []
    for i in range(20):
        if i % 5 == 3:
            kills.append({"fault": f"kill-during-checkpoint-write:{rng.randint(1, 2)}"})
        elif i % 5 == 4:
            kills.append({"fault": f"kill-during-session-write:{rng.randint(1, 2)}"})
        else:
            kills.append({"delay": rng.uniform(0.0, 1.5)})
    _kill_and_compare(tmp_path, data, 10, kills)

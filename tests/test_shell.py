"""The shell in-process (cmd2's onecmd_plus_hooks, captured output, last_result) and as a subprocess running plans."""

import json
import subprocess
import sys
from pathlib import Path

import pexpect
import pytest
import torch

from pgshell.engine.store import checkpoint as C

from conftest import ROOT, WAIT, exact_rows, pgshell, pgshell_env, pgshell_here, run


def test_session_flow_in_process(app, split_folder, tmp_path, capsys):
    assert run(app, f"data {split_folder} --size 32")[1]["classes"] == ["cat", "dog", "fox"]
    ok, spec = run(app, "load test_resnet")
    assert ok and spec["num_classes"] == 3 and spec["name"] == "test_resnet"
    assert run(app, "set batch_size 8")[0]
    ok, counts = run(app, "freeze backbone")
    head = sum(p.numel() for n, p in app.session.built.module.named_parameters() if n in app.session.built.head)
    assert ok and counts["trainable"] == head < counts["total"]
    assert run(app, "unfreeze all")[1]["trainable"] == counts["total"]
    ok, status = run(app, "train --steps 2")  # scripts: train blocks until done
    assert ok and status["state"] == "idle" and app.session.trainer.pos.step == 2
    ok, info = run(app, "show")
    assert info["position"]["step"] == 2 and info["position"]["batch"] == 2 and info["settings"]["batch_size"] == 8
    ok, ev = run(app, "eval")
    assert ok and ev["val"]["n"] == 12 and 0.0 <= ev["val"]["accuracy"] <= 1.0
    target = tmp_path / "mine.session"
    ok, path = run(app, f"save {target}")
    assert ok and Path(path) == target
    doc = json.loads(target.read_text())
    assert doc["format"] == "pgshell-session" and doc["version"] == 1 and doc["folder"] == "mine"
    assert doc["config"]["batch_size"] == 8 and doc["model"]["name"] == "test_resnet"
    assert (tmp_path / doc["checkpoint"]).exists()
    out = app.stdout.getvalue()
    assert f"trainable {head:,} /" in out and f"saved {target}" in out


@pytest.mark.parametrize("line, message", [
    ("frobnicate", "not a recognized command"),
    ("train 2", "no model yet"),
    ("set lr fast", "lr takes float"),
    ("set optimizer rmsprop-ish", "must be one of"),  # rmsprop itself is one of timm's optimizers now
    ("set nosuch 3", "not supported"),
    ("load no_such_model_xyz --classes 3", "unknown model"),
    ("data /no/such/folder", "no such folder"),
    ("load test_resnet", "how many classes"),
    ("train --steps -1", "positive"),
    ("pause", "nothing is training"),
    ("continue", "nothing to continue"),
    ("train 2 --bogus", "unrecognized arguments"),
])
def test_bad_input_gives_one_clear_line(app, capsys, line, message):
    before = dict(app.session.config.to_dict())
    ok, _ = run(app, line)
    err = capsys.readouterr().err
    assert not ok
    assert message in err.lower() or message in err, err
    assert "Traceback" not in err
    assert app.session.config.to_dict() == before  # a failed command leaves the state unchanged


def test_set_while_idle_changes_config(app):
    assert run(app, "set lr 0.01")[0] and app.session.config.lr == 0.01
    assert run(app, "set amp off")[0] and app.session.config.amp == "off"
    ok, table = run(app, "set")
    assert ok and table["lr"] == 0.01 and "scheduler" in table


# ------------------------------------------------------------------ plans: in-process (pgshell_here) and as subprocesses
def _final_state(session_file: Path):
    folder = session_file.parent / json.loads(session_file.read_text())["folder"]
    path, state = C.load_latest(folder / "checkpoints")
    return state, exact_rows(folder)


def test_plan_interrupted_and_reopened_equals_one_plan(tmp_path, split_folder):
    setup = f"data {split_folder} --size 32\nload test_resnet\nset batch_size 8\nset seed 3\n"
    one = pgshell_here(stdin=setup + "train 2\nsave one.session\n", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert "epoch 1 done" in one.stdout and "epoch 2 done" in one.stdout  # greppable progress lines
    a = pgshell_here(stdin=setup + "train --steps 3\nsave two.session\nquit\n", cwd=tmp_path)
    assert a.returncode == 0, a.stderr
    b = pgshell_here("-s", "two.session", stdin="train --steps 5\n", cwd=tmp_path)  # the end of a plan saves, like quit
    assert b.returncode == 0, b.stderr
    s1, rows1 = _final_state(tmp_path / "one.session")
    s2, rows2 = _final_state(tmp_path / "two.session")
    assert s1["position"] == s2["position"] == {"epoch": 2, "batch": 0, "sample": 0, "step": 8}
    assert all(torch.equal(s1["model"][k], s2["model"][k]) for k in s1["model"])
    assert rows1 == rows2 and len(rows1) == 10


def test_plan_stops_at_first_error_with_one_line(tmp_path, split_folder):
    plan = tmp_path / "plan.txt"
    plan.write_text(f"# comment\n\ndata {split_folder}\nset lr banana\nload test_resnet\n")
    r = pgshell_here(str(plan), cwd=tmp_path)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr and "Traceback" not in r.stdout
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and "lr" in errors[0] and "banana" in errors[0]
    assert "test_resnet" not in r.stdout  # nothing after the failing line ran


def test_plan_on_stdin_with_reopened_session(tmp_path, split_folder):
    r = pgshell_here(stdin=f"data {split_folder} --size 32\nload test_resnet\nset batch_size 16\nsave s.session\n",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = pgshell_here("-s", "s.session", stdin="show\ntrain --steps 1\n", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "batch_size         16" in r.stdout or "batch_size  16" in " ".join(r.stdout.split("\n"))
    state, rows = _final_state(tmp_path / "s.session")
    assert state["position"]["step"] == 1 and len(rows) == 1


def test_missing_session_file_is_one_line(tmp_path):
    r = pgshell("-s", "nope.session", stdin="", cwd=tmp_path)
    assert r.returncode == 1 and "no session file" in r.stderr and "Traceback" not in r.stderr


def test_quickstart_plan_runs_in_a_script_shell(tmp_path, image_folder):
    """The README demo's plan, against a tiny stand-in dataset so the suite stays fast."""
    text = (ROOT / "examples" / "quickstart.plan").read_text()
    text = text.replace("data/digits", str(image_folder)).replace("resnet18", "test_resnet")
    text = text.replace("train 6", "train 1").replace("sessions/quickstart.session", "q.session")
    r = pgshell(stdin=text, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "epoch 1 done" in r.stdout and (tmp_path / "q.session").exists()


def test_a_plan_cannot_run_programs_or_python(tmp_path):
    marker = tmp_path / "ran"
    for line in (f"shell touch {marker}", f"run_pyscript {marker}.py", "edit x"):
        (tmp_path / "ran.py").write_text(f"open({str(marker)!r}, 'w')")
        r = pgshell(stdin=line + "\n", cwd=tmp_path)
        assert r.returncode == 1 and "not available in pgshell" in r.stderr and "Traceback" not in r.stderr
        assert not marker.exists()
    r = pgshell(stdin=f"help | touch {marker}\n", cwd=tmp_path)  # no pipe to a program either
    assert not marker.exists()


# ------------------------------------------------------------------ start-up stays light
# pgshell as its console script runs it (`python -m pgshell`), then the heavy packages it imported, printed at exit.
_HEAVY = """
import runpy, sys
sys.argv = ["pgshell", *sys.argv[1:]]
try:
    runpy.run_module("pgshell", run_name="__main__")
finally:
    print("imported:", sorted({m.split(".")[0] for m in sys.modules} & {"torch", "timm", "torchvision"}), flush=True)
"""


def test_a_plan_of_quit_imports_neither_torch_nor_timm(tmp_path):
    """Start-up and `quit` must not import torch or timm (seconds each): only a command that needs them does."""
    (tmp_path / "quit.plan").write_text("quit\n")
    for args, stdin in ((["quit.plan"], None), ([], "quit\n"), ([], "")):
        r = subprocess.run([sys.executable, "-c", _HEAVY, *args], input=stdin, capture_output=True, text=True,
                           cwd=tmp_path, env=pgshell_env(), timeout=WAIT)
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[-1] == "imported: []", (args, r.stdout)
    assert not (tmp_path / "sessions").exists()  # nothing was trained: nothing saved


def test_the_interactive_start_up_and_quit_import_neither_torch_nor_timm(tmp_path):
    child = pexpect.spawn(sys.executable, ["-c", _HEAVY], cwd=str(tmp_path), env=pgshell_env(TERM="xterm"),
                          encoding="utf-8", timeout=WAIT, dimensions=(40, 160))
    child.expect("pgshell>")
    child.sendline("quit")
    child.expect(r"imported: \[.*\]")
    assert child.after == "imported: []"
    child.expect(pexpect.EOF)

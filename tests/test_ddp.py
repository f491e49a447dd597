"""DistributedDataParallel under torchrun, on CPU with gloo and 2 processes: the same loss curve as one process at
the same global batch, rank 0 alone writes, and a DDP checkpoint resumes in a single process. The same again as two
"nodes": two torchrun launchers meeting at a c10d rendezvous on localhost, in one folder (a shared filesystem)."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pgshell.engine.store import checkpoint as C
from pgshell.engine.train.metrics import read_rows

from conftest import make_split, pgshell_env, pgshell_here


def _env(**extra):
    return pgshell_env(OMP_NUM_THREADS="1", **extra)


def torchrun(plan: Path, cwd: Path, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pgshell", "--ddp", *extra, str(plan)]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(plan: Path, cwd: Path, *extra, timeout=300) -> list[subprocess.CompletedProcess]:
    """The commands a two-machine cluster runs, one per node: two torchrun launchers that meet at a c10d rendezvous
    (here on localhost, both in `cwd`, the filesystem every node sees). gloo is pinned to the loopback interface:
    both "nodes" are this host, and unpinned gloo uses the address the hostname resolves to, which a container's or
    a VM's network may not route."""
    port = _free_port()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
           "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", f"pgshell-{port}",
           "-m", "pgshell", "--ddp", *extra, str(plan)]
    env = _env(GLOO_SOCKET_IFNAME="lo")
    # each launcher leads its own process group, so a hang is ended with its workers, not just the launcher
    nodes = [subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              start_new_session=True) for _ in range(2)]
    deadline = time.monotonic() + timeout  # one bound for both: a launcher left alone waits at the rendezvous
    try:
        outs = [p.communicate(timeout=max(1.0, deadline - time.monotonic())) for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.communicate()
    return [subprocess.CompletedProcess(cmd, p.returncode, out, err) for p, (out, err) in zip(nodes, outs)]


def _both_ok(runs: list[subprocess.CompletedProcess]) -> str:
    """Both launchers' stdout together (rank 0's node printed it, whichever that was), after checking both ended 0."""
    for r in runs:
        assert r.returncode == 0, r.stderr[-3000:]
    return "".join(r.stdout for r in runs)


def single(cwd: Path, *args, stdin=""):
    """pgshell as one plain process: this one (pgshell's main in-process); DDP's side is what runs in new ones."""
    return pgshell_here(*args, stdin=stdin, cwd=cwd)


def _state(cwd: Path, name: str):
    _, state = C.load_latest(cwd / name / "checkpoints")
    rows = read_rows(cwd / name / "metrics.csv")
    return state, rows


def _close(rows_a, rows_b):
    assert [(r["step"], r["epoch"], r["batch"], r["split"], r["images"]) for r in rows_a] == \
           [(r["step"], r["epoch"], r["batch"], r["split"], r["images"]) for r in rows_b]
    for a, b in zip(rows_a, rows_b):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-3, abs=1e-4)
        assert float(a["lr"]) == pytest.approx(float(b["lr"]))


def _same_run(ref, cwd: Path, name: str) -> list[dict]:
    """Session `name` ended where the one-process run did: position, metrics rows (loss curve, lr) and weights."""
    s1, rows1 = ref["state"], ref["rows"]
    s2, rows2 = _state(cwd, name)
    _close(rows1, rows2)
    assert s1["position"] == s2["position"]
    assert all(torch.allclose(s1["model"][k], s2["model"][k], atol=1e-4) for k in s1["model"])
    return rows2


SETUP = "data {data} --size 32\nload test_vit\nset batch_size 8\nset lr 0.01\n"
CHECKPOINTS = ["epoch-0001.safetensors", "epoch-0002.safetensors", "step-0000008.safetensors"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """One process's 2 epochs, run once for this file: the setup plan, its state and metrics rows."""
    root = tmp_path_factory.mktemp("one")
    setup = SETUP.format(data=make_split(root / "tv"))
    one = single(root, stdin=setup + "train 2\nsave one.session\n")
    assert one.returncode == 0, one.stderr
    state, rows = _state(root, "one")
    return {"setup": setup, "state": state, "rows": rows}


def test_ddp_matches_one_process_and_resumes_in_one_process(tmp_path, reference):
    setup = reference["setup"]
    plan = tmp_path / "ddp.plan"
    plan.write_text(setup + "train 2\nsave two.session\n")
    r = torchrun(plan, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("epoch 2 done") == 1  # rank 0 alone prints
    rows2 = _same_run(reference, tmp_path, "two")
    assert len(rows2) == 10  # 4 batches of 8 (two processes x 4) + 1 validation, per epoch, written once
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == CHECKPOINTS

    # resume under another world size: a DDP run cut at step 3, finished by one process
    plan.write_text(setup + "train --steps 3\nsave cut.session\n")
    r = torchrun(plan, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "cut.session").read_text())["checkpoint"].endswith("step-0000003.safetensors")
    r = single(tmp_path, "-s", "cut.session", stdin="train 2\n")
    assert r.returncode == 0, r.stderr
    _same_run(reference, tmp_path, "cut")


def test_two_nodes_match_one_process(tmp_path, reference):
    """Two launchers, one process each (`--nnodes 2 --nproc-per-node 1`): both workers have LOCAL_RANK 0, and c10d
    decides which is rank 0 — that one alone may print and write, whichever launcher started it."""
    setup = reference["setup"]
    plan = tmp_path / "ddp.plan"
    plan.write_text(setup + "train 2\nsave two.session\n")
    out = _both_ok(two_nodes(plan, tmp_path))
    assert out.count("epoch 2 done") == 1
    rows2 = _same_run(reference, tmp_path, "two")
    assert len(rows2) == 10  # one writer: a second would double the rows
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == CHECKPOINTS
    # no stray auto-named folder or session file from the other node (sessions/ is where both named the run first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ddp.plan", "sessions", "two", "two.session"]
    assert list((tmp_path / "sessions").iterdir()) == []


@pytest.mark.slow  # two more cluster launches (four new processes each); the fast set resumes a DDP cut in one process
def test_two_nodes_resume_as_two_nodes(tmp_path, reference):
    """Two nodes cut at step 3, then two nodes reopen the session file in the shared folder and finish."""
    setup = reference["setup"]
    plan = tmp_path / "ddp.plan"
    plan.write_text(setup + "train --steps 3\nsave cut.session\n")
    _both_ok(two_nodes(plan, tmp_path))
    assert json.loads((tmp_path / "cut.session").read_text())["checkpoint"].endswith("step-0000003.safetensors")
    assert len(read_rows(tmp_path / "cut" / "metrics.csv")) == 3
    plan.write_text("train 2\n")
    out = _both_ok(two_nodes(plan, tmp_path, "-s", "cut.session"))
    assert out.count("epoch 2 done") == 1
    rows3 = _same_run(reference, tmp_path, "cut")
    assert len(rows3) == 10
    assert sorted(p.name for p in (tmp_path / "cut" / "checkpoints").iterdir()) == \
        CHECKPOINTS[:2] + ["step-0000003.safetensors", "step-0000008.safetensors"]  # the cut; the plan's end saves


def test_ddp_needs_torchrun_and_a_plan(tmp_path):
    r = single(tmp_path, "--ddp", "x.plan")
    assert r.returncode == 2 and "torchrun" in r.stderr and "Traceback" not in r.stderr

"""DistributedDataParallel under torchrun, on CPU with gloo and 2 processes: the same loss curve as one process at
the same global batch, rank 0 alone writes, and a DDP checkpoint resumes in a single process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pgshell.engine import checkpoint as C
from pgshell.engine.metrics import read_rows

from conftest import pgshell, pgshell_env


def _env():
    return pgshell_env(OMP_NUM_THREADS="1")


def torchrun(plan: Path, cwd: Path, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "pgshell", "--ddp", *extra, str(plan)]
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)


def single(cwd: Path, *args, stdin=""):
    return pgshell(*args, stdin=stdin, cwd=cwd, env=_env(), timeout=600)


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


SETUP = "data {data} --size 32\nload test_vit\nset batch_size 8\nset lr 0.01\n"


def test_ddp_matches_one_process_and_resumes_in_one_process(tmp_path, split_folder):
    setup = SETUP.format(data=split_folder)
    one = single(tmp_path, stdin=setup + "train 2\nsave one.session\n")
    assert one.returncode == 0, one.stderr

    plan = tmp_path / "ddp.plan"
    plan.write_text(setup + "train 2\nsave two.session\n")
    r = torchrun(plan, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("epoch 2 done") == 1  # rank 0 alone prints
    s1, rows1 = _state(tmp_path, "one")
    s2, rows2 = _state(tmp_path, "two")
    assert len(rows2) == 10  # 4 batches of 8 (two processes x 4) + 1 validation, per epoch, written once
    _close(rows1, rows2)
    assert s1["position"] == s2["position"]
    assert all(torch.allclose(s1["model"][k], s2["model"][k], atol=1e-4) for k in s1["model"])
    assert sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir()) == \
        ["epoch-0001.safetensors", "epoch-0002.safetensors", "step-0000008.safetensors"]

    # resume under another world size: a DDP run cut at step 3, finished by one process
    plan.write_text(setup + "train --steps 3\nsave cut.session\n")
    r = torchrun(plan, tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((tmp_path / "cut.session").read_text())["checkpoint"].endswith("step-0000003.safetensors")
    r = single(tmp_path, "-s", "cut.session", stdin="train 2\n")
    assert r.returncode == 0, r.stderr
    s3, rows3 = _state(tmp_path, "cut")
    assert s3["position"] == s1["position"]
    _close(rows1, rows3)
    assert all(torch.allclose(s1["model"][k], s3["model"][k], atol=1e-4) for k in s1["model"])


def test_ddp_needs_torchrun_and_a_plan(tmp_path):
    r = single(tmp_path, "--ddp", "x.plan")
    assert r.returncode == 2 and "torchrun" in r.stderr and "Traceback" not in r.stderr

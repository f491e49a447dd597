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
    from pgshell.engine import checkpoint as C

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

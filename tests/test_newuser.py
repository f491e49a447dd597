"""What a new user hit with real weights (issue 28): the toolbar in every job and phase, bounded contact sheets, the
end-of-run comparison with a probe, suggestions for typos, schedule restarts across phases, tables that keep what
differs, `show` that shows what changed, and the small things."""

from __future__ import annotations

import re
import time
from types import SimpleNamespace

import pytest

from conftest import new_app, run_out
from pgshell.engine.train.progress import Progress, phase_status
from pgshell.shell.app import toolbar_line


def ok(app, capsys, line: str) -> str:
    """One command in-process that must succeed; its stdout."""
    good, out, err = run_out(app, capsys, line)
    assert good, f"`{line}` failed: {err}"
    return out


# ====================================================================== 1: the toolbar never raises
def _statuses(job: str, tags=dict) -> list[dict]:
    """Every status the worker shows for `job`, in order, made by the code that makes them: the worker's start,
    Progress's before_fit / after_batch / before_validate, the cache builds' phases, the end of the run."""
    seen: list[dict] = [{"state": "training", "job": job}]  # Worker.start
    tr = SimpleNamespace(pos=SimpleNamespace(epoch=1, step=8, batch=0), cfg=SimpleNamespace(log_every=0),
                         notify=lambda msg: None)
    progress = Progress(seen.append, lambda tr: 12, job, tags)
    ten_s_ago = time.perf_counter() - 10
    for name, total in (("decoding images", 40), ("caching features", 44)):
        for done in (0, 8, total // 2, total):
            seen.append(phase_status(job, name, done, total, ten_s_ago))
    seen.append(phase_status(job, "caching features", 8, 44, time.perf_counter(), 8))  # a first report at 8 done
    progress.before_fit(tr, None)
    tr.pos.step = 9
    progress.after_batch(tr, SimpleNamespace(row={"epoch": 2, "batch": 1, "batches": 4, "step": 9, "loss": 1.25,
                                                  "accuracy": 0.5, "lr": 0.001, "images": 8}))
    progress.before_validate(tr, None)
    seen.append(dict(seen[-1], state="idle"))  # Worker._work's end keeps the last status, its state changed
    seen.append(dict(seen[-2], state="paused"))
    seen.append({"state": "paused", "error": "CUDA out of memory"})
    return seen


JOBS = {
    "train": dict,
    "lrfind": lambda: {"batch": 3, "batches": 100},  # LRFindJob's tags
    "tune": lambda: {"trial": 2, "trials_done": 1, "trials": 5},  # TuneJob's tags
    "eval": dict,  # any other job: its name, then what it has
}


@pytest.mark.parametrize("job", list(JOBS))
def test_toolbar_shows_every_status_of_every_job_in_one_line(job):
    statuses = _statuses(job, JOBS[job])
    if job == "tune":  # TuneJob.run, between trials
        statuses.insert(1, {"state": "training", "job": "tune", "trials_done": 1, "trials": 5})
    lines = [toolbar_line(st) for st in statuses]
    assert all(line.startswith(" ") and "\n" not in line and "None" not in line and "nan" not in line
               for line in lines), lines
    assert lines[-1] == " paused — `continue` resumes, `save` keeps it  (CUDA out of memory)"
    assert lines[-3] == " idle — `help` lists commands"


def test_toolbar_lines_for_each_job_and_phase():
    train = [toolbar_line(st) for st in _statuses("train")]
    assert train[0] == " training: starting…"
    assert train[1] == " training: decoding images 0/40 (0%)"
    assert train[2] == " training: decoding images 8/40 (20%)  ETA 0m40s"  # 8 in 10 s, 32 to go
    assert train[7] == " training: caching features 22/44 (50%)  ETA 0m10s"
    assert train[9] == " training: caching features 8/44 (18%)"  # its first report: nothing timed, no ETA
    assert train[10] == " epoch 2  starting…"
    assert train[11].startswith(" epoch 2  batch 1/4  loss 1.2500  acc 0.500  lr 0.001  ")
    assert re.search(r"  lr 0.001  \d+ img/s  ETA \dm\d\ds$", train[11]), train[11]
    assert train[12] == " epoch 2  validation pass"
    lrfind = [toolbar_line(st) for st in _statuses("lrfind", JOBS["lrfind"])]
    assert lrfind[0] == " lrfind  starting…" and lrfind[10] == " lrfind  starting…"  # the crash of issue 28
    assert lrfind[11].startswith(" lrfind  batch 3/100  loss 1.2500  acc 0.500  lr 0.001  ")
    assert lrfind[3] == " lrfind  decoding images 20/40 (50%)  ETA 0m10s"
    tune = [toolbar_line(st) for st in _statuses("tune", JOBS["tune"])]
    assert tune[10] == " trial 2 (1/5 done)  epoch 2  starting…"
    assert tune[11].startswith(" trial 2 (1/5 done)  epoch 2  batch 1/4  loss 1.2500")
    assert tune[12] == " trial 2 (1/5 done)  epoch 2  validation pass"
    assert toolbar_line({"state": "training", "job": "tune", "trials_done": 0, "trials": 5}) == \
        " tune (0/5 done)  starting…"


@pytest.mark.parametrize("status", [
    {"state": "training", "job": "lrfind", "batch": 0, "batches": 100, "epoch": 1},  # issue 28's KeyError 'lr'
    {"state": "training", "batch": 3},
    {"state": "training", "loss": float("nan"), "eta": float("inf")},
    {"state": "training", "phase": "caching features", "done": 5, "total": 0, "eta": None},
    {"state": "training", "job": "tune", "trial": 1},
    {"state": "training", "job": None, "epoch": "2", "loss": "x"},
    {},
])
def test_toolbar_never_raises_on_a_partial_status(app, status):
    app.session.status = status
    line = app.get_bottom_toolbar()
    assert isinstance(line, str) and line.startswith(" ") and "\n" not in line


# ====================================================================== 5: StepLR across freeze -> unfreeze
def _lrs_by_epoch(folder) -> dict[int, set]:
    from pgshell.engine.train.metrics import read_rows

    out: dict[int, set] = {}
    for r in read_rows(folder / "metrics.csv"):
        if r["split"] == "train":
            out.setdefault(int(r["epoch"]), set()).add(float(f"{float(r['lr']):.6g}"))  # 1e-05 ± float32
    return out


def test_a_new_phase_on_a_decayed_steplr_says_so_and_train_restart_restarts_it_exactly(app, split_folder, tmp_path,
                                                                                       capsys):
    import torch

    from pgshell.shell.cli import run_plan

    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "set step_size 1",
                 "set gamma 0.1", "freeze", "train 1", "unfreeze all"):
        ok(app, capsys, line)
    assert ("note: the StepLR schedule runs on from epoch 1 across `unfreeze all`: this new phase starts at lr "
            "0.0001, not 0.001 — `train --restart` restarts the schedule at epoch 2") in ok(app, capsys, "train 1")
    assert "note:" not in ok(app, capsys, "train 1 --restart")  # the schedule starts again: nothing to warn about
    assert app.session.config.schedule_start == 2
    history = ok(app, capsys, "history")
    assert "set schedule_start 2" in history and "train --restart" in history
    ok(app, capsys, "train --steps 1")  # the restarted schedule decays from epoch 3 on
    folder = app.session.folder
    assert _lrs_by_epoch(folder) == {1: {0.001}, 2: {0.0001}, 3: {0.001}, 4: {0.0001}}
    good, _, err = run_out(app, capsys, "train 1 --restart")
    assert not good and "this run is at epoch 4, batch 1: `train 1` to end the epoch first" in err
    # the exported plan replays the restart at its position: the same lrs and weights in a fresh session
    plan = tmp_path / "rebuild.plan"
    ok(app, capsys, f"export plan {plan}")
    other = new_app(tmp_path / "again")
    assert run_plan(other, plan.read_text().splitlines(), "rebuild.plan") == 0, other.stdout.getvalue()
    assert _lrs_by_epoch(other.session.folder) == _lrs_by_epoch(folder)
    mine, theirs = app.session.built.module.state_dict(), other.session.built.module.state_dict()
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)


def test_a_restarted_schedule_is_torchs_schedule_started_at_that_epoch():
    import torch

    from pgshell.engine.config import TrainConfig
    from pgshell.engine.train.schedule import lr_factor, phase_notice

    for name, make in (("step", lambda o: torch.optim.lr_scheduler.StepLR(o, 2, 0.5)),
                       ("cosine", lambda o: torch.optim.lr_scheduler.CosineAnnealingLR(o, 3 * 4))):
        cfg = TrainConfig(scheduler=name, step_size=2, gamma=0.5, epochs=5, schedule_start=2)
        f, unit = lr_factor(cfg, 4)
        opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
        sched, ref = make(opt), []
        for _ in range(12 if unit == "step" else 3):
            ref.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        counts = range(8, 20) if unit == "step" else range(2, 5)  # from epoch 3 (step 8) on: torch's from its start
        assert [f(c) for c in counts] == pytest.approx(ref, abs=1e-12)
        assert f(0) == f(8 if unit == "step" else 2) == 1.0  # before the restart (an older checkpoint): its start
    cosine = TrainConfig(scheduler="cosine", epochs=10, lr=0.01)
    assert phase_notice(cosine, 4, 6, 24, ["unfreeze all"]) == (
        "the cosine schedule runs on from epoch 1 across `unfreeze all`: this new phase starts at lr 0.0035, not "
        "0.01 — `train --restart` restarts the schedule at epoch 7")
    assert phase_notice(cosine, 4, 4, 16, ["unfreeze all"]) is None  # lr still above half: nothing to say
    assert phase_notice(cosine, 4, 6, 24, []) is None  # no new phase
    assert phase_notice(TrainConfig(scheduler="none"), 4, 6, 24, ["freeze"]) is None


# ====================================================================== 4: typos suggest the closest command
@pytest.mark.parametrize("line, said", [
    ("hist", "hist is not a recognized command — did you mean `history`? (`help` lists the commands)"),
    ("trian 3", "trian is not a recognized command — did you mean `train`?"),
    ("help trian", "error: no command trian — did you mean `help train`? (`help` lists the commands)"),
    ("help hist", "error: no command hist — did you mean `help history`?"),
    ("h", "h is not a recognized command — did you mean `help` or `history`?"),
    ("xyzzy", "xyzzy is not a recognized command — `help` lists the commands"),
])
def test_a_typo_suggests_the_closest_command_in_one_line(app, capsys, line, said):
    good, out, err = run_out(app, capsys, line)
    assert not good and said in err and err.count("\n") == 1 and out == ""


def test_help_of_real_commands_and_topics_still_works(app, capsys):
    assert ok(app, capsys, "help train").startswith("Usage: train [-h]")
    assert "--restart" in ok(app, capsys, "help train")
    assert "Training" in ok(app, capsys, "help")
    assert ok(app, capsys, "help tune show").startswith("Usage: tune show")


# ====================================================================== 2: contact sheets stay bounded
def _sheet_rows(folder, n: int) -> list[dict]:
    files = sorted(folder.rglob("*.png"))
    return [{"rank": i + 1, "path": f.name, "file": str(f), "true": f.parent.name,
             "predicted": "cat" if i % 3 else f.parent.name, "probability": 0.5, "p_true": 0.25, "loss": 1.0}
            for i, f in enumerate(files[i % len(files)] for i in range(n))]


def test_a_sheet_of_more_than_64_tiles_goes_on_pages_of_scaled_tiles(tmp_path):
    import csv
    import os

    import numpy as np
    from PIL import Image

    from conftest import make_images
    from pgshell.session.review import SHEET_TILES, write_errors

    folder = make_images(tmp_path / "imgs", per_class=10, px=300)  # larger than a tile: scaled down to 160 px
    rows = _sheet_rows(folder, 70)
    res = write_errors({"rows": rows, "split": "val", "model": "m", "class": None}, str(tmp_path / "x.png"))
    assert SHEET_TILES == 64 and res["pages"] == [str(tmp_path / "x.png"), str(tmp_path / "x-2.png")]
    assert res["page"] == [0] * 64 + [1] * 6 and len(res["tiles"]) == 70
    with Image.open(tmp_path / "x.png") as first, Image.open(tmp_path / "x-2.png") as second:
        assert first.size == (1316, 1628) and second.size == (496, 440)  # 8 x 8 tiles of 1.6", then 3 x 2
        # each tile shows its row's image (the classes are colours), the second page's too
        sheets = [first.convert("RGB"), second.convert("RGB")]
        for box, page, row in zip(res["tiles"], res["page"], rows):
            left, top, right, bottom = box
            assert right - left <= 160 and bottom - top <= 160
            crop = sheets[page].crop(
                (left + (right - left) // 4, top + (bottom - top) // 4, right - (right - left) // 4,
                 bottom - (bottom - top) // 4))
            assert int(np.asarray(crop).reshape(-1, 3).mean(0).argmax()) == ["cat", "dog", "fox"].index(row["true"])
    assert os.path.getsize(tmp_path / "x.png") < 4 * 2**20
    with open(tmp_path / "x.csv") as f:
        assert [r["path"] for r in csv.DictReader(f)] == [r["path"] for r in rows]


@pytest.mark.slow
def test_errors_top_341_writes_pages_of_a_few_mb(app, tmp_path, capsys):
    """issue 28: `errors --top 341 --out x.png` wrote one 18 MB PNG of 3800 x 4450 px."""
    import os

    from PIL import Image

    from conftest import make_images

    make_images(tmp_path / "d" / "train", per_class=4, px=200, seed=1)
    make_images(tmp_path / "d" / "val", per_class=120, px=200, seed=2)
    for line in (f"data {tmp_path / 'd'}", "load test_resnet"):
        ok(app, capsys, line)
    out = ok(app, capsys, f"errors --top 341 --out {tmp_path / 'x.png'}")
    pages = [tmp_path / "x.png"] + [tmp_path / f"x-{k}.png" for k in range(2, 7)]
    assert f"wrote {pages[0]} (1–64), {pages[1]} (65–128)" in out and f"{pages[5]} (321–341) and " in out
    for page in pages:
        with Image.open(page) as im:
            assert im.size[0] <= 1316 and im.size[1] <= 1628
        assert os.path.getsize(page) < 4 * 2**20  # noisy test images: photos make about 2 MB a page
    assert not (tmp_path / "x-7.png").exists()


# ====================================================================== 3: the end of a run compares with the probe
def test_the_end_of_a_run_says_when_a_recorded_probe_beat_the_fine_tune(tmp_path, split_folder):
    from conftest import new_session, train_to_end
    from pgshell.session.describe import best_line
    from pgshell.session.review import _record_probe

    said: list[str] = []
    s = new_session(tmp_path / "sessions", split_folder, lr=0.0)  # lr 0: the fine-tune learns nothing
    try:
        s.notify = said.append
        train_to_end(s, epochs=1)
        best = s.best["value"]
        assert best < 0.6 and "probe" not in best_line(s)  # no probe recorded: nothing to compare with
        _record_probe(s, {"kind": "linear", "accuracy": best + 0.02, "model": "test_resnet", "val": 12, "step": 0})
        assert "probe" not in best_line(s)  # 2 points on 12 images: no clear margin
        _record_probe(s, {"kind": "linear", "accuracy": 1.0, "model": "other_model", "val": 12, "step": 0})
        _record_probe(s, {"kind": "knn", "accuracy": 1.0, "model": "test_resnet", "val": 30, "step": 0})
        assert "probe" not in best_line(s)  # another model's, or on other data: not comparable
        _record_probe(s, {"kind": "knn", "accuracy": 0.75, "model": "test_resnet", "val": 12, "step": 0})
        assert best_line(s) == best_line(s).split("\n")[0] + "\n" + (
            f"note: the k-NN probe on this model's frozen features reached val accuracy 0.7500 (step 0), "
            f"{100 * (0.75 - best):.1f} points above this fine-tune's {best:.4f}: training is undoing what the "
            "pretrained features already separate — try the head alone first (`freeze`, `train`), a smaller "
            "backbone lr (`set backbone_lr_scale 0.1`), a lower lr (`lrfind`), or milder augmentation "
            "(`set crop_scale 0.5`)")
        said.clear()
        train_to_end(s, steps=1)  # the end-of-run lines say it
        assert any(m.startswith("best epoch ") and "\nnote: the k-NN probe" in m for m in said), said
    finally:
        s.close(save=False)


# ====================================================================== 6: tables keep what differs, --wide
@pytest.fixture
def three_sessions(tmp_path, capsys):
    """a: test_resnet from its seed, lr 0.0016051911333587634; b: the same from a weights file; c: other data."""
    import torch
    import timm

    from conftest import make_images, make_split

    split = make_split(tmp_path / "tv")
    other = make_images(tmp_path / "other", classes=("x", "y"), per_class=6)
    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), weights)
    root = tmp_path / "sessions"
    for name, lines in (("a", [f"data {split} --size 32", "load test_resnet", "set lr 0.0016051911333587634"]),
                        ("b", [f"data {split} --size 32", f"load test_resnet --weights {weights}",
                               "set lr 0.0016"]),
                        ("c", [f"data {other} --size 32", "load test_resnet"])):
        app = new_app(root)
        for line in [*lines, f"save {name}"]:
            ok(app, capsys, line)
        app.session.close(save=True)
    return root


def test_compare_keeps_the_column_that_differs_ranks_each_dataset_and_prints_floats_compactly(
        three_sessions, monkeypatch, capsys):
    from pgshell.shell._table import text_width

    app = new_app(three_sessions)
    try:
        monkeypatch.setenv("COLUMNS", "64")
        out = ok(app, capsys, "compare")
        tv, other = out.split("data other @32px: ")
        assert tv.startswith("data tv @32px: 2 sessions, best first\n") and other.startswith("1 session, best first")
        assert " ".join(out.split()).endswith("(2 datasets: each ranked on its own — accuracies on different data do "
                                              "not compare)")
        header = tv.splitlines()[1]
        assert "pretrained" in header and "data" not in header  # it tells a from b; the data is the same
        assert " no " in tv and " file " in tv
        assert "lr=0.0016\n" in tv + "\n" or "lr=0.0016 " in tv  # b's
        assert "lr=0.00161" in tv and "0.0016051911333587634" not in out
        assert text_width(out) <= 64
        wide = ok(app, capsys, "compare --wide")
        assert "final loss" in wide and "disk" in wide and text_width(wide) > 64
        sessions = ok(app, capsys, "sessions --wide")
        assert "last used" in sessions.splitlines()[0] and "model" in sessions.splitlines()[0]
    finally:
        app.session.close(save=False)


def test_compact_values_keep_different_values_different():
    from pgshell.shell.reviewcmds import compact_values

    assert compact_values([0.0016051911333587634, 0.001, 8, "sgd"]) == ["0.00161", "0.001", "8", "sgd"]
    assert compact_values([0.00161, 0.0016149]) == ["0.00161", "0.001615"]  # 3 digits would read the same


def test_history_fits_the_terminal_wrapping_between_words_and_takes_wide(app, split_folder, monkeypatch, capsys):
    from pgshell.shell._table import text_width

    for line in (f"data {split_folder} --size 32", "load test_resnet", "set lr 0.0016051911333587634",
                 "set auto_augment rand-m9-mstd0.5-inc1", "freeze layer1 layer2 layer3"):
        ok(app, capsys, line)
    monkeypatch.setenv("COLUMNS", "60")
    out = ok(app, capsys, "history")
    assert text_width(out) <= 60
    words = set(out.split())
    for token in ("0.0016051911333587634", "rand-m9-mstd0.5-inc1", "layer1", "layer2", "layer3", "--split"):
        assert token in words, (token, out)  # whole, never cut at the edge of the terminal
    wide = ok(app, capsys, "history --wide")
    assert f"data {split_folder} --split 0.2 --size 32" in wide  # one line, however long


# ====================================================================== 7: show what changed, one wording of a position
def test_show_lists_the_settings_not_at_their_defaults_and_one_wording_of_the_position(app, split_folder, capsys):
    from pgshell.engine.config import SETTINGS

    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "set lr 0.01"):
        ok(app, capsys, line)
    done = ok(app, capsys, "train --steps 5")
    assert "— at epoch 2, batch 1/4 (step 5)" in done
    out = ok(app, capsys, "show")
    info = app.last_result
    rest = len(SETTINGS) - 2
    assert info["settings"] == {"lr": 0.01, "batch_size": 8}
    assert "momentum" not in out and f"\nlr          0.01\nbatch_size  8\n(the other {rest} at their defaults: `show " \
        "--all` lists them)\n" in out
    assert info["position"]["at"] == "epoch 2, batch 1/4 (step 5)" and "epoch" not in info["position"]
    ok(app, capsys, "show --all")
    assert list(app.last_result["settings"]) == list(SETTINGS) and app.last_result["settings"]["momentum"] == 0.9
    ok(app, capsys, "save s")
    listed = ok(app, capsys, "sessions")
    assert "* s" in listed and "epoch 2, batch 1/4 (step 5)" in listed


def test_where_without_the_batches_of_an_epoch():
    from types import SimpleNamespace

    from pgshell.session.describe import target_words, where

    assert where(SimpleNamespace(epoch=3, batch=0, step=12), 4) == "epoch 3, batch 4/4 (step 12)"
    assert where(SimpleNamespace(epoch=3, batch=0, step=12), None) == "epoch 3, last batch (step 12)"
    assert where(SimpleNamespace(epoch=3, batch=2, step=14), None) == "epoch 4, batch 2 (step 14)"
    assert target_words({"epoch": 6}) == "to the end of epoch 6"
    assert target_words({"step": 120}) == "to step 120"
    assert target_words({"epoch": 6, "unfreeze_at": 1, "backbone_lr_scale": 0.1}) == \
        "to the end of epoch 6 (finetune: the backbone unfrozen after epoch 1, its lr x 0.1)"


# ====================================================================== 8: the small ones
def test_wait_prints_progress_and_each_epoch_and_says_when_nothing_runs(app, split_folder, capsys, monkeypatch):
    import threading

    import pgshell.shell.app as shell_app
    from pgshell.engine.train.events import Handler

    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8"):
        ok(app, capsys, line)
    assert ok(app, capsys, "wait") == "nothing is running (idle)\n"
    printed = threading.Event()
    plain = app.poutput

    def poutput(msg="", *args, **kw):  # the line `wait` prints first, where the run is, lets the run go on
        plain(msg, *args, **kw)
        if msg == "epoch 1  validation pass":
            printed.set()

    class HoldValidation(Handler):  # epoch 1's validation pass lasts until `wait` has said so
        def before_validate(self, tr, ctx):
            if tr.pos.epoch == 0:
                printed.wait(60)

    monkeypatch.setattr(app, "poutput", poutput)
    monkeypatch.setattr(shell_app, "PROGRESS_EVERY", 0.0)  # a line at every look (5 a second) when it changed
    app.interactive = True  # `train` returns at once; the toolbar is not drawn while `wait` blocks
    app.session.ensure_trainer().add_handler(HoldValidation())  # before the run starts: it cannot miss epoch 1
    ok(app, capsys, "train 2")
    out = ok(app, capsys, "wait")
    lines = out.splitlines()
    assert lines[0] == "waiting for the run to finish or pause (Ctrl-C pauses it)"
    assert lines[1] in ("training: starting…", "epoch 1  starting…") or lines[1].startswith("epoch 1  batch ")
    assert lines.index("epoch 1  validation pass") < next(i for i, ln in enumerate(lines) if "epoch 1 done" in ln)
    done = [ln for ln in lines if " done: train loss " in ln]
    assert [ln.split(" done")[0] for ln in done] == ["epoch 1", "epoch 2"]  # each as it came, not at the next prompt
    assert lines[-1].startswith("best epoch ")
    app.interactive = False
    ok(app, capsys, "train --steps 1")
    assert ok(app, capsys, "wait") == "nothing is running (idle)\n"


def test_quit_during_validation_keeps_the_epoch_line(app, split_folder, capsys):
    import threading

    from pgshell.engine.train.events import Handler

    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8"):
        ok(app, capsys, line)
    in_validation, go = threading.Event(), threading.Event()

    class HoldValidation(Handler):  # the quit arrives while the epoch's validation pass runs
        def before_validate(self, tr, ctx):
            in_validation.set()
            go.wait(60)

    app.interactive = True
    app.session.ensure_trainer().add_handler(HoldValidation())  # before the run starts: it cannot miss epoch 1
    ok(app, capsys, "train 2")
    assert in_validation.wait(60)
    quitting = threading.Thread(target=app.onecmd_plus_hooks, args=("quit",))
    quitting.start()
    assert app.session.worker.pause_event.wait(60)  # quit asked the run to pause: now let the validation end
    go.set()
    quitting.join(60)
    out = app.stdout.getvalue()
    assert "epoch 1 done: train loss " in out and "paused at epoch 1, batch 4/4 (step 4)" in out
    assert out.index("epoch 1 done") < out.index("saved ")


def test_a_phase_eta_counts_from_its_first_report(app, split_folder, capsys, monkeypatch):
    import pgshell.engine.train.progress as progress
    import pgshell.session.core as core

    clock = [100.0]
    monkeypatch.setattr(core.time, "perf_counter", lambda: clock[0])  # core and progress share the time module
    assert progress.time is core.time
    s = app.session
    s._on_phase("caching features", 64, 640)  # the feature cache's first report is its first batch
    assert s.status["eta"] is None and toolbar_line(s.status) == " training: caching features 64/640 (10%)"
    clock[0] = 102.0
    s._on_phase("caching features", 128, 640)  # 64 in 2 s, 512 to go
    assert s.status["eta"] == pytest.approx(16.0) and toolbar_line(s.status).endswith("ETA 0m16s")
    clock[0] = 103.0
    s._on_phase("decoding images", 0, 100)  # another phase starts its own clock
    clock[0] = 104.0
    s._on_phase("decoding images", 50, 100)
    assert s.status["eta"] == pytest.approx(1.0)


def test_an_eval_only_plan_leaves_no_session(tmp_path, split_folder, monkeypatch):
    from pgshell.shell.cli import run_plan

    monkeypatch.chdir(tmp_path)
    app = new_app(tmp_path / "sessions")
    assert run_plan(app, [f"data {split_folder} --size 32", "load test_resnet", "eval"], "eval.plan") == 0
    assert app.stdout.getvalue().endswith(
        "nothing trained and no name given: no session kept (`save NAME` in the plan keeps one)\n")
    assert list((tmp_path / "sessions").glob("*")) == []  # no file, no folder (it held a 14 MB checkpoint)
    app = new_app(tmp_path / "sessions")
    assert run_plan(app, [f"data {split_folder} --size 32", "load test_resnet", "save kept"], "kept.plan") == 0
    assert (tmp_path / "sessions" / "kept.session").is_file()  # a named one is kept


def test_label_smoothing_is_named_beside_the_losses_it_changes(app, split_folder, capsys):
    for line in (f"data {split_folder} --size 32", "load test_resnet", "set batch_size 8", "set label_smoothing 0.1"):
        ok(app, capsys, line)
    out = ok(app, capsys, "train 1")
    assert re.search(r"epoch 1 done: train loss [\d.]+ acc [\d.]+ \| val loss [\d.]+ acc [\d.]+ \(losses with label "
                     r"smoothing 0\.1\) \| checkpoint epoch-0001\.safetensors", out), out
    assert "(the loss includes label smoothing 0.1, as training's does)" in ok(app, capsys, "eval")
    ok(app, capsys, "set label_smoothing 0")
    assert "label smoothing" not in ok(app, capsys, "eval")


def test_export_timm_is_readable_by_others_and_claims_no_timm_weights(tmp_path):
    import json
    import os
    import stat

    import timm

    from pgshell.engine.report.export import check_timm, export_timm

    model = timm.create_model("test_resnet", num_classes=3)
    pre = {"input_size": (3, 32, 32), "mean": (0.5,) * 3, "std": (0.5,) * 3, "interpolation": "bilinear",
           "crop_pct": 1.0, "crop_mode": "center"}
    mask = os.umask(0o022)
    try:
        export_timm(model, tmp_path / "out", ["a", "b", "c"], pre)
    finally:
        os.umask(mask)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "out").iterdir()}
    assert modes == {"model.safetensors": 0o644, "config.json": 0o644}  # safetensors alone writes 0600
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())["pretrained_cfg"]
    assert "tag" not in cfg and "hf_hub_id" not in cfg and cfg["input_size"] == [3, 32, 32]
    assert check_timm(model, tmp_path / "out", pre) == 0.0  # timm rebuilds it the same without them

"""Issue 27: nothing outside a session is ever deleted or written. `save --force`, `sessions rm`, `fork` and the
change log touch pgshell's own session folders only, and never one another process holds; plans stop on a signal;
hostile label files, storages, weights archives and model folders are refused in one line.

Every deletion case checks that a file outside the session folder still exists with its bytes."""

import io
import json
import os
import shutil
from pathlib import Path

import pytest
from conftest import make_split, new_app, run_out

from pgshell.session import Session

OUTSIDE = b"precious bytes, not pgshell's\n"


@pytest.fixture(scope="module")
def made(tmp_path_factory) -> Path:
    """One trained, saved session `s` (2 steps) beside its data, made once and copied by each test."""
    base = tmp_path_factory.mktemp("made")
    make_split(base / "tv")
    from conftest import new_session, train_to_end

    s = new_session(base / "sessions", base / "tv", "s")
    train_to_end(s, steps=2)
    s.save()
    s.close(save=False)
    return base


@pytest.fixture
def work(made, tmp_path, monkeypatch) -> Path:
    w = tmp_path / "w"
    shutil.copytree(made, w)
    monkeypatch.chdir(w)
    (w / "keep.txt").write_bytes(OUTSIDE)
    return w


def _app(work: Path):
    return new_app(work / "sessions")


def _one_error(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    return lines[0]


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------ 1. save --force replaces only a real session
def test_save_force_replaces_only_a_real_session_never_a_data_folder_a_parent_or_a_foreign_file(work, capsys,
                                                                                               monkeypatch):
    from conftest import make_images

    make_images(work / "cats", classes=("a", "b"), per_class=3)
    victim = work / "victim" / "work"
    victim.mkdir(parents=True)
    (victim / "mine.txt").write_bytes(OUTSIDE)
    (work / "sessions" / "s" / "notes.txt").write_bytes(OUTSIDE)  # a file the user put in a session's folder
    cats, everything = _tree(work / "cats"), _tree(work)
    app = _app(work)
    try:
        for line in (f"data {work / 'tv'} --size 32", "load test_resnet"):
            assert run_out(app, capsys, line)[0], line
        monkeypatch.chdir(victim)
        for line in ("save .. --force", "save ...session --force", "save ./..session --force", "save . --force"):
            ok, _, err = run_out(app, capsys, line)
            assert not ok and "session name" in _one_error(err), (line, err)
        monkeypatch.chdir(work)
        ok, _, err = run_out(app, capsys, "save cats.session --force")  # a data folder of that name, no session
        assert not ok and "not a pgshell session" in _one_error(err)
        ok, _, err = run_out(app, capsys, f"save {work / 'sessions' / 's.session'} --force")
        assert not ok and "notes.txt" in _one_error(err)
        app.interactive = True  # at a terminal `save ..` asks; "y" must not delete either
        monkeypatch.setattr(app, "read_input", lambda prompt, **kw: "y")
        monkeypatch.chdir(victim)
        ok, _, err = run_out(app, capsys, "save ..")
        assert not ok and "session name" in _one_error(err)
        monkeypatch.chdir(work)
    finally:
        app.interactive = False
        app.session.close(save=False)
    assert (victim / "mine.txt").read_bytes() == OUTSIDE and (work / "keep.txt").read_bytes() == OUTSIDE
    assert _tree(work / "cats") == cats
    assert all(_tree(work).get(k) == v for k, v in everything.items())  # not one byte gone anywhere


def test_save_force_still_replaces_a_real_session_whole(work, capsys):
    app = _app(work)
    try:
        for line in (f"data {work / 'tv'} --size 32", "load test_resnet"):
            assert run_out(app, capsys, line)[0], line
        ok, out, _ = run_out(app, capsys, "save s --force")
        assert ok and out.strip().endswith(f"saved {work / 'sessions' / 's.session'}")
    finally:
        app.session.close(save=False)
    assert (work / "keep.txt").read_bytes() == OUTSIDE
    assert not (work / "sessions" / "s" / "metrics.csv").exists()  # the old run's rows went with it: replaced whole


# ------------------------------------------------------------------ 2. sessions rm of a session open elsewhere
def test_sessions_rm_refuses_a_session_another_pgshell_has_open(work, capsys):
    folder = work / "sessions" / "s"
    holder = Session.open(work / "sessions" / "s.session")  # its own lock file description: as another process
    before = _tree(folder)
    app = _app(work)
    try:
        ok, _, err = run_out(app, capsys, "sessions rm s --yes")
        assert not ok and "open in another pgshell" in _one_error(err)
    finally:
        app.session.close(save=False)
        holder.close(save=False)
    after = _tree(folder)
    assert {k: v for k, v in after.items() if k != ".lock"} == {k: v for k, v in before.items() if k != ".lock"}
    assert (work / "sessions" / "s.session").is_file() and (work / "keep.txt").read_bytes() == OUTSIDE


# ------------------------------------------------------------------ 3. sessions rm of a copied file
def test_sessions_rm_of_a_copied_session_file_never_deletes_the_originals_folder(work, capsys):
    root = work / "sessions"
    shutil.copyfile(root / "s.session", root / "copy.session")  # names the folder s/
    before = _tree(root / "s")
    app = _app(work)
    try:
        ok, out, err = run_out(app, capsys, "sessions rm copy --yes")
        assert ok and "the file only" in out, (out, err)
    finally:
        app.session.close(save=False)
    assert not (root / "copy.session").exists()
    assert _tree(root / "s") == before and (work / "keep.txt").read_bytes() == OUTSIDE
    Session.open(root / "s.session").close(save=False)  # the original still opens


# ------------------------------------------------------------------ 8. a fork killed part-way; orphan folders
def test_a_fork_killed_part_way_blocks_no_name_and_sessions_lists_and_removes_the_orphan(work, capsys,
                                                                                     monkeypatch):
    from pgshell.session import replay as R
    from pgshell.shell import PgShell

    root = work / "sessions"
    app = PgShell(interactive=False, sessions_dir=str(root), stdout=io.StringIO(),
                  session=Session.open(root / "s.session"))
    try:
        def killed(*a, **kw):  # what `kill -9` leaves: the copy stops here and no clean-up runs
            raise SystemExit("killed")

        with monkeypatch.context() as m:
            m.setattr(R, "_copy_log", killed)
            m.setattr(R.shutil, "rmtree", lambda *a, **kw: None)
            run_out(app, capsys, "fork f")
        assert not (root / "f").exists() and not (root / "f.session").exists()  # the name is free
        ok, out, err = run_out(app, capsys, "fork f")
        assert ok and (root / "f.session").is_file(), err
        shutil.copytree(root / "s", root / "lost", ignore=shutil.ignore_patterns(".lock"))  # a file deleted by hand
        ok, out, _ = run_out(app, capsys, "sessions")
        orphans = app.last_result["orphans"]
        names = sorted(o["name"] for o in orphans)
        assert len(names) == 2 and names[0].startswith(".f.fork-") and names[1] == "lost", names
        assert all(f"orphan folder {o['folder']}" in out for o in orphans)
        for name in names:
            ok, out, err = run_out(app, capsys, f"sessions rm {name} --yes")
            assert ok and f"removed {name}" in out, err
        assert sorted(p.name for p in root.iterdir()) == ["f", "f.session", "s", "s.session"]
    finally:
        app.session.close(save=False)
    assert (work / "keep.txt").read_bytes() == OUTSIDE


def test_a_folder_holding_other_files_is_no_orphan_and_sessions_rm_of_it_is_refused(work, capsys):
    from conftest import make_images

    root = work / "sessions"
    make_images(root / "pics", classes=("a",), per_class=2)  # the user's folder beside the sessions
    before = _tree(root / "pics")
    app = _app(work)
    try:
        run_out(app, capsys, "sessions")
        assert app.last_result["orphans"] == []
        ok, _, err = run_out(app, capsys, "sessions rm pics --yes")
        assert not ok and "no session pics" in _one_error(err)
    finally:
        app.session.close(save=False)
    assert _tree(root / "pics") == before


# ------------------------------------------------------------------ 9. a session folder that is a link
def test_sessions_rm_of_a_session_whose_folder_is_a_link_is_one_line_and_deletes_nothing(work, capsys):
    root = work / "sessions"
    elsewhere = work / "elsewhere"
    shutil.copytree(root / "s", elsewhere, ignore=shutil.ignore_patterns(".lock"))
    (elsewhere / "keep.txt").write_bytes(OUTSIDE)
    doc = json.loads((root / "s.session").read_text())
    (root / "l.session").write_text(json.dumps({**doc, "name": "l", "folder": "l"}))
    (root / "l").symlink_to(elsewhere)
    before = _tree(elsewhere)
    app = _app(work)
    try:
        ok, _, err = run_out(app, capsys, "sessions rm l --yes")
        assert not ok and "symbolic link" in _one_error(err)
    finally:
        app.session.close(save=False)
    assert (root / "l").is_symlink() and (root / "l.session").is_file() and _tree(elsewhere) == before


# ------------------------------------------------------------------ 4. changes.jsonl through a link
def test_the_change_log_is_never_appended_through_a_symbolic_link(work, capsys):
    log = work / "sessions" / "s" / "changes.jsonl"
    target = work / "outside.jsonl"
    target.write_bytes(log.read_bytes() + OUTSIDE)
    log.unlink()
    log.symlink_to(target)
    before = target.read_bytes()
    from pgshell.shell import PgShell

    app = PgShell(interactive=False, sessions_dir=str(work / "sessions"), stdout=io.StringIO(),
                  session=Session.open(work / "sessions" / "s.session"))
    try:
        ok, _, err = run_out(app, capsys, "freeze backbone")
        assert not ok and "symbolic link" in _one_error(err)
    finally:
        app.session.close(save=False)
    assert target.read_bytes() == before


# ------------------------------------------------------------------ 5. SIGINT in a plan stops it, saved
def test_sigint_during_train_in_a_plan_stops_the_plan_saved_with_a_non_zero_exit(work, capsys):
    import signal

    from pgshell.shell import run_plan

    app = _app(work)
    sent = []

    def ctrl_c(_row):  # the worker thread; Python runs the handler in the main thread, waiting on the run
        if not sent:
            sent.append(True)
            os.kill(os.getpid(), signal.SIGINT)

    app.session.batch_listeners.append(ctrl_c)
    plan = [f"data {work / 'tv'} --size 32\n", "load test_resnet\n", "set batch_size 8\n", "train 50\n",
            "export torchscript model.pt\n"]
    try:
        code = run_plan(app, plan, "p.plan")
    finally:
        app.session.close(save=False)
    err = capsys.readouterr().err
    assert code == 130 and "p.plan:4: interrupted (SIGINT)" in err, (code, err)
    assert not (work / "model.pt").exists()  # the line after it never ran
    saved = json.loads(Path(app.session.file).read_text())
    r = Session.open(app.session.file)
    try:
        assert 1 <= r.trainer.pos.step < 200 and saved["checkpoint"]  # paused part-way, and saved there
    finally:
        r.close(save=False)


# ------------------------------------------------------------------ 13. SIGTERM while reopening; a second SIGTERM
_AS_PROGRAM = """
import os, runpy, signal, sys
{patch}
sys.argv = ["pgshell", *{args!r}]
try:
    runpy.run_module("pgshell", run_name="__main__")  # `python -m pgshell ARGS`
except SystemExit as e:
    code = e.code
os.kill(os.getpid(), signal.SIGTERM)  # a second signal after all was said and saved: no silent death
sys.exit(code)
"""

_TERM_IN_SHOW = """
from pgshell.session import describe as D
D.describe = lambda *a, **kw: os.kill(os.getpid(), signal.SIGTERM)
"""


def test_sigterm_while_reopening_is_one_line_and_leaves_the_session_as_saved(work, capsys, monkeypatch):
    import signal

    from pgshell.session import files as F
    from pgshell.shell import main

    (work / "p.plan").write_text("show\n")
    file, metrics = work / "sessions" / "s.session", work / "sessions" / "s" / "metrics.csv"
    before = file.read_bytes(), metrics.read_bytes()
    found = F.find_checkpoint

    def term_then_find(*a, **kw):  # SIGTERM arrives while the session is being reopened
        os.kill(os.getpid(), signal.SIGTERM)
        return found(*a, **kw)

    monkeypatch.setattr(F, "find_checkpoint", term_then_find)
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["-s", str(file), str(work / "p.plan")]) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) == handler  # given back
    assert "SIGTERM while reopening" in _one_error(capsys.readouterr().err)
    assert (file.read_bytes(), metrics.read_bytes()) == before
    monkeypatch.setattr(F, "find_checkpoint", found)
    Session.open(file).close(save=False)  # its lock was let go


@pytest.mark.slow
def test_a_second_sigterm_after_the_final_save_ends_with_the_one_line_and_128_plus_the_signal(work):
    import subprocess
    import sys

    from conftest import pgshell_env

    (work / "p.plan").write_text(f"data {work / 'tv'} --size 32\nload test_resnet\nset batch_size 8\n"
                                 "train --steps 1\nshow\n")
    script = _AS_PROGRAM.format(patch=_TERM_IN_SHOW, args=["p.plan"])
    r = subprocess.run([sys.executable, "-c", script], cwd=work, env=pgshell_env(), capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 143 and _one_error(r.stderr).startswith("SIGTERM: paused and saved"), (r.returncode,
                                                                                                 r.stderr)


# ------------------------------------------------------------------ 10. an in-memory study storage
@pytest.mark.parametrize("url", ["sqlite:///", "sqlite://", "sqlite:///:memory:"])
def test_tune_with_an_in_memory_sqlite_storage_is_refused_up_front(tmp_path, capsys, split_folder, monkeypatch, url):
    monkeypatch.chdir(tmp_path)
    app = new_app(tmp_path / "sessions")
    try:
        for line in (f"data {split_folder} --size 32", "load test_resnet"):
            assert run_out(app, capsys, line)[0], line
        ok, _, err = run_out(app, capsys, f"tune --trials 1 --steps 1 --storage {url}")
        assert not ok and "in-memory SQLite" in _one_error(err)
    finally:
        app.session.close(save=False)
    assert not (tmp_path / "sessions").exists()  # refused before the session was even named


# ------------------------------------------------------------------ 11. label files
def _labels(folder: Path, rows) -> Path:
    import csv

    file = folder / "labels.csv"
    with open(file, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["path", "label"])
        w.writerows(rows)
    return file


def test_label_files_keep_to_their_root_and_to_printable_labels(tmp_path):
    from conftest import make_images

    from pgshell.engine import data as D
    from pgshell.engine.errors import PgError

    lists = tmp_path / "lists"
    make_images(lists / "imgs", classes=("cat", "dog"), per_class=4)
    (tmp_path / "secret.png").write_bytes(OUTSIDE)
    (lists / "imgs" / "link.png").symlink_to(tmp_path / "secret.png")
    good = [(f"imgs/{c}/{c}_{i:03d}.png", c) for c in ("cat", "dog") for i in range(4)]
    for bad in ("../secret.png", str(tmp_path / "secret.png"), "imgs/link.png", "/etc/passwd"):
        with pytest.raises(PgError, match="is outside") as e:
            D.resolve_data(str(_labels(lists, good + [(bad, "cat")])), check=False)
        assert "\n" not in str(e.value) and "--allow-outside" in str(e.value)
    got = D.resolve_data(str(_labels(lists, good + [("../secret.png", "cat")])), check=False, allow_outside=True)
    assert len(got.train) + len(got.val) == 9  # asked for: taken
    for label in ("cat\x00", "do\ng", "c\u202eat"):
        with pytest.raises(PgError, match="control character"):
            D.resolve_data(str(_labels(lists, good + [("imgs/cat/cat_000.png", label)])), check=False)


def test_a_huge_label_folds_in_the_class_table_and_formula_labels_are_text_in_csv_outputs(tmp_path, capsys,
                                                                                          monkeypatch):
    import csv

    from conftest import make_images

    monkeypatch.chdir(tmp_path)
    make_images(tmp_path / "imgs", classes=("cat", "dog"), per_class=6)
    huge, formula = "x" * 5000, "=cmd|' /C calc'!A0"
    file = _labels(tmp_path / "imgs", [(f"{c}/{c}_{i:03d}.png", {"cat": huge, "dog": formula}[c])
                                       for c in ("cat", "dog") for i in range(6)])
    app = new_app(tmp_path / "sessions")
    try:
        ok, out, err = run_out(app, capsys, f"data {file} --size 32")
        assert ok, err
        assert "x" * 100 not in out and "(5,000 chars)" in out  # the class table folds it
        for line in ("load test_resnet", "set batch_size 4", "train --steps 1", f"predict {tmp_path / 'imgs' / 'dog'} "
                     f"--out {tmp_path / 'p.csv'}"):
            ok, _, err = run_out(app, capsys, line)
            assert ok, (line, err)
    finally:
        app.session.close(save=False)
    cells = [c for row in csv.reader(open(tmp_path / "p.csv", encoding="utf-8")) for c in row]
    assert f"'{formula}" in cells and formula not in cells


# ------------------------------------------------------------------ 7. weights declaring far more than the model
def test_weights_declaring_far_more_than_the_model_are_refused_before_anything_is_inflated(tmp_path):
    import zipfile

    import torch
    from safetensors.torch import save_file

    from pgshell.engine import models as M
    from pgshell.engine.errors import PgError

    built = M.build_model(M.ModelSpec("test_resnet", 3))
    big = {**built.module.state_dict(), "extra": torch.zeros(12_000_000)}  # 48 MB the model has no room for
    plain = tmp_path / "plain.pt"
    torch.save(big, plain)
    bomb = tmp_path / "bomb.pth"  # the same archive, deflated: 48 MB of zeros in a file of a few hundred KB
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info.filename))
    assert bomb.stat().st_size < 2_000_000
    save_file({k: v.contiguous() for k, v in big.items()}, str(tmp_path / "big.safetensors"))
    before = {k: v.clone() for k, v in built.module.state_dict().items()}
    for file in (bomb, tmp_path / "big.safetensors"):
        with pytest.raises(PgError, match="declares 4[0-9.]+ MB of tensors, and the model holds") as e:
            M.load_weights_file(built, file)
        assert "\n" not in str(e.value) and "nothing was read" in str(e.value)
    assert all(torch.equal(v, before[k]) for k, v in built.module.state_dict().items())
    save_file(dict(before), str(tmp_path / "own.safetensors"))  # the model's own weights still load
    assert M.load_weights_file(built, tmp_path / "own.safetensors").startswith(f"loaded {len(before)} tensors")


# ------------------------------------------------------------------ 12. a model folder sized beyond the machine
def test_a_model_folder_beyond_the_machines_memory_is_refused_on_the_meta_device(tmp_path, monkeypatch):
    from pgshell.engine.models import _weightguard as G
    from pgshell.engine import models as M
    from pgshell.engine.errors import PgError

    folder = tmp_path / "huge"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"architecture": "test_vit", "num_classes": 3,
                                                    "pretrained_cfg": {"input_size": [3, 32, 32]},
                                                    "model_args": {"embed_dim": 256, "depth": 4}}))
    monkeypatch.setattr(G, "machine_memory", lambda: 8 * 2**20)  # an 8 MB machine: the 13 MB model cannot fit
    with pytest.raises(PgError, match=r"config.json asks for a model of 1[0-9.]+ MB of weights \(model_args "
                                      r"\{\"embed_dim\": 256, \"depth\": 4\}\), beyond this machine's 8.0 MB") as e:
        M.build_model(M.ModelSpec(str(folder), 3))
    assert "\n" not in str(e.value)
    monkeypatch.setattr(G, "machine_memory", lambda: 2**40)
    built = M.build_model(M.ModelSpec(str(folder), 3, pretrained=False))  # where it fits, it builds
    assert 10 * 2**20 < G.model_bytes(built.module) < 16 * 2**20


# ------------------------------------------------------------------ 6. what a fork from an older checkpoint keeps
def test_a_fork_from_an_older_epoch_says_its_momentum_restarts_and_the_help_promises_no_more(work, capsys):
    from pgshell.shell import PgShell

    root = work / "sessions"
    app = PgShell(interactive=False, sessions_dir=str(root), stdout=io.StringIO(),
                  session=Session.open(root / "s.session"))
    try:
        assert run_out(app, capsys, "train 2")[0]  # epochs 1 and 2: epoch 1's checkpoint is slim now
        ok, out, err = run_out(app, capsys, "fork f --checkpoint 1")
        assert ok and "momentum restarted" in out, (out, err)
        ok, out, _ = run_out(app, capsys, "help fork")
        text = " ".join(out.split())
        assert "newest checkpoint, continuing with the same settings is the parent bit for bit" in text
        assert "not the optimizer state" in text
    finally:
        app.session.close(save=False)
    readme = " ".join((Path(__file__).resolve().parent.parent / "README.md").read_text().split())
    assert "a fork continued with the parent's settings is the parent, bit for bit" not in readme
    assert "fork from now (or the newest checkpoint) continued with the parent's settings is the parent" in readme

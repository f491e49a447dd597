"""What a new user meets in the shell (issue 14) and the shell's structure (issue 10): subcommands, command sets
given the session, failure state per app, plans that say which line failed, help that helps, completion for model
names, tables that fit the terminal."""

import io
import json
from pathlib import Path

import pytest

from conftest import make_images
from pgshell.shell import PgShell
from pgshell.shell._table import fit_table, text_width
from pgshell.shell.app import unescape_spaces
from conftest import pgshell_here


def run(app, line, capsys=None):
    """One command: (ok, stdout of this command, stderr of this command)."""
    app.failed.clear()
    app.stdout.seek(0)
    app.stdout.truncate()
    app.last_result = None
    app.onecmd_plus_hooks(line)
    err = capsys.readouterr().err if capsys else ""
    return not app.failed.is_set(), app.stdout.getvalue(), err


# ====================================================================== issue 10: the shell's structure
@pytest.mark.parametrize("command, subcommands", [("tune", {"show", "apply"}), ("lrfind", {"show", "apply"})])
def test_tune_and_lrfind_show_apply_are_cmd2_subcommands(app, command, subcommands):
    parser = app.command_parsers.get(app.get_command_func(command))
    action = parser.get_subparsers_action()  # raises ValueError for a parser without subcommands
    assert set(action.choices) == subcommands
    ok, out, _ = run(app, f"help {command} show")
    assert ok and out.startswith(f"Usage: {command} show")


def test_command_sets_are_given_their_apps_session(tmp_path):
    a = PgShell(interactive=False, sessions_dir=str(tmp_path / "a"), stdout=io.StringIO())
    b = PgShell(interactive=False, sessions_dir=str(tmp_path / "b"), stdout=io.StringIO())
    try:
        sets_a, sets_b = a._installed_command_sets, b._installed_command_sets
        assert len(sets_a) == len(sets_b) == 9  # Model, Data, Training, Session, Analysis, Tuning, Review, Best (soup/autofit/report), Audit
        assert all(cs.session is a.session for cs in sets_a) and all(cs.session is b.session for cs in sets_b)
    finally:
        a.session.close(save=False)
        b.session.close(save=False)


def test_failure_state_belongs_to_each_app(tmp_path, capsys):
    import pgshell.shell._common as common

    assert not hasattr(common, "_failed")  # no module-global state shared by every PgShell of the process
    a = PgShell(interactive=False, sessions_dir=str(tmp_path / "a"), stdout=io.StringIO())
    b = PgShell(interactive=False, sessions_dir=str(tmp_path / "b"), stdout=io.StringIO())
    try:
        assert not run(a, "set lr fast", capsys)[0]
        assert a.failed.is_set() and not b.failed.is_set()
        assert not run(b, "train 2 --bogus", capsys)[0] and run(a, "set lr 0.5", capsys)[0]
        assert b.failed.is_set() and not a.failed.is_set()
    finally:
        a.session.close(save=False)
        b.session.close(save=False)


# ====================================================================== issue 14 item 1: plans say which line failed
def test_a_failing_plan_line_is_named_and_the_save_says_what_it_kept(tmp_path, split_folder):
    plan = tmp_path / "plan.txt"
    plan.write_text(f"data {split_folder} --size 32\nload test_resnet\nset lr 0.05\ntrain --steps 1\nset lr fast\n"
                    "set lr 0.5\n")
    r = pgshell_here(str(plan), "--sessions-dir", "s", cwd=tmp_path)
    assert r.returncode == 1
    errors = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(errors) == 1 and errors[0].startswith(f"{plan}:5: set lr fast: ") and "'fast'" in errors[0], r.stderr
    saved = [ln for ln in r.stdout.splitlines() if ln.startswith("saved")]
    assert len(saved) == 1 and saved[0].startswith("saved the session as it was before line 5: "), r.stdout
    file = Path(saved[0].rpartition(": ")[2])
    file = file if file.is_absolute() else tmp_path / file
    assert json.loads(file.read_text())["config"]["lr"] == 0.05  # line 3 is in, line 6 never ran
    # failing before any training leaves no session behind (issue 13), and says so
    plan.write_text(f"data {split_folder} --size 32\nload test_resnet\nset lr fast\n")
    r = pgshell_here(str(plan), "--sessions-dir", "s2", cwd=tmp_path)
    assert r.returncode == 1 and not (tmp_path / "s2").exists() or not list((tmp_path / "s2").iterdir())
    assert "nothing saved: line 3 failed before any training, so no session is left behind" in r.stdout


def test_a_plan_on_stdin_names_line_n_and_echo_prints_each_command(tmp_path, split_folder):
    r = pgshell_here("--echo", stdin=f"data {split_folder} --size 32\nset lr 0.01\n\nset momentum 2\n", cwd=tmp_path)
    assert r.returncode == 1
    assert r.stderr.startswith("line 4: set momentum 2: "), r.stderr
    out = r.stdout.splitlines()
    assert out[0] == f"pgshell> data {split_folder} --size 32"
    i = out.index("pgshell> set lr 0.01")
    assert out[i + 1] == "lr ─> 0.01" and out[-1] == "pgshell> set momentum 2"  # nothing to save: no model


# ====================================================================== item 2: pause/stop in a script
@pytest.mark.parametrize("line", ["pause", "stop"])
def test_pause_or_stop_in_a_script_says_train_steps_is_the_way(app, capsys, line):
    ok, _, err = run(app, line, capsys)
    assert not ok and "in a script `train` waits until its run ends" in err and "`train --steps K`" in err


# ====================================================================== item 6: the toolbar shows a preparing phase
@pytest.mark.parametrize("status, toolbar", [
    ({"state": "training", "phase": "caching features", "done": 120, "total": 1000, "eta": 34},
     " training: caching features 120/1,000 (12%)  ETA 0m34s"),
    ({"state": "training", "phase": "decoding images", "done": 0, "total": 5000, "eta": None},
     " training: decoding images 0/5,000 (0%)"),
    ({"state": "training"}, " training: starting…"),
])
def test_toolbar_shows_the_phase_with_its_progress(app, status, toolbar):
    app.session.status = status
    assert app.get_bottom_toolbar() == toolbar


# ====================================================================== item 8: completion for `load`
def test_load_completes_seed_names_then_timm_then_tv_then_py_files(app, tmp_path, monkeypatch):
    monkeypatch.setenv("PGSHELL_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "resnet_mine.py").write_text("def factory(num_classes): ...\n")
    got = app.complete("res", "load res", 5, 8)
    names = list(got.to_strings())
    assert names[:3] == ["resnet18", "resnet50", "resnet152"]  # the seed's short names first, in their order
    assert "resnet10t" in names and "resnet50.a1_in1k" in names  # then timm's architectures and pretrained tags
    assert names[-1] == "resnet_mine.py" and got.hint == ""  # then .py files; no Hint block
    assert json.loads((tmp_path / "cache" / "model-names.json").read_text())["names"][0] == "resnet18"
    tv = app.complete("tv:res", "load tv:res", 5, 11).to_strings()
    assert tv[0] == "tv:resnet101" and all(n.startswith("tv:res") for n in tv)
    none = app.complete("zzz", "load zzz", 5, 8)
    assert not none.to_strings() and none.hint == ""


# ====================================================================== item 9: help that helps
def test_help_lists_no_cmd2_category_and_lists_history(app):
    ok, out, _ = run(app, "help")
    assert ok and "Cmd2 Commands" not in out and "history" in out.split("Shell")[1]


def test_set_lists_training_settings_only_and_help_set_explains_them(app):
    ok, out, _ = run(app, "set")
    assert ok and set(app.last_result) == set(app.session.config.to_dict())
    for name in ("debug", "echo", "quiet", "traceback_width", "traceback_show_locals"):
        assert name not in app.last_result and f" {name} " not in out
    ok, out, _ = run(app, "help set")
    assert ok and "example:" in out and "set lr 0.01" in out
    assert "learning rate of the head" in out and "StepLR: decay the lr every step_size epochs" in out


def test_history_runs_no_program(app, tmp_path, capsys):
    run(app, "set lr 0.01")
    ok, out, _ = run(app, "history")
    assert ok and "set lr 0.01" in out
    ok, _, err = run(app, "history -e 1", capsys)
    assert not ok and "unrecognized arguments: -e 1" in err  # the change log runs nothing: no -e, no -r


# ====================================================================== item 10: a flat folder of images
def test_data_on_a_flat_folder_says_the_layout_and_where_the_dataset_is(app, tmp_path, capsys):
    make_images(tmp_path / "pics", classes=("ants", "bees"), per_class=4)
    ok, _, err = run(app, f"data {tmp_path / 'pics' / 'ants'}", capsys)
    assert not ok and len(err.strip().splitlines()) == 1
    assert "holds 4 images but no class folders" in err and "expected class folders like" in err
    assert f"the parent folder looks like a dataset (2 class folders: ants, bees): `data {tmp_path / 'pics'}`" in err
    ok, out, err = run(app, f"data {tmp_path / 'pics' / 'ants'} --check", capsys)
    assert not ok and out.count("not in a class folder") == 4 and "ants_000.png" in out


def test_data_in_train_of_a_split_dataset_points_at_the_dataset(app, tmp_path, capsys):
    make_images(tmp_path / "hym" / "train", classes=("ants", "bees"), per_class=3)
    make_images(tmp_path / "hym" / "val", classes=("ants", "bees"), per_class=2)
    ok, _, err = run(app, f"data {tmp_path / 'hym' / 'train' / 'bees'}", capsys)
    assert not ok and f"{tmp_path / 'hym'} looks like a dataset (train/ and val/" in err


# ====================================================================== item 11: `data my\ data`
def test_a_backslash_escaped_space_is_part_of_the_path(app, tmp_path):
    make_images(tmp_path / "my data", classes=("a", "b"), per_class=3)
    escaped = str(tmp_path / "my data").replace(" ", "\\ ")
    ok, _, _ = run(app, f"data {escaped} --size 32")
    assert ok and app.last_result["classes"] == ["a", "b"] and app.session.data["path"] == str(tmp_path / "my data")
    assert run(app, f'data "{tmp_path / "my data"}" --size 32')[0]  # quoting works as before


@pytest.mark.parametrize("line, expected", [
    ("data my\\ data --size 3", 'data "my data" --size 3'),
    ("data 'a\\ b' c\\ d", "data 'a\\ b' \"c d\""),  # inside quotes nothing changes
    ("data a\\ b\\ c", 'data "a b c"'),
    ("predict x\\y", "predict x\\y"),  # a backslash not before a space stays
])
def test_unescape_spaces(line, expected):
    assert unescape_spaces(line) == expected


# ====================================================================== item 13: tables fit the terminal
TRIALS = [["0", "complete", "0.9123", 3, "12.5", "lr=0.00123 weight_decay=1.2e-05 optimizer=adamw batch_size=32 "
                                                 "freeze=backbone label_smoothing=0.0312"],
          ["1", "pruned (at epoch 1: below the median of earlier trials)", "0.51", 1, "3.1", "lr=0.1"]]
HEAD = ["trial", "state", "val_accuracy", "epoch", "seconds", "params"]


@pytest.mark.parametrize("width", [130, 80, 60, 40, 24])
def test_fit_table_never_exceeds_the_width_and_keeps_its_rule(width):
    text = fit_table(TRIALS, HEAD, width, drop=["seconds", "epoch"], wrap=["state", "params"])
    assert text_width(text) <= width, text
    lines = text.splitlines()
    if width >= 60:  # a table whose rule line is whole: one line of dashes under the header, none after it
        assert set(lines[1]) == {"-", " "} and not any(set(ln) <= {"-", " "} for ln in lines[2:])
        assert "weight_decay=1.2e-05" in text  # words are not broken while narrowing others is enough
    else:  # too narrow for a table: the last resort, one `header  value` line per cell
        assert lines[0].startswith("trial ") and lines[1].startswith("state ")


def test_fit_table_drops_low_value_columns_first_and_names_them():
    full = fit_table(TRIALS, HEAD, None)
    assert text_width(full) > 100 and "seconds" in full
    narrow = fit_table(TRIALS, HEAD, 100, drop=["seconds", "epoch"], wrap=["state", "params"])
    assert "seconds" not in narrow.splitlines()[0] and "not shown: seconds" in narrow
    assert "freeze=backbone" in narrow and "below the median" in narrow.replace("\n", " ")  # wrapped, not cut


def test_tune_show_data_and_show_fit_and_wide_shows_all(app, tmp_path, monkeypatch):
    from pgshell.shell.tuning import TuningCommands

    monkeypatch.setenv("COLUMNS", "72")
    tuning = next(cs for cs in app._installed_command_sets if isinstance(cs, TuningCommands))
    table = {"study": "s", "direction": "maximize", "metric": "val_accuracy", "budget": {"epochs": 3},
             "trials": [{"number": int(t[0]), "state": t[1].split(" (")[0], "reason": "at epoch 1: below the median",
                         "value": float(t[2]), "reached": t[3], "duration": float(t[4]),
                         "params": dict(p.split("=") for p in t[5].split())} for t in TRIALS]}
    tuning._print_trials(table, wide=False)
    narrow = app.stdout.getvalue()
    assert text_width(narrow) <= 72 and "--wide shows every column" in narrow
    app.stdout.seek(0), app.stdout.truncate()
    tuning._print_trials(table, wide=True)
    assert text_width(app.stdout.getvalue()) > 72 and "seconds" in app.stdout.getvalue()
    long_class = tmp_path / "d"
    make_images(long_class, classes=("a_class_with_a_very_long_name_indeed_" * 2, "short"), per_class=3)
    ok, out, _ = run(app, f"data {long_class} --size 32")
    assert ok and text_width(out) <= 72
    ok, out, _ = run(app, "show")
    assert ok and text_width(out) <= 72 and str(long_class) in out.replace("\n", "").replace(" ", "")
    ok, out, _ = run(app, "show --wide")
    assert ok and text_width(out) > 72


# ====================================================================== item 14: eval without a useless top-5
def test_eval_omits_top5_when_there_are_5_classes_or_fewer(app, split_folder):
    assert run(app, f"data {split_folder} --size 32")[0] and run(app, "load test_resnet")[0]
    ok, out, _ = run(app, "eval")
    assert ok and app.last_result["val"]["top5"] is None
    assert out.splitlines()[1].split() == ["split", "loss", "accuracy", "images"]


# ====================================================================== item 12: offline, weights are "not cached"
def test_models_says_not_cached_offline_and_how_to_fill_the_cache(app, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty cache
    ok, out, _ = run(app, "models resnet18.a1")
    rows = app.last_result
    assert ok and rows and all(r["weights"] == "not cached" for r in rows if r["source"] == "timm")
    assert "download" not in out and "--weights FILE" in out and "$HF_HOME/hub" in out

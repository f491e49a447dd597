"""Every command fed generated arguments and settings (hypothesis): no traceback, no internal error, no hang, and a
command that fails leaves the session as it was (settings, model, data, position, session file).

Commands run in-process (PgShell(interactive=False).onecmd_plus_hooks) on a 4-image dataset at 8 px, so `train`
really trains. Values that would legitimately run for long are left out of the pools (training for thousands of
epochs, a billion classes, torch.compile on CPU), as are characters that make cmd2 run a shell command (`|`, `>`,
`<`, `!`) and the cmd2 built-ins pgshell hides (shell, edit, run_pyscript, ...).
"""

import contextlib
import faulthandler
import io
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgshell.engine.config import SETTINGS

from conftest import new_app

HANG = 120  # seconds one command may take before the test dumps every thread's stack and fails
JUNK = ["", "x", "-1", "0", "1.5", "nan", "inf", "1e400", "--", "-h", "--help", "--bogus", "'", '"', "''", '"a b"',
        "é", "\\", "%s", "{}", "None", "$HOME", "~", ";", "#", "\t"]
junk = st.one_of(st.sampled_from(JUNK), st.text(st.characters(codec="utf-8", exclude_characters="|<>!\n\r\x00"),
                                                max_size=8).filter(lambda t: not any(c.isdigit() for c in t)))


def _values(name: str) -> list[str]:
    """Values for `set NAME`: the setting's own kind, edge cases, and no value that would train for long."""
    meta, default = SETTINGS[name].metadata, SETTINGS[name].default
    special = {"epochs": ["1", "2", "0", "-1", "2.0", "3"], "batch_size": ["1", "2", "3", "64", "0", "1e30"],
               "seed": ["0", "1", "7", "-1", "1e30", "18446744073709551616", "9223372036854775807"],
               "workers": ["0", "1", "-1"], "compile": ["false", "off", "no", "maybe"],
               "device": ["auto", "cpu", "cuda", "cuda:0", "cuda:x", "mps", "CPU"],
               "devices": ["all", "0", "0,1", "x", "-1", "1,,2"], "step_size": ["1", "7", "0", "1e30"],
               "warmup_epochs": ["0", "0.5", "1e300", "-1"]}
    if name in special:
        return special[name]
    if meta["choices"]:
        return [*meta["choices"], "", "SGD", " adam ", "x"]
    if isinstance(default, bool):
        return ["true", "false", "on", "off", "1", "0", "yes", "maybe"]
    if isinstance(default, int):
        return ["0", "1", "2", "-1", "2.5", "1e9"]
    if isinstance(default, float):
        return ["0", "0.1", "1", "-1", "1e-3", "0.99", "1e308", "nan", "inf", "-0", "0x10", "1_0"]
    return ["x"]


def _words(*options: str) -> st.SearchStrategy[str]:
    return st.sampled_from(options)


def _line(*parts: st.SearchStrategy[str]) -> st.SearchStrategy[str]:
    """Meaningful words, mostly; now and then junk in some place."""
    maybe_junk = st.one_of(st.just(""), st.just(""), st.just(""), junk)
    return st.tuples(*parts, maybe_junk).map(lambda words: " ".join(w for w in words if w))


def _maybe(*options: str) -> st.SearchStrategy[str]:
    return st.sampled_from(("",) + options)


PATHS = ["DATA", "DATA/cat", "nowhere", "file.txt", "empty", "one_class", ".", "~/nowhere", "DATA/../DATA"]
MODELS = ["test_resnet", "test_vit", "resnet18", "nosuch", "tv:nosuch", "tv:squeezenet1_0", "hf-hub:nobody/nothing",
          "missing.py:build", "MODEL:build", "MODEL:broken", "MODEL:nothing", "MODEL", "file.txt:build",
          "timm:test_resnet", "resnet18.nosuchtag"]
PARTS = ["backbone", "all", "none", "head", "layer1", "conv1", "fc", "layer", "stem.conv", "blocks.0", "0", "3"]
COMMANDS = {
    "models": _line(_maybe("zzz", "[", "][", "tv:zzz", "timm:zzz", "test_res*", "tv:resnet1?", "*!")),
    "load": _line(_words(*MODELS), _maybe("--pretrained", "--weights WEIGHTS", "--weights file.txt",
                                          "--weights nowhere.pth", "--weights empty", "--pretrained --weights WEIGHTS"),
                  _maybe("--classes 2", "--classes 3", "--classes 1", "--classes 0", "--classes -2", "--classes x")),
    "data": _line(_words(*PATHS), _maybe("--split 0.5", "--split 0", "--split 1", "--split nan", "--split -1",
                                         "--split 0.999"), _maybe("--size 8", "--size 0", "--size -1", "--size 5000",
                                                                  "--size 12"), _maybe("--check")),
    "freeze": _line(_maybe(*PARTS), _maybe(*PARTS)),
    "unfreeze": _line(_maybe(*PARTS), _maybe(*PARTS)),
    "set": st.one_of(*[st.sampled_from(_values(n)).map(lambda v, n=n: f"{n} {v}") for n in sorted(SETTINGS)],
                     _line(_maybe(*sorted(SETTINGS), "nosuch"), _maybe("1", "x", "-h"), _maybe("2", "--", "-h"))),
    "show": _line(),
    "train": _line(_maybe("1", "2", "0", "-1", "1.5", "--steps 1", "--steps 3", "--steps 0", "1 --steps 1")),
    "pause": _line(),
    "continue": _line(),
    "stop": _line(),
    "wait": _line(),
    "eval": _line(),
    "save": _line(_maybe("a.session", "b.session", "sub/c.session", "x.txt", ".session", "/proc/nope/d.session",
                         "empty", "DATA", "'a b.session'", "DATA/e.session", "sessions/f.session")),
    "help": _line(_maybe("train", "set", "load", "nosuch", "-v")),
    "history": _line(),
    "export": _line(_words("plan"), _maybe("p.plan", "DATA", "/proc/nope/p.plan", "sub/q.plan")),
    "expect": _line(_words("data", "file", "weights", "nothing"), _maybe("DATA", "nowhere", "p.plan", "0" * 32),
                    _maybe("00ff", "")),
    "fork": _line(_maybe("f1", "f2", "a.session", "../up", "x/y"),
                  _maybe("--checkpoint 1", "--checkpoint best", "--checkpoint last", "--checkpoint step:1",
                         "--checkpoint x")),
    "errors": _line(_maybe("--split val", "--split test", "--split train"), _maybe("--top 1", "--top 0", "--top 3"),
                    _maybe("--class cat", "--class wolf"), _maybe("--out e.png", "--out e.txt", "--checkpoint 1",
                                                                  "--checkpoint last")),
    "explain": _line(_words("DATA/cat/cat_000.png", "nowhere.png", "file.txt", "DATA", "empty"),
                     _maybe("--class dog", "--class wolf"), _maybe("--out cam.png", "--method gradcam++",
                                                                   "--method x", "--checkpoint best")),
    "probe": _line(_words("knn", "linear", "x"), _maybe("--k 1", "--k 0", "--k 100")),
    "compare": _line(_maybe("a", "sessions/a.session", "nowhere", "file.txt"), _maybe("--out c.csv")),
    "sessions": _line(_maybe("rm"), _maybe("a", "nowhere", "DATA"), _maybe("--yes")),
    "checkpoints": _line(_maybe("prune"), _maybe("--keep 0", "--keep 2", "--keep -1", "--yes")),
}
PREFIXES = [[], ["data DATA --size 8"], ["data DATA --size 8", "load test_resnet"],
            ["data DATA --size 8", "load test_resnet", "train --steps 1"],
            ["data DATA --size 8", "load MODEL:build", "set batch_size 1", "train 1"]]

MODEL_FILE = '''
from torch import nn


def build(num_classes):
    return nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, num_classes))


def broken(num_classes):
    raise ValueError("this factory is broken")


nothing = 3
'''


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The files the commands may point at; each example works in its own folder below."""
    from conftest import make_images

    base = tmp_path_factory.mktemp("fuzz")
    make_images(base / "DATA", classes=("cat", "dog"), per_class=2, px=8)
    make_images(base / "one_class", classes=("cat",), per_class=2, px=8)
    (base / "empty").mkdir()
    (base / "file.txt").write_text("not a folder\n")
    (base / "model.py").write_text(MODEL_FILE)
    import timm
    from safetensors.torch import save_file

    save_file(timm.create_model("test_resnet", num_classes=2).state_dict(), base / "weights.safetensors")
    return base


def _fill(line: str, base: Path) -> str:
    return (line.replace("DATA", str(base / "DATA")).replace("MODEL", str(base / "model.py"))
            .replace("WEIGHTS", str(base / "weights.safetensors")))


def _state(app) -> dict:
    s = app.session
    return {"config": s.config.to_dict(), "spec": s.spec.to_dict() if s.spec else None,
            "data": dict(s.data) if s.data else None, "file": s.file,
            "position": None if s.trainer is None else (s.trainer.pos.epoch, s.trainer.pos.step, s.trainer.pos.sample),
            "frozen": None if s.built is None else sorted(n for n, p in s.built.module.named_parameters()
                                                          if not p.requires_grad)}


def _one(app, line: str) -> tuple[bool, str]:
    app.failed.clear()
    err = io.StringIO()
    faulthandler.dump_traceback_later(HANG, exit=True)  # a hang ends the run with every thread's stack
    try:
        with contextlib.redirect_stderr(err):
            app.onecmd_plus_hooks(line)
    finally:
        faulthandler.cancel_dump_traceback_later()
    return not app.failed.is_set(), err.getvalue()


SEQUENCES = {"prefix": st.sampled_from(PREFIXES),
             "commands": st.lists(st.sampled_from(sorted(COMMANDS)).flatmap(
                 lambda c: COMMANDS[c].map(lambda a: f"{c} {a}".strip())), min_size=1, max_size=8)}
FUZZ = {"deadline": None, "database": None, "suppress_health_check": [
    HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large]}


@settings(max_examples=150, derandomize=True, **FUZZ)  # the same examples on every run: CI stays deterministic
@given(**SEQUENCES)
def test_any_command_sequence_gives_no_traceback_and_failures_change_nothing(world, prefix, commands):
    _run_sequence(world, prefix, commands)


@pytest.mark.slow
@settings(max_examples=2000, derandomize=False, **FUZZ)  # new examples each run
@given(**SEQUENCES)
def test_any_command_sequence_at_length(world, prefix, commands):
    _run_sequence(world, prefix, commands)


def _run_sequence(world: Path, prefix: list[str], commands: list[str]) -> None:
    cwd = os.getcwd()
    work = Path(tempfile.mkdtemp(dir=world))
    os.chdir(work)
    app = new_app(work / "sessions")
    try:
        for line in prefix:
            ok, err = _one(app, _fill(line, world))
            assert ok, (line, err)
        for line in commands:
            line = _fill(line, world)
            before = _state(app)
            ok, err = _one(app, line)
            out = app.stdout.getvalue()
            assert "Traceback" not in err + out and "internal error" not in err + out, (line, err)
            if "Error: " in err or "Usage: " in err:
                assert not ok, (line, "an argument error counts as a failed command (a plan stops there)")
            if not ok:
                assert err.strip(), (line, "a failure says why")
                after = _state(app)
                if line.split()[0] in ("train", "continue") and "training stopped by" in err:
                    # torch refusing what it was given (an 8 px image through squeezenet, an lr of 1e308) is
                    # the user's to fix; a Python error here would be a setting pgshell should have refused
                    assert "training stopped by an error: RuntimeError:" in err, (line, err)
                    after["position"] = before["position"]  # the run got going, then failed: progress is kept
                assert after == before, (line, err)
            assert not app.session.running  # scripts: train and continue block until the run ends
    finally:
        app.session.close(save=False)
        os.chdir(cwd)


def test_every_setting_at_its_edges_then_a_training_step(world, tmp_path, monkeypatch):
    """Systematic where the fuzzing is random: each setting at each of its edge values, then one training step.
    A value is refused at `set` (config unchanged), or training with it works or stops with a clear error."""
    monkeypatch.chdir(tmp_path)
    app = new_app(tmp_path / "sessions")
    try:
        for line in ("data DATA --size 8", "load MODEL:build", "set batch_size 2"):
            assert _one(app, _fill(line, world))[0]
        for name in sorted(SETTINGS):
            default = str(getattr(app.session.config, name))
            for value in _values(name):
                before = app.session.config
                ok, err = _one(app, f"set {name} {value}")
                assert "Traceback" not in err and "internal error" not in err, (name, value, err)
                if not ok:
                    assert app.session.config == before, (name, value)
                    continue
                ok, err = _one(app, "train --steps 1")
                assert "Traceback" not in err and "internal error" not in err, (name, value, err)
                assert ok or err.startswith("error: ") and "training stopped by an error" not in err, (name, value, err)
                assert _one(app, f"set {name} {default}")[0]
    finally:
        app.session.close(save=False)


def test_an_image_size_the_model_cannot_take_is_one_line_before_training(world, tmp_path, monkeypatch):
    """Found by the long fuzzing run: test_vit given 8 px images (not a multiple of its 16 px patches) raised inside
    timm — an internal error from `eval`, a bare AssertionError from `train`."""
    monkeypatch.chdir(tmp_path)
    app = new_app(tmp_path / "sessions")
    try:
        for line in ("data DATA --size 8", "load test_vit"):
            assert _one(app, _fill(line, world))[0]
        for line in ("train 1", "eval"):
            before = _state(app)
            ok, err = _one(app, line)
            assert not ok and err.startswith("error: test_vit") and "cannot take 8x8 images" in err, err
            assert "--size 160" in err and len(err.strip().splitlines()) == 1 and _state(app) == before
        assert _one(app, _fill("data DATA --size 32", world))[0] and _one(app, "train 1")[0]
    finally:
        app.session.close(save=False)


@pytest.mark.parametrize("prefix, commands", [
    (PREFIXES[2], ["freeze all", "train"]),  # refused only once the session was named and a trainer built
    (PREFIXES[2], ["save /proc/nope/d.session", "show"]),  # internal error, session moved to the unwritable place
    ([], ["set lr 0.1 0.2"]),  # cmd2's own parser: a usage error that did not fail the command
    (PREFIXES[2], ["set seed 1e30", "train 1"]),  # accepted; every step then failed packing the seed
    (PREFIXES[2], ["set batch_size 1e30", "train 1"]),  # accepted; the data loader then failed
    (PREFIXES[2], ["set lr 1e308", "train 1"]),  # accepted; torch then overflowed converting it
    (PREFIXES[3], ["set optimizer adam", "train 1"]),  # KeyError 'step': SGD's state loaded into Adam
    (PREFIXES[1], ["load test_vit", "eval"]),  # 8 px through 16 px patches: an internal error
])
def test_sequences_that_once_failed(world, prefix, commands):
    """What the fuzzing found, kept as fixed examples so the default suite holds them every run."""
    _run_sequence(world, prefix, commands)

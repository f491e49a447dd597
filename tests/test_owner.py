"""Issue 23, the session's one owner: nothing outside session/core.py assigns to a Session; one `Run` answers the
position, the trainer read from and the evaluation data; `Session.fork` and one checkpoint resolver (`eval
--checkpoint step:N` as `fork` takes it); one reader of the session file."""

import ast
from pathlib import Path

import pytest

from conftest import ROOT, new_session, run, run_out, train_to_end

PACKAGE = ROOT / "pgshell"
CORE = PACKAGE / "session" / "core.py"
SESSION_NAMES = {"s", "session", "sess"}  # how a Session is bound: s.X, session.X, self.session.X, self.s.X, ...


def _session_attributes() -> set[str]:
    """Every attribute Session has: those its methods assign (self.X = ...), its methods and properties."""
    tree = ast.parse(CORE.read_text())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Session")
    names = set()
    for node in ast.walk(cls):
        if isinstance(node, ast.FunctionDef):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store) \
                and isinstance(node.value, ast.Name) and node.value.id == "self":
            names.add(node.attr)
    return names


def _is_session(node: ast.AST) -> bool:
    if isinstance(node, ast.Name):
        return node.id in SESSION_NAMES
    return isinstance(node, ast.Attribute) and node.attr in ("session", "s")


def _writes_to_a_session(tree: ast.AST, attributes: set[str]):
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.ctx, (ast.Store, ast.Del)) \
                and _is_session(node.value) and node.attr in attributes:
            yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Name) and f.id in ("setattr", "delattr") and node.args and _is_session(node.args[0]):
                yield node.lineno, ast.unparse(node)
            # s.__dict__.update(...), vars(s).update(...), s.__dict__[k] = ... (below)
            if isinstance(f, ast.Attribute) and f.attr in ("update", "setdefault", "__setitem__", "pop"):
                owner = f.value
                if (isinstance(owner, ast.Attribute) and owner.attr == "__dict__" and _is_session(owner.value)) or \
                        (isinstance(owner, ast.Call) and getattr(owner.func, "id", "") == "vars"
                         and owner.args and _is_session(owner.args[0])):
                    yield node.lineno, ast.unparse(node)
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store):
            owner = node.value
            if (isinstance(owner, ast.Attribute) and owner.attr == "__dict__" and _is_session(owner.value)) or \
                    (isinstance(owner, ast.Call) and getattr(owner.func, "id", "") == "vars" and owner.args
                     and _is_session(owner.args[0])):
                yield node.lineno, ast.unparse(node)


def test_no_module_outside_session_core_assigns_to_a_session():
    attributes = _session_attributes()
    assert {"notify", "target", "uid", "auto_named", "trainer", "config"} <= attributes  # the check sees them
    found = []
    for file in sorted(PACKAGE.rglob("*.py")):
        if file == CORE:
            continue
        for line, what in _writes_to_a_session(ast.parse(file.read_text()), attributes):
            found.append(f"{file.relative_to(ROOT)}:{line}: {what}")
    assert found == []


def test_the_ownership_check_finds_each_kind_of_write():
    """The check itself: each way of writing to a session from outside is found, reads are not."""
    code = ("s.target = None\nself.session.notify = f\nsess.uid += 'x'\nsetattr(s, 'dirty', True)\n"
            "s.__dict__.update(x=1)\nvars(session)['name'] = 'n'\ndel s.trainer\n"
            "x = s.target\ns.saver.latest = p\nother.target = 1\n")
    found = [line for line, _ in _writes_to_a_session(ast.parse(code), _session_attributes())]
    assert found == [1, 2, 3, 4, 5, 6, 7]


# ---------------------------------------------------------------- one checkpoint resolver, Session.fork, one Run
def ok(app, line):
    """One command in-process; fails the test (with the shell's output) if the command failed."""
    good, result = run(app, line)
    assert good, f"`{line}` failed: {app.stdout.getvalue()[-600:]}"
    return result


@pytest.fixture
def stepped(app, split_folder):
    """A shell on a session of 4 batches an epoch trained to step 3 (a checkpoint there: the end of a --steps run)
    and on to step 6 (epoch 1's checkpoint at step 4, another at step 6), with `crop_pct` changed after step 3."""
    for line in ("set batch_size 8", f"data {split_folder} --size 32", "load test_resnet", "train --steps 3"):
        ok(app, line)
    assert app.session.wait(120)
    ok(app, "set crop_pct 0.8")  # the checkpoint at step 3 keeps the policy it was trained with
    ok(app, "train --steps 3")
    assert app.session.wait(120) and "error" not in app.session.status
    return app


def test_eval_checkpoint_step_n_is_eval_on_a_fork_at_step_n(stepped):
    from pgshell.session.files import C  # engine's checkpoint module

    app = stepped
    at3 = ok(app, "eval --checkpoint step:3 --split val")["val"]
    errors = ok(app, "errors --checkpoint step:3 --top 1000")  # the same Run: the checkpoint's policy and weights
    live = ok(app, "eval --split val")["val"]
    assert (at3["step"], at3["epoch"], at3["batch"], live["step"]) == (3, 0, 3, 6)
    assert at3["model"] == "step-0000003.safetensors" and at3["loss"] != live["loss"]
    assert errors["step"] == 3 and len(errors["rows"]) == 12
    assert sum(r["loss"] for r in errors["rows"]) / 12 == pytest.approx(at3["loss"], rel=1e-5, abs=1e-6)
    image = app.session.splits.val[0][0]
    live_resize = _eval_resize(app.session, None)
    ckpt_resize = _eval_resize(app.session, "step:3")  # the checkpoint's evaluation policy, not today's crop_pct
    seen = ok(app, f"explain {image} --checkpoint step:3")
    told = ok(app, f"predict {image} --checkpoint step:3")
    ok(app, "fork at3 --checkpoint step:3")
    fork = app.session
    state = C.load_checkpoint(fork.folder / "checkpoints" / "step-0000003.safetensors")
    assert fork.name == "at3" and fork.position() == {"epoch": 0, "step": 3, "batch": 3, "run": state["run"]}
    assert fork.config.crop_pct != 0.8  # the checkpoint's settings came with it
    again = ok(app, "eval --split val")["val"]
    assert (again["step"], again["loss"], again["accuracy"]) == (3, at3["loss"], at3["accuracy"])
    seen_there, told_there = ok(app, f"explain {image}"), ok(app, f"predict {image}")
    assert seen["step"] == seen_there["step"] == told["step"] == told_there["step"] == 3
    assert seen["map"].shape == seen_there["map"].shape == (32, 32) and (seen["map"] == seen_there["map"]).all()
    assert told["rows"][0]["top"] == told_there["rows"][0]["top"]
    assert ckpt_resize == _eval_resize(fork, None) != live_resize and live_resize == round(32 / 0.8)


def _eval_resize(s, checkpoint):
    """The resize side of the evaluation transform a Run reads with (explain frames its map by it)."""
    run = s.select_run(checkpoint)
    steps = run.eval_spec(s.apply(run.model)).transform(train=False).transforms
    size = next(t.size for t in steps if type(t).__name__ == "Resize")
    return size if isinstance(size, int) else min(size)


def test_every_command_resolves_a_checkpoint_name_to_the_same_file(stepped, capsys):
    from pgshell.session.files import C  # engine's checkpoint module
    from pgshell.session import review
    from pgshell.session.run import resolve_checkpoint

    s = stepped.session
    files = {which: resolve_checkpoint(s, which) for which in ("step:3", "step-4", "1", "best", "last", None)}
    assert {k: p.name for k, p in files.items()} == {
        "step:3": "step-0000003.safetensors", "step-4": "epoch-0001.safetensors", "1": "epoch-0001.safetensors",
        "best": "epoch-0001.safetensors", "last": "step-0000006.safetensors", None: "step-0000006.safetensors"}
    assert int(C.read_metadata(files["step:3"])["step"]) == 3
    assert review.resolve_checkpoint is resolve_checkpoint  # soup and the review commands use this one
    for which, words in (("step:5", "no checkpoint at step 5"), ("9", "no checkpoint for epoch 9"),
                         ("nothing.safetensors", "no checkpoint nothing.safetensors: give an epoch number, step:N")):
        good, _, err = run_out(stepped, capsys, f"eval --checkpoint {which}")
        assert not good and words in err


def test_session_fork_returns_the_session_at_the_checkpoint_and_closes_this_one(tmp_path, split_folder):
    from pgshell.session.files import C  # engine's checkpoint module
    from pgshell.session import Session

    s = new_session(tmp_path / "sessions", split_folder, name="p")
    train_to_end(s, steps=3)
    train_to_end(s, steps=2)
    told = []
    s.report_to(told.append)
    fork = s.fork("q", "step:3")
    try:
        assert isinstance(fork, Session) and fork.name == "q" and fork.file == tmp_path / "sessions" / "q.session"
        state = C.load_checkpoint(tmp_path / "sessions" / "q" / "checkpoints" / "step-0000003.safetensors")
        assert fork.position() == {"epoch": 0, "step": 3, "batch": 3, "run": state["run"]}
        assert fork.select_run().position.step == 3 and fork.select_run().position == fork.select_run("last").position
        assert not s.worker.thread.is_alive() and fork.notify == told.append  # the parent closed, saved
        assert [e["kind"] for e in fork.changes.entries][-1] == "fork"
    finally:
        fork.close(save=False)


def test_a_fork_that_cannot_open_leaves_the_shell_on_this_session_as_it_was(stepped, monkeypatch):
    from pgshell.engine.errors import PgError
    from pgshell.session import Session

    app, parent = stepped, stepped.session
    before = parent.position()

    def fails(*a, **kw):
        raise PgError("cannot open it")

    monkeypatch.setattr(Session, "open", classmethod(fails))
    good, _ = run(app, "fork broken --checkpoint step:3")
    assert not good and app.session is parent and parent.worker.thread.is_alive()
    assert parent.position() == before and parent.name is not None
    monkeypatch.undo()
    ok(app, "train --steps 1")  # the parent works on
    assert app.session.wait(120) and parent.position()["step"] == 7

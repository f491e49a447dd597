"""Shared fixtures and helpers: tiny image folders made by the tests themselves (no network, no ../shared), sessions
and shells on them, and pgshell as a subprocess. Test files import the helpers (`from conftest import run`)."""

import contextlib
import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never touch the network
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:  # `pytest -n N`: the workers share the cores, so each takes its part
    # (torch is not imported yet; the pgshell subprocesses a test starts inherit the same share)
    os.environ.setdefault("OMP_NUM_THREADS",
                          str(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"]))))

WAIT = 120  # seconds: a generous bound for a tiny run on a loaded 2-core machine


@pytest.fixture(autouse=True)
def _no_terminal_width(monkeypatch):
    """Tables are as wide as their text unless a test sets COLUMNS itself: a pytest-xdist worker finds COLUMNS=80 and
    LINES=24 in its environment (a plain run does not), and a user may have exported them."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)


def make_images(root: Path, classes=("cat", "dog", "fox"), per_class=10, px=32, seed=0, fmt="png") -> Path:
    """Class folders of small learnable images: each class has its own colour and stripe direction, plus noise."""
    rng = np.random.default_rng(seed)
    colours = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (200, 200, 40), (200, 40, 200)]
    for c, name in enumerate(classes):
        d = root / name
        d.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            a = np.zeros((px, px, 3), np.float32) + colours[c % len(colours)]
            stripes = (np.arange(px) // 4 % 2)[:, None] if c % 2 else (np.arange(px) // 4 % 2)[None, :]
            a = a * (0.6 + 0.4 * stripes[..., None]) + rng.normal(0, 20, a.shape)
            Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).save(d / f"{name}_{i:03d}.{fmt}")
    return root


@pytest.fixture
def image_folder(tmp_path) -> Path:
    """3 classes x 10 images, one class-folder root (split by ratio)."""
    return make_images(tmp_path / "imgs")


def make_split(root: Path) -> Path:
    """train/ (3 x 10) and val/ (3 x 4) folders: 30 training images, 4 batches of 8 per epoch."""
    make_images(root / "train", per_class=10, seed=1)
    make_images(root / "val", per_class=4, seed=2)
    return root


@pytest.fixture
def split_folder(tmp_path) -> Path:
    """make_split's folders under tmp_path/tv."""
    return make_split(tmp_path / "tv")


# ---------------------------------------------------------------- sessions
def new_session(root: Path, folder: Path, name: str = "s", batch_size: int | None = 8, **settings):
    """A session in `root` on `folder` at 32 px with test_resnet: `batch_size` (None: the default), then `settings`
    in the order given (before the data and model, as a plan would set them), named `name`."""
    from pgshell.session import Session  # imported on use: conftest stays cheap to load for every test file

    s = Session(root=root)
    if batch_size is not None:
        s.set("batch_size", batch_size)
    for k, v in settings.items():
        s.set(k, v)
    s.attach_data(str(folder), size=32)
    s.load_model("test_resnet")
    s.use_name(name)
    return s


def train_to_end(s, **kw) -> None:
    """`s.train(**kw)` and wait for it: the run must end in time and without an error."""
    s.train(**kw)
    assert s.wait(WAIT), "training did not finish in time"
    assert "error" not in s.status, s.status


def weights_of(module) -> dict:
    """A copy of the module's weights, to compare with after more training."""
    return {k: v.clone() for k, v in module.state_dict().items()}


def exact_rows(folder: Path) -> list[tuple]:
    """The session folder's metrics log in the columns a resumed run must reproduce bit for bit."""
    from pgshell.engine.train.metrics import EXACT_COLUMNS, read_rows

    return [tuple(r[c] for c in EXACT_COLUMNS) for r in read_rows(folder / "metrics.csv")]


# ---------------------------------------------------------------- the shell in-process and as a subprocess
def new_app(sessions_dir: Path):
    """A script-mode shell whose output goes to a StringIO (app.stdout)."""
    from pgshell.shell import PgShell

    return PgShell(interactive=False, sessions_dir=str(sessions_dir), stdout=io.StringIO())


@pytest.fixture
def app(tmp_path, monkeypatch):
    """A shell run from tmp_path (so the files a command writes land there), closed without saving."""
    monkeypatch.chdir(tmp_path)
    a = new_app(tmp_path / "sessions")
    yield a
    a.session.close(save=False)


def run_out(app, capsys, line):
    """One command in-process on an app writing to a StringIO: (ok, stdout, stderr); stderr never holds a
    traceback."""
    app.failed.clear()
    app.stdout.seek(0)
    app.stdout.truncate()
    app.onecmd_plus_hooks(line)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return not app.failed.is_set(), app.stdout.getvalue(), err


def run(app, line):
    """One command in-process; returns (ok, last_result)."""
    app.failed.clear()
    app.last_result = None
    app.onecmd_plus_hooks(line)
    return not app.failed.is_set(), app.last_result


def pgshell_env(**extra) -> dict:
    """The environment for pgshell in a subprocess: this checkout, offline, no fault injection unless asked."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", **extra)
    if "PGSHELL_FAULT" not in extra:
        env.pop("PGSHELL_FAULT", None)
    return env


def pgshell(*args, stdin=None, cwd=None, timeout=300, env=None) -> subprocess.CompletedProcess:
    """`pgshell ARGS` as a subprocess fed `stdin` (a plan); its output captured as text."""
    return subprocess.run([sys.executable, "-m", "pgshell", *args], input=stdin, capture_output=True, text=True,
                          cwd=cwd, env=env or pgshell_env(), timeout=timeout)


def pgshell_here(*args, stdin=None, cwd=None) -> subprocess.CompletedProcess:
    """`pgshell ARGS` as `pgshell()` runs it, but in this process: its `main` with stdin, stdout and stderr swapped
    for strings and the working folder changed, giving the same exit code and output. For tests of what a plan does,
    not of the process itself: it skips the seconds a new process spends importing torch and timm."""
    from pgshell.shell import main

    out, err, here = io.StringIO(), io.StringIO(), os.getcwd()
    fault = os.environ.pop("PGSHELL_FAULT", None)  # as pgshell_env(): no fault injection
    try:
        os.chdir(cwd or here)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), _stdin(stdin or ""):
            try:
                code = main([str(a) for a in args])
            except SystemExit as e:  # argparse: --help, --version, bad arguments
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
    finally:
        os.chdir(here)
        if fault is not None:
            os.environ["PGSHELL_FAULT"] = fault
    return subprocess.CompletedProcess(["pgshell", *map(str, args)], code, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def _stdin(text: str):
    old, sys.stdin = sys.stdin, io.StringIO(text)
    try:
        yield
    finally:
        sys.stdin = old

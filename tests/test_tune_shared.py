"""A `tune` study shared through a real PostgreSQL server by two pgshell processes running at once (two "machines":
their own working folders, the same data, model and seed), and the sampler that keeps them from drawing the same
parameters.

The server is Debian's PostgreSQL (`apt-get install postgresql`), started by the fixture below in a temporary folder
for this test session and stopped at its end; without it, or without psycopg2 (`pip install 'pgshell[postgres]'`),
the shared-study test is skipped and says which."""

import contextlib
import glob
import io
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from types import SimpleNamespace

import optuna
import pytest

from pgshell.engine.errors import PgError
from pgshell.engine.search.trials import make_sampler
from pgshell.session import Session
from pgshell.session import study as T

from conftest import make_split, pgshell_env, run

TRIALS = 3  # per process
WAIT = 240  # seconds for both processes together: a generous bound on a loaded 2-core machine
PG_WAIT = 60  # seconds pg_ctl waits for the server to start or stop
# Only lr varies: two machines drawing the same parameters show up as equal lr values.
SPACE = "lr=1e-4:1e-1:log optimizer=sgd batch_size=8 freeze=none weight_decay=- label_smoothing=-"
INSTALL = "apt-get install postgresql (Debian) or put PostgreSQL's bin folder on PATH"


# ------------------------------------------------------------------ the sampler, without a server
def _first_draws(worker, seed=0, n=3):
    study = optuna.create_study(sampler=make_sampler(seed, 0, worker))
    return [study.ask().suggest_float("lr", 1e-4, 1e-1, log=True) for _ in range(n)]


def test_each_machine_draws_its_own_parameters_and_the_local_study_draws_as_before():
    a, b = "host-a:/work/a/sessions/s", "host-b:/work/b/sessions/s"
    assert _first_draws(a) == _first_draws(a)  # the same machine (session key and seed) replays its draws
    first_a, first_b = _first_draws(a), _first_draws(b)
    assert first_a[0] != first_b[0] and not set(first_a) & set(first_b)  # two machines, one seed: apart
    assert _first_draws(a, seed=1)[0] != first_a[0]
    # the session's own tune.db (no worker): the seed as before the shared-storage change, Optuna's other defaults
    old = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=5))
    assert _first_draws(None) == [old.ask().suggest_float("lr", 1e-4, 1e-1, log=True) for _ in range(3)]
    assert make_sampler(0, 0, a)._constant_liar  # asked for, whatever the Optuna version's default (True from 5.0)


# ------------------------------------------------------------------ a PostgreSQL server for the test session
def _server_bindir() -> Path | None:
    """Where initdb and pg_ctl are: pg_config's bindir, else Debian's /usr/lib/postgresql/VERSION/bin (newest)."""
    found = []
    if shutil.which("pg_config"):
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, timeout=30)
        found.append(out.stdout.strip())
    found += sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda p: int(Path(p).parent.name)
                    if Path(p).parent.name.isdigit() else 0, reverse=True)
    return next((Path(d) for d in found if d and (Path(d) / "initdb").exists() and (Path(d) / "pg_ctl").exists()),
                None)


def _as_server_user() -> list[str]:
    """The command prefix that runs the server's programs: PostgreSQL refuses to run as root, so root hands them to
    the `postgres` user (Debian's package creates it)."""
    if os.geteuid() != 0:
        return []
    try:
        import pwd

        pwd.getpwnam("postgres")
    except KeyError:
        pytest.skip(f"running as root and there is no `postgres` user to run the PostgreSQL server: {INSTALL}")
    return ["runuser", "-u", "postgres", "--"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(bindir: Path, folder: Path, user: list[str]) -> int:
    """initdb a cluster in folder/data (trust authentication, superuser `pgshell`) and start it on a free port;
    the port. pytest.skip with the server's own words when it will not start."""
    data, log = folder / "data", folder / "server.log"

    def call(*cmd):
        r = subprocess.run([*user, *map(str, cmd)], capture_output=True, text=True, cwd=folder, timeout=PG_WAIT + 30)
        return r.returncode == 0, (r.stderr or r.stdout).strip()

    ok, err = call(bindir / "initdb", "-D", data, "-A", "trust", "-U", "pgshell", "--no-locale", "-E", "UTF8",
                   "--no-sync")
    if not ok:
        pytest.skip(f"initdb failed, so no PostgreSQL server for the shared-study test: {_last(err)}")
    for _ in range(3):  # another program may take the free port before the server binds it: try another
        port = _free_port()
        ok, err = call(bindir / "pg_ctl", "start", "-D", data, "-l", log, "-w", "-t", PG_WAIT, "-o",
                       f"-c listen_addresses=127.0.0.1 -p {port} -k {folder} -c fsync=off")
        if ok:
            return port
    said = log.read_text(errors="replace") if log.exists() else err
    pytest.skip(f"the PostgreSQL server did not start: {_last(said)}")


def _last(text: str) -> str:
    """The line that says why: the last FATAL or ERROR of the server's log, else its last line."""
    lines = text.strip().splitlines() or ["(no output)"]
    return next((ln for ln in reversed(lines) if "FATAL" in ln or "ERROR" in ln), lines[-1])


def _stop(bindir: Path, folder: Path, user: list[str]) -> None:
    if (folder / "data" / "postmaster.pid").exists():  # a server runs (or a start timed out): stop it, waiting
        subprocess.run([*user, str(bindir / "pg_ctl"), "stop", "-D", str(folder / "data"), "-m", "fast", "-w", "-t",
                        str(PG_WAIT)], capture_output=True, cwd=folder, timeout=PG_WAIT + 30)


def _connect(url: str):
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname=u.database, connect_timeout=30)


def _new_database(url: str, name: str) -> str:
    """CREATE DATABASE `name` on the server of `url`; the new database's URL."""
    from sqlalchemy.engine import make_url

    con = _connect(url)
    try:
        con.autocommit = True  # CREATE DATABASE refuses to run inside a transaction
        with con.cursor() as cur:
            cur.execute(f"CREATE DATABASE {name}")
    finally:
        con.close()
    return make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def postgres_url():
    """`postgresql+psycopg2://pgshell@127.0.0.1:PORT/pgshell_test` on a server of this test session's own."""
    try:
        import psycopg2  # noqa: F401  (only whether it is there)
    except ImportError:
        pytest.skip("psycopg2 is not installed: pip install 'pgshell[postgres]' (or psycopg2-binary)")
    bindir = _server_bindir()
    if bindir is None:
        pytest.skip(f"no PostgreSQL server programs (initdb, pg_ctl) found: {INSTALL}")
    user = _as_server_user()
    folder = Path(tempfile.mkdtemp(prefix="pgshell-pg-"))  # not under pytest's tmp_path: root's, unreadable to postgres
    if user:
        shutil.chown(folder, "postgres", "postgres")
    try:
        port = _start(bindir, folder, user)
        yield _new_database(f"postgresql+psycopg2://pgshell@127.0.0.1:{port}/postgres", "pgshell_test")
    finally:
        _stop(bindir, folder, user)
        shutil.rmtree(folder, ignore_errors=True)


# ------------------------------------------------------------------ two machines, one study
class _Machine:
    """One machine: pgshell in its own folder with a plan on stdin that tunes the shared study (in a plan `tune`
    waits for its search and prints the table). A thread reads its output, so it never blocks on a full pipe, and
    sets `started` at the `tune:` line (or at the end of the output, should it fail before)."""

    def __init__(self, root: Path, data: Path, url: str):
        root.mkdir()
        self.proc = subprocess.Popen([sys.executable, "-m", "pgshell"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, cwd=root,
                                     env=pgshell_env(PYTHONUNBUFFERED="1"))  # the `tune:` line arrives as printed
        self.proc.stdin.write(f"set seed 0\nset batch_size 8\ndata {data} --size 32\nload test_resnet\n"
                              f"tune --trials {TRIALS} --epochs 1 --storage {url} --study shared --space {SPACE}\n")
        self.proc.stdin.close()
        self.lines: list[str] = []
        self.started = threading.Event()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            self.lines.append(line)
            if line.startswith("tune: "):
                self.started.set()
        self.started.set()

    def finish(self, timeout: float = WAIT) -> str:
        """Its whole output once it has ended; killed when still running after `timeout` seconds."""
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=WAIT)
        return "".join(self.lines)


@contextlib.contextmanager
def _no_new_trials(url: str):
    """Hold the `trials` table so that no machine can add a trial (reading it still works) until the block ends."""
    con = _connect(url)
    try:
        with con.cursor() as cur:
            cur.execute("LOCK TABLE trials IN EXCLUSIVE MODE")  # until the rollback below ends the transaction
        yield
    finally:
        con.rollback()
        con.close()


def test_two_machines_share_one_postgres_study_without_repeating_a_trial(tmp_path, postgres_url):
    data = make_split(tmp_path / "tv")
    roots = [tmp_path / "machine-a", tmp_path / "machine-b"]
    optuna.storages.RDBStorage(postgres_url)  # Optuna's tables, to lock one (the race to create them: the test below)
    machines = []
    try:
        # Neither machine can add a trial before both have started their search: both start on the empty study, as
        # two machines started at the same moment do, with the same seed (before the fix: the same parameters)
        with _no_new_trials(postgres_url):
            machines = [_Machine(r, data, postgres_url) for r in roots]
            assert all(m.started.wait(WAIT) for m in machines)
        outs = [m.finish() for m in machines]
    finally:
        for m in machines:
            m.finish(timeout=0)
    for m, out in zip(machines, outs):
        assert m.proc.returncode == 0, out
        assert "study 'shared' (0 trials so far)" in out and f"tune done: {TRIALS} trials" in out, out
    trials = optuna.load_study(study_name="shared", storage=postgres_url).get_trials(deepcopy=False)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
    assert sorted(t.number for t in trials) == list(range(2 * TRIALS))  # each number once, nothing else left
    assert all(t.state in finished for t in trials), [t.state for t in trials]
    keys = [T.session_key(SimpleNamespace(uid=json.loads(_session_folder(r).with_suffix(".session").read_text())["id"]))
            for r in roots]
    assert keys[0] != keys[1]
    assert sorted(t.user_attrs["session"] for t in trials) == sorted(keys * TRIALS)  # N trials from each machine
    lrs = [t.params["lr"] for t in trials]
    assert len(set(lrs)) == 2 * TRIALS and all(1e-4 <= lr <= 1e-1 for lr in lrs)  # no two trials alike
    assert all(set(t.params) == {"lr"} and t.user_attrs["fixed"]["optimizer"] == "sgd" for t in trials)
    # `tune show` in one machine's session lists both machines' trials (tune.json remembers storage and study)
    app = _reopened(_session_folder(roots[0]))
    try:
        ok, table = run(app, "tune show")
    finally:
        app.session.close(save=False)
    assert ok and table["study"] == "shared" and table["budget"] == {"epochs": 1}
    assert {r["number"]: r["params"]["lr"] for r in table["trials"]} == {t.number: t.params["lr"] for t in trials}


def test_machines_opening_an_empty_database_at_once_all_get_the_study(postgres_url):
    """Optuna creates its tables on a database's first use; machines doing so at once race (optuna#1092) and the
    losers used to fail with "duplicate key value violates unique constraint". Threads race reliably enough (every
    time, here, before the fix): 4 of them, on 2 fresh databases."""
    for n in range(2):
        url = _new_database(postgres_url, f"race{n}")
        assert _open_at_once(url, 4) == ["race"] * 4
        (summary,) = optuna.get_all_study_summaries(url)
        assert summary.study_name == "race" and summary.direction == optuna.study.StudyDirection.MINIMIZE


def _open_at_once(url: str, k: int) -> list[str]:
    """`k` threads open (create) study "race" in `url` at the same moment: the study's name, or the error, of each."""
    start, results = threading.Barrier(k), []

    def open_study():
        start.wait(timeout=WAIT)
        try:
            results.append(T._open_study(url, "race", "val_loss").study_name)
        except PgError as e:
            results.append(str(e))

    threads = [threading.Thread(target=open_study) for _ in range(k)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=WAIT)
    return results


def _session_folder(root: Path) -> Path:
    """The machine's session folder (the end of a plan saves the session as sessions/NAME.session beside it)."""
    (state,) = root.glob("sessions/*/tune.json")
    return state.parent


def _reopened(folder: Path):
    """A script-mode shell on the saved session whose folder is `folder`."""
    from pgshell.shell import PgShell

    session = Session.open(folder.with_name(folder.name + ".session"))
    return PgShell(session=session, interactive=False, stdout=io.StringIO())

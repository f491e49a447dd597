"""Hyperparameter selection for a Session: the learning-rate range test (`lrfind`) and the Optuna search (`tune`).

Both are background jobs run through `Session.start_job`, so the toolbar, `pause`, `continue`, `stop` and `wait` work
as for training, and both train through the one training loop (`Trainer.run`) on *copies* of the model: the
session's own model, optimizer state and position are never touched (only `lrfind apply` / `tune apply` change the
session, through `Session.set` and `Session.freeze`).

Files in the session folder `sessions/NAME/`:
- `lrfind.json`: the last range test (curve and suggestions), so `lrfind show` / `lrfind apply` work after a reopen;
- `tune.db`: the Optuna study (RDB storage, SQLite), named after the session unless `--study` says otherwise;
  `--storage URL` puts it in a shared database instead (how a search spreads over several machines);
- `tune.json`: which storage and study `tune`, `tune show` and `tune apply` use next;
- `trials/STUDY.initial.safetensors`: the weights every trial of the study starts from (taken when the study began,
  so a study resumed after a quit, or after more training, still compares like with like);
- `trials/metrics.csv`: every trial's per-batch and per-epoch rows (the `trial` column holds the trial number, or
  `STUDY#N` for a study not named after the session) — apart from `metrics.csv`, which stays the session's own run.

Pausing a trial keeps it in memory, RUNNING in Optuna's terms, and `continue` carries on exactly where it paused.
`stop` during a trial marks it FAIL and enqueues its parameters. A trial left RUNNING by a closed session (quit
mid-trial, a crash) or abandoned while paused (`stop`, `train`) is found by the next `tune` of the same session: it
is marked FAIL and its parameters are enqueued. Either way it runs again first. A trial is never counted as
complete unless it trained its whole budget.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import re
import socket
import time
from datetime import datetime
from pathlib import Path
from typing import Any

from ..engine.errors import PgError
from .jobs import loop_handlers

STUDY_ATTR = "pgshell"  # the study's user attribute holding its metric, budget and space
DEFAULT_EPOCHS = 3  # per trial, when neither the user nor the study says
DEFAULT_TRIALS = 10


# ====================================================================== LR range test
def finish_lrfind(session, test, out: str | None) -> None:
    """A finished range test: its result into lrfind.json (and the PNG), and the suggestions in one line."""
    try:
        result = test.result()
    except PgError as e:
        session.job_failed(str(e))
        return
    result["time"] = datetime.now().isoformat(timespec="seconds")
    _write_json(session.folder / "lrfind.json", result)
    msg = (f"lrfind done: {len(result['lrs'])} batches ({result['stop']}); suggested lr {result['valley']:.2e} "
           f"(valley), steepest {result['steepest']:.2e}, minimum/10 {result['minimum']:.2e} — `lrfind apply`")
    if out:
        write_lrfind_png(result, out)
        msg += f"; plot {out}"
    session.notify(msg)


def start_lrfind(session, start: float = 1e-7, end: float = 10.0, steps: int = 100, out: str | None = None) -> str:
    """Start an LR range test in the background on copies of the model and optimizer state."""
    from ..engine.train.lrfind import RangeTest, range_test_trainer

    if session.running:
        raise PgError("something is already running: `pause`, `stop` or `wait` first")
    _check_png(out)
    test = RangeTest(start, end, steps)
    live = session.ensure_trainer()
    trainer = range_test_trainer(session.built, session.spec, session.splits, session.config,
                                 size=(session.data or {}).get("size", 0),
                                 optimizer_state=live.optimizer_state())
    trainer.apply_live("lr", test.lr(0))
    session.start_job(LRFindJob(session, test, trainer, out))
    return (f"lrfind: {steps} batches, lr {start:.0e} to {end:.0e}, on a copy of the model "
            f"(stops early when the loss diverges)")


def lrfind_result(session) -> dict:
    """The last finished range test of this session."""
    path = session.folder / "lrfind.json" if session.folder else None
    if path is None or not path.exists():
        raise PgError("no learning-rate range test yet: `lrfind` runs one")
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise PgError(f"{path} is unreadable ({type(e).__name__}): run `lrfind` again") from None


def apply_lrfind(session, which: str = "valley") -> float:
    result = lrfind_result(session)
    lr = float(result[which])
    with session.changes.via(f"lrfind apply {which}"):  # logged as a `set lr`, marked as made by lrfind
        session.set("lr", lr)
    return lr


def write_lrfind_png(result: dict, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result["lrs"], result["losses"], color="0.8", lw=1, label="batch loss")
    ax.plot(result["lrs"], result["smoothed"], color="C0", lw=2, label="smoothed loss")
    from ..engine.train.lrfind import LABELS

    for key, colour in (("valley", "C2"), ("steepest", "C1"), ("minimum", "C3")):
        ax.axvline(result[key], color=colour, ls="--", lw=1, label=f"{LABELS[key]} {result[key]:.2e}")
    finite = [v for v in result["smoothed"] if math.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        ax.set_ylim(lo - 0.05 * (hi - lo + 1e-9), min(hi, 4 * lo) + 0.05 * (hi - lo + 1e-9))
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    ax.set_title("learning-rate range test")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from ..engine.report.plot import save_png

    try:
        save_png(fig, out, dpi=110)
    finally:
        plt.close(fig)


def _check_png(out: str | None) -> None:
    if out and not out.lower().endswith(".png"):
        raise PgError(f"--out writes a PNG: give a name ending in .png, not {out!r}")


# ====================================================================== the search
def optuna_module():
    try:
        import optuna
    except ImportError:
        raise PgError("tune needs Optuna: pip install 'pgshell[tune]' (or pip install optuna)") from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # pgshell reports trials itself, one line each
    return optuna


def session_key(session) -> str:
    """Marks the trials this session runs, so a later `tune` of the same session can find its interrupted ones
    without touching trials that other machines are running on a shared storage. The session's id, not its folder:
    `save NAME` may move the folder, and the trials it ran stay its own."""
    return f"{socket.gethostname()}:{session.uid}"


def _where(session, storage: str | None, study: str | None) -> tuple[str, str, bool]:
    """(storage URL, study name, is the session's own tune.db): from the arguments, else the session's tune.json,
    else the defaults."""
    saved = {}
    state = session.folder / "tune.json"
    if state.exists():
        try:
            saved = json.loads(state.read_text())
        except (OSError, json.JSONDecodeError):
            saved = {}
    if storage is None and study is None:
        storage, study = saved.get("storage"), saved.get("study")
    from ..engine.search.trials import check_storage

    check_storage(storage)
    local = not storage
    url = storage or f"sqlite:///{(session.folder / 'tune.db').resolve()}"
    return url, study or session.name, local


def _load(session, storage: str | None, study: str | None):
    optuna = optuna_module()
    if session.folder is None:
        raise PgError("no study yet: `tune` starts one")
    url, name, local = _where(session, storage, study)
    if local and not (session.folder / "tune.db").exists():
        raise PgError("no study yet: `tune` starts one")
    try:
        return optuna.load_study(study_name=name, storage=url)
    except KeyError:
        raise PgError(f"no study named {name!r} in {_shown(url)}: `tune` starts one") from None
    except Exception as e:  # a bad URL, an unreachable database
        raise PgError(f"cannot open the study storage {_shown(url)}: {str(e).splitlines()[0][:160]}") from None


def _shown(url: str) -> str:
    return re.sub(r"//([^:/@]+):[^@]*@", r"//\1:***@", url)  # never print a password


def params_text(trial, space) -> str:
    merged = {**trial.user_attrs.get("fixed", {}), **trial.params}
    return " ".join(f"{k}={_short(v)}" for k, v in merged.items() if space.get(k) is None or space[k].kind != "fixed")


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _write_json(path: Path, doc: dict) -> None:
    from ..engine.store.checkpoint import atomic_write_bytes

    atomic_write_bytes(path, (json.dumps(doc, indent=1) + "\n").encode())


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.") or "study"


def _check_tune_args(session, trials: int | None, epochs: int | None, steps: int | None,
                     metric: str | None) -> int:
    from ..engine.search.trials import METRICS

    if session.running:
        raise PgError("something is already running: `pause`, `stop` or `wait` first")
    trials = DEFAULT_TRIALS if trials is None else trials
    if trials < 1:
        raise PgError("--trials takes a positive number of trials to run")
    if epochs is not None and steps is not None:
        raise PgError("give --epochs or --steps, not both")
    if (epochs is not None and epochs < 1) or (steps is not None and steps < 1):
        raise PgError("--epochs and --steps take positive numbers")
    if metric is not None and metric not in METRICS:
        raise PgError(f"--metric is one of {', '.join(METRICS)}, not {metric!r}")
    return trials


def _open_study(url: str, name: str, metric: str | None):
    from ..engine.search.trials import METRICS

    try:
        return _create_study(url, name, METRICS[metric or "val_accuracy"][1])
    except Exception as e:
        raise PgError(f"cannot open the study storage {_shown(url)}: {str(e).splitlines()[0][:160]}") from None


def _create_study(url: str, name: str, direction: str):
    """The study, created or loaded. Optuna creates its tables on a database's first use, and machines starting
    together on an empty shared database race to create them (optuna#1092: "already exists", a duplicate key): the
    losers find them made when they try again."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError  # Optuna's RDB storage is built on SQLAlchemy

    create = functools.partial(optuna_module().create_study, storage=url, study_name=name, load_if_exists=True,
                               direction=direction)
    for _ in range(2):
        try:
            return create()
        except (IntegrityError, ProgrammingError):
            continue
    return create()


def _study_terms(st, name: str, metric, epochs, steps, space, parsed, n_train: int):
    """A resumed study keeps its metric, budget and space; returns (metric, epochs, steps, parsed space)."""
    from ..engine.search.space import parse_space

    stored = st.user_attrs.get(STUDY_ATTR, {})
    if stored or st.get_trials(deepcopy=False):
        old_metric = stored.get("metric") or ("val_accuracy" if st.direction.name == "MAXIMIZE" else "val_loss")
        if metric is not None and metric != old_metric:
            raise PgError(f"study {name!r} compares {old_metric}: omit --metric, or start another study with "
                          "--study NAME")
        metric = old_metric
        old_budget = {k: stored[k] for k in ("epochs", "steps") if stored.get(k)}
        new_budget = {"epochs": epochs} if epochs else {"steps": steps} if steps else old_budget
        if old_budget and new_budget != old_budget:
            k, v = next(iter(old_budget.items()))
            raise PgError(f"study {name!r} trains each trial for {v} {k[:-1] if v == 1 else k}: omit "
                          "--epochs/--steps (trials must compare), or start another study with --study NAME")
        epochs, steps = new_budget.get("epochs"), new_budget.get("steps")
        if space is None and stored.get("space"):
            parsed = parse_space(stored["space"], n_train)
    if epochs is None and steps is None:
        epochs = DEFAULT_EPOCHS
    return metric or "val_accuracy", epochs, steps, parsed


def _initial_weights(session, name: str, existing: bool):
    """The weights every trial of the study starts from: saved when the study began, read back when it resumes."""
    from ..engine.search.trials import load_initial, save_initial

    folder = session.folder / "trials"
    folder.mkdir(parents=True, exist_ok=True)
    init_path = folder / f"{_safe(name)}.initial.safetensors"
    if existing and init_path.exists():
        return load_initial(init_path, session.built)
    # a new study (or its name reused after tune.db was removed): it starts from the model as it is now
    init = dataclasses.replace(session.built, module=copy.deepcopy(session.built.module))
    save_initial(init_path, init)
    return init


def start_tune(session, trials: int | None = None, epochs: int | None = None, steps: int | None = None,
               metric: str | None = None, space: str | None = None, pruner: str = "median",
               storage: str | None = None, study: str | None = None) -> str:
    """Start (or resume) the session's study in the background: `trials` more finished trials."""
    from ..engine.search.trials import METRICS, check_storage, make_pruner, make_sampler
    from ..engine.search.space import check_compatible, format_space, parse_space

    check_storage(storage)  # before anything is named, built or written
    trials = _check_tune_args(session, trials, epochs, steps, metric)
    pruner_obj = make_pruner(pruner)
    session.ensure_trainer()  # model and data present, the session named, a pending checkpoint loaded
    if not session.splits.val:
        raise PgError("tune compares trials on the validation split, and this data has none: attach data with a "
                      "val/ folder or a --split")
    n_train = len(session.splits.train)
    parsed = parse_space(space, n_train)  # a bad --space fails before any file is touched
    url, name, local = _where(session, storage, study)
    st = _open_study(url, name, metric)
    existing = st.get_trials(deepcopy=False)
    metric, epochs, steps, parsed = _study_terms(st, name, metric, epochs, steps, space, parsed, n_train)
    check_compatible(parsed, existing)
    init = _initial_weights(session, name, bool(existing))
    st.set_user_attr(STUDY_ATTR, {"metric": metric, "epochs": epochs, "steps": steps, "space": format_space(parsed)})
    key = session_key(session)
    requeued = _requeue_interrupted(st, key)
    # machines sharing a storage draw apart (their session keys join the seed); the local study samples as it always has
    st.sampler = make_sampler(session.config.seed, len(existing), None if local else key)
    st.pruner = pruner_obj
    _write_json(session.folder / "tune.json", {"storage": None if local else url, "study": name})
    prefix = "" if name == session.name else f"{name}#"
    session.start_job(TuneJob(session, st, parsed, metric, epochs, steps, trials, init, prefix))
    budget = f"{epochs} epoch{'s' * (epochs != 1)}" if epochs else f"{steps} steps"
    aim = "maximising" if METRICS[metric][1] == "maximize" else "minimising"
    msg = f"tune: {trials} more trial{'s' * (trials != 1)} of {budget} each, {aim} {metric}"
    msg += f"; study {name!r} ({len(existing)} trials so far) in {_shown(url) if not local else session.folder / 'tune.db'}"
    if requeued:
        msg += f"; re-running interrupted trial{'s' * (len(requeued) > 1)} {', '.join(map(str, requeued))} first"
    return msg + f"\nspace: {format_space(parsed)}"


def _requeue_interrupted(study, key: str) -> list[int]:
    """This session's trials still RUNNING belong to no live job (a new `tune` cannot start while one runs): fail
    them and enqueue their parameters (marked `retry_of`) so they run again first."""
    optuna = optuna_module()
    numbers = []
    for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        if t.user_attrs.get("session") != key:
            continue
        study.tell(t.number, state=optuna.trial.TrialState.FAIL)
        if t.params:
            study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})
        numbers.append(t.number)
    return numbers


def trials_table(session, storage: str | None = None, study: str | None = None) -> dict:
    """The study's trials as plain rows, best first: complete (by value), pruned (by their last reported value),
    then failed, running and waiting ones (by number)."""
    optuna = optuna_module()
    st = _load(session, storage, study)
    maximize = st.direction == optuna.study.StudyDirection.MAXIMIZE
    metric = st.user_attrs.get(STUDY_ATTR, {}).get("metric") or ("val_accuracy" if maximize else "val_loss")
    trials = st.get_trials(deepcopy=False)
    retried = {t.user_attrs.get("retry_of") for t in trials}
    rows = []
    for t in trials:
        state = t.state.name.lower()
        value = t.value if t.state == optuna.trial.TrialState.COMPLETE else (
            t.intermediate_values[t.last_step] if t.last_step is not None else None)
        rows.append({"number": t.number, "state": state, "value": value,
                     "params": {**t.user_attrs.get("fixed", {}), **t.params},
                     "reached": t.last_step,
                     "reason": t.user_attrs.get("reason") or ("interrupted" if t.number in retried else ""),
                     "duration": t.duration.total_seconds() if t.duration is not None else None})
    order = {"complete": 0, "pruned": 1, "fail": 2, "running": 3, "waiting": 4}

    def key(r):
        v = r["value"]
        good = -v if (maximize and v is not None and math.isfinite(v)) else v
        rank = good if r["state"] in ("complete", "pruned") and v is not None and math.isfinite(v) else math.inf
        return order.get(r["state"], 5), rank, r["number"]

    rows.sort(key=key)
    budget = {k: v for k, v in st.user_attrs.get(STUDY_ATTR, {}).items() if k in ("epochs", "steps") and v}
    return {"study": st.study_name, "metric": metric, "direction": "maximize" if maximize else "minimize",
            "budget": budget, "trials": rows}


def apply_trial(session, number: int | None = None, storage: str | None = None, study: str | None = None) -> dict:
    """Set the best (or the named) trial's hyperparameters on the session; the model itself stays as it is."""
    optuna = optuna_module()
    st = _load(session, storage, study)
    if number is None:
        try:
            t = st.best_trial
        except ValueError:
            raise PgError("no trial has completed yet: `tune` runs some (or `tune apply N` for a given trial)") from None
    else:
        found = [t for t in st.get_trials(deepcopy=False) if t.number == number]
        if not found:
            raise PgError(f"study {st.study_name!r} has no trial {number}: `tune show` lists them")
        t = found[0]
    params = {**t.user_attrs.get("fixed", {}), **t.params}
    if not params:
        raise PgError(f"trial {t.number} has no parameters (it never started): pick another from `tune show`")
    settings = {k: v for k, v in params.items() if k != "freeze"}
    with session.changes.via(f"tune apply {t.number}"):  # logged as the sets and freezes it makes
        for k, v in settings.items():
            session.set(k, v)
        if "freeze" in params:
            session.freeze(["none"])
            if params["freeze"] == "backbone":
                session.freeze(["backbone"])
    return {"trial": t.number, "state": t.state.name.lower(),
            "value": t.value if t.state == optuna.trial.TrialState.COMPLETE else None,
            "settings": settings, "freeze": params.get("freeze")}


# ====================================================================== the jobs: LR range test
class LRFindJob:
    """`lrfind`: a RangeTest driven through a Trainer on copies of the model and optimizer."""

    label = "lrfind"

    def __init__(self, session, test, trainer, out: str | None = None):
        self.session, self.test, self.trainer, self.out = session, test, trainer, out

    def run(self, worker) -> str:
        from ..engine.rng import preserved_rng
        from ..engine.train.lrfind import run_range_test

        test = self.test
        handlers = loop_handlers(self.session, worker, self.label, lambda tr: test.steps - len(test.lrs),
                                 lambda: {"batch": len(test.lrs), "batches": test.steps})
        with preserved_rng():
            outcome = run_range_test(self.trainer, test, handlers)
        if outcome == "stopped":
            self.session.notify("lrfind stopped; the session is unchanged")
        if outcome == "done":
            finish_lrfind(self.session, test, self.out)
        return outcome


# ====================================================================== the jobs: tuning
class TuneJob:
    """`tune`: asks the study for trials and trains each through TrialRun until `trials` more have finished
    (complete or pruned). Pausing keeps the current trial in memory; `continue` carries on with it exactly."""

    label = "tune"

    def __init__(self, session, study, space, metric: str, epochs: int | None, steps: int | None, trials: int,
                 init, trial_prefix: str):
        from ..engine.train.metrics import MetricsLog

        self.session, self.study, self.space, self.metric = session, study, space, metric
        self.epochs, self.steps, self.trials, self.init = epochs, steps, trials, init
        self.trial_prefix = trial_prefix
        self.key = session_key(session)
        self.log = MetricsLog(session.folder / "trials" / "metrics.csv")
        self.finished = 0
        self.failures_in_row = 0
        self.counts = {"complete": 0, "pruned": 0, "failed": 0}
        self.current: tuple[Any, Any, float] | None = None  # (optuna trial, TrialRun, seconds spent) of a paused one

    def run(self, worker) -> str:
        from ..engine.rng import preserved_rng

        worker.status = {"state": "training", "job": self.label, "trials_done": self.finished, "trials": self.trials}
        try:
            with preserved_rng():
                while self.finished < self.trials:
                    if self.current is None:
                        request = worker.check()  # between trials too: a pause or stop needs no trial
                        if request:
                            self.session.notify(f"tune {'paused' if request == 'pause' else 'stopped'} between "
                                                "trials" + (" — `continue` resumes" if request == "pause" else ""))
                            return "paused" if request == "pause" else "stopped"
                        self.current = self._next_trial()
                        if self.current is None:
                            continue
                    outcome = self._run_current(worker)
                    if outcome in ("paused", "stopped"):
                        return outcome
        finally:
            self.log.sync()
            self.log.close()  # reopened on the next append (a `continue`)
        self._report_done()
        return "done"

    def _next_trial(self):
        from ..engine.search.trials import TrialRun, trial_trainer
        from ..engine.search.space import suggest

        s = self.session
        trial = self.study.ask()
        try:
            trial.set_user_attr("session", self.key)
            params = suggest(trial, self.space)
            trial.set_user_attr("fixed", {d.name: d.value for d in self.space.values() if d.kind == "fixed"})
            trial.set_user_attr("budget", {"epochs": self.epochs} if self.epochs else {"steps": self.steps})
            trainer = trial_trainer(self.init, s.spec, s.splits, s.config, params,
                                    size=(s.data or {}).get("size", 0), log=self.log,
                                    label=f"{self.trial_prefix}{trial.number}", epochs=self.epochs, steps=self.steps)
        except Exception as e:
            self._fail(trial, e)
            return None
        return trial, TrialRun(trial, trainer, self.metric, epochs=self.epochs, steps=self.steps), 0.0

    def _handlers(self, worker, trial, run) -> list:
        tr = run.trainer
        total = self.epochs * tr.optimizer_steps_per_epoch if self.epochs else self.steps  # optimizer steps

        def remaining(tr) -> int:
            return max(0, total - tr.pos.step) + (self.trials - self.finished - 1) * total

        def tags() -> dict:
            return {"trial": trial.number, "trials_done": self.finished, "trials": self.trials}

        return loop_handlers(self.session, worker, self.label, remaining, tags)

    def _run_current(self, worker) -> str:
        trial, run, spent = self.current
        t0 = time.perf_counter()
        try:
            outcome = run.run(self._handlers(worker, trial, run))
        except Exception as e:  # one failing trial (out of memory at batch 64, say) must not end the search
            self.current = None
            self._fail(trial, e)
            return "failed"
        spent += time.perf_counter() - t0
        self.current = (trial, run, spent)
        if outcome == "paused":
            self.session.notify(f"trial {trial.number} paused at epoch {run.trainer.pos.epoch + 1} batch "
                                f"{run.trainer.pos.batch} — `continue` resumes it")
            return outcome
        self.current = None
        if outcome == "stopped":
            self._stopped(trial)
        else:
            self._finished(trial, run, outcome, spent)
        return outcome

    def _stopped(self, trial) -> None:
        trial.set_user_attr("reason", "stopped")
        self.study.tell(trial, state=optuna_module().trial.TrialState.FAIL)
        if trial.params:
            self.study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
        self.session.notify(f"trial {trial.number} stopped (marked failed); the next `tune` runs it again first")

    def _finished(self, trial, run, outcome: str, spent: float) -> None:
        self.failures_in_row = 0
        self.finished += 1
        params = params_text(trial, self.space)
        if outcome == "pruned":
            trial.set_user_attr("reason", run.reason)
            self.study.tell(trial, state=optuna_module().trial.TrialState.PRUNED)
            self.counts["pruned"] += 1
            last = max(run.curve) if run.curve else 0
            where = f"at epoch {last}" if self.epochs and last else f"at step {run.trainer.pos.step}"
            value = f": {self.metric} {run.curve[last]:.4f}" if run.curve and math.isfinite(run.curve[last]) else ""
            self.session.notify(f"trial {trial.number} {run.reason} {where}{value} ({params}) in {spent:.1f} s")
        else:
            self.study.tell(trial, run.value)
            self.counts["complete"] += 1
            self.session.notify(f"trial {trial.number} complete: {self.metric} {run.value:.4f} ({params}) "
                                f"in {spent:.1f} s")

    def _fail(self, trial, e: Exception) -> None:
        from .files import log_error

        s = self.session
        log_error(s.folder, e)
        msg = str(e) if isinstance(e, PgError) else f"{type(e).__name__}: {str(e)[:200]}"
        try:
            trial.set_user_attr("reason", msg[:500])
            self.study.tell(trial, state=optuna_module().trial.TrialState.FAIL)
        except Exception:  # the storage itself is failing: the error below says enough
            pass
        self.counts["failed"] += 1
        self.failures_in_row += 1
        s.notify(f"trial {trial.number} failed: {msg}")
        if self.failures_in_row >= 3:
            self.failures_in_row = 0
            raise PgError(f"3 trials in a row failed (last: {msg}); fix the cause (`--space`, settings), then "
                          "`continue`")

    def _report_done(self) -> None:
        c = self.counts
        msg = f"tune done: {self.finished} trials ({c['complete']} complete, {c['pruned']} pruned"
        msg += f", {c['failed']} failed)" if c["failed"] else ")"
        try:
            best = self.study.best_trial
            msg += f"; best trial {best.number}: {self.metric} {best.value:.4f} — `tune show`, `tune apply`"
        except ValueError:
            msg += "; no trial completed yet"
        self.session.notify(msg)

"""`autofit [--budget 10m] [--metric val_accuracy]`: the best model this session's data and model can give within a
wall-clock budget, by a recipe chosen from what they say, every step of it an ordinary pgshell step.

The recipe (`_plan`; every choice is printed as it is made and kept in autofit.json with its reason):
- the base is the README's measured best fixed recipe: AdamW, weight decay 0.05, a cosine schedule spanning the run;
- images of 64 px or less: the mild policy (no colour jitter, no border cut; timm's ImageNet crop scale is searched
  from 0.25 up) — larger images search timm's crop scales from 0.08;
- classes whose largest has 5x the images of the smallest: a class-balanced sampler;
- pretrained weights (`--pretrained` or `--weights`): the backbone trains at a tenth of the head's lr (fastai's
  fine_tune), and the head alone is tried first with the backbone frozen (often the best there is for little time).
  The phases do not start from the probe's head (`probe linear --apply`, LP-FT): measured on sign-language digits it
  lifted the frozen-head phase (79.6% against 72.5%) but autofit's end result fell (87.8% against 92.7% val).

Then, each phase only while the budget allows it: a linear probe (the baseline to beat: session/review.py `probe`);
the frozen-head phase (a trial on a copy of the model); the learning-rate range test (engine/train/lrfind.py, on a
copy; its valley centres the lr range searched, unless it lies outside LR_WINDOW: then the usual AdamW start); a short
Optuna search (engine/search/trials.py, in the session's tune.db as study `NAME-autofit`, pruned by the median rule:
`tune show --study NAME-autofit` lists them) over lr, crop scale (augmentation strength) and label smoothing, each
trial training a copy of the starting weights for the same number of epochs (chosen so that about four trials fit);
then the best of the frozen head and the trials is applied to the
session (its settings logged as `set`s made by autofit) and the session itself trains for as many epochs as the rest
of the budget allows (from the trials' own epoch time) — a normal run with its checkpoints, replayed by `export plan`;
finally the greedy soup of that run's epoch checkpoints (session/best.py). With pretrained weights and nothing trained
above the linear probe, the probe becomes the head instead (`probe linear --apply`) and is the final model.

The budget is wall-clock time spent by the job (paused time does not count). Every phase is cut at a batch boundary
when the budget runs out, and one that would not fit is skipped, saying so. The state is kept in
`sessions/NAME/autofit.json` after every phase and trial, so `pause`/`continue` resume it in the process and, after a
quit, `autofit` on the reopened session continues it where it stopped (a trial cut by the quit is run again).
"""

from __future__ import annotations

import json
import math
import re
import time
from datetime import datetime
from typing import TYPE_CHECKING, Any

from ..engine.errors import PgError
from ..engine.train.events import Handler

if TYPE_CHECKING:
    from .core import Session

STATE = "autofit.json"
VERSION = 1
PHASES = ("plan", "probe", "head", "lrfind", "search", "final", "soup")
METRICS = ("val_accuracy", "val_loss")
# shares of the whole budget promised to the range test and the search: a phase before them stops where they begin
# (the probe and the frozen head share what is left before that), the final run gets the rest after them
SHARES = {"lrfind": 0.06, "search": 0.40}
SOUP_SHARE = 0.06  # kept back for the soup's evaluations
HEAD_EPOCHS = 3  # the frozen-head phase (features are cached: epochs are cheap)
HEAD_LR = 1e-3  # AdamW on a new head
FALLBACK_LR = {True: 3e-4, False: 2e-3}  # pretrained or not, when the range test could not run
# the AdamW learning rates a range test's valley is believed in (pretrained or not): outside them the curve was noise,
# e.g. 100 images gave a valley of 3.6e-7, where nothing trains in a few epochs
LR_WINDOW = {True: (1e-5, 3e-3), False: (1e-4, 3e-2)}
SEARCH_TRIALS = 4  # trials the search aims to fit
MAX_FINAL_FACTOR = 3  # the final run: at most this many times a trial's epochs
SOUP_TOP = 5  # the soup: of the best few epochs of the final run (each one tasted costs an evaluation)
SOUP_OVERHEAD = 1.0  # seconds: a soup's model copy, checkpoint reads and file write, whatever its size


def parse_budget(text: str | float | int) -> float:
    """'10m', '90s', '1h', '1h30m' or a number of seconds -> seconds."""
    if isinstance(text, (int, float)):
        seconds = float(text)
    else:
        t = str(text).strip().lower()
        parts = re.fullmatch(r"(?:(\d+(?:\.\d+)?)h)?\s*(?:(\d+(?:\.\d+)?)m)?\s*(?:(\d+(?:\.\d+)?)s?)?", t)
        if not t or parts is None or not any(parts.groups()):
            raise PgError(f"--budget takes a time such as 10m, 90s, 1h30m or a number of seconds, not {text!r}")
        h, m, sec = (float(g) if g else 0.0 for g in parts.groups())
        seconds = h * 3600 + m * 60 + sec
    if not seconds > 0:
        raise PgError("--budget must be more than 0 seconds")
    return seconds


def read_state(s: "Session") -> dict | None:
    path = s.folder / STATE if s.folder is not None else None
    if path is None or not path.exists():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) and doc.get("version") == VERSION else None


def _write_state(s: "Session", state: dict) -> None:
    from ..engine.store.checkpoint import atomic_write_bytes

    atomic_write_bytes(s.folder / STATE, (json.dumps(state, indent=1) + "\n").encode())


def autofit_summary(s: "Session") -> str:
    """One paragraph of what the last autofit chose and why (for `report`), or ""."""
    state = read_state(s)
    if not state:
        return ""
    head = (f"budget {state['budget']:.0f} s, {state['spent']:.0f} s spent"
            + (", finished" if state.get("done") else ", not finished (`autofit` continues it)"))
    return head + ". " + " ".join(state.get("decisions", []))


# ====================================================================== starting
def start_autofit(s: "Session", budget: str | None = None, metric: str | None = None, new: bool = False) -> str:
    """Start autofit in the background, or continue the session's unfinished one (its budget and metric stay)."""
    if s.running:
        raise PgError("something is already running: `pause`, `stop` or `wait` first")
    if metric is not None and metric not in METRICS:
        raise PgError(f"--metric is one of {', '.join(METRICS)}, not {metric!r}")
    seconds = parse_budget(budget) if budget is not None else None
    started = time.monotonic()  # the budget counts from the command: building the trainer is part of it
    s.ensure_trainer()  # model and data present, the session named
    if not s.splits.val:
        raise PgError("autofit compares recipes on the validation split, and this data has none: attach data with a "
                      "val/ folder or a --split")
    job = s.worker.job
    if isinstance(job, AutofitJob) and not new:
        s.start_job(job)
        return f"continuing autofit: {job.left():.0f} s of its budget left"
    state = read_state(s)
    if state and not state.get("done") and not new:
        if seconds is not None and abs(seconds - state["budget"]) > 1e-9:
            s.notify(f"note: continuing the autofit begun with a budget of {state['budget']:.0f} s (`autofit --new "
                     "--budget ...` starts another)")
        s.start_job(AutofitJob(s, state, started))
        return (f"continuing autofit from its {_next_phase(state)} phase: {state['budget'] - state['spent']:.0f} s "
                "of its budget left")
    attempt = (state or {}).get("attempt", 0) + 1
    state = {"version": VERSION, "attempt": attempt, "study": f"{s.name}-autofit" + (f"-{attempt}" if attempt > 1
                                                                                      else ""),
             "budget": seconds if seconds is not None else parse_budget("10m"), "metric": metric or "val_accuracy",
             "spent": 0.0, "finished": [], "decisions": [], "trials": [],
             "started": datetime.now().isoformat(timespec="seconds"), "done": False}
    _write_state(s, state)
    s.start_job(AutofitJob(s, state, started))
    return (f"autofit: {state['budget']:.0f} s, maximising {state['metric']}" if state["metric"] == "val_accuracy"
            else f"autofit: {state['budget']:.0f} s, minimising {state['metric']}") + \
        " — a probe, the frozen head (pretrained weights), lrfind, a short search, the best run and its soup"


def _next_phase(state: dict) -> str:
    return next((p for p in PHASES if p not in state["finished"]), "last")


# ====================================================================== the job
class _Budget(Handler):
    """Stops (or pauses) a run at the next batch boundary once the job's budget, less `reserve` seconds, is spent."""

    order = 5

    def __init__(self, job: "AutofitJob", reserve: float = 0.0, what: str = "stop"):
        self.job, self.reserve, self.what = job, reserve, what
        self.cut = False

    def before_batch(self, tr, ctx) -> None:
        if self.job.left() <= self.reserve:
            self.cut = True
            tr.request(self.what, "budget")


class _NoStudy:
    """The trial interface TrialRun reports to, for runs that are not Optuna trials (the frozen-head phase)."""

    def report(self, value, step) -> None:
        pass

    def should_prune(self) -> bool:
        return False


class AutofitJob:
    label = "autofit"

    def __init__(self, session: "Session", state: dict, started: float | None = None):
        from ..engine.train.metrics import MetricsLog

        self.s, self.state = session, state
        self.log = MetricsLog(session.folder / "trials" / "metrics.csv")
        self.current = None  # (label or optuna trial, TrialRun, budget guard) of a paused phase run
        self.range_test = None  # (RangeTest, trainer) of a paused range test
        self.final_job = None  # the session's TrainJob of the final phase
        self._t0 = started if started is not None else time.monotonic()
        self._spent0 = state["spent"]
        self._started = started  # the first run counts from the command; a `continue` from itself
        self._init = None

    # ---------------- time
    def spent(self) -> float:
        return self._spent0 + (time.monotonic() - self._t0)

    def left(self) -> float:
        return self.state["budget"] - self.spent()

    def _save(self) -> None:
        self.state["spent"] = self.spent()
        _write_state(self.s, self.state)

    def _decide(self, text: str) -> None:
        self.state["decisions"].append(text)
        self.s.notify(f"autofit: {text}")

    # ---------------- the phases
    def run(self, worker) -> str:
        from ..engine.rng import preserved_rng

        self._t0, self._spent0 = self._started or time.monotonic(), self.state["spent"]
        self._started = None
        worker.status = {"state": "training", "job": self.label}
        try:
            for phase in PHASES:
                if phase in self.state["finished"]:
                    continue
                request = worker.check()
                if request:
                    return self._interrupted(request)
                if phase == "final":
                    outcome = self._final(worker)
                else:
                    with preserved_rng():  # the session's own stream is left as it was: trials train copies
                        outcome = getattr(self, f"_{phase}")(worker)
                if outcome in ("paused", "stopped"):
                    return self._interrupted("pause" if outcome == "paused" else "stop")
                self.state["finished"].append(phase)
                self.state.setdefault("ended", {})[phase] = round(self.spent(), 2)  # the budget spent by its end
                self._save()
        finally:
            self.log.sync()
            self.log.close()
            self._save()
        self.state["done"] = True
        self._save()
        self._conclude()
        return "done"

    def _interrupted(self, request: str) -> str:
        self._save()
        if request == "pause":
            self.s.notify(f"autofit paused ({self.left():.0f} s of its budget left) — `continue` resumes it; after a "
                          "quit, `autofit` on the reopened session")
            return "paused"
        self.s.notify("autofit stopped; `autofit` continues it from its last finished phase")
        return "stopped"

    def _plan(self, worker) -> str:
        from ..engine import data as D

        s, st = self.s, self.state
        size = int((s.data or {}).get("size") or 0) or int(s.built.data_config["input_size"][-1])
        pretrained = bool(s.spec.pretrained or s.spec.weights)
        fixed: dict[str, Any] = {"optimizer": "adamw", "weight_decay": 0.05, "scheduler": "cosine",
                                 "warmup_epochs": 0}
        reasons = ["base recipe AdamW, weight decay 0.05, cosine over the run (the README's best fixed recipe)"]
        if size <= 64:
            fixed.update(color_jitter=0.0, crop_pct=1.0)
            crops = [0.25, 0.5, 0.8]
            reasons.append(f"{size} px images: the mild policy (no colour jitter, no border cut), crop scale searched "
                           "from 0.25")
        else:
            crops = [0.08, 0.25, 0.5]
            reasons.append(f"{size} px images: timm's policy, crop scale searched from 0.08")
        if D.imbalance_warning(s.splits):
            fixed["sampler"] = "balanced"
            reasons.append("imbalanced classes: a class-balanced sampler")
        if pretrained:
            fixed["backbone_lr_scale"] = 0.1
            reasons.append("pretrained weights: the backbone at a tenth of the head's lr, and the head alone first")
        else:
            fixed["backbone_lr_scale"] = 1.0
            reasons.append("weights not pretrained: no frozen-head phase (a random backbone's features teach little)")
        st["recipe"] = {"fixed": fixed, "crop_scale": crops, "label_smoothing": [0.0, 0.1], "size": size,
                        "pretrained": pretrained, "n_train": len(s.splits.train)}
        self._decide("; ".join(reasons) + ".")
        return "done"

    def _probe(self, worker) -> str:
        from .review import probe

        if self.left() < 0.5 * self.state["budget"]:  # a resumed autofit that already spent half its budget
            self._decide("no time for the probe baseline")
            return "done"
        res = probe(self.s, "linear")
        self.state["probe"] = {"accuracy": res["accuracy"], "seconds": res["feature_seconds"] + res["fit_seconds"]}
        self._decide(f"linear probe baseline {100 * res['accuracy']:.1f}% val accuracy "
                     f"({res['feature_seconds'] + res['fit_seconds']:.1f} s).")
        return "done"

    def _initial(self):
        """The weights every trial starts from: the session's model when autofit began (kept on disk)."""
        from ..engine.search.trials import load_initial, save_initial

        if self._init is None:
            path = self.s.folder / "trials" / f"{self.state['study']}.initial.safetensors"
            if path.exists():
                self._init = load_initial(path, self.s.built)
            else:
                import copy
                import dataclasses

                self._init = dataclasses.replace(self.s.built, module=copy.deepcopy(self.s.built.module))
                path.parent.mkdir(parents=True, exist_ok=True)
                save_initial(path, self._init)
        return self._init

    def _base_config(self):
        return self.s.config.replace(**self.state["recipe"]["fixed"])

    def _phase_end(self, phase: str) -> float:
        """The budget left when `phase` must stop: what the later phases are promised."""
        later = {"head": SHARES["lrfind"] + SHARES["search"], "lrfind": SHARES["search"], "search": 0.0}[phase]
        return self.state["budget"] * (later + SOUP_SHARE + 0.25)  # the final run is promised a quarter at least

    def _train_copy(self, worker, label: str, params: dict, epochs: int, trial=None) -> tuple[str, Any]:
        """A trial's training (engine/search/trials.py) on a copy of the starting weights, cut by the budget; resumes a
        paused one. Returns (outcome, TrialRun)."""
        from ..engine.search.trials import TrialRun, trial_trainer
        from .jobs import loop_handlers

        s = self.s
        if self.current is None or self.current[0] != label:
            tr = trial_trainer(self._initial(), s.spec, s.splits, self._base_config(), params,
                               size=(s.data or {}).get("size", 0), log=self.log, label=label, epochs=epochs,
                               steps=None)
            run = TrialRun(trial or _NoStudy(), tr, self.state["metric"], epochs=epochs)
            self.current = (label, run, _Budget(self, self._phase_end(self._phase_of(label))), time.monotonic())
        _, run, guard, _ = self.current
        total = epochs * run.trainer.steps_per_epoch
        def tags() -> dict:  # what the toolbar's trial line reads (`trial T (D/N done)`)
            return {"trial": label, "trials_done": len(self.state["trials"]),
                    "trials": max(SEARCH_TRIALS, len(self.state["trials"]) + 1)}

        handlers = [*loop_handlers(s, worker, self.label, lambda tr: max(0, total - tr.pos.step), tags), guard]
        t0 = time.monotonic()
        outcome = run.run(handlers)
        seconds = time.monotonic() - t0
        if outcome == "paused":
            return outcome, run
        self.current = None
        if outcome == "stopped" and guard.cut:
            outcome = "cut"
        if outcome in ("complete", "pruned") and run.trainer.pos.epoch and self._phase_of(label) == "search":
            # a fine-tuning epoch, validation included (the frozen head's epochs run on cached features: no guide)
            self.state["epoch_seconds"] = seconds / run.trainer.pos.epoch
        return outcome, run

    @staticmethod
    def _phase_of(label: str) -> str:
        return "head" if label.endswith("head") else "search"

    def _head(self, worker) -> str:
        st = self.state
        if not st["recipe"]["pretrained"]:
            return "done"
        if self.left() <= self._phase_end("head"):
            self._decide("no time for the frozen-head phase")
            return "done"
        params = {"freeze": "backbone", "lr": HEAD_LR}
        outcome, run = self._train_copy(worker, "autofit-head", params, HEAD_EPOCHS)
        if outcome in ("paused", "stopped"):
            return outcome
        value = _best_of(run.curve, st["metric"])
        st["head"] = {"params": params, "epochs": HEAD_EPOCHS, "value": value, "outcome": outcome,
                      "best_epoch": _best_epoch(run.curve, st["metric"])}
        self._decide(f"frozen head ({HEAD_EPOCHS} epochs at lr {HEAD_LR:g}): {st['metric']} {_fmt(value)}"
                     + (" (cut by the budget)" if outcome == "cut" else "") + ".")
        return "done"

    def _lrfind(self, worker) -> str:
        import copy
        import dataclasses

        from ..engine import models as M
        from ..engine.train.lrfind import RangeTest, range_test_trainer, run_range_test
        from .jobs import loop_handlers

        s, st = self.s, self.state
        fallback = FALLBACK_LR[st["recipe"]["pretrained"]]
        if self.left() <= self._phase_end("lrfind"):
            st["lr"] = fallback
            self._decide(f"no time for the range test: lr {fallback:g} (the usual AdamW start)")
            return "done"
        if self.range_test is None:
            init = self._initial()
            twin = dataclasses.replace(init, module=copy.deepcopy(init.module))
            M.freeze(twin, ["none"])  # the search fine-tunes everything
            # fastai's 100 batches, or three epochs of small data (never fewer than 30: a curve needs points)
            steps = max(30, min(100, 3 * math.ceil(len(s.splits.train) / s.config.batch_size)))
            test = RangeTest(1e-7, 10.0, steps)
            tr = range_test_trainer(twin, s.spec, s.splits, self._base_config(), size=(s.data or {}).get("size", 0))
            tr.apply_live("lr", test.lr(0))
            self.range_test = (test, tr, _Budget(self, self._phase_end("lrfind")))
        test, tr, guard = self.range_test
        t0 = time.monotonic()
        handlers = [*loop_handlers(s, worker, self.label, lambda t: test.steps - len(test.lrs)), guard]
        outcome = run_range_test(tr, test, handlers)
        if outcome == "paused":
            return outcome
        self.range_test = None
        if test.lrs:
            st["batch_seconds"] = (time.monotonic() - t0) / len(test.lrs)
        try:
            result = test.result()
        except PgError as e:
            st["lr"] = fallback
            self._decide(f"range test without a result ({e}): lr {fallback:g}")
            return "done"
        from ..engine.store.checkpoint import atomic_write_bytes

        result["time"] = datetime.now().isoformat(timespec="seconds")
        atomic_write_bytes(s.folder / "lrfind.json", (json.dumps(result, indent=1) + "\n").encode())  # `lrfind show`
        st["lr"], why = trusted_lr(float(result["valley"]), st["recipe"]["pretrained"])
        self._decide(f"range test ({len(result['lrs'])} batches): {why}.")
        return "done"

    def _search(self, worker) -> str:
        from ..engine.search.space import Dim, suggest
        from ..engine.search.trials import make_pruner, make_sampler
        from .study import optuna_module

        s, st = self.s, self.state
        optuna = optuna_module()
        lr = st.get("lr") or FALLBACK_LR[st["recipe"]["pretrained"]]
        space = {"lr": Dim("lr", "range", lr / 4, min(lr * 4, 1.0), log=True),
                 "crop_scale": Dim("crop_scale", "choice", choices=tuple(st["recipe"]["crop_scale"])),
                 "label_smoothing": Dim("label_smoothing", "choice", choices=tuple(st["recipe"]["label_smoothing"])),
                 "freeze": Dim("freeze", "fixed", value="none")}
        url = f"sqlite:///{(s.folder / 'tune.db').resolve()}"
        direction = "maximize" if st["metric"] == "val_accuracy" else "minimize"
        study = optuna.create_study(storage=url, study_name=st["study"], load_if_exists=True, direction=direction)
        self._requeue(study, optuna)
        study.sampler = make_sampler(s.config.seed, len(study.trials))
        study.pruner = make_pruner("median")
        window = self.left() - self._phase_end("search")
        if "trial_epochs" not in st:
            epoch_s = st.get("epoch_seconds") or self._estimated_epoch_seconds()
            st["trial_epochs"] = max(1, min(4, int(window / (SEARCH_TRIALS * epoch_s)))) if epoch_s else 1
            self._decide(f"search: lr {lr / 4:.2e} to {min(lr * 4, 1.0):.2e} (log), crop scale "
                         f"{'/'.join(map(str, st['recipe']['crop_scale']))}, label smoothing 0/0.1; "
                         f"{st['trial_epochs']} epoch(s) a trial (about {epoch_s:.1f} s an epoch here).")
        epochs = st["trial_epochs"]
        while True:
            epoch_s = st.get("epoch_seconds") or self._estimated_epoch_seconds()
            if self.current is None:
                if self.left() - self._phase_end("search") < 0.8 * epochs * epoch_s:
                    break
                request = worker.check()
                if request:
                    return "paused" if request == "pause" else "stopped"
                trial = study.ask()
                trial.set_user_attr("autofit", s.uid)
                params = suggest(trial, space)
                label = f"{st['study']}#{trial.number}"
            else:
                label, trial = self.current[0], self.current[1].trial
                params = {**trial.params, "freeze": "none"}
            outcome, run = self._train_copy(worker, label, params, epochs, trial)
            if outcome == "paused":
                return "paused"
            self._tell(study, optuna, trial, run, outcome, params, epochs)
            self._save()
            if outcome == "stopped":
                return "stopped"
            if outcome == "cut":
                break
        done = [t for t in st["trials"] if t["outcome"] == "complete"]
        self._decide(f"search: {len(st['trials'])} trial(s), {len(done)} complete (`tune show --study "
                     f"{st['study']}`).")
        return "done"

    def _requeue(self, study, optuna) -> None:
        """Trials of this autofit cut by a quit (still RUNNING): failed, and run again first."""
        for t in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if t.user_attrs.get("autofit") == self.s.uid:
                study.tell(t.number, state=optuna.trial.TrialState.FAIL)
                if t.params:
                    study.enqueue_trial(t.params, user_attrs={"retry_of": t.number})

    def _tell(self, study, optuna, trial, run, outcome: str, params: dict, epochs: int) -> None:
        value = run.value if outcome == "complete" else None
        if outcome == "complete":
            study.tell(trial, value)
        elif outcome == "pruned":
            study.tell(trial, state=optuna.trial.TrialState.PRUNED)
        else:  # cut by the budget or stopped: not a result
            trial.set_user_attr("reason", "budget" if outcome == "cut" else "stopped")
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
        self.state["trials"].append({"number": trial.number, "params": {k: v for k, v in params.items()
                                                                         if k != "freeze"},
                                     "outcome": outcome, "value": value, "epochs": epochs,
                                     "best_epoch": _best_epoch(run.curve, self.state["metric"])})
        shown = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
                         if k != "freeze")
        self.s.notify(f"autofit trial {trial.number} {outcome}" + (f": {self.state['metric']} {value:.4f}"
                                                                     if value is not None else "") + f" ({shown})")

    def _estimated_epoch_seconds(self) -> float:
        st = self.state
        per_batch = st.get("batch_seconds")
        if not per_batch:
            return 0.0
        s = self.s
        batches = math.ceil(len(s.splits.train) / s.config.batch_size)
        return batches * per_batch * (1 + 0.5 * len(s.splits.val) / max(1, len(s.splits.train)))

    # ---------------- the session's own run
    def _choose(self) -> dict | None:
        """The best of the frozen head and the complete trials by the metric: {"params", "epochs", "from", why}."""
        st = self.state
        better = (lambda a, b: a > b) if st["metric"] == "val_accuracy" else (lambda a, b: a < b)
        best = None
        head = st.get("head")
        if head and head.get("value") is not None and math.isfinite(head["value"]):
            best = {"params": head["params"], "value": head["value"], "from": "the frozen head",
                    "epochs": head["epochs"]}
        for t in st["trials"]:
            if t["outcome"] == "complete" and t["value"] is not None and (best is None
                                                                          or better(t["value"], best["value"])):
                best = {"params": {**t["params"], "freeze": "none"}, "value": t["value"],
                        "from": f"trial {t['number']}", "epochs": t["epochs"]}
        return best

    def _plan_final(self) -> bool:
        """Choose the final run (the best of the head and the trials) and the most epochs that fit the budget with
        the soup after them, and set it up on the session; False: no time is left for it (noted as skipped)."""
        st = self.state
        chosen = self._choose()
        epoch_s = st.get("epoch_seconds") or self._estimated_epoch_seconds()
        if chosen is None:
            chosen = {"params": {"lr": st.get("lr") or FALLBACK_LR[st["recipe"]["pretrained"]],
                                 "freeze": "none"}, "value": None, "from": "the recipe alone (no trial "
                                                                           "finished)", "epochs": 1}
        room = self.left()
        # the most epochs (up to a few times a trial's) that fit with the soup after them
        fits = [e for e in range(1, MAX_FINAL_FACTOR * chosen["epochs"] + 1)
                if epoch_s and e * epoch_s + self._soup_seconds(e) <= room]
        if not fits:
            st["final"] = {"skipped": True}
            self._decide(f"no time left for the final run ({max(0.0, room):.0f} s; an epoch takes about "
                         f"{epoch_s:.0f} s)" if epoch_s else "no time left for the final run (no epoch timed)")
            return False
        epochs = max(fits)
        probe = (st.get("probe") or {}).get("accuracy")
        if self._probe_wins(chosen, probe):
            return False
        why = f"chose {chosen['from']}" + (f" ({st['metric']} {chosen['value']:.4f})" if chosen["value"]
                                            is not None else "")
        if probe is not None and st["metric"] == "val_accuracy" and chosen["value"] is not None \
                and chosen["value"] < probe:
            why += f", below the linear probe's {probe:.4f}: more epochs or a larger budget should help"
        self._decide(f"{why}; the session trains {epochs} epoch(s) with it ({room:.0f} s left for it).")
        st["final"] = {"from": chosen["from"], "params": chosen["params"], "epochs": epochs}
        self._save()
        self._apply(chosen["params"], epochs)
        return True

    def _probe_wins(self, chosen: dict, probe: float | None) -> bool:
        """Nothing trained beat the linear probe on pretrained features (measured: 100 images, trials at 27% against
        a 70% probe): the probe becomes the head (`probe linear --apply`, logged and replayed) and is the final model;
        no final run, no soup. False when it does not apply, or the head is not one Linear layer."""
        from .review import probe as fit_probe

        st = self.state
        if probe is None or st["metric"] != "val_accuracy" or not st["recipe"]["pretrained"] \
                or (chosen["value"] is not None and chosen["value"] >= probe):
            return False
        try:
            with self.s.changes.via("autofit"):
                res = fit_probe(self.s, "linear", apply=True)
        except PgError as e:
            self._decide(f"the probe cannot become the head ({e})")
            return False
        best = "no trial finished" if chosen["value"] is None else f"{chosen['from']} reached {chosen['value']:.4f}"
        self._decide(f"nothing trained beat the linear probe ({best}, the probe {probe:.4f}): the probe is the "
                     f"model, as its head ({res['head']}: `probe linear --apply`); a larger budget could fine-tune "
                     "past it.")
        st["final"] = {"skipped": True, "probe": True, "val": {"val_accuracy": res["accuracy"]}}
        self._save()
        return True

    def _final(self, worker) -> str:
        from .jobs import TrainJob

        s, st = self.s, self.state
        if "final" not in st:
            if not self._plan_final():
                return "done"
        elif st["final"].get("skipped") or st["final"].get("done"):
            return "done"
        if s.target is None:  # the run finished (or was cut) before a quit
            st["final"]["done"] = True
            return "done"
        guard = {"cut": False}

        def watch(row) -> None:
            if self.left() <= st["budget"] * SOUP_SHARE * 0.5 and s.trainer is not None:
                guard["cut"] = True
                s.trainer.request("pause", "budget")

        if self.final_job is None:
            self.final_job = TrainJob(s)
        s.batch_listeners.append(watch)
        try:
            outcome = self.final_job.run(worker)
        finally:
            s.batch_listeners.remove(watch)
        if outcome == "paused" and not guard["cut"]:
            return "paused"
        if outcome == "stopped":
            return "stopped"
        if guard["cut"]:
            s.run_ended()
            s.write_session_file()
            self._decide(f"the final run was cut by the budget at epoch {s.trainer.pos.epoch}.")
        st["final"]["done"] = True
        st["final"]["position"] = {"epoch": s.trainer.pos.epoch, "step": s.trainer.pos.step}
        st["final"]["val"] = dict(s.trainer.last)
        return "done"

    def _soup_seconds(self, epochs: int) -> float:
        """About how long the greedy soup of `epochs` checkpoints takes: a validation pass and a BatchNorm pass over
        BN_IMAGES training images for each soup tasted (a forward pass costs about a third of a training step)."""
        from .best import BN_IMAGES

        s, epoch_s = self.s, self.state.get("epoch_seconds") or self._estimated_epoch_seconds()
        n = len(s.splits.train)
        per_taste = epoch_s * (len(s.splits.val) + min(BN_IMAGES, n)) / (3 * max(1, n))
        return SOUP_OVERHEAD + (min(epochs, SOUP_TOP) + 1) * per_taste

    def _apply(self, params: dict, epochs: int) -> None:
        """The chosen recipe onto the session, as `set`s and `freeze`s logged as made by autofit, and its `train`."""
        s = self.s
        settings = {**self.state["recipe"]["fixed"], **{k: v for k, v in params.items() if k != "freeze"}}
        with s.changes.via("autofit"):
            for k, v in settings.items():
                s.set(k, v)
            s.freeze(["none"])
            if params.get("freeze") == "backbone":
                s.freeze(["backbone"])
            pos = s.trainer.pos
            s.set("epochs", pos.epoch + epochs)  # the cosine spans the run
        s.changes.flush_pending()  # sets held because a job runs: they apply here, before the run
        tr = s.ensure_trainer()
        s.aim({"epoch": pos.epoch + epochs})
        s.changes.record("train", f"train {epochs}", target=dict(s.target), device=str(tr.runtime.device))
        tr.run_id = max(tr.run_id, 0) + 1
        s.write_session_file()

    def _soup(self, worker) -> str:
        from .best import make_soup

        st = self.state
        final = st.get("final") or {}
        if not final.get("done"):
            return "done"
        epochs = len([1 for _ in (self.s.folder / "checkpoints").glob("epoch-*.safetensors")])
        top = min(SOUP_TOP, max(1, epochs))
        if self.left() < self._soup_seconds(top):
            self._decide(f"no time left for the soup ({max(0.0, self.left()):.0f} s; it takes about "
                         f"{self._soup_seconds(top):.0f} s)")
            return "done"
        try:
            # greedy stops tasting once the budget (less a final evaluation's time) is spent
            deadline = time.monotonic() + self.left() - self._soup_seconds(0)
            res = make_soup(self.s, "greedy", top, cmd=f"soup --greedy --top {top}", deadline=deadline)
        except PgError as e:
            self._decide(f"no soup: {e}")
            return "done"
        st["soup"] = {"members": res["members"], "val_accuracy": res["val"]["accuracy"], "path": res["path"],
                      "best_single": res["best_single"]["val_accuracy"]}
        self._decide(f"greedy soup of {len(res['members'])} checkpoint(s): val accuracy "
                     f"{100 * res['val']['accuracy']:.1f}% (best single epoch "
                     f"{100 * res['best_single']['val_accuracy']:.1f}%).")
        return "done"

    def _conclude(self) -> None:
        st = self.state
        where = "`eval --checkpoint soup`" if st.get("soup") else "`eval --checkpoint best`"
        if (st.get("final") or {}).get("probe"):
            where = "`eval` (the probe is the head)"
        self.s.notify(f"autofit done in {st['spent']:.0f} s of {st['budget']:.0f} s — {where}, `report`")


def trusted_lr(valley: float, pretrained: bool) -> tuple[float, str]:
    """The lr the search centres on, and why: the range test's valley when it lies in LR_WINDOW, else the usual
    AdamW start (a valley far outside it comes from a noisy curve: few images, few batches)."""
    low, high = LR_WINDOW[pretrained]
    if low <= valley <= high:
        return valley, f"valley lr {valley:.2e}"
    fallback = FALLBACK_LR[pretrained]
    return fallback, (f"valley lr {valley:.2e} is outside {low:g}..{high:g}, where AdamW "
                      f"{'fine-tunes pretrained weights' if pretrained else 'trains from scratch'}: the curve is "
                      f"too noisy to trust, so lr {fallback:g} (the usual start)")


def _best_of(curve: dict, metric: str) -> float | None:
    values = [v for v in curve.values() if math.isfinite(v)]
    if not values:
        return None
    return max(values) if metric == "val_accuracy" else min(values)


def _best_epoch(curve: dict, metric: str) -> int | None:
    best = _best_of(curve, metric)
    return next((int(e) for e, v in curve.items() if v == best), None) if best is not None else None


def _fmt(v) -> str:
    return "n/a" if v is None else f"{v:.4f}"

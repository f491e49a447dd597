"""One session: model, data, settings, trainer, the one worker thread, the session file (no cmd2 here).

- core.py        the Session facade: what the shell calls; the one owner of the session's state (the one module
                 that assigns to a Session), `fork` included
- run.py         Run: the live run or a checkpoint as a read sees it (position, trainer, evaluation data); the one
                 checkpoint resolver
- worker.py      the worker thread, its change queue, pause/stop, the status the toolbar reads
- jobs.py        the background jobs' shape, the loop handlers every job uses, TrainJob
- document.py    the session file: SessionDoc and DataBinding (typed, versioned), read and written by pure functions
- files.py       the session folder: naming, moving, what a reopen reads (checkpoint, model, data), quarantine, errors.log
- lock.py        one writer per session (flock), ending with the process that took it
- fingerprint.py the data's classes and file lists; what changed; `data --keep`; an exclusion applied
- changelog.py   changes.jsonl: every change at the position the session gives it
- replay.py      history, export plan, `expect`, a fork's files
- describe.py    the summary line and `show`'s tables
- review.py      checkpoints, evaluation of a checkpoint, predict, errors, explain, probe, export, plot, compare
- study.py       lrfind and tune: their jobs, the study's storage, initial weights, trials, apply
- best.py        `soup`; autofit.py `autofit`; report.py `report`
- dataaudit.py   `audit`, `errors --suspect`, `data --exclude`: the engine's findings in the session's words
"""

from .core import Session
from .document import SESSION_FORMAT, SESSION_VERSION, DataBinding, SessionDoc

__all__ = ["Session", "SessionDoc", "DataBinding", "SESSION_FORMAT", "SESSION_VERSION"]

"""The session's one worker thread, its queues and its status.

The shell thread never touches the model while a job runs: changes go through `apply`, which runs them at once when
nothing runs (or when called from the worker itself) and otherwise queues them for the loop's next batch boundary,
where the `Control` handler drains the queue; pause and stop are Events that handler turns into the loop's requests.
A job is an object with a `label` and `run(worker) -> "done" | "paused" | "stopped"`; a paused job is run again by
`continue`. The worker never prints: it reports through `notify` and `status`.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any, Callable, TypedDict

from ..engine.errors import PgError
from ..engine.train.events import Handler

WAIT_NOTICE = 2.0  # seconds a command waits for the worker before it says what it waits for
WAIT_LIMIT = 3600.0  # then it gives up with a clear line (the worker stays healthy)


class Status(TypedDict, total=False):
    """What the toolbar and `show` read: `state` always; the rest while training (or after an error)."""

    state: str  # "idle" | "training" | "paused"
    job: str  # "train" | "lrfind" | "tune"
    epoch: int
    batch: int
    batches: int
    step: int
    loss: float
    accuracy: float
    lr: float
    rate: float  # images per second
    eta: float  # seconds
    phase: str  # a long step outside the batches: "validation pass", "caching features", "decoding images"
    done: int  # phase progress
    total: int
    trial: int
    trials_done: int
    trials: int
    error: str  # why the last job ended (the run is paused)


class Control(Handler):
    """Between batches: apply the queued changes, then turn a pause or stop request into the loop's request."""

    order = 0
    essential = True

    def __init__(self, worker: "Worker"):
        self.worker = worker

    def before_batch(self, tr, ctx) -> None:
        request = self.worker.check()
        if request:
            tr.request(request)


class Worker:
    def __init__(self, notify: Callable[[str], None], on_error: Callable[[BaseException], tuple[str, str | None]]):
        self.notify = notify
        self.on_error = on_error  # triage of a job's exception: (the one line to show, a note to follow or None)
        self.status: Status = {"state": "idle"}
        self.job: Any = None  # the running or paused job
        self.running = False
        self.changes: queue.Queue = queue.Queue()
        self.pause_event, self.stop_event, self.idle = threading.Event(), threading.Event(), threading.Event()
        self.idle.set()
        self._lock = threading.Lock()
        self._jobs: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="pgshell-worker", daemon=True)
        self.thread.start()

    @property
    def control(self) -> Control:
        return Control(self)

    # ---------------- the shell's side
    def start(self, job) -> None:
        if self.running:
            raise PgError("something is already running: `pause`, `stop` or `wait` first")
        if not self.thread.is_alive():  # closed: a job queued now would never run, and `wait` would never return
            raise PgError("this session is closed: reopen it (`pgshell -s sessions/NAME.session`) to train it")
        with self._lock:
            self.pause_event.clear()
            self.stop_event.clear()
            self.idle.clear()
            self.running = True
            self.job = job
            self.status = {"state": "training", "job": job.label}
        self._jobs.put(job)

    def apply(self, change: Callable[[], Any]) -> Any:
        """Run `change` now if idle (or if called by the worker itself: it must not queue to itself), or between
        two batches of the running job; returns its result."""
        with self._lock:
            if not self.running or threading.current_thread() is self.thread:
                return change()
            fut: Future = Future()
            self.changes.put((change, fut))
        waited = 0.0
        while True:
            try:
                return fut.result(timeout=WAIT_NOTICE)
            except FutureTimeout:
                waited += WAIT_NOTICE
                if waited == WAIT_NOTICE:
                    self.notify(f"waiting for the {self.status.get('phase') or 'current batch'} to finish …")
                if waited >= WAIT_LIMIT:
                    raise PgError(f"the run did not reach a batch boundary in {WAIT_LIMIT:.0f} s "
                                  f"({self.status.get('phase') or 'a batch'} is still going): `pause` and try "
                                  "again") from None

    def check(self) -> str | None:
        """Called by a job between batches: applies queued changes; says whether to pause or stop."""
        self._drain()
        if self.stop_event.is_set():
            return "stop"
        if self.pause_event.is_set():
            return "pause"
        return None

    def pause(self, timeout: float = 120.0) -> bool:
        if not self.running:
            return True
        self.pause_event.set()
        return self.idle.wait(timeout)

    def request_pause(self) -> None:
        if self.running:
            self.pause_event.set()

    def stop(self, timeout: float = 120.0) -> bool:
        self.stop_event.set()
        return self.idle.wait(timeout)

    def close(self) -> None:
        self._jobs.put(None)
        self.thread.join(timeout=30)

    # ---------------- the worker's side
    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            outcome = "failed"
            try:
                outcome = job.run(self)
            except BaseException as e:  # the worker must survive anything: report, pause, keep the shell alive
                msg, note = self.on_error(e)
                self.status = {"state": "paused", "error": msg}
                self.notify(f"error: {msg}")
                if note:
                    self.notify(note)
            finally:
                with self._lock:
                    self._drain()
                    if outcome not in ("paused", "failed"):
                        self.job = None
                    self.running = False
                    self.status["state"] = "paused" if self.job is not None else "idle"
                    self.idle.set()

    def _drain(self) -> None:
        while True:
            try:
                change, fut = self.changes.get_nowait()
            except queue.Empty:
                return
            try:
                fut.set_result(change())
            except BaseException as e:
                fut.set_exception(e)

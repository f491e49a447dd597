"""The loop's events and the handlers that attach features to them (fastai's Learner callbacks, Lightning's Callback
hooks: an `order`, a defined way to ask for a pause or a stop, and state that goes into the checkpoint).

`Trainer.run` fires, in this order:

    before_fit
      before_epoch                       (when an epoch starts at its first batch)
        before_batch                     ctx.x, ctx.y on the device; a handler may replace them (mixup)
        after_loss                       ctx.out, ctx.loss; a handler may replace ctx.loss (soft targets, scaling)
        before_step                      gradients are there: clip them, or set ctx.skip_step (accumulation)
        after_step                       the optimizer stepped (EMA updates here)
        after_batch                      ctx.row: the metrics row of the batch (position already advanced)
      before_validate                    a handler may set ctx.eval_module (evaluate EMA weights)
      after_validate                     ctx.val: {"loss", "accuracy", "n", "bad"}
      after_epoch                        ctx.info: {"epoch", "step", "val", "train_loss", "train_accuracy"}
    after_fit                            ctx.outcome: "done" | "paused" | "stopped" | "failed"
    on_exception                         ctx.error: the exception (then it propagates)

A handler asks the loop to pause or stop with `tr.request("pause" | "stop", reason)`; the loop honours it at the next
batch boundary (under DDP, agreed by every process). A handler with memory (an EMA, an early-stopping counter) sets
`key` and implements `state_dict()` / `load_state_dict()`: the state is stored in every checkpoint under
`handlers/KEY` and given back when a handler with that key is attached to a trainer restored from one, so it resumes
exactly.

A handler that raises is reported once (through `Events.on_error`) and dropped for the rest of the run; training goes
on — unless the handler is `essential`, in which case the error ends the run like any other. A dropped handler's
state as it was when it failed stays in every later checkpoint (a failing EMA keeps its averaged weights), and so
does the state of a handler attached for one run after that run returns (the pause checkpoint is written then).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

EVENTS = ("before_fit", "before_epoch", "before_batch", "after_loss", "before_step", "after_step", "after_batch",
          "before_validate", "after_validate", "after_epoch", "after_fit", "on_exception")


class Handler:
    """A feature attached to the training loop: override the events it needs, each `event(self, tr, ctx)`."""

    order: int = 50  # lower runs first: logging 10, progress 20, features 50, checkpoints 90
    essential: bool = False  # True: an exception in this handler ends the run instead of being reported once
    key: str | None = None  # where its state lives in the checkpoint (None: it has none)

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def __repr__(self) -> str:
        return type(self).__name__


@dataclass
class Ctx:
    """What the current event is about. Fields are filled as the loop gets to them."""

    x: Any = None  # the batch's inputs (on the device), or cached features
    y: Any = None  # its labels
    out: Any = None  # the model's output
    loss: Any = None  # the loss tensor that is back-propagated
    skip_step: bool = False  # before_step: True leaves the optimizer step out (gradient accumulation)
    row: dict | None = None  # after_batch: the metrics row
    eval_module: Any = None  # before_validate: evaluate this module instead of the trainer's
    val: dict | None = None  # after_validate / after_epoch: the validation figures
    info: dict | None = None  # after_epoch
    outcome: str = ""  # after_fit
    error: BaseException | None = None  # on_exception
    extra: dict = field(default_factory=dict)  # for handlers to pass things to later handlers of the same event


class Events:
    """The ordered handlers of a trainer, and the guarded calling of one event on all of them."""

    def __init__(self, on_error: Callable[[Handler, str, BaseException], None] | None = None):
        self.handlers: list[Handler] = []
        self.on_error = on_error  # told once when a non-essential handler fails
        self._pending: dict[str, dict] = {}  # states from a checkpoint for handlers not attached yet

    def add(self, handler: Handler) -> Handler:
        if handler.key is not None:
            if any(h.key == handler.key for h in self.handlers):
                raise ValueError(f"a handler with key {handler.key!r} is already attached")
            if handler.key in self._pending:
                handler.load_state_dict(self._pending.pop(handler.key))
        self.handlers.append(handler)
        self.handlers.sort(key=lambda h: h.order)  # stable: equal orders keep the order they were added in
        return handler

    def remove(self, handler: Handler, keep_state: bool = False) -> None:
        """Detach a handler; with `keep_state` its state stays in the checkpoint until a handler of its key returns
        (a state_dict that raises leaves the state kept before, if any)."""
        if handler in self.handlers:
            self.handlers.remove(handler)
            if keep_state and handler.key is not None:
                try:
                    self._pending[handler.key] = handler.state_dict()
                except Exception:
                    pass

    def find(self, kind: type) -> Handler | None:
        return next((h for h in self.handlers if isinstance(h, kind)), None)

    def fire(self, event: str, tr, ctx: Ctx) -> None:
        for h in list(self.handlers):
            fn = getattr(h, event, None)
            if fn is None:
                continue
            try:
                fn(tr, ctx)
            except Exception as e:
                if h.essential or event == "on_exception":
                    raise
                self.remove(h, keep_state=True)
                if self.on_error is not None:
                    self.on_error(h, event, e)

    # ---------------- checkpoint state
    def state_dict(self) -> dict:
        """Every keyed handler's state, plus states loaded for handlers not attached since (so they survive)."""
        out = dict(self._pending)
        out.update({h.key: h.state_dict() for h in self.handlers if h.key is not None})
        return out

    def load_state_dict(self, states: dict) -> None:
        self._pending = {}
        attached = {h.key: h for h in self.handlers if h.key is not None}
        for key, state in (states or {}).items():
            if key in attached:
                attached[key].load_state_dict(state)
            else:
                self._pending[key] = state

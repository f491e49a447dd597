"""The best model from what a session trained: checkpoint soups (`soup`), the session's report (`report`) and the
time-budgeted search (`autofit`, session/autofit.py).

A soup averages the weights of epoch checkpoints of the session's run (engine/models/soup.py): `--uniform` all of them (or
the `--top K` by validation accuracy), `--greedy` as Wortsman et al. 2022 do — the checkpoints sorted by their
validation accuracy, each added only if the soup's validation accuracy does not drop with it. BatchNorm layers whose
running statistics differ between the ingredients get them recomputed on training images (a seeded sample of up to
`BN_IMAGES`, the eval transform: deterministic, so the same soup comes out every time) before the soup is evaluated.
The result is one more checkpoint of the session, `checkpoints/soup.safetensors`, in the one format: the weights,
and the settings, classes and position of the newest ingredient (no optimizer state: it is not a point to resume
from), so `eval --checkpoint soup`, `predict`, `export` and `fork NAME --checkpoint soup` take it like any other.
The change log records it (a note: a replay does not remake it).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine.errors import PgError

if TYPE_CHECKING:
    from .core import Session

SOUP = "soup.safetensors"  # in the session's checkpoints/ folder: the last soup made
BN_IMAGES = 1024  # training images for a soup's BatchNorm statistics (a seeded sample; all of them when fewer)
MODES = ("greedy", "uniform")


# ====================================================================== soups
def soup_path(s: "Session") -> Path:
    if s.folder is None:
        raise PgError("this session has no checkpoints yet: a soup is made of its epoch checkpoints")
    return s.folder / "checkpoints" / SOUP


def soup_candidates(s: "Session", checkpoints: list[str] | None = None, top: int | None = None) -> list[dict]:
    """The checkpoints a soup is made of: those named, or the session's epoch checkpoints that have a validation
    accuracy (rows as `checkpoints` lists them); with `top`, the K best by it. Oldest first."""
    from . import review

    if top is not None and top < 1:
        raise PgError("--top takes a positive number of checkpoints")
    if checkpoints:
        paths = [review.resolve_checkpoint(s, c) for c in checkpoints]
        if len(set(paths)) != len(paths):
            raise PgError("a checkpoint is named twice: name each once")
        rows = {r["path"]: r for r in review.list_checkpoints(s)}
        chosen = [rows.get(str(p)) or _row_of(p) for p in paths]
        missing = [Path(r["path"]).name for r in chosen if r.get("val_accuracy") is None]
        if missing:
            raise PgError(f"{', '.join(missing)} has no validation accuracy to rank it by: name epoch checkpoints "
                          "(`checkpoints` lists them)")
    else:
        chosen = [r for r in review.list_checkpoints(s) if r["kind"] == "epoch" and r["val_accuracy"] is not None]
    if top is not None:
        keep = {id(r) for r in sorted(chosen, key=lambda r: -r["val_accuracy"])[:top]}
        chosen = [r for r in chosen if id(r) in keep]
    if not chosen:
        raise PgError("no epoch checkpoint with a validation accuracy to make a soup of: train some epochs first "
                      "(`checkpoints` lists what there is)")
    return chosen


def _row_of(path: Path) -> dict:
    from ..engine.store import checkpoint as C

    meta = C.read_metadata(path)
    acc = meta.get("val_accuracy")
    return {"file": path.name, "path": str(path), "epoch": int(meta.get("epoch", 0)), "step": int(meta.get("step", 0)),
            "val_accuracy": float(acc) if acc is not None else None}


def soup(s: "Session", mode: str = "greedy", top: int | None = None, checkpoints: list[str] | None = None,
         bn_images: int = BN_IMAGES) -> dict:
    """Make the soup (see the module's docstring), write it as checkpoints/soup.safetensors, log it; returns what it
    did: the ingredients tried (kept or not, with the soup's val accuracy at each step), the soup's val (and test)
    figures beside the best single checkpoint's."""
    if s.running:
        raise PgError("cannot make a soup while training: `pause` or `wait` first")
    return make_soup(s, mode, top, checkpoints, bn_images)


def make_soup(s: "Session", mode: str = "greedy", top: int | None = None, checkpoints: list[str] | None = None,
              bn_images: int = BN_IMAGES, cmd: str | None = None, deadline: float | None = None) -> dict:
    """`soup` without the check that nothing runs: autofit makes its soup from the worker thread. `deadline` (a
    time.monotonic() value): the greedy search tries no more ingredients after it."""
    if mode not in MODES:
        raise PgError(f"a soup is greedy or uniform, not {mode!r}")
    if s.spec is None or s.splits is None:
        raise PgError("a soup needs the session's model and data: `load MODEL` and `data PATH` first")
    if not s.splits.val:
        raise PgError("a soup is judged on the validation split, and this data has none: attach data with a val/ "
                      "folder or a --split")
    rows = soup_candidates(s, checkpoints, top)
    result = s.apply(lambda: _cook(s, rows, mode, bn_images, deadline))
    cmd = cmd or ("soup --" + mode + (f" --top {top}" if top else "")
                  + (" --checkpoints " + " ".join(Path(r["path"]).name for r in rows) if checkpoints else ""))
    s.changes.record("soup", cmd, mode=mode, members=result["members"], file=SOUP,
                     val_accuracy=result["val"]["accuracy"])
    return result


def _cook(s: "Session", rows: list[dict], mode: str, bn_images: int, deadline: float | None = None) -> dict:
    import time

    from ..engine.models import soup as SP

    states, names = _ingredients(s, rows)
    newest = max(range(len(states)), key=lambda i: (states[i]["position"]["step"], states[i]["position"]["epoch"]))
    base = states[newest]
    pot = _Pot(s, states, base, bn_images)
    order = SP.rank([r["val_accuracy"] for r in rows])
    if mode == "greedy":
        kept, steps = SP.greedy_soup(order, pot.taste, lambda: deadline is not None and time.monotonic() >= deadline)
        tried = [(st.index, st.kept, st.score) for st in steps]
    else:
        kept = order
        pot.taste(kept)
        tried = [(i, True, None) for i in order]
    key = tuple(sorted(kept))
    bn = pot.cook(list(key))  # the final weights in the copy (greedy: the last soup tasted may have been rejected)
    val = pot.tasted[key]["val"]
    test = pot.evaluate("test") if s.splits.test else None
    best = order[0]
    single_test = None
    if test is not None:
        single_test = pot.evaluate_one(best, names[best], "test")["accuracy"]
        pot.cook(list(key))
    members = [names[i] for i in sorted(kept)]
    path = _write_soup(s, base, pot.weights(), mode, members, val, bn)
    return {"mode": mode, "path": str(path), "members": members,
            "tried": [{"file": names[i], "epoch": rows[i].get("epoch"), "val_accuracy": rows[i]["val_accuracy"],
                       "kept": k, "soup_accuracy": score} for i, k, score in tried],
            "val": {"loss": val["loss"], "accuracy": val["accuracy"], "n": val["n"]},
            "test": {"loss": test["loss"], "accuracy": test["accuracy"], "n": test["n"]} if test else None,
            "best_single": {"file": names[best], "val_accuracy": rows[best]["val_accuracy"],
                            "test_accuracy": single_test},
            "bn": bn, "position": dict(base["position"])}


def _ingredients(s: "Session", rows: list[dict]) -> tuple[list[dict], list[str]]:
    """The checkpoints' states and file names, refused unless they are of this session's model and classes and
    their weights can be averaged."""
    from ..engine.store import checkpoint as C
    from ..engine.models import soup as SP

    states = [C.load_checkpoint(r["path"]) for r in rows]
    names = [Path(r["path"]).name for r in rows]
    for state, name in zip(states, names):
        theirs = state.get("model_spec") or {}
        if (theirs.get("name"), theirs.get("num_classes")) != (s.spec.name, s.spec.num_classes):
            raise PgError(f"{name} was made by another model ({theirs.get('name')}, {theirs.get('num_classes')} "
                          f"classes) than this session's ({s.spec.name}, {s.spec.num_classes}): a soup averages "
                          "checkpoints of one model")
        if list(state.get("classes") or []) != list(s.splits.classes):
            raise PgError(f"{name} was trained on other classes than the attached data's: attach its data to make "
                          "a soup of it")
    SP.check_ingredients([st["model"] for st in states], names)
    return states, names


class _Pot:
    """A copy of the model in which soups are made: `cook` averages ingredients into it (BatchNorm statistics
    recomputed where they differ), `taste` gives a soup's validation figures, each soup evaluated once. The copy
    runs with the newest ingredient's settings on this machine's device."""

    def __init__(self, s: "Session", states: list[dict], base: dict, bn_images: int):
        import torch

        from ..engine import models as M
        from ..engine.config import TrainConfig
        from ..engine.train.loop import Trainer

        here = {k: getattr(s.config, k) for k in ("device", "amp", "channels_last", "devices")}
        cfg = TrainConfig.from_dict({**base["config"], **here})
        size = int(base.get("size") or 0)
        with torch.random.fork_rng(devices=[]):  # the copy's throwaway initialisation leaves the global stream
            self.built = M.build_skeleton(s.spec)
        self.tr = Trainer(self.built, s.spec, s.splits, cfg, log=None, size=size)
        self.bn_batches = _bn_batches(s, self.built, cfg, size, bn_images)
        self.states = states
        self.tasted: dict[tuple, dict] = {}
        self.holds: list[int] | None = None  # the ingredients whose soup the copy holds now
        self.bn: dict = {}  # its BatchNorm figures

    def cook(self, indices: list[int]) -> dict:
        """The soup of those ingredients in the model copy, its BatchNorm statistics recomputed where they differ."""
        from ..engine import models as M
        from ..engine.models import soup as SP

        if self.holds == indices:
            return self.bn
        module, runtime = self.built.module, self.tr.runtime
        chosen = [self.states[i]["model"] for i in indices]
        M.restore_weights(module, SP.average_weights(chosen), [], "the soup")
        layers = SP.differing_batchnorm(module, chosen)
        images = 0
        if layers:
            def forward(x):
                with runtime.autocast():
                    return module(runtime.to_input(x))
            images = SP.recompute_batchnorm(module, self.bn_batches(), layers, forward)
        self.holds, self.bn = list(indices), {"layers": len(layers), "images": images}
        return self.bn

    def taste(self, indices: list[int]) -> float:
        key = tuple(sorted(indices))
        if key not in self.tasted:
            bn = self.cook(list(key))
            self.tasted[key] = {"val": self.evaluate("val"), "bn": bn}
        return self.tasted[key]["val"]["accuracy"]

    def evaluate(self, split: str) -> dict:
        return self.tr.evaluate(split, module=self.built.module)

    def evaluate_one(self, index: int, name: str, split: str) -> dict:
        """One ingredient alone, evaluated on `split` (the copy holds no soup after it)."""
        from ..engine import models as M

        M.restore_weights(self.built.module, self.states[index]["model"], [], name)
        self.holds = None
        return self.evaluate(split)

    def weights(self) -> dict:
        return {k: v.detach().cpu().clone() for k, v in self.built.module.state_dict().items()}


def _bn_batches(s: "Session", built, cfg, size: int, limit: int):
    """A function giving the batches (images only) of a seeded sample of up to `limit` training images with the
    eval transform, in the training batch size — the same images every time it is called."""
    import torch

    from ..engine import data as D

    train = s.splits.train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(D.derived_seed(
        "pgshell-soup-bn", cfg.seed))).tolist()[:max(1, limit)]
    samples = [train[i] for i in sorted(order)]
    dataset = D.ImageDataset(samples, D.build_transform(built.data_config, train=False, size=size, policy=cfg))

    def batches():
        sampler = D.EpochSampler(len(dataset), cfg.seed, 0, shuffle=False)
        for x, _y, _bad in D.make_loader(dataset, sampler, cfg.batch_size, cfg.workers):
            if x is not None:
                yield x

    return batches


def _write_soup(s: "Session", base: dict, weights: dict, mode: str, members: list[str], val: dict, bn: dict) -> Path:
    from datetime import datetime

    from ..engine.store import checkpoint as C
    from ..engine.store.saver import SLIM

    # a soup's exponential moving average would be the newest ingredient's, not the soup's: left out
    handlers = {k: v for k, v in (base.get("handlers") or {}).items() if k != "ema"}
    state = {**base, **{k: None for k in SLIM}, "model": weights, "handlers": handlers,
             "soup": {"mode": mode, "members": members, "bn_layers": bn["layers"], "bn_images": bn["images"]}}
    pos = base["position"]
    summary = {"kind": "soup", "step": pos["step"], "epoch": pos["epoch"], "batch": pos["batch"],
               "time": datetime.now().isoformat(timespec="seconds"), "val_loss": val["loss"],
               "val_accuracy": val["accuracy"], "members": json.dumps(members), "mode": mode, "resumable": False}
    path = soup_path(s)
    C.save_checkpoint(path, state, summary)
    return path

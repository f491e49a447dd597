"""The session described for people: the one-line summary and the tables `show` prints."""

from __future__ import annotations

from typing import Any


def summary_line(s) -> str:
    """One line: model, position, paused or not (the reopen message)."""
    parts = [s.spec.name if s.spec else "no model"]
    if s.trainer is not None:
        p = s.trainer.pos
        parts.append(f"epoch {p.epoch}" + (f" + {p.batch} batches" if p.batch else "") + f", step {p.step}")
    elif s.splits is None and s.data:
        parts.append("data missing")
    if s.paused:
        parts.append("paused: `continue` resumes")
    return ", ".join(parts)


def describe(s) -> dict[str, dict]:
    """Model, data, settings, position, last metrics and files, as the tables of `show`."""
    from ..engine import models as M

    out: dict[str, dict] = {}
    if s.built is not None:
        trainable, total = M.count_params(s.built.module)
        out["model"] = {"name": s.spec.name, "resolved": s.built.full_name, "source": s.built.source,
                        "pretrained": s.spec.pretrained or bool(s.spec.weights),
                        "classes": s.spec.num_classes, "parameters": total, "trainable": trainable,
                        "input": "x".join(map(str, s.built.data_config.get("input_size", ())[1:]))}
    if s.splits is not None:
        out["data"] = {"path": s.data["path"], "layout": s.splits.layout,
                       "classes": ", ".join(s.splits.classes[:12]) + (" ..." if len(s.splits.classes) > 12 else ""),
                       "train": len(s.splits.train), "val": len(s.splits.val),
                       "test": len(s.splits.test or []), "size": s.data.get("size") or "model default"}
    out["settings"] = s.config.to_dict()
    if s.built is not None:
        from ..engine.data import describe_policy

        out["augmentation"] = describe_policy(s.built.data_config, s.config, (s.data or {}).get("size", 0))
    if s.trainer is not None:
        from ..engine.recipes import describe_groups

        out["lr groups"] = describe_groups(s.trainer.optimizer)
    pos: dict[str, Any] = {"state": s.status.get("state", "idle")}
    if s.trainer is not None:
        p = s.trainer.pos
        pos.update(epoch=p.epoch, batch=p.batch, step=p.step, batches_per_epoch=s.trainer.steps_per_epoch,
                   device=s.trainer.runtime.describe())
    if s.target:
        pos["target"] = ", ".join(f"{k} {v}" for k, v in s.target.items())
    out["position"] = pos
    if s.trainer is not None and s.trainer.last:
        last = dict(s.trainer.last)  # one step (the worker adds and drops keys): iterating it could fail
        out["metrics"] = {k: round(v, 6) if isinstance(v, float) else v for k, v in last.items()
                          if not k.startswith("epoch_")}
    files: dict[str, Any] = {}
    if s.file:
        files["session file"] = str(s.file)
    if s.latest_checkpoint:
        files["latest checkpoint"] = str(s.latest_checkpoint)
    if s.best:
        files["best"] = f"{s.best['path']} ({s.best['metric']} {s.best['value']:.4f})"
    out["files"] = files
    return out

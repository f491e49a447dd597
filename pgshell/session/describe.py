"""The session described for people: the one-line summary and the tables `show` prints."""

from __future__ import annotations

from typing import Any


def where(pos, batches: int | None) -> str:
    """The one wording of a position: `epoch 14, batch 4/8 (step 108)`. At an epoch's end it names that epoch's
    last batch (`epoch 13, batch 8/8`), so the epoch is always the one the last batch belonged to. `batches` None
    (not known): `epoch 14, batch 4 (step 108)`, `epoch 13, last batch (step 104)`."""
    if pos.batch == 0 and pos.epoch:
        return f"epoch {pos.epoch}, " + (f"batch {batches}/{batches}" if batches else "last batch") + \
            f" (step {pos.step})"
    return f"epoch {pos.epoch + 1}, batch {pos.batch}" + (f"/{batches}" if batches else "") + f" (step {pos.step})"


def summary_line(s) -> str:
    """One line: model, position, paused or not (the reopen message)."""
    parts = [s.spec.name if s.spec else "no model"]
    if s.trainer is not None:
        parts.append(where(s.trainer.pos, s.trainer.steps_per_epoch_now))
    elif s.splits is None and s.data:
        parts.append("data missing")
    if s.paused:
        parts.append("paused: `continue` resumes")
    return ", ".join(parts)


def best_line(s) -> str:
    """The best epoch by `best_metric`, its value and checkpoint, beside the last epoch's: what the end of a run
    and a script's last lines say, so that a run whose best was epoch 7 does not read as its epoch 8."""
    best = s.best
    if not best:
        return ""
    metric, last = best["metric"], (s.trainer.last if s.trainer is not None else {})
    line = f"best epoch {best['epoch']} by {metric}: {best['value']:.4f} (checkpoint {s.root / best['path']})"
    if last.get("val_epoch") is None or last["val_epoch"] == best["epoch"]:
        line += ", also the last epoch validated"
    else:
        line += f"; last epoch {last['val_epoch']}: {metric} {last[metric]:.4f}"
    accuracy = best["value"] if metric == "val_accuracy" else last.get("val_accuracy")
    note = probe_note(s, accuracy) if accuracy is not None else ""
    return line + (f"\n{note}" if note else "")


def probe_note(s, accuracy: float) -> str:
    """When a recorded probe (`probe knn|linear`) of this model on this data beat the fine-tune's val accuracy by a
    clear margin (3 points, and 2 images): say so, and what to try. A probe that a fine-tune cannot reach means the
    training is hurting what the pretrained features already separate (issue 28: a probe at 86%, the fine-tune 74%)."""
    from .review import probe_results

    val = len(s.splits.val) if s.splits is not None else 0
    probes = [r for r in probe_results(s).values()
              if r.get("model") == (s.spec.name if s.spec else None) and r.get("val") == val
              and isinstance(r.get("accuracy"), (int, float))]
    if not probes or not val:
        return ""
    top = max(probes, key=lambda r: r["accuracy"])
    if top["accuracy"] - accuracy < max(0.03, 2 / val):
        return ""
    name = "k-NN" if top["kind"] == "knn" else "linear"
    return (f"note: the {name} probe on this model's frozen features reached val accuracy {top['accuracy']:.4f} "
            f"(step {top.get('step', 0)}), {100 * (top['accuracy'] - accuracy):.1f} points above this fine-tune's "
            f"{accuracy:.4f}: training is undoing what the pretrained features already separate — try the head "
            "alone first (`freeze`, `train`), a smaller backbone lr (`set backbone_lr_scale 0.1`), a lower lr "
            "(`lrfind`), or milder augmentation (`set crop_scale 0.5`)")


def evaluated_line(s, report: dict) -> str:
    """Which weights `eval` evaluated: the live ones, at their position, or a checkpoint — and where the best is."""
    from pathlib import Path

    best = s.best
    best_path = (s.root / best["path"]).resolve() if best else None
    if report.get("batch") and report.get("step") is not None and s.trainer is not None:  # mid-epoch: `where`'s words
        from types import SimpleNamespace

        pos = SimpleNamespace(epoch=report["epoch"], batch=report["batch"], step=report["step"])
        at = where(pos, s.trainer.steps_per_epoch_now)
    else:
        at = f"epoch {report['epoch']}" + (f" + {report['batch']} batches" if report.get("batch") else "")
        at += f", step {report['step']}" if report.get("step") is not None else ""
    at += f"; test-time augmentation: {report['tta']}" if report.get("tta", "none") != "none" else ""
    if report["checkpoint"] is not None:
        line = f"evaluated: checkpoint {report['checkpoint']} ({at})"
        if best_path is not None and Path(report["checkpoint"]).resolve() == best_path:
            line += f", the best by {best['metric']}"
        return line
    line = f"evaluated: the current weights ({at})" if report.get("epoch") is not None else \
        "evaluated: the current weights (not trained yet)"
    if best and (report.get("epoch"), report.get("batch") or 0) != (best["epoch"], 0):
        line += f"; the best is epoch {best['epoch']} ({best['metric']} {best['value']:.4f}): `eval --checkpoint best`"
    return line


def _init_seed(s) -> str:
    seed = s.changes.init_seed()
    if seed is None:
        return "seed unknown (the change log did not see the load)"
    now = "" if seed == s.config.seed else f" (seed is {s.config.seed} now: `load` again to use it)"
    return f"seed {seed}{now}"


def describe(s, every: bool = False) -> dict[str, dict]:
    """Model, data, settings, position, last metrics and files, as the tables of `show`. The settings are those not
    at their defaults (50 lines of defaults hid the few that mattered), all of them with `every` (`show --all`)."""
    from ..engine import models as M

    out: dict[str, dict] = {}
    if s.built is not None:
        trainable, total = M.count_params(s.built.module)
        out["model"] = {"name": s.spec.name, "resolved": s.built.full_name, "source": s.built.source,
                        "pretrained": s.spec.pretrained or bool(s.spec.weights),
                        "classes": s.spec.num_classes, "parameters": total, "trainable": trainable,
                        "initialised with": _init_seed(s),
                        "input": _input_size(s)}
    if s.splits is not None:
        out["data"] = {"path": s.data["path"], "layout": s.splits.layout,
                       "classes": ", ".join(s.splits.classes[:12]) + (" ..." if len(s.splits.classes) > 12 else ""),
                       "train": len(s.splits.train), "val": len(s.splits.val),
                       "test": len(s.splits.test or []), "size": s.data.get("size") or "model default"}
    out["settings"] = settings_shown(s.config, every)
    if s.built is not None:
        from ..engine.data.transforms import describe_policy

        out["augmentation"] = describe_policy(s.built.data_config, s.config, (s.data or {}).get("size", 0))
    if s.trainer is not None:
        from ..engine.train.recipes import describe_groups

        out["lr groups"] = describe_groups(s.trainer.optimizer)
    pos: dict[str, Any] = {"state": s.status.get("state", "idle")}
    if s.trainer is not None:  # one wording of the position (`where`), as the pause line and `sessions` say it
        p = s.trainer.pos
        pos.update(at=where(p, s.trainer.steps_per_epoch_now), batch=p.batch, step=p.step,
                   batches_per_epoch=s.trainer.steps_per_epoch, device=s.trainer.runtime.describe())
    if s.target:
        pos["target"] = target_words(s.target)
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
        files["best"] = (f"{s.root / s.best['path']} (epoch {s.best['epoch']}, "
                         f"{s.best['metric']} {s.best['value']:.4f})")
    out["files"] = files
    return out


def settings_shown(cfg, every: bool = False) -> dict[str, Any]:
    """The settings `show` lists: those whose value is not the default (all with `every`)."""
    from ..engine.config import TrainConfig

    values, defaults = cfg.to_dict(), TrainConfig().to_dict()
    return values if every else {k: v for k, v in values.items() if v != defaults[k]}


def defaults_note(shown: dict) -> str:
    """What `show` says under the settings it listed: how many it left out at their defaults."""
    from ..engine.config import SETTINGS

    rest = len(SETTINGS) - len(shown)
    if not rest:
        return ""
    return (f"(the other {rest} at their defaults: `show --all` lists them)" if shown else
            f"(all {rest} at their defaults: `show --all` lists them)")


def target_words(target: dict) -> str:
    """Where the run goes, in `where`'s words: `to the end of epoch 6`, `to step 120`."""
    words = f"to step {target['step']}" if "step" in target else f"to the end of epoch {target.get('epoch')}"
    if target.get("unfreeze_at") is not None:  # finetune's first phase
        words += (f" (finetune: the backbone unfrozen after epoch {target['unfreeze_at']}, its lr x "
                  f"{target.get('backbone_lr_scale', 1.0):g})")
    return words


def _input_size(s) -> str:
    """The image size training uses: `data --size` when given, else the model's own."""
    size = (s.data or {}).get("size") or 0
    if size:
        return f"{size}x{size} (data --size)"
    return "x".join(map(str, s.built.data_config.get("input_size", ())[1:])) + " (the model's own)"

"""What the change log (session/changelog.py) makes possible: `history`, a plan that rebuilds a session from nothing
(`export plan`), the checks such a plan makes while it runs (`expect`), and `fork`.

A plan replays the log in order: `train --steps K` up to the step of each change, the change, and so on to the
session's position. Training is a function of the settings, the data and the position alone (data order, augmentation
and the model's own randomness are seeded per sample and per step; a run may stop and start at any batch boundary
and continue bit for bit), so on CPU the replay's weights and metrics rows are those of the session. What a plan
cannot recreate it checks: after `data` the folder's contents (`expect data MANIFEST`, naming the file that differs),
before `load --weights` the file's checksum (`expect file`), after `load` the weights it produced (`expect weights`).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
from datetime import datetime
from pathlib import Path

from ..engine.config import TrainConfig, setting_names
from ..engine.errors import PgError
from .changelog import LOG, REPLAYED, read_log, value_text, where
from .files import FORK_TEMP, SESSION_NAME
from .run import resolve_checkpoint


# ====================================================================== history
def history(s) -> list[dict]:
    """The session's changes, oldest first, with where each took effect (held ones last, not yet numbered)."""
    return [dict(e, where=where(e)) for e in s.changes.entries] + [dict(p, pending=True, where=where({"pending": 1}))
                                                                   for p in s.changes.pending]


def note(entry: dict) -> str:
    """What a history line adds to the command: what made it, what it was checked against."""
    bits = []
    if entry.get("via"):
        bits.append(f"by {entry['via']}")
    if entry["kind"] == "set" and "old" in entry:
        bits.append(f"was {value_text(entry['old'])}")
    if entry.get("init_seed") is not None:
        bits.append(f"weights initialised with seed {entry['init_seed']}")
    if entry["kind"] == "data":
        bits.append(f"{entry['files']} files, fingerprint {entry['fingerprint'][:12]}")
        if entry.get("exclude"):
            bits.append(f"{len(entry['excluded'])} excluded by a list with sha256 {entry['exclude_sha256'][:12]}")
    if entry.get("weights_sha256"):
        bits.append(f"weights file sha256 {entry['weights_sha256'][:12]}")
    return "; ".join(bits)


# ====================================================================== export plan
class _Plan:
    """The lines of a plan as they are written, and the warnings that name them."""

    def __init__(self):
        self.lines: list[str] = []
        self.warnings: list[str] = []

    def add(self, line: str) -> int:
        self.lines.append(line)
        return len(self.lines)

    def warn(self, line_no: int, why: str) -> None:
        self.warnings.append(f"plan line {line_no} (`{self.lines[line_no - 1]}`): {why}")


def export_plan(s, file: str) -> dict:
    """Write a plan that rebuilds the session from nothing and replays it to its position; returns {"path", "lines",
    "changes", "step", "warnings"} — a warning names each plan line that cannot replay exactly, and why."""
    log = s.changes
    if s.running:
        raise PgError("training is running: `pause` first, so that the plan ends at a fixed position")
    if not log.header.get("complete", True):
        raise PgError("this session's change log does not reach back to its start (the session is older than the "
                      "log): no plan can rebuild it — a session started now records everything")
    if not any(e["kind"] in REPLAYED for e in log.entries):
        raise PgError("nothing to replay yet: the change log starts with `data` and `load`")
    path = Path(file).expanduser().resolve()
    if path.is_dir():
        raise PgError(f"{file} is a folder: give the plan's file name, e.g. `export plan {file.rstrip('/')}/x.plan`")
    try:
        return _write_plan(s, path)
    except OSError as e:
        raise PgError(f"cannot write the plan to {path}: {e.strerror or e}") from None


def _write_plan(s, path: Path) -> dict:
    log = s.changes
    path.parent.mkdir(parents=True, exist_ok=True)
    step, epoch, batch = log.position()
    plan = _Plan()
    plan.add(f"# pgshell plan: rebuilds session {s.name or '(unnamed)'} from nothing and replays its changes to "
             f"step {step} ({where({'step': step, 'epoch': epoch, 'batch': batch})})")
    plan.add(f"# exported {datetime.now().isoformat(timespec='seconds')}; run it in a new process: pgshell {path}")
    plan.add("# on CPU the replay's weights and metrics rows are the session's, bit for bit; `expect` stops it where "
             "they could not be")
    _defaults(plan, log.header.get("defaults") or {})
    at = _replay_entries(s, plan, path)
    if step > at:
        plan.add(f"train --steps {step - at}")
    for p in log.pending:
        plan.add("# set during the last run; applies when training next starts")
        plan.add(p["cmd"])
    _check_settings(s, plan)
    path.write_text("\n".join(plan.lines) + "\n")
    return {"path": str(path), "lines": len(plan.lines), "changes": len(log.entries), "step": step,
            "warnings": plan.warnings}


def _defaults(plan: _Plan, defaults: dict) -> None:
    """Settings whose default was another when the session began (another pgshell version) are set first."""
    now = TrainConfig().to_dict()
    for name, value in defaults.items():
        if name in now and now[name] != value:
            plan.add(f"set {name} {value_text(value)}")


def _replay_entries(s, plan: _Plan, path: Path) -> int:
    """The changes, each preceded by the training up to its step; returns the step reached."""
    at, data_n, last_data = 0, 0, None
    devices = set()
    for e in s.changes.entries:
        if e["kind"] == "train" and e.get("device", "cpu") != "cpu":
            devices.add(e["device"])
        if e["kind"] == "fork" and str(e.get("checkpoint", "")).startswith("soup"):
            plan.warnings.append(f"change {e['n']} forked this session from a soup (averaged weights): the plan "
                                 "replays the training before it, not the average")
        if e["kind"] not in REPLAYED:
            continue
        if e["step"] > at:
            plan.add(f"train --steps {e['step'] - at}")
            at = e["step"]
        n = plan.add(f"# change {e['n']} at step {e['step']} ({where(e)})" + (f", by {e['via']}" if e.get("via") else ""))
        if e["step"] < at:  # a log edited by hand, or written by something other than this session
            plan.warn(n, f"logged at step {e['step']}, after step {at} was reached: the log is out of order")
        if e["kind"] == "data" and e.get("kept_position"):
            if last_data and _data_key(e) == last_data:
                plan.add(f"# ({e['cmd']}: the same data again after a reopen, nothing to replay)")
                continue
            plan.warn(plan.add(f"# {e['cmd']}"), "other data attached to a reopened run: a plan cannot continue a "
                                                  "run on other data mid-way")
            continue
        for key in ("weights", "code", "exclude"):  # a file the command reads: the same bytes, or the replay stops
            if e.get(key):
                n = plan.add(f"expect file {_quote(e[key])} {e[key + '_sha256']}")
                _check_file(plan, n, e[key], e[key + "_sha256"])
        plan.add(e["cmd"])
        if e["kind"] == "data":
            data_n += 1
            last_data = _data_key(e)
            _expect_data(s, plan, e, path.with_name(f"{path.name}.data-{data_n}.tsv"))
        if e.get("digest"):
            plan.add(f"expect weights {e['digest']}")
        # a new model or other data begins a new run of the session at the position reached (Session._new_run):
        # the step counts on, so `at` does too
    if devices:
        plan.warnings.append(f"the session trained on {', '.join(sorted(devices))}: a replay on CPU agrees to float "
                             "rounding, not bit for bit")
    return at


def _data_key(entry: dict) -> tuple:
    """What makes two `data` lines the same data: the folder's contents, the split, the size, the names excluded."""
    return entry["path"], entry["split"], entry["size"], entry["fingerprint"], tuple(entry.get("excluded") or ())


def _quote(text: str) -> str:
    import shlex

    return shlex.quote(text)


def _check_file(plan: _Plan, line_no: int, file: str, sha: str) -> None:
    from ..engine.store.digests import file_sha256

    if not os.path.isfile(file):
        plan.warn(line_no, f"{file} is missing: the replay stops there")
    elif file_sha256(file) != sha:
        plan.warn(line_no, f"{file} differs by checksum from the file the session loaded: the replay stops there")


def _expect_data(s, plan: _Plan, entry: dict, manifest: Path) -> None:
    """Copy the data's manifest beside the plan, check the folder against it now, add the `expect data` line."""
    source = s.changes.manifest_path(entry["fingerprint"])
    if source is None or not source.exists():
        plan.warnings.append(f"change {entry['n']} (`{entry['cmd']}`): its data manifest is missing from the session "
                             "folder, so the replay cannot check the data")
        return
    shutil.copyfile(source, manifest)
    n = plan.add(f"expect data {_quote(str(manifest))}")
    try:
        diff = data_differences(entry["path"], manifest)
    except PgError as e:
        plan.warn(n, f"{e}: the replay stops there")
        return
    if diff:
        plan.warn(n, f"the data changed since the session used it: {_summary(diff)} — the replay stops there")


def _check_settings(s, plan: _Plan) -> None:
    """The log accounts for every setting the session has: its sets applied to the defaults give today's config."""
    cfg = dict(s.changes.header.get("defaults") or TrainConfig().to_dict())
    for e in s.changes.entries + s.changes.pending:
        if e["kind"] == "set":
            cfg[e["name"]] = e["value"]
    now = s.config.to_dict()
    off = [n for n in setting_names() if n in cfg and cfg[n] != now[n]]
    if off:
        plan.warnings.append(f"the log does not account for {', '.join(off)} (changed outside it): the replay ends "
                             f"with {', '.join(f'{n} {value_text(cfg[n])}' for n in off)}")


# ====================================================================== the checks a plan makes
def data_differences(path: str, manifest: str | os.PathLike) -> list[str]:
    """How the folder `path` differs from a manifest (empty: identical)."""
    from ..engine import data as D
    from ..engine.store.digests import data_manifest, manifest_changes, read_manifest
    from .changelog import data_files

    try:
        _, then = read_manifest(manifest)
    except (OSError, ValueError) as e:
        raise PgError(f"{manifest} is not a readable data manifest ({type(e).__name__})") from None
    splits = D.scan_folder(path)
    return manifest_changes(then, data_manifest(path, data_files(splits)))


def expect_data(s, manifest: str) -> str:
    if s.data is None:
        raise PgError("no data attached: `expect data` follows a `data` line")
    diff = data_differences(s.data["path"], manifest)
    if diff:
        from ..engine.store.digests import read_manifest

        title, _ = read_manifest(manifest)
        raise PgError(f"the data of `{title}` changed since the session used it: {_summary(diff)} — the replay "
                      "cannot be exact, so it stops here")
    return f"data as the session had it ({s.data['path']})"


def _summary(diff: list[str]) -> str:
    return diff[0] + (f" (and {len(diff) - 1} more)" if len(diff) > 1 else "")


def expect_file(path: str, sha256: str) -> str:
    from ..engine.store.digests import file_sha256

    if not os.path.isfile(path):
        raise PgError(f"{path} is missing: the session loaded it with sha256 {sha256[:16]}… — the replay cannot be "
                      "exact, so it stops here")
    now = file_sha256(path)
    if now != sha256:
        raise PgError(f"{path} differs by checksum from the file the session loaded (sha256 {now[:16]}… now, "
                      f"{sha256[:16]}… then) — the replay cannot be exact, so it stops here")
    return f"{path}: the file the session loaded"


def expect_weights(s, digest: str) -> str:
    from ..engine.store.digests import weights_digest

    if s.built is None:
        raise PgError("no model loaded: `expect weights` follows a `load` line")
    now = s.apply(lambda: weights_digest(s.built.module))
    if now != digest:
        raise PgError(f"the weights differ from the session's at this point (digest {now[:12]} here, {digest[:12]} "
                      "there): other pretrained weights in the cache, an edited model file or another library "
                      "version — the replay cannot be exact, so it stops here")
    return "weights as the session had them"


# ====================================================================== fork
def fork(s, name: str, which: str | None = None) -> Path:
    """Write a new session NAME beside this one, starting from one of its checkpoints (default: the latest): the
    checkpoints up to it, the metrics rows and the change log up to it. Returns the new session file; Session.fork
    opens it (this session is left as it is)."""
    from ..engine.store.saver import C

    check_fork(s, name)
    if s.folder is None:
        raise PgError("this session has no checkpoints yet to fork from: train or `save` first")
    src = resolve_checkpoint(s, which)
    meta = C.read_metadata(src)
    state = json.loads(meta["state"])
    pos = state["position"]
    final = s.root / name
    # built under a temporary name and renamed in whole: a kill part-way leaves `.NAME.fork-XXXX`, which neither
    # blocks the name nor passes for a session (`sessions` lists it as an orphan; `sessions rm` removes it)
    folder = s.root / f".{name}{FORK_TEMP}{secrets.token_hex(3)}"
    renamed = False
    try:
        start = _copy_checkpoints(s, src, pos["step"], folder / "checkpoints")
        _copy_metrics(s, folder, pos["step"])
        kept = _copy_log(s, folder, state, name, src)
        for extra in ("quarantine.txt", "manifests"):
            if (s.folder / extra).is_file():
                shutil.copyfile(s.folder / extra, folder / extra)
            elif (s.folder / extra).is_dir():
                shutil.copytree(s.folder / extra, folder / extra)
        data = next((_data_of(e) for e in reversed(kept) if e["kind"] == "data"),
                    s.data)  # the data the checkpoint was trained on, though other data is attached now
        if final.exists() or final.is_symlink():  # taken meanwhile: never renamed over
            raise PgError(f"{final} appeared while forking: choose another name")
        os.rename(folder, final)
        renamed = True
        _write_session_file(s, name, final / start.relative_to(folder), TrainConfig.from_dict(state["config"]), data)
    except BaseException:
        shutil.rmtree(final if renamed else folder, ignore_errors=True)  # only what this fork made
        if renamed:
            (s.root / f"{name}.session").unlink(missing_ok=True)
        raise
    return s.root / f"{name}.session"


def _data_of(entry: dict) -> dict:
    """A session file's `data` from a change log's `data` line (with the names `data --exclude` left out)."""
    data = {k: entry[k] for k in ("path", "split", "size")}
    if entry.get("exclude"):
        data["exclude"] = {"file": entry["exclude"], "sha256": entry["exclude_sha256"], "paths": entry["excluded"]}
    return data


def check_fork(s, name: str) -> None:
    """A fork needs a model and a free, plain name beside this session."""
    if not SESSION_NAME.match(name or "") or name.endswith(".session"):
        raise PgError(f"a session name is letters, digits, '_', '-' and '.' (no .session), not {name!r}")
    if s.built is None:
        raise PgError("nothing to fork: `load MODEL` first")
    if (s.root / f"{name}.session").exists() or (s.root / name).exists():
        raise PgError(f"{s.root / name}.session already exists: choose another name")


def _copy_checkpoints(s, src: Path, step: int, dest: Path) -> Path:
    """The checkpoints before the fork point, and the fork point itself (hard links where the disk allows: a
    checkpoint is never rewritten in place, only replaced); returns the fork point's copy."""
    from ..engine.store.saver import C

    dest.mkdir(parents=True)
    for p in C.list_checkpoint_files(src.parent):
        try:
            before = int(C.read_metadata(p).get("step", -1)) < step
        except C.CheckpointError:
            continue
        if before or p == src:
            _link(p, dest / p.name)
    if (dest / src.name).exists():
        return dest / src.name
    # a fork point that is not an epoch or step checkpoint (a soup): the new session's checkpoint at that step
    _link(src, dest / f"step-{step:07d}.safetensors")
    return dest / f"step-{step:07d}.safetensors"


def _link(p: Path, target: Path) -> None:
    try:
        os.link(p, target)
    except OSError:
        shutil.copyfile(p, target)


def _copy_metrics(s, folder: Path, step: int) -> None:
    from ..engine.train.metrics import MetricsLog

    s.sync_metrics()
    if (s.folder / "metrics.csv").exists():
        shutil.copyfile(s.folder / "metrics.csv", folder / "metrics.csv")
        MetricsLog(folder / "metrics.csv").truncate_after(step)


def _copy_log(s, folder: Path, state: dict, name: str, src: Path) -> list[dict]:
    """The parent's changes up to the checkpoint (the count it stored), then the fork itself; returns them."""
    from ..engine.store.checkpoint import atomic_write_bytes

    header, entries = (read_log(s.folder / LOG) if (s.folder / LOG).exists()
                       else (dict(s.changes.header), list(s.changes.entries)))
    count = (state.get("handlers") or {}).get("changelog", {}).get("count")
    if count is None:  # a checkpoint older than the log: which changes it holds is unknown
        header = {**header, "complete": False}
        count = len(entries)
    pos = state["position"]
    fork_entry = {"n": count + 1, "kind": "fork", "cmd": f"fork {name} --checkpoint {src.name}",
                  "step": pos["step"], "epoch": pos["epoch"], "batch": pos["batch"],
                  "time": datetime.now().isoformat(timespec="seconds"), "parent": s.name, "checkpoint": src.name}
    lines = [json.dumps(header)] + [json.dumps(e) for e in entries[:count]] + [json.dumps(fork_entry)]
    atomic_write_bytes(folder / LOG, ("\n".join(lines) + "\n").encode())
    return entries[:count] + [fork_entry]


def _write_session_file(s, name: str, latest: Path, cfg: TrainConfig, data: dict | None) -> None:
    from ..engine.store.saver import CheckpointSaver
    from .document import DataBinding, write_document
    from .files import new_uid

    saver = CheckpointSaver()
    saver.root = s.root
    saver.rejudge(latest.parent, cfg.best_metric)  # the best of the epochs up to the fork
    doc = s.document().replace(id=new_uid(), name=name, folder=name, config=cfg,
                               data=DataBinding.from_dict(data) if data else None,
                               checkpoint=str(latest.relative_to(s.root)), best=saver.best, target=None)
    write_document(s.root / f"{name}.session", doc)

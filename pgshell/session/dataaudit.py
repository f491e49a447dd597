"""`audit`, `errors --suspect` and `data --exclude`: can the session's data be trusted, and acting on the answer.

The engine finds (engine/report/audit.py: digests, perceptual hashes, odd images, confident learning); this module
gathers the session's samples, runs the model where features or predictions are wanted (through `Session.apply`: the data
path seeds the process-wide generators the worker's training relies on), names what was found in the user's words
("12 val images also in train"), draws the contact sheets and writes the exclude list.

An exclusion never touches the disk: `data --exclude FILE` leaves the listed files out of the splits it attaches. The
excluded names are kept in the session file (reopening leaves them out again, whatever the list says by then) and in
the change log with the list's SHA-256 (a replayed plan checks the list is the same file before its `data` line);
they change the data's fingerprint, and the folder's manifest still covers them, so `expect data` agrees.
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ..engine.errors import PgError
from ..engine.names import escape

if TYPE_CHECKING:
    from .core import Session

SPLITS = ("train", "val", "test")
_EVAL_FIRST = {"test": 0, "val": 1, "train": 2}  # which copy of a duplicate stays: the evaluation splits' own
MAX_TILES = 64  # per contact sheet
SHEETS = ("exact", "near", "features", "blank", "grey-scale", "tiny", "huge", "odd aspect")


def _samples(s: "Session", split: str) -> list[tuple[str, int, str]]:
    """(path, class index, split) of the splits asked for ("all": every split there is)."""
    if s.splits is None:
        raise PgError("no data attached: `data PATH` first")
    names = [n for n in SPLITS if getattr(s.splits, n)] if split == "all" else [split]
    out = []
    for name in names:
        samples = getattr(s.splits, name, None)
        if samples is None:
            raise PgError(f"there is no {name} split in this dataset")
        out += [(p, label, name) for p, label in samples]
    return out


def _rel(s: "Session", path: str) -> str:
    return path if path.startswith("arrow:") else os.path.relpath(path, s.data["path"] if os.path.isdir(
        s.data["path"]) else os.path.dirname(s.data["path"]))


def informed(s: "Session") -> bool:
    """Whether the model's features say anything about the images: pretrained, loaded from weights or a file, or
    trained in this session. A random network's features are alike for every image."""
    if s.built is None:
        return False
    return bool(s.spec.pretrained or s.spec.weights or s.built.source == "file" or s.changes.position()[0] > 0)


def model_features(s: "Session", samples: list[tuple[str, int]]):
    """(features (N, D) of the usable images, ok mask (N,)): the head's input, the backbone in eval mode, the eval
    transform (as `probe`)."""
    from ..engine import data as D
    from ..engine.report.evaluate import eval_batch_size
    from ..engine.batches.features import compute_features, head_module_name

    if s.built is None:
        raise PgError("no model loaded: `load MODEL --pretrained` first (its features compare the images)")
    tr = s.trainer if s.running else s.ensure_trainer()
    name = head_module_name(s.built.head)
    head = s.built.module.get_submodule(name) if name else s.built.module
    transform = D.build_transform(s.built.data_config, train=False, size=int((s.data or {}).get("size") or 0),
                                  policy=s.config)  # the evaluation the session trains with: normalize, crop_pct
    job = (D.ImageDataset(samples, transform), [(i, 0) for i in range(len(samples))])

    def run():
        (x, ok, _bad), = compute_features(s.built.module, head, [job], tr.runtime,
                                          eval_batch_size(tr.cfg.batch_size), tr.cfg.workers)
        return x.cpu(), ok.cpu()

    return s.apply(run)


# ====================================================================== audit
def audit(s: "Session", split: str = "all", features: bool | None = None, out: str | None = None,
          workers: int = 2) -> dict:
    """Duplicates within and across the splits, leakage, class balance and odd images of the attached data.
    `features`: also compare the model's pooled features (None: when a model is loaded). `out`: a folder for the
    contact sheets, audit.csv and exclude.txt."""
    import numpy as np

    from ..engine.report import audit as AU

    t0 = time.perf_counter()
    samples = _samples(s, split)
    paths = [p for p, _, _ in samples]
    facts = AU.image_facts(paths, workers=workers)
    exact = AU.exact_groups(facts.digests)
    in_exact = {i for g in exact for i in g}
    near_p = AU.near_pairs(facts)
    # a near group may hold exact copies too: exact pairs join it so one image is not in two near groups
    near = [g for g in AU.groups_of(near_p + [(g[0], k) for g in exact for k in g[1:]], len(paths))
            if not set(g) <= in_exact]
    use_features = informed(s) if features is None else features
    feat = None
    if use_features:
        x, ok = model_features(s, [(p, label) for p, label, _ in samples])
        index = np.nonzero(ok.numpy())[0]
        pairs = [(int(index[a]), int(index[b]), c) for a, b, c in AU.feature_pairs(x[ok])]
        known = {frozenset((a, b)) for g in exact + near for a in g for b in g}
        feat = [g for g in AU.groups_of([p for p in pairs if frozenset(p[:2]) not in known], len(paths))]
    odd = AU.odd_images(facts)

    def member(i):
        p, label, sp = samples[i]
        return {"index": i, "path": _rel(s, p), "file": p, "split": sp, "class": s.splits.classes[label]}

    groups = {"exact": [[member(i) for i in g] for g in exact], "near": [[member(i) for i in g] for g in near],
              "features": None if feat is None else [[member(i) for i in g] for g in feat]}
    result = {
        "split": split, "images": len(paths), "seconds": 0.0, "groups": groups,
        "leakage": _leakage(groups), "conflicts": [g for kind in ("exact", "near") for g in groups[kind]
                                                   if len({m["class"] for m in g}) > 1],
        "odd": {k: [member(i) for i in v] for k, v in odd.items()},
        "bad": [(_rel(s, paths[i]), why) for i, why in sorted(facts.bad.items())],
        "counts": s.splits.counts(), "imbalance": _imbalance(s), "thresholds": AU.thresholds(),
        "features": use_features,
    }
    result["exclude"] = _exclusions(result)
    result["seconds"] = time.perf_counter() - t0
    if out:
        result["files"] = write_audit(s, result, out)
    return result


def _leakage(groups: dict) -> list[dict]:
    """For each evaluation split B and earlier split A: how many of B's images have a copy in A, exact or near."""
    out = []
    for b, a in (("val", "train"), ("test", "train"), ("test", "val")):
        seen: dict[str, set] = {"exact": set(), "near": set(), "features": set()}
        for kind in ("exact", "near", "features"):
            for g in groups[kind] or []:
                if any(m["split"] == a for m in g):
                    seen[kind] |= {m["index"] for m in g if m["split"] == b}
        near = seen["near"] - seen["exact"]
        by_features = seen["features"] - seen["exact"] - seen["near"]
        total = len(seen["exact"]) + len(near) + len(by_features)
        if total:
            parts = [f"{n} {k}" for n, k in ((len(seen["exact"]), "exact"), (len(near), "near"),
                                              (len(by_features), "by features")) if n]
            out.append({"split": b, "in": a, "images": total, "exact": len(seen["exact"]), "near": len(near),
                        "features": len(by_features),
                        "line": f"{total} {b} image{'s' * (total != 1)} also in {a} ({', '.join(parts)})"})
    return out


def _imbalance(s: "Session") -> str:
    from ..engine.report import audit as AU
    from ..engine import data as D

    counts = D.class_counts(s.splits.train, len(s.splits.classes))
    if not counts or min(counts) * AU.IMBALANCE > max(counts):
        return ""
    big, small = counts.index(max(counts)), counts.index(min(counts))
    ratio = f"{max(counts) / min(counts):.1f}x" if min(counts) else "it has none"
    return (f"imbalanced: {s.splits.classes[big]!r} has {max(counts)} training images, {s.splits.classes[small]!r} "
            f"{min(counts)} ({ratio})")


def _exclusions(result: dict) -> list[tuple[str, str]]:
    """What the exclude list suggests: of each duplicate group (exact or near) every copy but one — the one kept is
    in the evaluation split (test, then val), so an evaluation set stays what it was — and of a group whose copies
    carry different classes, all of them; blank images. Feature groups are only reported (their threshold is a
    similarity, not a copy)."""
    rows: dict[str, str] = {}
    for kind in ("exact", "near"):
        for g in result["groups"][kind]:
            classes = sorted({m["class"] for m in g})
            if len(classes) > 1:
                for m in g:
                    rows.setdefault(m["path"], f"{kind} copies under classes {', '.join(classes)}")
                continue
            keep = min(g, key=lambda m: (_EVAL_FIRST[m["split"]], m["index"]))
            for m in g:
                if m is not keep:
                    rows.setdefault(m["path"], f"{kind} duplicate of {keep['path']} ({keep['split']})")
    for m in result["odd"]["blank"]:
        rows.setdefault(m["path"], "blank")
    return sorted(rows.items())


def summary_lines(result: dict) -> list[str]:
    """The short form (what `data --check` prints): leakage, duplicates, conflicts, odd images, imbalance."""
    lines = [x["line"] for x in result["leakage"]]
    g = result["groups"]
    for kind, words in (("exact", "exact-duplicate"), ("near", "near-duplicate"), ("features", "feature-duplicate")):
        if g.get(kind):
            n = sum(len(x) for x in g[kind])
            lines.append(f"{len(g[kind])} {words} group{'s' * (len(g[kind]) != 1)} ({n} images)")
    if result["conflicts"]:
        lines.append(f"{len(result['conflicts'])} duplicate group(s) with different classes")
    odd = [f"{len(v)} {k}" for k, v in result["odd"].items() if v]
    if odd:
        lines.append("odd images: " + ", ".join(odd))
    if result["imbalance"]:
        lines.append(result["imbalance"])
    return lines


def write_audit(s: "Session", result: dict, out: str) -> dict:
    """Into folder `out`: a contact sheet per finding (exact.png, near.png, features.png, blank.png, ...: each group's
    images side by side, up to MAX_TILES tiles), audit.csv (every finding) and exclude.txt (for `data --exclude`)."""
    from ..engine.report import audit as AU
    from .review import written

    folder = Path(out).expanduser()
    if folder.suffix.lower() == ".png" or folder.is_file():
        raise PgError(f"--out is a folder for the sheets, audit.csv and exclude.txt, not {out}")

    def write():
        folder.mkdir(parents=True, exist_ok=True)
        files = {}
        for kind in SHEETS:
            groups = result["groups"].get(kind) if kind in result["groups"] else \
                [[m] for m in result["odd"].get(kind, [])]
            if groups:
                files[kind] = str(_sheet(groups, folder / f"{kind.replace(' ', '-')}.png", kind))
        rows = [(kind, n, m) for kind in ("exact", "near", "features") for n, g in
                enumerate(result["groups"][kind] or [], 1) for m in g]
        rows += [(kind, "", m) for kind, members in result["odd"].items() for m in members]
        with open(folder / "audit.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["finding", "group", "split", "class", "path"])
            w.writerows([kind, n, m["split"], m["class"], escape(m["path"])] for kind, n, m in rows)
        files["csv"] = str(folder / "audit.csv")
        AU.write_exclude(folder / "exclude.txt", result["exclude"], f"`audit` of {s.data['path']}")
        files["exclude"] = str(folder / "exclude.txt")
        return files

    return written(folder, write)


def _sheet(groups: list[list[dict]], path: Path, kind: str) -> Path:
    """One contact sheet: the groups' images in order, each tile labelled with its group, split and class."""
    import numpy as np

    from ..engine import data as D
    from ..engine.report.plot import contact_sheet_png

    images, labels, flags = [], [], []
    for n, g in enumerate(groups, 1):
        for m in g:
            if len(images) >= MAX_TILES:
                break
            try:
                images.append(np.asarray(D.load_image(m["file"], min_side=128)))
            except D.BadImage:
                continue
            labels.append((f"#{n} " if len(g) > 1 else "") + f"{m['split']}/{m['class']}"[:22])
            flags.append(len({x["class"] for x in g}) > 1)
    shown = sum(len(g) for g in groups)
    title = f"{kind}: {len(groups)} group{'s' * (len(groups) != 1)}" if any(len(g) > 1 for g in groups) else \
        f"{kind}: {shown} image{'s' * (shown != 1)}"
    if shown > len(images):
        title += f" (first {len(images)} tiles)"
    return contact_sheet_png(images, labels, path, title, wrong=flags, cols=8 if len(images) > 16 else 0,
                             tile=1.4)[0]


# ====================================================================== likely label errors (`errors --suspect`)
def suspects(s: "Session", split: str = "val", top: int = 16, checkpoint: str | None = None, probe: bool = False,
             folds: int = 5, cls: str | None = None) -> dict:
    """Images whose given label the model disbelieves, by confident learning (engine/report/audit.py). The probabilities
    must not come from a model that learned these labels: on val and test, the model's own predictions (a
    checkpoint's with `checkpoint`); on train, or with `probe`, out-of-fold predictions of a linear probe on the
    model's features (`folds` folds)."""
    import numpy as np

    from ..engine.report import audit as AU
    from . import review

    if top < 1:
        raise PgError("--top must be at least 1")
    if s.splits is None or s.built is None:
        raise PgError("errors --suspect needs a model and data: `load MODEL` and `data PATH` first")
    classes = list(s.splits.classes)
    wanted = review.class_index(classes, cls) if cls is not None else None
    if checkpoint is None and not s.changes.position()[0]:
        probe = True  # an untrained head's predictions say nothing: the probe on the features does
    note = "" if informed(s) or checkpoint is not None else (
        f"note: {s.spec.name} has random weights (never pretrained or trained): its judgement says little — "
        f"`load {s.spec.name} --pretrained` (or --weights FILE), or train first")
    if split == "train" or probe:
        if checkpoint is not None:
            raise PgError("--checkpoint is for the model's own predictions on val or test; the probe uses the "
                          "model's features as they are now")
        samples = getattr(s.splits, split) or []
        if not samples:
            raise PgError(f"there is no {split} split in this dataset")
        x, ok = model_features(s, samples)
        kept = [sm for sm, good in zip(samples, ok.tolist()) if good]
        labels = np.array([label for _, label in kept])
        try:
            probs = AU.out_of_fold_probs(x[ok], labels, len(classes), folds=folds, seed=s.config.seed)
        except ValueError as e:
            raise PgError(f"{e}: the probe needs more images (or fewer --folds)") from None
        source = {"model": f"a linear probe on {s.spec.name}'s features, out of fold ({folds} folds)",
                  "how": "probe"}
    else:
        result, kept, where = review.split_outputs(s, split, checkpoint)
        labels = result["labels"].long().numpy()
        probs = result["logits"].float().softmax(1).numpy()
        source = {"model": f"{where['model']} (epoch {where['epoch']}, step {where['step']})", "how": "model"}
    issues = AU.find_label_issues(labels, probs)
    order = AU.rank_label_issues(labels, probs)
    shown = [i for i in order if wanted is None or labels[i] == wanted]
    flagged = set(issues.tolist())
    rows = []
    for rank, i in enumerate(shown[:top], 1):
        pred = int(probs[i].argmax())
        rows.append({"rank": rank, "path": _rel(s, kept[i][0]), "file": kept[i][0], "true": classes[labels[i]],
                     "predicted": classes[pred], "probability": float(probs[i, pred]),
                     "p_true": float(probs[i, labels[i]]), "flagged": int(i) in flagged})
    return {"rows": rows, "split": split, "n": len(kept), "flagged": len(issues), "class": cls,
            "ranking": [kept[i][0] for i in order],
            "files": [p for p, _ in kept], "labels": labels, "probs": probs, "note": note,
            **source}


def write_suspects(result: dict, out: str) -> dict:
    """The suspects' contact sheet (FILE.png: each tile labelled given / believed / probability) and FILE.csv."""
    import numpy as np

    from ..engine import data as D
    from ..engine.report.plot import contact_sheet_png
    from .review import written

    out_path = Path(out)
    if out_path.suffix.lower() != ".png":
        raise PgError(f"--out draws a PNG: give FILE.png, not {out}")
    if not result["rows"]:
        raise PgError("no images to draw")
    images, labels = [], []
    for r in result["rows"]:
        try:
            images.append(np.asarray(D.load_image(r["file"], min_side=128)))
        except D.BadImage as e:
            raise PgError(f"cannot draw {r['path']}: {e}") from None
        labels.append(f"given {r['true']}\nbelieved {r['predicted']} {r['probability']:.2f}")

    def write():
        png, boxes = contact_sheet_png(images, labels, out_path, f"likely label errors ({result['split']}, "
                                       f"{result['flagged']} flagged by confident learning)",
                                       wrong=[r["flagged"] for r in result["rows"]])
        csv_path = out_path.with_suffix(".csv")
        with open(csv_path, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["rank", "path", "given", "believed", "probability", "p_given", "flagged"])
            w.writerows([r["rank"], escape(r["path"]), r["true"], r["predicted"], repr(r["probability"]),
                         repr(r["p_true"]), int(r["flagged"])] for r in result["rows"])
        return {"out": str(png), "csv": str(csv_path), "tiles": boxes}

    return written(out, write)


# ====================================================================== `data --exclude FILE`
def read_exclusion(file: str, root: str, splits) -> tuple[dict, int]:
    """({"file", "sha256", "paths"}, how many listed names are not in the data) of an exclude list: the names it
    lists (relative to the data folder, or absolute) that are samples of `splits`, relative and sorted."""
    from ..engine.report import audit as AU
    from ..engine.store.digests import file_sha256
    from .fingerprint import absolute

    path = Path(file).expanduser().resolve()
    try:
        names = AU.read_exclude(path.read_text(errors="surrogateescape"))
        sha = file_sha256(path)
    except OSError as e:
        raise PgError(f"cannot read the exclude list {file}: {e.strerror or e} (`audit --out DIR` writes "
                      "DIR/exclude.txt)") from None
    base = root if os.path.isdir(root) else os.path.dirname(root)
    present = {p for p, _ in splits.train + splits.val + (splits.test or [])}
    listed = {absolute(n, base) if not os.path.isabs(n) else os.path.normpath(n) for n in names}
    found = sorted(p if p.startswith("arrow:") else os.path.relpath(p, base) for p in listed & present)
    if names and not found:
        raise PgError(f"none of the {len(names)} files {file} lists is in {root}: is it the list of this data? "
                      "(paths are relative to the data folder)")
    return {"file": str(path), "sha256": sha, "paths": found}, len(listed - present)

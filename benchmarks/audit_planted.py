"""Plant duplicates, near-duplicates and label flips in a copy of a class-folder dataset, run `audit` and
`errors --suspect` through the session, and measure what they find.

    nice -n 10 python benchmarks/audit_planted.py ../shared/datasets/cifar10-test --out /tmp/audit-bench \\
        [--weights FILE --model efficientnet_lite0 --size 128 --normalize 0.5/0.5 --crop-pct 1]

The copy (never the source) is laid out as train/ and val/ (every fifth image of each class to val), then:
- 50 exact duplicates across the split: 50 val images copied byte for byte into train/ under other names;
- 50 near-duplicates across the split: 50 other val images into train/ as a copy re-encoded (JPEG quality 50), resized
  (to 3/4 or 3/2 of the side) or slightly cropped (0-2 pixels off each side, at random) — a third each;
- 100 label flips: 100 training images moved into another (random) class folder.
Figures: the recall of each planted kind; near-duplicate groups reported that hold no planted copy (the data's own
near-duplicates count here: CIFAR-10's test set holds some, ciFAIR lists them — look at OUT/audit/near.png with
--sheets); the audit's time without features;
with --weights (a model whose features are worth probing), the share of the flips among the first 200 images of the
label-error ranking, from out-of-fold linear-probe predictions on the training split.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from pgshell.session import Session  # noqa: E402
from pgshell.session import dataaudit as AU  # noqa: E402


def build_copy(source: Path, out: Path, seed: int) -> dict:
    """The train/val copy with the planted cases; returns what was planted (paths relative to the copy)."""
    rng = random.Random(seed)
    data = out / "data"
    if data.exists():
        shutil.rmtree(data)
    classes = sorted(d.name for d in source.iterdir() if d.is_dir() and not d.name.startswith("."))
    val, train = [], []
    for c in classes:
        for k, f in enumerate(sorted((source / c).iterdir())):
            split = "val" if k % 5 == 0 else "train"
            dst = data / split / c / f.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(f, dst)
            (val if split == "val" else train).append(dst)
    picked = rng.sample(val, 100)
    exact, near = [], []
    for k, src in enumerate(picked[:50]):
        dst = data / "train" / src.parent.name / f"dup-{k:03d}{src.suffix}"
        shutil.copyfile(src, dst)
        exact.append((rel(src, data), rel(dst, data)))
    for k, src in enumerate(picked[50:]):
        im = Image.open(src).convert("RGB")
        w, h = im.size
        kind = ("reencoded", "resized", "cropped")[k % 3]
        if kind == "reencoded":
            buf = io.BytesIO()
            im.save(buf, "JPEG", quality=50)
            copy, ext = Image.open(io.BytesIO(buf.getvalue())), ".jpg"
        elif kind == "resized":
            f = (0.75, 1.5)[k % 2]
            copy, ext = im.resize((round(w * f), round(h * f)), Image.Resampling.BICUBIC), ".png"
        else:
            copy, ext = im.crop((rng.randint(0, 2), rng.randint(0, 2), w - rng.randint(0, 2),
                                 h - rng.randint(0, 2))), ".png"
        dst = data / "train" / src.parent.name / f"near-{kind}-{k:03d}{ext}"
        copy.save(dst, quality=95) if ext == ".jpg" else copy.save(dst)
        near.append((rel(src, data), rel(dst, data), kind))
    flips = []
    for src in rng.sample(train, 100):
        other = rng.choice([c for c in classes if c != src.parent.name])
        dst = data / "train" / other / f"flip-{src.parent.name}-{src.name}"
        src.rename(dst)
        flips.append(rel(dst, data))
    return {"data": str(data), "exact": exact, "near": near, "flips": flips}


def rel(p: Path, root: Path) -> str:
    return str(p.relative_to(root))


def pairs_of(groups: list[list[dict]]) -> set[frozenset]:
    return {frozenset((a["path"], b["path"])) for g in groups for a in g for b in g if a["path"] < b["path"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("source", type=Path, help="a folder of class folders (it is copied, never changed)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/audit-bench"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workers", type=int, default=2, help="threads reading the images for the audit")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--weights", default="", help="weights for --model (the label-error part runs with them)")
    ap.add_argument("--size", type=int, default=224, help="the model's input size for the feature pass")
    ap.add_argument("--sheets", action="store_true", help="also write the audit's contact sheets to OUT/audit")
    ap.add_argument("--normalize", default="model",
                    help="the `normalize` setting for the feature pass (lukemelas' Lite weights expect 0.5/0.5)")
    ap.add_argument("--crop-pct", type=float, default=0.0, help="the `crop_pct` setting (1: the whole image)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch's CPU threads for the feature pass (1: on a busy machine OpenMP's waits cost more)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)

    planted = build_copy(args.source, args.out, args.seed)
    s = Session(root=args.out / "sessions")
    report = {"load": os.getloadavg(), "cores": len(os.sched_getaffinity(0))}
    try:
        s.set("batch_size", 64)
        s.set("normalize", args.normalize)
        if args.crop_pct:
            s.set("crop_pct", args.crop_pct)
        s.attach_data(planted["data"], size=args.size)
        t0, c0 = time.perf_counter(), time.process_time()
        res = AU.audit(s, features=False, workers=args.workers,
                       out=str(args.out / "audit") if args.sheets else None)
        # wall time depends on what else the cores run; the CPU time of this process (both threads) does not
        report["audit_seconds"], report["audit_cpu_seconds"] = time.perf_counter() - t0, time.process_time() - c0
        report["images"] = res["images"]
        exact_found = pairs_of(res["groups"]["exact"])
        near_found = pairs_of(res["groups"]["near"])
        exact_hits = sum(frozenset(p) in exact_found for p in planted["exact"])
        near_hits = {kind: sum(frozenset((a, b)) in near_found for a, b, k in planted["near"] if k == kind)
                     for kind in ("reencoded", "resized", "cropped")}
        planted_files = {x for a, b, _ in planted["near"] for x in (a, b)} | {x for p in planted["exact"] for x in p}
        unplanted = [[m["path"] for m in g] for g in res["groups"]["near"]
                     if not {m["path"] for m in g} & planted_files]  # the data's own near-duplicates, or false alarms
        unplanted_images = {x for g in unplanted for x in g}
        report.update(
            exact_recall=exact_hits / len(planted["exact"]), near_recall=sum(near_hits.values()) / len(planted["near"]),
            near_by_kind={k: f"{v}/{sum(x[2] == k for x in planted['near'])}" for k, v in near_hits.items()},
            near_groups=len(res["groups"]["near"]), near_groups_unplanted=len(unplanted),
            near_unplanted_images=len(unplanted_images),
            near_unplanted_images_share=len(unplanted_images) / res["images"],
            leakage=[x["line"] for x in res["leakage"]], unplanted_groups=unplanted)
        print(json.dumps({k: v for k, v in report.items() if k != "unplanted_groups"}, indent=1), flush=True)
        if args.weights:
            s.load_model(args.model, weights=args.weights)
            t0 = time.perf_counter()
            sus = AU.suspects(s, split="train", top=200, probe=True)
            report["suspect_seconds"] = time.perf_counter() - t0
            top = {os.path.relpath(p, planted["data"]) for p in sus["ranking"][:200]}
            flagged = {os.path.relpath(p, planted["data"]) for p in sus["ranking"][:sus["flagged"]]}
            flips = set(planted["flips"])
            is_flip = np.array([os.path.relpath(p, planted["data"]) in flips for p in sus["files"]])
            labels, probs = sus["labels"], sus["probs"]
            other = probs.copy()
            other[np.arange(len(labels)), labels] = -1
            margin = probs[np.arange(len(labels)), labels] - other.max(1)  # cleanlab's normalized margin, unscaled
            np.savez(args.out / "probs.npz", labels=labels, probs=probs, is_flip=is_flip)
            report["flips_in_top200_by_margin_alone"] = float(is_flip[np.argsort(margin, kind="stable")[:200]].mean()
                                                              * 200 / len(flips))
            report.update(flips_in_top200=len(top & flips) / len(flips),
                          flagged=sus["flagged"], flips_flagged=len(flagged & flips),
                          probe_accuracy_on_given_labels=float((sus["probs"].argmax(1) == sus["labels"]).mean()))
    finally:
        s.close(save=False)
    report["load_after"] = os.getloadavg()
    (args.out / "report.json").write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "unplanted_groups"}, indent=1))
    print(f"(the unplanted near-duplicate groups are listed in {args.out / 'report.json'})")


if __name__ == "__main__":
    main()

"""The best model from a fixed train/val/test split: pgshell's recipes on EfficientNet-Lite0, pretrained against
random weights, several seeds, with each run's best and last epoch checkpoints and its uniform and greedy soups, all
evaluated on val and test; optionally one `autofit --budget` run on the same split.

    python benchmarks/best_model.py --data /work/shared/datasets/sign-language-digits --name signlang \
        --fractions 0.6,0.2,0.2 --size 64 --recipes frozen,best --inits pretrained,random --seeds 0,1,2 --epochs 4
    python benchmarks/best_model.py --data /work/shared/datasets/cifar10-test --name cifar300 --per-class 300,100,100 \
        --size 64 --recipes default,finetune --inits pretrained --seeds 0,1,2 --epochs 4
    nice -n -5 python benchmarks/best_model.py --data /work/shared/datasets/sign-language-digits --name signlang \
        --fractions 0.6,0.2,0.2 --recipes none --autofit 15m

The split is built once as a symlink tree outside the project (/tmp/pgbench/NAME/{train,val,test}/<class>/, which
pgshell's scan_folder takes as it is): each class's sorted files shuffled by `--data-seed` (independent of the
training seeds), then cut by `--fractions` or capped by `--per-class TRAIN,VAL,TEST`. Every run is a
pgshell.session.Session in this process, driven as a user types it (the settings are printed per recipe):

- `frozen`: the seed's fixed feature extractor — `freeze backbone`, SGD lr 0.01, 10 epochs (stored features), the
  mild small-image policy (crop_scale 0.5, color_jitter 0, crop_pct 1, scheduler none), as benchmarks/transfer.py;
- `best`: `frozen`, then `unfreeze all`, lr 0.001, backbone_lr_scale 0.1, bn_stats frozen (random weights: auto,
  i.e. update), `train E` — the frozen figures of a `best` run are its first phase, so `frozen` alone is not rerun
  when both are asked for (the same seed and steps give the same weights);
- `default`: `load --pretrained` (or not) and `train E` with pgshell's defaults;
- `finetune`: `finetune E` (its defaults: --head-epochs 1, --backbone-lr-scale 0.1) with the other defaults;
- `adamw`: what `autofit --budget 15m` chose on the sign-language split, fixed: everything from the start, AdamW lr
  6e-4, weight decay 0.05, cosine over E epochs, the mild policy with crop_scale 0.8, backbone_lr_scale 0.1.

For the fine-tuning recipes the soups are made of the epoch checkpoints of the phase that trains the whole model
(`soup --uniform --checkpoints ...`, `soup --greedy --checkpoints ...` through session/best.py, BatchNorm recomputed
where the ingredients differ as it does by default); the best single checkpoint is the one of those with the highest
logged val accuracy. Seconds per epoch are wall time over the `train` call(s) of a phase, evaluations included.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from pgshell.session import Session  # noqa: E402

IMAGE_EXT = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
SMALL_POLICY = {"crop_scale": 0.5, "color_jitter": 0.0, "crop_pct": 1.0, "scheduler": "none"}
HEAD = {"lr": 0.01, "epochs": 10}
START = time.perf_counter()


def say(text: str) -> None:
    print(f"[{time.perf_counter() - START:7.1f}s] {text}", flush=True)


# ====================================================================== the split
def build_split(data: str, name: str, data_seed: int, fractions: list[float] | None, per_class: list[int] | None,
                root: str = "/tmp/pgbench") -> Path:
    """The symlink tree root/NAME/{train,val,test}/<class>/ (rebuilt every time: the same arguments give the same
    tree); prints its counts."""
    src = Path(data).resolve()
    out = Path(root) / name
    if out.exists():
        shutil.rmtree(out)
    counts = {"train": 0, "val": 0, "test": 0}
    for cls in sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(p for p in (src / cls).rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXT
                       and not p.name.startswith("."))
        random.Random(f"{data_seed}:{cls}").shuffle(files)
        if per_class:
            n_tr, n_va, n_te = per_class
            if n_tr + n_va + n_te > len(files):
                raise SystemExit(f"class {cls} has {len(files)} images, fewer than --per-class asks")
        else:
            n_tr, n_va = round(fractions[0] * len(files)), round(fractions[1] * len(files))
            n_te = len(files) - n_tr - n_va
        parts = {"train": files[:n_tr], "val": files[n_tr:n_tr + n_va], "test": files[n_tr + n_va:n_tr + n_va + n_te]}
        for split, chosen in parts.items():
            d = out / split / cls
            d.mkdir(parents=True)
            for f in chosen:
                os.symlink(f, d / "_".join(f.relative_to(src / cls).parts))
            counts[split] += len(chosen)
    cut = f"per class {','.join(map(str, per_class))}" if per_class else f"fractions {','.join(map(str, fractions))}"
    say(f"split {out}: train {counts['train']}, val {counts['val']}, test {counts['test']} (data seed {data_seed}, "
        f"{cut})")
    return out


# ====================================================================== one session
def new_session(args, split: Path, init: str, seed: int, root: Path, label: str) -> Session:
    s = Session(root=root / f"{label}-{init}-{seed}", notify=lambda m: say("  | " + m) if args.verbose else None)
    s.set("seed", seed)
    s.attach_data(str(split), size=args.size)
    s.load_model(args.model, pretrained=init == "pretrained")
    return s


def settings(s: Session, values: dict) -> list[str]:
    for k, v in values.items():
        s.set(k, v)
    return [f"set {k} {v}" for k, v in values.items()]


def timed_train(s: Session, epochs: int, finetune: bool = False) -> float:
    t0 = time.perf_counter()
    if finetune:
        s.finetune(epochs)
    else:
        s.train(epochs)
    s.wait()
    err = s.status.get("error")
    if err:
        raise RuntimeError(f"training failed: {err}")
    return time.perf_counter() - t0


def accuracy(s: Session, split: str) -> float:
    return s.evaluate(split)["accuracy"]


def checkpoints_of(s: Session, first_epoch: int) -> list[str]:
    from pgshell.session import review

    return [str(r["epoch"]) for r in review.list_checkpoints(s)
            if r["kind"] == "epoch" and r["val_accuracy"] is not None and r["epoch"] >= first_epoch]


def soups(s: Session, first_epoch: int, out: dict) -> None:
    """Best single, last, uniform and greedy soups of the epoch checkpoints from `first_epoch` on."""
    from pgshell.session import best as B

    names = checkpoints_of(s, first_epoch)
    out["last_val"], out["last_test"] = s.trainer.last["val_accuracy"], accuracy(s, "test")
    for mode in ("uniform", "greedy"):
        t0 = time.perf_counter()
        res = B.soup(s, mode, checkpoints=names)
        out[f"{mode}_val"], out[f"{mode}_test"] = res["val"]["accuracy"], res["test"]["accuracy"]
        out[f"{mode}_s"] = time.perf_counter() - t0
        if mode == "greedy":
            out["greedy_n"] = len(res["members"])
        single = res["best_single"]
        out["best_val"], out["best_test"] = single["val_accuracy"], single["test_accuracy"]
        out["best_file"] = single["file"]
    out["soup_cmds"] = f"soup --uniform --checkpoints {' '.join(names)}; soup --greedy --checkpoints {' '.join(names)}"


# ====================================================================== the recipes
def recipe_frozen(args, s: Session, init: str) -> dict:
    cmds = settings(s, {**SMALL_POLICY, "lr": HEAD["lr"]})
    s.freeze(["backbone"])
    cmds += ["freeze backbone", f"train {HEAD['epochs']}"]
    seconds = timed_train(s, HEAD["epochs"])
    return {"cmds": cmds, "frozen_val": s.trainer.last["val_accuracy"], "frozen_test": accuracy(s, "test"),
            "frozen_spe": seconds / HEAD["epochs"]}


def recipe_best(args, s: Session, init: str) -> dict:
    out = recipe_frozen(args, s, init)
    s.freeze(["all"], unfreeze=True)
    ft = {"lr": 0.001, "backbone_lr_scale": 0.1, "epochs": HEAD["epochs"] + args.epochs}
    if init == "pretrained":
        ft["bn_stats"] = "frozen"
    out["cmds"] += ["unfreeze all"] + settings(s, ft) + [f"train {args.epochs}"]
    out["spe"] = timed_train(s, args.epochs) / args.epochs
    soups(s, HEAD["epochs"] + 1, out)
    return out


def recipe_default(args, s: Session, init: str) -> dict:
    out = {"cmds": [f"train {args.epochs}"]}
    out["spe"] = timed_train(s, args.epochs) / args.epochs
    soups(s, 1, out)
    return out


def recipe_finetune(args, s: Session, init: str) -> dict:
    out = {"cmds": [f"finetune {args.epochs}"]}
    out["spe"] = timed_train(s, args.epochs, finetune=True) / (args.epochs + 1)  # the head epoch counted
    soups(s, 2, out)
    return out


def recipe_adamw(args, s: Session, init: str) -> dict:
    """What `autofit --budget 15m` chose on the sign-language split (its trial 7), as a fixed recipe over E epochs:
    everything trained from the start (no frozen-head phase), AdamW, cosine over the run, the backbone at lr x 0.1."""
    cmds = settings(s, {"optimizer": "adamw", "lr": 6e-4, "weight_decay": 0.05, "scheduler": "cosine",
                        "warmup_epochs": 0, "color_jitter": 0.0, "crop_pct": 1.0, "crop_scale": 0.8,
                        "backbone_lr_scale": 0.1, "epochs": args.epochs})
    out = {"cmds": cmds + [f"train {args.epochs}"]}
    out["spe"] = timed_train(s, args.epochs) / args.epochs
    soups(s, 1, out)
    return out


RECIPES = {"frozen": recipe_frozen, "best": recipe_best, "default": recipe_default, "finetune": recipe_finetune,
           "adamw": recipe_adamw}
ROWS = [("frozen head (10 epochs)", "frozen_val", "frozen_test"), ("best single checkpoint", "best_val", "best_test"),
        ("last checkpoint", "last_val", "last_test"), ("uniform soup", "uniform_val", "uniform_test"),
        ("greedy soup", "greedy_val", "greedy_test")]


def summary(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    each = ", ".join(f"{100 * v:.1f}" for v in values)
    return f"{100 * statistics.mean(values):5.1f}% ± {100 * sd:3.1f} ({each})"


def report(recipe: str, init: str, results: list[dict]) -> None:
    say(f"== {recipe} / {init}, {len(results)} seed(s): mean ± sd (per seed), val | test")
    for label, kv, kt in ROWS:
        if kv in results[0]:
            print(f"   {label:24s} val {summary([r[kv] for r in results])}   test "
                  f"{summary([r[kt] for r in results])}", flush=True)
    for key, label in (("frozen_spe", "s/epoch frozen head"), ("spe", "s/epoch training")):
        if key in results[0]:
            print(f"   {label:24s} {statistics.mean(r[key] for r in results):.1f} "
                  f"({', '.join(f'{r[key]:.1f}' for r in results)})", flush=True)
    if "greedy_n" in results[0]:
        print(f"   greedy soup kept {', '.join(str(r['greedy_n']) for r in results)} checkpoint(s); soups took "
              f"{statistics.mean(r['uniform_s'] + r['greedy_s'] for r in results):.0f} s a run; best single: "
              f"{', '.join(r['best_file'] for r in results)}", flush=True)


def run_recipes(args, split: Path, work: Path) -> None:
    recipes = [r for r in args.recipes.split(",") if r and r != "none"]
    if "best" in recipes and "frozen" in recipes:
        recipes.remove("frozen")  # its figures are `best`'s first phase
        say("frozen: measured as the first phase of each `best` run (the same seed and steps)")
    for recipe in recipes:
        for init in args.inits.split(","):
            results = []
            for seed in (int(v) for v in args.seeds.split(",")):
                s = new_session(args, split, init, seed, work, recipe)
                t0 = time.perf_counter()
                r = RECIPES[recipe](args, s, init)
                s.close(save=False)
                shutil.rmtree(work / f"{recipe}-{init}-{seed}", ignore_errors=True)
                if not results:
                    say(f"{recipe} / {init}: data {split} --size {args.size}; load {args.model}"
                        f"{' --pretrained' if init == 'pretrained' else ''}; set seed S; " + "; ".join(r["cmds"])
                        + (f"; {r['soup_cmds']}" if "soup_cmds" in r else ""))
                results.append(r)
                say(f"{recipe} / {init} seed {seed} ({time.perf_counter() - t0:.0f} s): " + "  ".join(
                    f"{k} {100 * r[k]:.1f}" for k in r if k.endswith(("_val", "_test")))
                    + "  " + "  ".join(f"{k} {r[k]:.1f}" for k in ("frozen_spe", "spe") if k in r))
            report(recipe, init, results)


# ====================================================================== autofit
def run_autofit(args, split: Path, work: Path) -> None:
    from pgshell.session import review
    from pgshell.session.autofit import read_state, start_autofit

    s = Session(root=work / "autofit", notify=lambda m: say("  | " + m))
    s.set("seed", int(args.seeds.split(",")[0]))
    s.attach_data(str(split), size=args.size)
    s.load_model(args.model, pretrained=True)
    say(f"autofit: data {split} --size {args.size}; load {args.model} --pretrained; autofit --budget {args.autofit}")
    t0 = time.perf_counter()
    say(start_autofit(s, args.autofit))
    s.wait()
    wall = time.perf_counter() - t0
    state = read_state(s) or {}
    say(f"autofit wall time {wall:.1f} s (budget {state.get('budget')}, spent by its own count "
        f"{state.get('spent', 0):.1f} s, done {state.get('done')}); phases ended at {state.get('ended')}")
    for d in state.get("decisions", []):
        print(f"   decision: {d}", flush=True)
    for t in state.get("trials", []):
        print(f"   trial: {t}", flush=True)
    print(f"   final: {state.get('final')}", flush=True)
    live = review.evaluate(s, ["val", "test"])
    say(f"autofit final run's last weights: val {100 * live[0]['accuracy']:.1f}%  test "
        f"{100 * live[1]['accuracy']:.1f}%")
    if state.get("soup"):
        soup = review.evaluate(s, ["val", "test"], checkpoint="soup")
        say(f"autofit soup ({len(state['soup']['members'])} members): val {100 * soup[0]['accuracy']:.1f}%  test "
            f"{100 * soup[1]['accuracy']:.1f}%  <- its final model")
    if s.best:
        best = review.evaluate(s, ["val", "test"], checkpoint="best")
        say(f"autofit best checkpoint ({s.best.get('path')}): val {100 * best[0]['accuracy']:.1f}%  test "
            f"{100 * best[1]['accuracy']:.1f}%")
    s.close(save=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True, help="a folder of class folders")
    ap.add_argument("--name", required=True, help="the split's name under --split-root")
    ap.add_argument("--split-root", default="/tmp/pgbench")
    ap.add_argument("--data-seed", type=int, default=0, help="the split's shuffle (not a training seed)")
    ap.add_argument("--fractions", default="0.6,0.2,0.2", help="train,val,test fractions of each class")
    ap.add_argument("--per-class", help="TRAIN,VAL,TEST images of each class instead of --fractions")
    ap.add_argument("--model", default="efficientnet_lite0")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--recipes", default="frozen,best", help=f"of {', '.join(RECIPES)} (or none)")
    ap.add_argument("--inits", default="pretrained,random")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--epochs", type=int, default=4, help="E: the fine-tuning epochs")
    ap.add_argument("--autofit", metavar="BUDGET", help="also one `autofit --budget BUDGET` run (pretrained)")
    ap.add_argument("--verbose", action="store_true", help="print pgshell's notices (epoch lines) too")
    args = ap.parse_args()
    fractions = [float(v) for v in args.fractions.split(",")]
    per_class = [int(v) for v in args.per_class.split(",")] if args.per_class else None
    split = build_split(args.data, args.name, args.data_seed, fractions, per_class, args.split_root)
    work = Path(tempfile.mkdtemp(prefix="pgbench-runs-"))
    say(f"{args.model} at {args.size} px; E = {args.epochs}; seeds {args.seeds}; load {os.getloadavg()}")
    try:
        run_recipes(args, split, work)
        if args.autofit:
            run_autofit(args, split, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    say(f"done; load {os.getloadavg()}")


if __name__ == "__main__":
    main()

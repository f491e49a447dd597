"""Evaluation and graphs: plots read back from metrics.csv, checkpoint evaluation that reproduces the logged validation
exactly, predictions, exports run back, retention, TensorBoard event files read back.

One short real run is shared by most tests (`trained`): test_resnet at 32 px on three colour classes, `train --steps
3`, `train --steps 2` (a new run id at step 4, inside epoch 1), `train 2` (a new run id at step 6) — 12 steps, 3
epochs of 4 batches, validation at steps 4, 8 and 12. Tests that use it only read.
"""

import csv
import io
import json
import math
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from PIL import Image

from pgshell.session import review as A
from pgshell.engine.store import checkpoint as C
from pgshell.engine.report import plot as P
from pgshell.engine.train.metrics import EXACT_COLUMNS, read_rows
from pgshell.session import Session
from pgshell.shell import PgShell

from conftest import ROOT, WAIT, make_images, make_split, new_app, pgshell_here, run, weights_of

CLASSES = ["cat", "dog", "fox"]
SETUP = ["set batch_size 8", "set lr 0.05", "set augment off"]


def ok(app, line):
    good, result = run(app, line)
    assert good, f"{line!r} failed"
    return result


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("analysis")
    data = make_split(tmp / "tv")
    app = new_app(tmp / "sessions")
    for line in [f"data {data} --size 32", "load test_resnet", *SETUP, "set tensorboard on",
                 "train --steps 3", "train --steps 2", "train 2"]:
        ok(app, line)
    s = app.session
    assert (s.trainer.pos.epoch, s.trainer.pos.step) == (3, 12)
    yield app, tmp
    s.close(save=False)


def _rows(s):
    return read_rows(s.folder / "metrics.csv")


# ------------------------------------------------------------------ graphs
def test_plot_reads_back_batches_epochs_and_pauses(trained):
    app, tmp = trained
    s = app.session
    rows = _rows(s)
    train = [r for r in rows if r["split"] == "train"]
    val = [r for r in rows if r["split"] == "val"]
    res = ok(app, "plot --metric loss --smooth 4")
    ser = res["series"][s.name]
    assert ser["train"]["step"] == list(range(1, 13)) and len(train) == 12
    assert ser["train"]["loss"] == [float(r["loss"]) for r in train]
    assert ser["train"]["accuracy"] == [float(r["accuracy"]) for r in train]
    assert len(ser["smoothed"]["loss"]) == 12
    assert ser["smoothed"]["loss"][-1] == pytest.approx(sum(ser["train"]["loss"][-4:]) / 4)
    assert ser["smoothed"]["loss"][0] == ser["train"]["loss"][0]
    assert ser["val"]["step"] == [4, 8, 12] == ser["epoch_ends"] and len(val) == 3
    assert ser["val"]["loss"] == [float(r["loss"]) for r in val]
    # `train --steps 2` started a new run at step 4 and `train 2` one at step 6, each after a run that had finished:
    # no pause (tests/test_review.py marks a real one)
    assert ser["train"]["run"][3] != ser["train"]["run"][2] and ser["pauses"] == []
    # the terminal plot: 15 canvas rows, then the axis row carrying the marks (the epoch ends at steps 4 and 8; the
    # one at 12 is the right edge)
    lines = res["text"].splitlines()
    axis = next(ln for ln in lines if "└" in ln)
    assert axis.count("▲") == 0 and axis.count("┴") == 3
    assert lines.index(axis) == 16 and "o" in "".join(lines[1:16])


def test_plot_png_is_a_real_png(trained):
    app, tmp = trained
    out = tmp / "graphs" / "run.png"
    res = ok(app, f"plot --out {out}")
    assert res["out"] == str(out) and app.stdout.getvalue().rstrip().endswith(f"wrote {out}")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    with Image.open(out) as im:
        im.verify()
    with Image.open(out) as im:
        assert im.size == (1000, 960)  # three panels (loss, accuracy, lr) at 100 dpi


def _write_session(root: Path, name: str, rows: list[dict]) -> Path:
    folder = root / name
    folder.mkdir(parents=True)
    with open(folder / "metrics.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["step", "epoch", "batch", "split", "loss", "accuracy", "lr", "images",
                                          "seconds", "run", "trial"])
        w.writeheader()
        w.writerows(rows)
    (root / f"{name}.session").write_text(json.dumps({"format": "pgshell-session", "version": 1, "folder": name}))
    return root / f"{name}.session"


def _synthetic(n, run_change_at=None, trial="", scale=1.0):
    rows = []
    for step in range(1, n + 1):
        rows.append({"step": step, "epoch": (step - 1) // 5 + 1, "batch": (step - 1) % 5 + 1, "split": "train",
                     "loss": scale / step, "accuracy": step / n, "lr": 0.1, "images": 8, "seconds": 0.1,
                     "run": 2 if run_change_at and step >= run_change_at else 1, "trial": trial})
        if step % 5 == 0:
            rows.append({"step": step, "epoch": step // 5, "batch": 0, "split": "val", "loss": scale / step / 2,
                         "accuracy": 0.5, "lr": 0.1, "images": 4, "seconds": "", "run": 1, "trial": trial})
    return rows


def test_plot_series_is_a_pure_function_of_the_rows():
    rows = _synthetic(10, run_change_at=7) + _synthetic(5, trial="3", scale=9.0)
    rows.insert(3, dict(rows[3], loss="nan"))  # a batch whose images were all bad
    del rows[4]
    ser = P.plot_series(rows, smooth=3)
    assert ser["train"]["step"] == list(range(1, 11)) and ser["pauses"] == [7] and ser["epoch_ends"] == [5, 10]
    assert math.isnan(ser["train"]["loss"][3])
    assert ser["smoothed"]["loss"][4] == pytest.approx((1 / 3 + 1 / 5 + 1 / 2) / 3)  # the NaN is skipped
    trial = P.plot_series(rows, smooth=1, trial="3")
    assert trial["train"]["loss"] == [9.0 / s for s in range(1, 6)] and trial["pauses"] == []
    assert trial["smoothed"]["loss"] == trial["train"]["loss"]


def test_plot_overlays_sessions_and_selects_trials(tmp_path):
    a = _write_session(tmp_path, "alpha", _synthetic(10, run_change_at=4))
    b = _write_session(tmp_path, "beta", _synthetic(20) + _synthetic(6, trial="1", scale=5.0))
    app = new_app(tmp_path / "s")
    try:
        res = ok(app, f"plot {a} {b} --metric accuracy")
        assert res["names"] == ["alpha", "beta"]
        assert len(res["series"]["alpha"]["train"]["step"]) == 10 and len(res["series"]["beta"]["train"]["step"]) == 20
        assert res["series"]["alpha"]["pauses"] == [4] and res["series"]["beta"]["pauses"] == []
        assert "⣿ alpha" in res["text"] and "• beta" in res["text"]
        out = tmp_path / "both.png"
        assert ok(app, f"plot {a} {b} --out {out}")["out"] == str(out) and out.stat().st_size > 10_000
        res = ok(app, f"plot {b} --trial 1 --metric loss")
        assert res["series"]["beta"]["train"]["loss"] == [5.0 / s for s in range(1, 7)]
        good, _ = run(app, f"plot {a} --trial 9")
        assert not good
        assert ok(app, "checkpoints") == []  # a new session: nothing yet, and no error
    finally:
        app.session.close(save=False)


# ------------------------------------------------------------------ evaluation
def test_eval_checkpoint_reproduces_logged_validation_exactly(trained):
    app, _ = trained
    s = app.session
    val = {int(r["epoch"]): r for r in _rows(s) if r["split"] == "val"}
    before, pos = weights_of(s.built.module), dict(vars(s.trainer.pos))
    for epoch in (1, 2):
        rep = ok(app, f"eval --checkpoint {epoch}")["val"]
        assert rep["loss"] == float(val[epoch]["loss"]) and rep["accuracy"] == float(val[epoch]["accuracy"])
        assert rep["n"] == 12 and rep["epoch"] == epoch and rep["step"] == 4 * epoch
        assert sum(map(sum, rep["confusion"])) == 12 and [c["support"] for c in rep["per_class"]] == [4, 4, 4]
        assert rep["top5"] is None  # 3 classes: top-5 is meaningless
    # the live model and its position were not touched
    assert all(torch.equal(v, before[k]) for k, v in weights_of(s.built.module).items())
    assert dict(vars(s.trainer.pos)) == pos
    # `last` is the resume point (epoch 3): the same numbers as the live model and the step-12 val row
    last, live = ok(app, "eval --checkpoint last")["val"], ok(app, "eval")["val"]
    assert last["loss"] == live["loss"] == float(val[3]["loss"])
    assert last["confusion"] == live["confusion"]


def test_eval_report_matches_predictions(trained):
    app, tmp = trained
    out = tmp / "confusion.png"
    rep = ok(app, f"eval --split train --out {out}")["train"]
    assert rep["n"] == 30 and rep["classes"] == CLASSES
    cm = torch.tensor(rep["confusion"])
    assert cm.sum() == 30 and cm.diag().sum().item() / 30 == rep["accuracy"]
    for i, c in enumerate(rep["per_class"]):
        assert c["support"] == cm[i].sum()
        assert c["recall"] == pytest.approx(cm[i, i].item() / cm[i].sum().item())
    with Image.open(out) as im:
        assert im.format == "PNG" and im.size[0] > 100


def test_classification_report_on_known_logits():
    from pgshell.engine.report.evaluate import classification_report

    classes = [f"c{i}" for i in range(7)]
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 3, 4, 5, 6])
    pred = torch.tensor([0, 1, 1, 1, 2, 0, 3, 4, 6, 6])
    logits = torch.full((10, 7), -5.0)
    logits[torch.arange(10), pred] = 5.0
    logits[torch.arange(10), labels] = torch.where(pred == labels, 5.0, 1.0)  # true class second best when wrong
    rep = classification_report(logits, labels, classes)
    assert rep["accuracy"] == 0.7 and rep["top5"] == 1.0
    c0, c1 = rep["per_class"][0], rep["per_class"][1]
    assert (c0["precision"], c0["recall"], c0["support"]) == (0.5, 0.5, 2)
    assert c1["precision"] == pytest.approx(2 / 3) and c1["recall"] == 1.0 and c1["f1"] == pytest.approx(0.8)
    assert rep["per_class"][5] == {"class": "c5", "precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 1}
    assert rep["confusion"][0] == [1, 1, 0, 0, 0, 0, 0] and rep["confusion"][5][6] == 1
    assert {(x["true"], x["predicted"], x["count"]) for x in rep["confused"]} == {("c0", "c1", 1), ("c2", "c0", 1),
                                                                               ("c5", "c6", 1)}


def test_eval_of_a_checkpoint_mid_run_leaves_the_run_exact(tmp_path, trained):
    """A checkpoint evaluated while training runs (between two batches, on its own copy): the run's metrics rows
    are exactly those of the shared run, which was trained with the same settings."""
    app, tmp = trained
    ref = [tuple(r[c] for c in EXACT_COLUMNS) for r in _rows(app.session) if int(r["step"]) <= 8]
    s = Session(root=tmp_path / "sessions")
    for line in SETUP:
        s.set(*line.split()[1:])
    s.attach_data(str(tmp / "tv"), size=32)
    s.load_model("test_resnet")
    s.use_name("busy")
    hold, release, result = threading.Event(), threading.Event(), {}

    def at_batch(info):
        if info["step"] == 6:
            hold.set()
            release.wait(WAIT)

    s.batch_listeners.append(at_batch)
    queued, put = threading.Event(), s.worker.changes.put

    def put_and_tell(item, *args, **kw):  # the evaluation is queued for the worker: it runs between two batches
        put(item, *args, **kw)
        queued.set()

    s.worker.changes.put = put_and_tell
    s.train(epochs=2)
    assert hold.wait(WAIT)
    t = threading.Thread(target=lambda: result.update(rep=A.evaluate(s, ["val"], "1")[0]))
    t.start()
    assert queued.wait(WAIT)
    release.set()
    t.join(WAIT)
    assert s.wait(WAIT) and s.trainer.pos.step == 8
    rows = [tuple(r[c] for c in EXACT_COLUMNS) for r in _rows(s)]
    assert rows == ref
    assert result["rep"]["loss"] == float(next(r[4] for r in ref if r[3] == "val" and r[1] == "1"))
    s.close(save=False)


# ------------------------------------------------------------------ predictions
def test_predict_known_classes_and_after_reopening(trained, tmp_path):
    app, tmp = trained
    new = make_images(tmp_path / "new", per_class=3, seed=11)  # unseen images of the three classes
    res = ok(app, f"predict {new} --top 2")
    assert [r["path"].split(os.sep)[0] for r in res["rows"]] == [c for c in CLASSES for _ in range(3)]
    for r in res["rows"]:
        assert r["top"][0][0] == r["path"].split(os.sep)[0]  # every image gets its own class first
        assert len(r["top"]) == 2 and r["top"][0][1] >= r["top"][1][1] and r["top"][0][1] + r["top"][1][1] <= 1 + 1e-6
    out = tmp_path / "pred.csv"
    ok(app, f"predict {new} --top 3 --out {out}")
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 9 and [r["class_1"] for r in table] == [c for c in CLASSES for _ in range(3)]
    assert all(abs(sum(float(r[f"prob_{i}"]) for i in (1, 2, 3)) - 1) < 1e-5 for r in table)
    one = ok(app, f"predict {new / 'dog' / 'dog_001.png'}")
    assert len(one["rows"]) == 1 and one["rows"][0]["top"][0][0] == "dog"

    # reopened elsewhere, its data folder gone: class names and image size come from the checkpoint
    copy = tmp_path / "moved"
    shutil.copytree(app.session.root, copy)
    file = copy / f"{app.session.name}.session"
    doc = json.loads(file.read_text())
    doc["data"]["path"] = str(tmp_path / "gone")
    file.write_text(json.dumps(doc))
    messages = []
    r = Session.open(file, notify=messages.append)
    try:
        assert r.splits is None and any("data not attached" in m for m in messages)
        again = A.predict(r, str(new), top=2)
        assert again["classes"] == CLASSES and again["size"] == 32
        assert [x["top"][0][0] for x in again["rows"]] == [x["top"][0][0] for x in res["rows"]]
        for x, y in zip(again["rows"], res["rows"]):
            assert x["top"][0][1] == pytest.approx(y["top"][0][1], abs=1e-6)
    finally:
        r.close(save=False)


# ------------------------------------------------------------------ export
def _preprocessed(app, image: Path):
    from pgshell.engine.data.transforms import build_transform
    from pgshell.engine.data.images import load_image

    tf = build_transform(app.session.built.data_config, train=False, size=32)
    return tf(load_image(str(image)))[None]


def test_export_torchscript_round_trip(trained, tmp_path):
    app, tmp = trained
    x = torch.cat([_preprocessed(app, p) for p in sorted((tmp / "tv" / "val").rglob("*.png"))[:5]])
    path = tmp_path / "model.pt"
    info = ok(app, f"export torchscript {path}")
    side = json.loads(Path(f"{path}.json").read_text())
    assert side == info and side["classes"] == CLASSES and side["preprocessing"]["input_size"] == [3, 32, 32]
    cfg = app.session.built.data_config
    assert side["preprocessing"]["mean"] == pytest.approx(list(cfg["mean"])) and side["preprocessing"]["crop_pct"] == cfg["crop_pct"]
    loaded = torch.jit.load(str(path))
    module = app.session.built.module.eval()
    with torch.no_grad():
        expected, got = module(x), loaded(x)
    module.train()
    assert torch.allclose(got, expected, atol=1e-5) and info["check"]["max_abs_diff"] < 1e-5
    # --checkpoint 1 exports epoch 1's weights, not the live ones
    path1 = tmp_path / "epoch1.pt"
    ok(app, f"export torchscript {path1} --checkpoint 1")
    built, _, _ = A._checkpoint_copy(app.session, app.session.folder / "checkpoints" / "epoch-0001.safetensors")
    with torch.no_grad():
        e1, g1 = built.module.eval()(x), torch.jit.load(str(path1))(x)
    assert torch.allclose(g1, e1, atol=1e-5) and not torch.allclose(g1, expected, atol=1e-3)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # torch marks its TorchScript-based exporter deprecated
def test_export_onnx_round_trip(trained, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    app, tmp = trained
    x = torch.cat([_preprocessed(app, p) for p in sorted((tmp / "tv" / "val").rglob("*.png"))[:3]])
    path = tmp_path / "model.onnx"
    info = ok(app, f"export onnx {path}")
    assert info["check"]["by"] == "onnxruntime" and json.loads(Path(f"{path}.json").read_text())["classes"] == CLASSES
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(sess.run(["logits"], {"input": x.numpy()})[0])
    module = app.session.built.module.eval()
    with torch.no_grad():
        expected = module(x)
    module.train()
    assert got.shape == (3, 3) and torch.allclose(got, expected, atol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_export_onnx_without_onnx_says_what_to_install(trained, tmp_path, monkeypatch, capsys):
    app, _ = trained
    monkeypatch.setitem(sys.modules, "onnx", None)  # as if it were not installed
    good, _ = run(app, f"export onnx {tmp_path / 'm.onnx'}")
    err = capsys.readouterr().err
    assert not good and "pip install" in err and "onnx" in err and "Traceback" not in err, err
    assert not Path(f"{tmp_path / 'm.onnx'}.json").exists()


def test_export_timm_is_rebuilt_identically_by_timm_and_by_load_folder(trained, tmp_path):
    import timm
    import timm.data

    from pgshell.engine.data.transforms import build_transform

    app, tmp = trained
    x = torch.cat([_preprocessed(app, p) for p in sorted((tmp / "tv" / "val").rglob("*.png"))[:4]])
    folder = tmp_path / "cats-timm"
    info = ok(app, f"export timm {folder}")
    assert sorted(os.listdir(folder)) == ["config.json", "model.safetensors"] and info["check"]["max_abs_diff"] == 0
    cfg = json.loads((folder / "config.json").read_text())
    assert (cfg["architecture"], cfg["num_classes"], cfg["label_names"]) == ("test_resnet", 3, CLASSES)
    module = app.session.built.module.eval()
    with torch.no_grad():
        expected = module(x)
    module.train()
    # timm alone, as the README shows it: the weights file with the class count (else timm drops the head)
    overlay = timm.create_model(cfg["architecture"], pretrained=True, num_classes=cfg["num_classes"],
                                pretrained_cfg_overlay=dict(file=str(folder / "model.safetensors"),
                                                            num_classes=cfg["num_classes"])).eval()
    local = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()  # what hf-hub:ORG/NAME does after upload
    # pgshell: `load FOLDER` in another session on the same data (no --pretrained: a folder names weights)
    other = PgShell(interactive=False, sessions_dir=str(tmp_path / "sessions"), stdout=io.StringIO())
    try:
        ok(other, f"data {tmp / 'tv'} --size 32")
        assert ok(other, f"load {folder}")["pretrained"] is True
        loaded = other.session.built.module.eval()
        with torch.no_grad():
            assert torch.equal(overlay(x), expected) and torch.equal(local(x), expected)
            assert torch.equal(loaded(x), expected)
        # config.json's preprocessing is the eval transform the session used, on an image of another size
        exported = timm.data.create_transform(**timm.data.resolve_data_config(pretrained_cfg=cfg["pretrained_cfg"]))
        ours = build_transform(app.session.built.data_config, train=False, size=32)
        assert other.session.built.data_config["input_size"] == (3, 32, 32)
        pixels = torch.randint(0, 256, (41, 57, 3), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
        image = Image.fromarray(pixels.numpy())
        assert exported(image).shape == (3, 32, 32) and torch.equal(exported(image), ours(image))
    finally:
        other.session.close(save=False)
    # a checkpoint exports its own weights
    ok(app, f"export timm {tmp_path / 'epoch1'} --checkpoint 1")
    built, _, _ = A._checkpoint_copy(app.session, app.session.folder / "checkpoints" / "epoch-0001.safetensors")
    with torch.no_grad():
        e1 = built.module.eval()(x)
        assert torch.equal(timm.create_model(f"local-dir:{tmp_path / 'epoch1'}", pretrained=True).eval()(x), e1)


def test_export_timm_refuses_a_model_timm_cannot_rebuild():
    import torchvision

    from pgshell.engine.errors import PgError
    from pgshell.engine.report.export import timm_architecture

    with pytest.raises(PgError, match="needs a timm model .*export onnx"):
        timm_architecture(torchvision.models.resnet18())


# ------------------------------------------------------------------ checkpoints and retention
def test_checkpoints_lists_every_file_with_marks(trained):
    app, _ = trained
    s = app.session
    rows = ok(app, "checkpoints")
    assert [r["file"] for r in rows] == ["step-0000003.safetensors", "epoch-0001.safetensors",
                                         "step-0000005.safetensors", "epoch-0002.safetensors",
                                         "epoch-0003.safetensors"]
    assert [r["kind"] for r in rows] == ["step", "epoch", "step", "epoch", "epoch"]
    assert [r["step"] for r in rows] == [3, 4, 5, 8, 12]
    val = [r for r in _rows(s) if r["split"] == "val"]
    assert [r["val_loss"] for r in rows if r["kind"] == "epoch"] == [float(r["loss"]) for r in val]
    accs = [float(r["accuracy"]) for r in val]
    best = accs.index(max(accs)) + 1  # val_accuracy, ties keep the earlier epoch
    assert [r["file"] for r in rows if r["best"]] == [f"epoch-{best:04d}.safetensors"]
    assert [r["file"] for r in rows if r["resume"]] == ["epoch-0003.safetensors"]
    assert all(r["bytes"] == Path(r["path"]).stat().st_size for r in rows)


def test_retention_keeps_the_resume_point_and_the_best(tmp_path, split_folder):
    s = Session(root=tmp_path / "sessions")
    for k, v in {"batch_size": 8, "lr": 0.05, "augment": False, "keep_last": 1}.items():
        s.set(k, v)
    s.attach_data(str(split_folder), size=32)
    s.load_model("test_resnet")
    s.use_name("keep")
    ck = s.folder / "checkpoints"

    def train(**kw):
        s.train(**kw)
        assert s.wait(WAIT) and "error" not in s.status, s.status

    def files():
        return [p.name for p in C.list_checkpoint_files(ck)]

    def session_file_checkpoint():
        return (s.root / json.loads(s.file.read_text())["checkpoint"]).name

    train(epochs=1)
    assert s.best["path"].endswith("epoch-0001.safetensors")
    # from here the model cannot change (head lr 0, backbone and its BatchNorm statistics frozen): later epochs tie
    # with epoch 1, and ties keep the earlier checkpoint as the best
    s.freeze(["backbone"])
    s.set("lr", 0.0)
    train(epochs=2)
    assert files() == ["epoch-0001.safetensors", "epoch-0003.safetensors"]  # best + the last 1; epoch 2 removed
    train(steps=1)  # the resume point is now a step checkpoint, older epochs are not among the last 1
    assert files() == ["epoch-0001.safetensors", "epoch-0003.safetensors", "step-0000013.safetensors"]
    assert session_file_checkpoint() == "step-0000013.safetensors" == s.latest_checkpoint.name
    # a new best_metric is judged over the checkpoints kept so far (epoch 1 stays best on a tie), not handed to
    # whichever epoch ends next
    s.set("best_metric", "val_loss")
    train(epochs=1)
    assert s.best["metric"] == "val_loss" and s.best["path"].endswith("epoch-0001.safetensors")
    assert files() == ["epoch-0001.safetensors", "epoch-0004.safetensors"]
    assert session_file_checkpoint() == "epoch-0004.safetensors"
    file = s.file
    s.close(save=False)
    r = Session.open(file)
    assert r.trainer.pos.step == 16 and r.best["path"].endswith("epoch-0001.safetensors")
    r.close(save=False)


# ------------------------------------------------------------------ TensorBoard
def test_tensorboard_event_files_read_back(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    app, _ = trained
    s = app.session
    folder = s.folder / "tensorboard"
    ea = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    ea.Reload()
    train = [r for r in _rows(s) if r["split"] == "train"]
    val = [r for r in _rows(s) if r["split"] == "val"]
    for tag in ("batch/loss", "batch/accuracy", "batch/lr"):
        events = ea.Scalars(tag)
        assert [e.step for e in events] == list(range(1, 13)), tag
    assert [e.value for e in ea.Scalars("batch/loss")] == pytest.approx([float(r["loss"]) for r in train], rel=1e-6)
    assert [e.value for e in ea.Scalars("batch/lr")] == pytest.approx([float(r["lr"]) for r in train])
    for tag in ("epoch/train_loss", "epoch/train_accuracy", "epoch/val_loss", "epoch/val_accuracy"):
        assert [e.step for e in ea.Scalars(tag)] == [4, 8, 12], tag
    assert [e.value for e in ea.Scalars("epoch/val_loss")] == pytest.approx([float(r["loss"]) for r in val], rel=1e-6)
    # each run that reached its end recorded the settings with its final metrics
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == ["hparams-12", "hparams-3", "hparams-5"]
    hp = EventAccumulator(str(folder / "hparams-12"))
    hp.Reload()
    assert hp.Scalars("final/val_loss")[0].value == pytest.approx(float(val[-1]["loss"]), rel=1e-6)
    assert "_hparams_/experiment" in hp.Tags()["tensors"] or hp.PluginTagToContent("hparams")


def test_tensorboard_missing_says_how_to_install(monkeypatch, tmp_path, capsys):
    from pgshell.engine.report import tensorboard as TB

    monkeypatch.setattr(TB, "available", lambda: False)
    app = new_app(tmp_path / "s")
    try:
        good, _ = run(app, "set tensorboard on")
        err = capsys.readouterr().err
        assert not good and app.session.config.tensorboard is False
        assert "pip install" in err and "tensorboard" in err and "Traceback" not in err
    finally:
        app.session.close(save=False)


# ------------------------------------------------------------------ errors and scripts
@pytest.mark.parametrize("line, message", [
    ("eval --checkpoint 7", "no checkpoint for epoch 7: `checkpoints` lists them"),
    ("eval --checkpoint nope.safetensors", "no checkpoint nope.safetensors"),
    ("eval --split test", "no test split"),
    ("predict /no/such/place", "no image at /no/such/place"),
    ("predict . --top 0", "--top must be at least 1"),
    ("plot --smooth 0", "--smooth must be at least 1"),
    ("plot /no/such.session", "no session file"),
    ("export torchscript x.pt --checkpoint 9", "no checkpoint for epoch 9"),
    ("export pickle x.pkl", "invalid choice"),
])
def test_analysis_errors_are_one_clear_line(trained, capsys, line, message):
    app, _ = trained
    good, _ = run(app, line)
    err = capsys.readouterr().err
    assert not good and message in err and "Traceback" not in err, err


def test_analysis_commands_in_a_script(trained, tmp_path):
    app, _ = trained
    copy = tmp_path / "sessions"
    shutil.copytree(app.session.root, copy)
    plan = "checkpoints\neval --checkpoint 1\nplot --out curves.png\npredict {}\n".format(
        app.session.splits.val[0][0])
    r = pgshell_here("-s", str(copy / f"{app.session.name}.session"), stdin=plan, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    val1 = next(x for x in _rows(app.session) if x["split"] == "val")
    assert "epoch-0001.safetensors" in r.stdout and f"{float(val1['loss']):.4f}" in r.stdout
    assert "wrote curves.png" in r.stdout and (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert "cat 1.000" in r.stdout or "cat 0.9" in r.stdout


def test_analysis_layers_import_without_cmd2():
    code = ("import sys; sys.modules['cmd2'] = None; sys.modules['prompt_toolkit'] = None\n"
            "import pgshell.engine.report.evaluate, pgshell.engine.report.plot, pgshell.engine.report.export\n"
            "import pgshell.engine.report.tensorboard\n"
            "import pgshell.session.review\n"
            "assert 'cmd2' not in [m for m in sys.modules if sys.modules[m] is not None]\nprint('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr

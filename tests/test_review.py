"""Review: the highest-loss images (contact sheet and CSV read back), class-activation maps, predictions against
class folders, probes (k-NN and linear, pure and in a session), sessions compared and listed, plot axes and pause
marks, and freeing space (sessions rm, checkpoints prune).

`trained` is one short real run shared by the tests that only read it: test_resnet at 32 px on three colour classes
(cat red, dog green, fox blue), `train --steps 1` (a finished run: a "step" checkpoint at step 1), then `train 2` —
8 steps, 2 epochs of 4 batches.
"""

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pgshell.session import review as A
from pgshell.engine.report import probe as PR
from pgshell.engine.train.metrics import read_rows
from pgshell.session import Session
from pgshell.shell import PgShell

from conftest import make_images

CLASSES = ["cat", "dog", "fox"]
SETUP = ["set batch_size 8", "set lr 0.05", "set augment off"]


def run(app, line):
    app.failed.clear()
    app.last_result = None
    app.onecmd_plus_hooks(line)
    return not app.failed.is_set(), app.last_result


def ok(app, line):
    good, result = run(app, line)
    assert good, f"{line!r} failed"
    return result


def _app(root: Path) -> PgShell:
    return PgShell(interactive=False, sessions_dir=str(root), stdout=io.StringIO())


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("review")
    data = tmp / "tv"
    make_images(data / "train", per_class=10, seed=1)
    make_images(data / "val", per_class=4, seed=2)
    app = _app(tmp / "sessions")
    for line in [f"data {data} --size 32", "load test_resnet", *SETUP, "train --steps 1", "train 2"]:
        ok(app, line)
    assert app.session.trainer.pos.step == 8
    yield app, tmp
    app.session.close(save=False)


# ------------------------------------------------------------------ probes: the math
def test_knn_gives_the_known_nearest_neighbour_and_weights_votes_by_similarity():
    g = torch.Generator().manual_seed(0)
    train = torch.randn(50, 16, generator=g)
    labels = torch.arange(50) % 7
    queries = train[[3, 17, 42]] + 0.01 * torch.randn(3, 16, generator=g)
    assert PR.knn_scores(train, labels, queries, 7, k=1).argmax(1).tolist() == labels[[3, 17, 42]].tolist()
    # one neighbour of class 0 at cosine 0.99 outweighs two of class 1 at 0.80 and 0.79: exp(sim / 0.07) votes
    angle = [math.acos(c) for c in (0.99, 0.80, 0.79, 0.10)]
    train = torch.tensor([[math.cos(a), math.sin(a)] for a in angle]) * torch.tensor([[1.0], [3.0], [0.5], [2.0]])
    scores = PR.knn_scores(train, torch.tensor([0, 1, 1, 2]), torch.tensor([[1.0, 0.0]]), 3, k=3)
    expected = [math.exp(0.99 / 0.07), math.exp(0.80 / 0.07) + math.exp(0.79 / 0.07), 0.0]
    assert scores[0].tolist() == pytest.approx(expected, rel=1e-4)
    assert scores.argmax(1).item() == 0


def _separable(n0, n1, g):
    """Linearly separable by x0 = 0; class 0 packed densely against the boundary, class 1 spread out beyond it: the
    nearest neighbours of class-1 points near the boundary are mostly class 0."""
    a = torch.stack([-torch.rand(n0, generator=g) * 0.2 - 0.01, torch.randn(n0, generator=g)], 1)
    b = torch.stack([torch.rand(n1, generator=g) * 2 + 0.01, torch.randn(n1, generator=g)], 1)
    x = torch.cat([torch.cat([a, b]), torch.full((n0 + n1, 1), 3.0)], 1)  # an offset: cosine sees the position
    return x, torch.cat([torch.zeros(n0), torch.ones(n1)]).long()


def test_linear_probe_beats_knn_on_a_separable_toy_set():
    g = torch.Generator().manual_seed(0)
    tx, ty = _separable(300, 30, g)
    vx, vy = _separable(100, 100, g)
    knn = PR.accuracy(PR.knn_scores(tx, ty, vx, 2, k=20), vy)
    probe = PR.fit_linear(tx, ty, 2)
    linear = PR.accuracy(probe.scores(vx), vy)
    assert linear >= 0.95 and linear >= knn + 0.1, (linear, knn)
    assert probe.weight_decay in PR.WEIGHT_DECAYS
    # deterministic: the same fit twice gives the same weights
    assert torch.equal(PR.fit_linear(tx, ty, 2).weight, probe.weight)


def test_a_probe_folded_into_one_linear_layer_gives_the_same_scores():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(60, 8, generator=g) * 5 + 3, torch.arange(60) % 3
    probe = PR.fit_linear(x, y, 3)
    weight, bias = probe.as_linear()
    assert torch.allclose(x @ weight.T + bias, probe.scores(x), atol=1e-4)


# ------------------------------------------------------------------ probes: in a session
def test_probe_is_recorded_and_shown_by_show_and_compare(trained):
    app, _ = trained
    s = app.session
    knn = ok(app, "probe knn --k 5")
    linear = ok(app, "probe linear")
    assert (knn["train"], knn["val"], knn["features"], knn["k"]) == (30, 12, 96, 5)  # test_resnet: 96 features
    assert linear["step"] == knn["step"] == 8 and 0 <= knn["accuracy"] <= 1 and 0 <= linear["accuracy"] <= 1
    # the k-NN figure again from features computed here, through the engine alone
    from pgshell.engine import data as D
    from pgshell.engine.batches.features import compute_features, head_module_name

    tf = D.build_transform(s.built.data_config, train=False, size=32)
    head = s.built.module.get_submodule(head_module_name(s.built.head))
    jobs = [(D.ImageDataset(split, tf), [(i, 0) for i in range(len(split))]) for split in (s.splits.train, s.splits.val)]
    feats = [f for f, _ok, _bad in compute_features(s.built.module, head, jobs, s.trainer.runtime, 64, 0)]
    labels = [torch.tensor([c for _, c in split]) for split in (s.splits.train, s.splits.val)]
    assert PR.accuracy(PR.knn_scores(feats[0], labels[0], feats[1], 3, k=5), labels[1]) == knn["accuracy"]
    recorded = json.loads((s.folder / "probe.json").read_text())
    assert recorded["knn"]["accuracy"] == knn["accuracy"] and recorded["linear"]["accuracy"] == linear["accuracy"]
    shown = ok(app, "show")["probe"]
    assert set(shown) == {"knn", "linear"} and f"{knn['accuracy']:.4f}" in shown["knn"]
    row = next(r for r in ok(app, "compare")["rows"] if r["session"] == s.name)
    assert row["probe"]["linear"]["accuracy"] == linear["accuracy"]


# ------------------------------------------------------------------ errors
def _dominant(png: Image.Image, box) -> int:
    """The strongest colour channel inside a tile (its middle half: no title, no border)."""
    left, top, right, bottom = box
    w, h = right - left, bottom - top
    crop = np.asarray(png.convert("RGB").crop((left + w // 4, top + h // 4, right - w // 4, bottom - h // 4)))
    return int(crop.reshape(-1, 3).mean(0).argmax())


def test_errors_contact_sheet_and_csv_match_the_predictions(trained, tmp_path):
    app, tmp = trained
    early = "step-0000001.safetensors"  # after one batch: mistakes and doubts of all kinds
    res = ok(app, f"errors --top 12 --checkpoint {early} --out {tmp_path / 'errors.png'}")
    with open(tmp_path / "errors.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["path"] for r in table] == [r["path"] for r in res["rows"]] and len(table) == 12
    losses = [float(r["loss"]) for r in table]
    assert losses == sorted(losses, reverse=True)
    # each row agrees with an independent prediction of the same checkpoint's weights
    for r in table:
        file = tmp / "tv" / r["path"]
        assert r["true"] == file.parent.name
        top = A.predict(app.session, str(file), top=3, checkpoint=early)["rows"][0]["top"]
        probs = dict(top)
        assert r["predicted"] == top[0][0]
        assert float(r["probability"]) == pytest.approx(top[0][1], abs=1e-5)
        assert float(r["loss"]) == pytest.approx(-math.log(probs[r["true"]]), abs=1e-4)
    assert {r["predicted"] == r["true"] for r in table} == {True, False}  # right and wrong answers both drawn
    # the tiles, read back from the PNG in the CSV's order: each shows its row's image (classes are colours)
    with Image.open(tmp_path / "errors.png") as png:
        assert [_dominant(png, box) for box in res["tiles"]] == [CLASSES.index(r["true"]) for r in table]
    assert res["labels"] == [f"true {r['true']}\npred {r['predicted']} {float(r['probability']):.2f}" for r in table]
    # one true class, and the terminal table
    dogs = ok(app, f"errors --class dog --checkpoint {early}")["rows"]
    assert [r["path"] for r in dogs] == [r["path"] for r in table if r["true"] == "dog"]
    assert "val/dog/" in app.stdout.getvalue()


# ------------------------------------------------------------------ predictions against class folders
def test_predict_on_class_folders_adds_true_and_correct(trained, tmp_path):
    app, tmp = trained
    out = tmp_path / "pred.csv"
    res = ok(app, f"predict {tmp / 'tv' / 'val'} --out {out}")
    with open(out) as f:
        table = list(csv.DictReader(f))
    assert len(table) == 12 and list(table[0])[-2:] == ["true", "correct"]
    assert [r["true"] for r in table] == [c for c in CLASSES for _ in range(4)]
    assert [r["correct"] for r in table] == [str(int(r["class_1"] == r["true"])) for r in table]
    # the accuracy over the class folders is the evaluation's (same weights, same preprocessing)
    assert res["labelled"] == 12 and res["accuracy"] == ok(app, "eval")["val"]["accuracy"]
    other = make_images(tmp_path / "other", classes=("x", "y"), per_class=2)  # subfolders that are no classes
    assert "labelled" not in ok(app, f"predict {other}")


# ------------------------------------------------------------------ explain
def test_explain_gives_a_map_of_the_image_size_that_differs_between_classes(trained, tmp_path):
    app, tmp = trained
    img = tmp_path / "dog.png"
    with Image.open(tmp / "tv" / "val" / "dog" / "dog_000.png") as im:
        im.resize((48, 40)).save(img)  # not square and not the model's size
    dog = ok(app, f"explain {img} --class dog --out {tmp_path / 'cam.png'}")
    fox = ok(app, f"explain {img} --class fox")
    assert dog["map"].shape == fox["map"].shape == (40, 48) and dog["layer"] == "layer3"  # 32 px: layer4 is 1x1
    assert 0 <= dog["map"].min() and dog["map"].max() <= 1 and np.abs(dog["map"] - fox["map"]).max() > 0.1
    assert dog["predicted"] == "dog"
    # the model saw the centre crop of the image resized to 33 px: columns 0-4 and 44-47 and the last row lie
    # outside it (torchvision's Resize(33) then CenterCrop(32), mapped back)
    assert not dog["map"][:, :5].any() and not dog["map"][:, 44:].any() and not dog["map"][39:].any()
    assert dog["map"][:39, 5:44].any()
    with Image.open(tmp_path / "cam.png") as im:
        assert im.format == "PNG" and im.size[0] > 400
    assert "out" not in fox and fox["text"].count("\n") >= 5  # the terminal's map


def test_explain_a_vit(tmp_path, split_folder):
    app = _app(tmp_path / "sessions")
    try:
        ok(app, f"data {split_folder} --size 32")
        ok(app, "load test_vit")
        ok(app, "freeze")  # a frozen backbone still explains (on a copy), and stays frozen
        frozen = [n for n, p in app.session.built.module.named_parameters() if not p.requires_grad]
        image = split_folder / "val" / "cat" / "cat_000.png"
        a, b = ok(app, f"explain {image} --class cat"), ok(app, f"explain {image} --class dog")
        assert a["layer"] == "blocks.5.norm1" and a["map"].shape == (32, 32)
        assert np.abs(a["map"] - b["map"]).max() > 0.1
        assert [n for n, p in app.session.built.module.named_parameters() if not p.requires_grad] == frozen
        assert len(frozen) == 78  # every tensor but the head's two
    finally:
        app.session.close(save=False)


# ------------------------------------------------------------------ compare, sessions, rm
@pytest.fixture(scope="module")
def three(tmp_path_factory):
    """Three sessions of one epoch each, differing in lr, batch_size and optimizer."""
    tmp = tmp_path_factory.mktemp("three")
    data = make_images(tmp / "imgs")
    root = tmp / "sessions"
    for name, extra in (("a", []), ("b", ["set lr 0.01"]), ("c", ["set batch_size 12", "set optimizer adam"])):
        app = _app(root)
        for line in [f"data {data} --size 32", "load test_resnet", *SETUP, *extra, f"save {root / name}.session",
                     "train 1"]:
            ok(app, line)
        app.session.close(save=True)
    yield root


def test_compare_three_sessions_lists_exactly_the_differing_settings(three, tmp_path, monkeypatch):
    app = _app(three)
    try:
        res = ok(app, "compare")
        assert res["differing"] == ["optimizer", "lr", "batch_size"]  # in the settings' order
        assert [r["config"]["lr"] for r in res["rows"] if r["session"] == "b"] == [0.01]
        best = [r["best_accuracy"] for r in res["rows"]]
        assert best == sorted(best, reverse=True) and sorted(r["session"] for r in res["rows"]) == ["a", "b", "c"]
        for r in res["rows"]:
            val = [x for x in read_rows(three / r["session"] / "metrics.csv") if x["split"] == "val"]
            assert r["best_accuracy"] == float(val[0]["accuracy"]) and r["epoch"] == r["final_epoch"] == 1
            assert r["bytes"] == sum(p.stat().st_size for p in (three / r["session"]).rglob("*") if p.is_file()) \
                + (three / f"{r['session']}.session").stat().st_size
        out = tmp_path / "runs.csv"
        ok(app, f"compare a b c --out {out}")
        with open(out) as f:
            table = list(csv.DictReader(f))
        assert {r["session"]: (r["optimizer"], r["lr"], r["batch_size"]) for r in table} == {
            "a": ("sgd", "0.05", "8"), "b": ("sgd", "0.01", "8"), "c": ("adam", "0.05", "12")}
        # the terminal table fits: wide, everything; narrow, columns left out; never a line over the width
        for width in (200, 70, 30):
            monkeypatch.setenv("COLUMNS", str(width))
            start = len(app.stdout.getvalue())
            ok(app, "compare")
            printed = app.stdout.getvalue()[start:]
            assert max(len(line) for line in printed.splitlines()) <= width, printed
            assert "lr=0.01" in printed.replace("\n", " ").replace("  ", " ") or "lr=0.01" in printed
            assert ("not shown:" in printed) == (width == 70) or width == 30  # 30: one `name value` block a row
    finally:
        app.session.close(save=False)


def test_sessions_lists_and_rm_asks_or_needs_yes(three, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "sessions"
    shutil.copytree(three, root)
    app = _app(root)
    try:
        listed = ok(app, "sessions")["rows"]
        assert sorted(r["session"] for r in listed) == ["a", "b", "c"]
        # 24 training images: 3 batches of 8 (a, b), 2 of 12 (c)
        assert all(r["step"] == (2 if r["session"] == "c" else 3) and r["epoch"] == 1 for r in listed)
        size_b = next(r["bytes"] for r in listed if r["session"] == "b")
        good, _ = run(app, "sessions rm b")  # a plan: nobody to ask
        assert not good and (root / "b.session").exists() and (root / "b").is_dir()
        assert ok(app, "sessions rm b --yes")["bytes"] == size_b
        assert not (root / "b.session").exists() and not (root / "b").exists()
        app.interactive = True  # asked: "n" keeps it, "y" removes it
        answers = iter(["n", "y"])
        monkeypatch.setattr(app, "read_input", lambda prompt, **kw: next(answers))
        ok(app, "sessions rm c")
        assert (root / "c.session").exists()
        ok(app, "sessions rm c")
        assert not (root / "c.session").exists() and [r["session"] for r in ok(app, "sessions")["rows"]] == ["a"]
    finally:
        app.session.close(save=False)
    other = PgShell(interactive=False, sessions_dir=str(root), stdout=io.StringIO(),
                    session=Session.open(root / "a.session"))
    try:
        good, _ = run(other, "sessions rm a --yes")  # the open session is refused
        assert not good and (root / "a.session").exists()
    finally:
        other.session.close(save=False)


# ------------------------------------------------------------------ plot: axes and pause marks
def test_plot_marks_real_pauses_only_and_draws_epoch_and_time_axes(tmp_path, split_folder):
    app = _app(tmp_path / "sessions")
    s = app.session
    try:
        for line in [f"data {split_folder} --size 32", "load test_resnet", *SETUP, "train --steps 2", "train 1"]:
            ok(app, line)
        s.batch_listeners.append(lambda info: info["step"] == 6 and s.request_pause())  # a real pause at step 6
        ok(app, "train 1")
        assert s.paused and s.trainer.pos.step == 6
        ok(app, "continue")
        res = ok(app, "plot --metric lr")
        ser = res["series"][s.name]
        assert ser["train"]["run"][2] != ser["train"]["run"][1]  # `train 1` after the finished `train --steps 2`
        assert ser["pauses"] == [7]  # ... is no pause; the pause at step 6 is
        assert "log10 lr" in res["text"]
        rows = [r for r in read_rows(s.folder / "metrics.csv") if r["split"] == "train"]
        assert ser["train"]["epoch_x"] == [0.25, 0.5, 0.75, 1.0] * 1 + [1.25, 1.5, 1.75, 2.0]
        assert ser["val"]["epoch_x"] == [1.0, 2.0]
        assert ser["train"]["time"] == pytest.approx(np.cumsum([float(r["seconds"]) for r in rows]).tolist())
        text = ok(app, "plot --x epoch --metric loss")["text"]
        assert text.rstrip().endswith("2  epoch")
        png = ok(app, f"plot --x time --out {tmp_path / 't.png'}")
        assert png["x"] == "time" and (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    finally:
        s.close(save=False)


# ------------------------------------------------------------------ checkpoints prune
def test_prune_keeps_the_best_and_the_resume_point(tmp_path, split_folder):
    app = _app(tmp_path / "sessions")
    s = app.session
    try:
        for line in [f"data {split_folder} --size 32", "load test_resnet", *SETUP, "train 3", "train --steps 1"]:
            ok(app, line)
        before = ok(app, "checkpoints")
        assert [r["file"] for r in before] == [f"epoch-000{e}.safetensors" for e in (1, 2, 3)] + [
            "step-0000013.safetensors"]
        best = next(r["file"] for r in before if r["best"])
        plan = ok(app, "checkpoints prune --keep 0")
        assert sorted(plan["kept"]) == sorted({best, "step-0000013.safetensors"})
        assert plan["bytes"] == sum(r["bytes"] for r in before if r["file"] not in plan["kept"])
        assert sorted(p.name for p in (s.folder / "checkpoints").iterdir()) == sorted(plan["kept"])
        assert ok(app, "checkpoints prune --keep 0")["remove"] == []
        ok(app, "eval --checkpoint best")
        ok(app, "train --steps 1")
        assert s.trainer.pos.step == 14
    finally:
        s.close(save=False)


@pytest.mark.parametrize("line, message", [
    ("errors --class wolf", "no class 'wolf'"),
    ("errors --top 0", "--top must be at least 1"),
    ("errors --out e.jpg", "give FILE.png"),
    ("explain /no/such.png", "cannot read /no/such.png"),
    ("explain {img} --class wolf", "no class 'wolf'"),
    ("probe knn --k 0", "--k must be at least 1"),
    ("probe knn --apply", "only the linear probe can become the head"),
    ("compare nope", "no session nope"),
    ("sessions rm", "which session?"),
    ("sessions rm nope --yes", "no session nope"),
    ("checkpoints prune --keep -1", "--keep must be 0 or more"),
    ("plot --x hours", "invalid choice"),
])
def test_review_errors_are_one_clear_line(trained, capsys, line, message):
    app, tmp = trained
    good, _ = run(app, line.format(img=tmp / "tv" / "val" / "cat" / "cat_000.png"))
    err = capsys.readouterr().err
    assert not good and message in err and "Traceback" not in err, err


def test_activation_map_goes_back_through_resize_and_centre_crop():
    from pgshell.engine.report.explain import to_image_frame

    ones = np.ones((32, 32), np.float32)
    # 40 wide, 48 high; shorter side to 33 -> 33 x 39, centre crop 32: columns 0-38, rows 5-43 of the original
    tall = to_image_frame(ones, (40, 48), 33, (32, 32))
    assert tall.shape == (48, 40)
    assert np.array_equal(np.argwhere(tall.any(1)).ravel(), np.arange(5, 44))
    assert np.array_equal(np.argwhere(tall.any(0)).ravel(), np.arange(0, 39))
    # squashed to the crop's size (timm's crop_mode "squash"): the whole image
    assert to_image_frame(ones, (40, 48), (32, 32), (32, 32)).min() == pytest.approx(1.0)

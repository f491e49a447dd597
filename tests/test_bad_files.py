"""Files from strangers and hands: session files, checkpoints and weight files edited, truncated, swapped or
carrying a pickle payload give one clear PgError line and never execute code; messy image folders train anyway,
with every bad file listed once in quarantine.txt and by `data --check`.

Already held elsewhere (not repeated here): a flipped byte or a truncated checkpoint (tests/test_engine.py::
test_corrupt_newest_checkpoint_falls_back, ::test_truncated_checkpoint_is_detected), a pickle named .safetensors
(::test_pickle_is_never_loaded), weights of another model and a pickle in a .pth (tests/test_models.py::
test_weights_of_another_model_are_refused, ::test_a_pickle_with_code_is_never_unpickled), what the folder scan
rejects and why (tests/test_data.py::test_scan_rejects_what_the_header_shows and the bad-image tests there).
"""

import io
import json
import os
import pickle
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from pgshell.engine.store import checkpoint as C
from pgshell.engine.errors import PgError
from pgshell.session import Session

from conftest import WAIT, make_split, new_session, pgshell_here, weights_of


class _Payload:
    """Unpickling this creates a file: the proof that code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A session trained one epoch: its file, folder and the checkpoint's state, kept pristine for each test."""
    base = tmp_path_factory.mktemp("saved")
    s = new_session(base / "orig", make_split(base / "tv"))
    s.train(epochs=1)
    assert s.wait(WAIT) and "error" not in s.status
    s.close(save=False)  # the epoch's checkpoint rewrote the session file
    return base / "orig"


@pytest.fixture
def copy(saved, tmp_path):
    """A fresh copy of the saved session: (session file, its checkpoint)."""
    import shutil

    shutil.copytree(saved, tmp_path / "sessions")
    file = tmp_path / "sessions" / "s.session"
    (ckpt,) = (tmp_path / "sessions" / "s" / "checkpoints").iterdir()
    return file, ckpt


def _open_fails(file: Path, *words: str) -> str:
    with pytest.raises(PgError) as e:
        s = Session.open(file)
        s.close(save=False)
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg
    return msg


def _edit_session(file: Path, change) -> None:
    doc = json.loads(file.read_text())
    change(doc)
    file.write_text(json.dumps(doc))


def _edit_checkpoint(ckpt: Path, change, header: dict | None = None) -> None:
    """Rewrite a checkpoint with an edited state, with a valid checksum: only its meaning is wrong."""
    state = C.load_checkpoint(ckpt)
    change(state)
    C.save_checkpoint(ckpt, state, header)


# ------------------------------------------------------------------ session files
@pytest.mark.parametrize("change, words", [
    (lambda d: d.update(version=2), ["session version 2", "reads 1"]),
    (lambda d: d.pop("format"), ["not a pgshell session file"]),
    (lambda d: d.update(config={"lr": "fast"}), ["lr takes float"]),
    (lambda d: d.update(config={"warp_drive": 1}), ["unknown settings warp_drive"]),
    (lambda d: d.update(config=[1, 2]), ["damaged"]),
    (lambda d: d.update(model={"num_classes": 3}), ["no 'name'"]),
    (lambda d: d.update(model={"name": "test_resnet", "num_classes": "three"}), ["num_classes"]),
    (lambda d: d.update(folder="../../etc"), ["bad folder name"]),
    (lambda d: d.update(folder="elsewhere"), ["no usable checkpoint"]),
    (lambda d: d.update(data="tv"), ["damaged"]),
    (lambda d: d.update(data={"path": 5}), ["damaged"]),
    (lambda d: d.update(best="the best one"), ["damaged", "best"]),
    (lambda d: d.update(best={"path": 3}), ["damaged", "best"]),
    (lambda d: d.update(target="all of it"), ["damaged", "target"]),
    (lambda d: d.update(target={"epoch": "x"}), ["damaged", "target"]),
])
def test_hand_edited_session_file_is_one_clear_error(copy, change, words):
    file, _ = copy
    _edit_session(file, change)
    _open_fails(file, *words)


@pytest.mark.parametrize("content", [b"", b"\x00\xff" * 50, b"[1, 2, 3]", b'{"format": "pgshell-session"',
                                     pickle.dumps({"format": "pgshell-session"})])
def test_garbage_session_file_is_one_clear_error(tmp_path, content):
    file = tmp_path / "g.session"
    file.write_bytes(content)
    _open_fails(file, str(file))


def test_a_session_pointing_at_a_pickle_checkpoint_never_runs_it(copy, tmp_path):
    """A stranger's session folder whose newest checkpoint is a pickle: skipped, said, never unpickled; with no
    good checkpoint left, opening is an error."""
    file, ckpt = copy
    marker = tmp_path / "pwned"
    evil = ckpt.parent / "epoch-0009.safetensors"
    evil.write_bytes(pickle.dumps(_Payload(marker)))
    s = Session.open(file)
    assert s.trainer.pos.epoch == 1 and s.latest_checkpoint == ckpt  # the good one
    s.close(save=False)
    ckpt.unlink()
    _open_fails(file, "no usable checkpoint")
    torch.save({"model": _Payload(marker)}, evil)  # a torch zip pickle this time
    _open_fails(file, "no usable checkpoint")
    assert not marker.exists()


def test_other_models_weights_in_a_valid_checkpoint_are_refused(copy):
    import timm

    file, ckpt = copy
    other = timm.create_model("test_vit", num_classes=3).state_dict()
    _edit_checkpoint(ckpt, lambda st: st.update(model=dict(other)))
    _open_fails(file, "do not fit")


@pytest.mark.parametrize("change, words", [
    (lambda st: st["model"].update({"fc.weight": torch.zeros(7, 5)}), ["do not fit", "fc.weight"]),
    (lambda st: st.pop("position"), ["damaged", "position"]),
    (lambda st: st.pop("model"), ["damaged", "model"]),
    (lambda st: st.update(position={"epoch": "one", "batch": 0, "sample": 0, "step": 4}), ["damaged"]),
    (lambda st: st.update(position={"epoch": 1, "batch": 0, "sample": 0, "step": 4, "warp": 9}), ["damaged"]),
    (lambda st: st["config"].update(warp_drive=1), ["unknown settings warp_drive"]),
    (lambda st: st["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)), ["damaged"]),
    (lambda st: st["rng"].update(python=[3, [1, 2], None]), ["damaged"]),
    (lambda st: st["optimizer"]["state"]["fc.weight"].update(momentum_buffer=torch.zeros(2, 2)),
     ["damaged", "fc.weight"]),
    (lambda st: st.update(optimizer="sgd"), ["damaged"]),
])
def test_hand_edited_checkpoint_is_one_clear_error(copy, change, words):
    file, ckpt = copy
    _edit_checkpoint(ckpt, change, C.read_metadata(ckpt))
    _open_fails(file, *words)


def test_a_checkpoint_of_another_version_is_skipped_and_alone_is_an_error(copy):
    file, ckpt = copy
    meta = {k: v for k, v in C.read_metadata(ckpt).items() if k not in ("format", "version", "state", "sha256")}
    state = C.load_checkpoint(ckpt)
    C.save_checkpoint(ckpt, state, meta)
    data = ckpt.read_bytes().replace(b'"version":"1"', b'"version":"9"')
    ckpt.write_bytes(data)
    with pytest.raises(C.CheckpointError, match="version '9'"):
        C.load_checkpoint(ckpt)
    _open_fails(file, "no usable checkpoint", "version '9'")


def test_pgshell_s_with_a_damaged_session_is_one_line_and_exit_1(copy):
    file, ckpt = copy
    _edit_checkpoint(ckpt, lambda st: st["rng"].update(torch=torch.zeros(3, dtype=torch.uint8)),
                     C.read_metadata(ckpt))
    r = pgshell_here("-s", str(file), stdin="show\n")
    assert r.returncode == 1, r.stdout
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and "damaged" in lines[0], r.stderr


# ------------------------------------------------------------------ load --weights
def _cmd(app, capsys, line):
    app.failed.clear()
    app.onecmd_plus_hooks(line)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return not app.failed.is_set(), err


def _weights_files(tmp_path: Path, marker: Path) -> dict[str, Path]:
    files = {}
    for name in ("payload.pth", "payload.bin", "payload.safetensors"):
        files[name] = tmp_path / name
        torch.save({"fc.weight": torch.zeros(3, 4), "evil": _Payload(marker)}, files[name])
    files["raw-pickle.pt"] = tmp_path / "raw-pickle.pt"
    files["raw-pickle.pt"].write_bytes(pickle.dumps(_Payload(marker)))
    files["empty.pth"] = tmp_path / "empty.pth"
    files["empty.pth"].write_bytes(b"")
    files["text.safetensors"] = tmp_path / "text.safetensors"
    files["text.safetensors"].write_text("hello")
    files["truncated.pth"] = tmp_path / "truncated.pth"
    buf = io.BytesIO()
    torch.save({"fc.weight": torch.zeros(300, 400)}, buf)
    files["truncated.pth"].write_bytes(buf.getvalue()[:2000])
    files["shapes.safetensors"] = tmp_path / "shapes.safetensors"
    from safetensors.torch import save_file

    save_file({"conv1.weight": torch.zeros(1, 2, 3)}, files["shapes.safetensors"])
    files["not-weights.txt"] = tmp_path / "not-weights.txt"
    files["not-weights.txt"].write_text("hi")
    return files


def test_load_weights_from_bad_files_is_one_line_never_runs_code_and_keeps_the_model(app, capsys, tmp_path):
    marker = tmp_path / "pwned"
    assert _cmd(app, capsys, "load test_resnet --classes 3")[0]
    before = weights_of(app.session.built.module)
    spec = app.session.spec
    for name, path in _weights_files(tmp_path, marker).items():
        ok, err = _cmd(app, capsys, f"load test_resnet --classes 3 --weights {path}")
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert not ok and len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert app.session.spec is spec  # the loaded model is untouched
    assert not marker.exists()
    after = app.session.built.module.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


# ------------------------------------------------------------------ messy image folders, end to end
def _png(path: Path, seed: int, size: int = 32, mode: str = "RGB") -> Path:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode).save(path)
    return path


@pytest.fixture
def messy(tmp_path, monkeypatch):
    """Three classes of good images plus every kind of trouble; returns (root, {bad path: reason start})."""
    root = tmp_path / "messy"
    for c, name in enumerate(("ant", "bee", "cow")):
        for i in range(6):
            _png(root / name / f"{i}.png", 10 * c + i)
    bad = {}
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(buf, "JPEG")
    (root / "ant" / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    bad[root / "ant" / "truncated.jpg"] = "truncated or corrupt"
    (root / "bee" / "zero.jpg").write_bytes(b"")
    bad[root / "bee" / "zero.jpg"] = "empty file"
    (root / "cow" / "text.jpg").write_text("a text file wearing a .jpg name\n")
    bad[root / "cow" / "text.jpg"] = "not an image"
    Image.new("CMYK", (32, 32), (255, 0, 0, 0)).save(root / "ant" / "cmyk.jpg")  # good: converted
    Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)).save(root / "bee" / "deep.png")
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 16, 32))
    palette.save(root / "cow" / "palette.png", transparency=0)  # good: composited on white
    _png(root / "cow" / "huge.png", 5, size=64)
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 2000)  # 64x64 = 4096 pixels: a bomb by this limit
    bad[root / "cow" / "huge.png"] = "decompression bomb"
    locked = _png(root / "bee" / "locked.png", 6)
    real_open = PIL.Image.open

    def open_or_refuse(fp, *args, **kwargs):  # root reads anything: make PIL see what a chmod 000 would cause
        if str(fp) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real_open(fp, *args, **kwargs)

    monkeypatch.setattr(PIL.Image, "open", open_or_refuse)
    bad[locked] = "unreadable (permission denied)"
    (root / "empty_class").mkdir()
    bad[root / "empty_class"] = "empty class folder"
    return root, bad


def _quarantine(folder: Path) -> dict[str, str]:
    lines = (folder / "quarantine.txt").read_text().splitlines()
    entries = [ln.split("\t") for ln in lines]
    assert len({p for p, _ in entries}) == len(entries), "each bad file is listed once"
    return dict(entries)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_training_over_a_messy_folder_completes_and_quarantines_exactly_the_bad_files(app, capsys, messy):
    root, bad = messy
    ok, _ = _cmd(app, capsys, f"data {root} --size 32 --check")
    assert ok
    listed = {Path(p): reason for p, reason in app.last_result["rejected"]}
    assert set(listed) == set(bad) and all(listed[p].startswith(r) for p, r in bad.items())
    for line in ("load test_resnet", "set batch_size 4", "save m.session"):  # the folder appears only now
        assert _cmd(app, capsys, line)[0]
    assert _cmd(app, capsys, "train 2")[0]
    s = app.session
    assert s.trainer.pos.epoch == 2 and s.splits.classes == ["ant", "bee", "cow"]
    quarantined = {Path(p): reason for p, reason in _quarantine(s.folder).items()}
    assert set(quarantined) == set(bad) and all(quarantined[p].startswith(r) for p, r in bad.items())


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_quarantine_found_at_data_time_reaches_the_folder_made_when_training_starts(app, capsys, messy):
    root, bad = messy
    assert _cmd(app, capsys, f"data {root} --size 32")[0]  # no --check: the truncated file shows when decoded
    assert _cmd(app, capsys, "load test_resnet")[0] and app.session.folder is None
    assert _cmd(app, capsys, "set batch_size 4")[0]
    assert _cmd(app, capsys, "train 2")[0]
    quarantined = {Path(p) for p in _quarantine(app.session.folder)}
    assert quarantined == set(bad)  # the scan's finds, and the truncated one once though seen every epoch
    assert _cmd(app, capsys, "save moved.session")[0] and _cmd(app, capsys, "train 1")[0]
    assert {Path(p) for p in _quarantine(app.session.folder)} == set(bad)  # moved along, still once each


@pytest.mark.parametrize("layout, message", [
    ({}, "no images found"),
    ({"only": 3}, "at least 2 classes"),
    ({"a": 2, "empty": 0}, "at least 2 classes"),
    ({"a": 0, "b": 0}, "no images found"),
])
def test_impossible_datasets_are_refused_before_training(app, capsys, tmp_path, layout, message):
    root = tmp_path / "impossible"
    root.mkdir()
    for name, n in layout.items():
        (root / name).mkdir()
        for i in range(n):
            _png(root / name / f"{i}.png", i)
    ok, err = _cmd(app, capsys, f"data {root}")
    assert not ok and message in err and len(err.strip().splitlines()) == 1
    assert app.session.splits is None


# ------------------------------------------------------------------ checkpoints never name code
EVIL_MODEL = '''
import pathlib

pathlib.Path({marker!r}).touch()  # the proof that this file was imported


def f(num_classes=3):
    import torch

    return torch.nn.Linear(3, num_classes)
'''


def test_a_checkpoint_naming_code_never_imports_it(copy, tmp_path, app, capsys):
    """A stranger's checkpoint whose model is `evil.py:f`, re-signed so its checksum passes: the model comes from
    the session file or the user's `load`, a checkpoint of another model is refused, the file never imported."""
    file, ckpt = copy
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil" / "evil.py"
    evil.parent.mkdir()
    evil.write_text(EVIL_MODEL.format(marker=str(marker)))
    _edit_checkpoint(ckpt, lambda st: st["model_spec"].update(name=f"{evil}:f"), C.read_metadata(ckpt))
    _open_fails(file, "another model", "never chooses the model")
    data = json.loads(file.read_text())["data"]["path"]
    for line in (f"data {data} --size 32", "load test_resnet"):
        assert _cmd(app, capsys, line)[0]
    for line in (f"eval --checkpoint {ckpt}", f"predict {data} --checkpoint {ckpt}",
                 f"export torchscript {tmp_path / 'x.pt'} --checkpoint {ckpt}"):
        ok, err = _cmd(app, capsys, line)
        assert not ok and "another model" in err and len(err.strip().splitlines()) == 1, (line, err)
    assert not marker.exists() and not (tmp_path / "x.pt").exists()


# ------------------------------------------------------------------ writes stay inside the session folder
def test_session_files_are_never_written_through_a_symbolic_link(copy, tmp_path):
    from pgshell.session.files import log_error

    file, _ = copy
    folder = file.parent / "s"
    outside = {}
    for name in ("metrics.csv", "quarantine.txt", "errors.log"):
        outside[name] = tmp_path / f"outside-{name}"
        outside[name].write_text("precious\n")
        (folder / name).unlink(missing_ok=True)
        (folder / name).symlink_to(outside[name])
    s = Session.open(file)
    with pytest.raises(PgError, match="symbolic link"):
        s.quarantine([(str(tmp_path / "x.png"), "not an image")])
    assert log_error(folder, RuntimeError("boom")) is None  # refused (the caller says the log could not be written)
    s.train(steps=1)
    assert s.wait(WAIT)
    assert "symbolic link" in s.status.get("error", "") or not (folder / "metrics.csv").is_symlink()
    s.close(save=False)
    assert all(p.read_text() == "precious\n" for p in outside.values())


def test_history_and_nested_scripts_cannot_write_files_or_run_a_plan_past_its_errors(tmp_path, app, capsys):
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    nested = tmp_path / "nested.txt"
    nested.write_text("set lr banana\nset lr 0.5\n")
    ok, err = _cmd(app, capsys, f"history -o {victim}")  # `history` is the session's change log: it writes nothing
    assert not ok and "unrecognized arguments: -o" in err, err
    for line in (f"run_script {nested}", f"@{nested}", f"_relative_run_script {nested}"):
        ok, err = _cmd(app, capsys, line)
        assert not ok and "not available in pgshell" in err, (line, err)
    assert victim.read_text() == "precious\n" and app.session.config.lr == 0.001


# ------------------------------------------------------------------ damaged metrics rows, a huge "checkpoint"
def test_bad_metrics_rows_are_skipped_and_counted_and_hide_no_later_row(copy, tmp_path):
    from pgshell.engine.train.metrics import read_rows
    from pgshell.session import review

    file, _ = copy
    metrics = file.parent / "s" / "metrics.csv"
    header, *rows = metrics.read_text().splitlines()  # 4 training rows and the validation row
    garbage = ["abc,1,0,train,0.5,0.5,0.001,8,0.1,1,", '2,1,2,train,"0.5,0.5,0.001,8,0.1,1,']  # no closing quote
    metrics.write_text("\n".join([header, rows[0], *garbage, *rows[1:]]) + "\n")
    other = tmp_path / "other" / "metrics.csv"  # plotted as a file of its own: named after its folder
    other.parent.mkdir()
    other.write_bytes(metrics.read_bytes())
    good = read_rows(metrics)
    assert [int(r["step"]) for r in good] == [1, 2, 3, 4, 4]  # the quote hid nothing, the garbage row is out
    from pgshell.engine.train.metrics import read_rows_counted

    assert read_rows_counted(metrics) == (good, 2)
    notes: list[str] = []
    s = Session.open(file, notify=notes.append)  # not "the session file is damaged": the rows are skipped
    assert any("2 unreadable row(s) skipped" in m for m in notes), notes
    assert read_rows_counted(metrics) == (good, 0)  # and removed from the session's own file
    res = review.plot(s, [str(other)])
    assert res["skipped"] == {"other": 2} and res["series"]["other"]["train"]["step"] == [1, 2, 3, 4]
    s.close(save=False)


def _fake_checkpoint(path: Path, data_bytes: int, size: int, meta: dict) -> None:
    """A safetensors header claiming one tensor of `data_bytes`, in a sparse file of `size` bytes (no disk used)."""
    header = json.dumps({"__metadata__": meta, "x": {"dtype": "U8", "shape": [data_bytes],
                                                      "data_offsets": [0, data_bytes]}}).encode()
    with open(path, "wb") as f:
        f.write(len(header).to_bytes(8, "little") + header)
        f.truncate(size if size else 8 + len(header) + data_bytes)


def test_a_huge_file_named_like_a_checkpoint_is_refused_by_its_header_before_it_is_read(copy, monkeypatch):
    file, ckpt = copy
    meta = {"step": "36", "epoch": "9", "lineage": C.read_metadata(ckpt).get("lineage", "")}  # of the session's run
    huge = ckpt.parent / "epoch-0009.safetensors"
    _fake_checkpoint(huge, 16, 64 * 2**30, meta)  # 64 GiB on disk (sparse), a header describing 16 bytes
    with pytest.raises(C.CheckpointError, match="header accounts for"):
        C.load_checkpoint(huge)
    notes: list[str] = []
    s = Session.open(file, notify=notes.append)
    assert s.trainer.pos.step == 4 and any("epoch-0009" in m and "skipping" in m for m in notes), notes
    s.close(save=False)
    _fake_checkpoint(huge, 2**33, 0, meta)  # a header that accounts for all of its 8 GiB
    monkeypatch.setattr(C, "_physical_memory", lambda: 2**32)  # on a machine with 4 GiB
    with pytest.raises(C.CheckpointError, match="more than this machine's memory"):
        C.load_checkpoint(huge)


# ------------------------------------------------------------------ file names that are not UTF-8
def test_file_names_not_in_utf8_or_holding_a_newline_survive_quarantine_training_reopen_and_predict(
        app, capsys, tmp_path):
    import csv

    from conftest import make_images

    data = make_images(tmp_path / "odd", classes=("cat", "dog"), per_class=8)
    cat = os.fsencode(data / "cat")
    png = (data / "cat" / "cat_001.png").read_bytes()
    names = {"good": b"caf\xe9.png", "trunc": b"trunc\xe9.png", "newline": b"new\nline.png"}
    paths = {k: os.path.join(cat, v) for k, v in names.items()}
    Path(os.fsdecode(paths["good"])).write_bytes(png)
    Path(os.fsdecode(paths["trunc"])).write_bytes(png[: len(png) // 2])  # shows when decoded: mid-training
    Path(os.fsdecode(paths["newline"])).write_bytes(b"not an image")  # rejected by the scan
    for line in (f"data {data} --size 32", "load test_resnet", "set batch_size 4", "train 1",
                 f"data {data} --size 32 --check"):
        ok, err = _cmd(app, capsys, line)
        assert ok, (line, err)
    from pgshell.engine.names import unescape

    lines = (app.session.folder / "quarantine.txt").read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2  # one line each, the newline in a name escaped
    assert {unescape(ln.split("\t")[0]) for ln in lines} == {os.fsdecode(paths["trunc"]), os.fsdecode(paths["newline"])}
    out = app.stdout.getvalue()
    assert "trunc\\xe9.png" in out and "new\\x0aline.png" in out  # `data --check` prints them escaped
    ok, err = _cmd(app, capsys, f"predict {data} --out {tmp_path / 'p.csv'}")
    assert ok, err
    with open(tmp_path / "p.csv", encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    error = rows[0].index("error")  # true/correct follow it when the folder's subfolders name the classes
    by_name = {unescape(r[0]): r for r in rows[1:]}
    assert by_name[os.path.join("cat", os.fsdecode(names["good"]))][error] == ""  # classified
    assert by_name[os.path.join("cat", os.fsdecode(names["trunc"]))][error] != ""  # its error, on its own row
    file = app.session.save()
    app.session.close(save=False)
    s = Session.open(file)  # the session with those names reopens
    assert s.trainer.pos.epoch == 1
    s.close(save=False)

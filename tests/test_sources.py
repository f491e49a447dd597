"""Data beyond class folders: label files (CSV, JSON lines) and Hugging Face datasets (a save_to_disk folder, a name in
the local datasets cache). They give the very splits a folder of the same images gives, and train and resume to the
same metrics rows; bad images are quarantined; the input cache is keyed by the table file's content."""

import csv
import json
import os
from pathlib import Path

import pytest
import torch

from pgshell.engine.data import _arrow
from pgshell.engine import data as D
from pgshell.engine.batches import inputcache as IC
from pgshell.engine.errors import PgError
from pgshell.engine.train.metrics import EXACT_COLUMNS, read_rows
from pgshell.session import Session
from conftest import train_to_end

datasets = pytest.importorskip("datasets")

WAIT = 120


def _folder_rows(root: Path, folder: str):
    """(relative path, class) of every image of a class-folder tree, in scan order."""
    return [(str(p.relative_to(root)), p.parent.name) for p in sorted((root / folder).rglob("*.png"))]


def _write_csv(file: Path, rows, with_split: dict | None = None):
    file.parent.mkdir(parents=True, exist_ok=True)
    with open(file, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split"] if with_split else ["path", "label"])
        for path, label in reversed(rows):  # the file's row order does not matter: images sort by path
            w.writerow([path, label, with_split[path.split("/")[0]]] if with_split else [path, label])
    return file


def _hf_from_folders(root: Path, out: Path, splits=(("train", "train"), ("validation", "val")), extra=None):
    """A save_to_disk DatasetDict holding the folder's images (encoded bytes, as the Hub's datasets do)."""
    names = sorted(p.name for p in (root / "train").iterdir())
    features = datasets.Features({"img": datasets.Image(), "label": datasets.ClassLabel(names=names)})
    parts = {}
    for hf_name, folder in splits:
        rows = {"img": [], "label": []}
        for c, name in enumerate(names):
            for file in sorted((root / folder / name).glob("*.png")):
                rows["img"].append({"bytes": file.read_bytes(), "path": None})
                rows["label"].append(c)
        for image_bytes, label in (extra or {}).get(hf_name, []):
            rows["img"].append({"bytes": image_bytes, "path": None})
            rows["label"].append(label)
        parts[hf_name] = datasets.Dataset.from_dict(rows, features=features)
    datasets.DatasetDict(parts).save_to_disk(str(out))
    return out



# ------------------------------------------------------------------------------------------- label files
def test_a_csv_with_a_split_column_gives_the_folders_splits(tmp_path, split_folder):
    rows = _folder_rows(split_folder, "train") + _folder_rows(split_folder, "val")
    labels = _write_csv(tmp_path / "elsewhere" / "labels.csv", rows, with_split={"train": "train", "val": "val"})
    got = D.resolve_data(str(labels), root=str(split_folder))
    want = D.scan_folder(str(split_folder))
    assert (got.classes, got.train, got.val, got.test) == (want.classes, want.train, want.val, None)
    assert got.layout == "labels.csv: train/val as given" and got.rejected == []


def test_a_jsonl_without_a_split_column_is_split_as_the_folder_is(tmp_path, image_folder):
    jsonl = image_folder / "labels.jsonl"
    jsonl.write_text("".join(json.dumps({"path": p, "label": c}) + "\n\n" for p, c in _folder_rows(image_folder, "")))
    got, want = D.resolve_data(str(jsonl), split=0.3, seed=4), D.scan_folder(str(image_folder), split=0.3, seed=4)
    assert (got.classes, got.train, got.val) == (want.classes, want.train, want.val)
    assert len(got.val) == 9 and got.layout == "labels.jsonl: split 0.3 seed 4"


def test_label_file_problems(tmp_path, image_folder):
    rows = _folder_rows(image_folder, "")
    messy = [*rows, ("cat/cat_000.png", "dog"), ("ghost.png", "cat"), ("cat/cat_001.png", ""), ("notes.txt", "fox")]
    (image_folder / "notes.txt").write_text("not an image")
    got = D.resolve_data(str(_write_csv(image_folder / "messy.csv", messy)))
    reasons = {os.path.relpath(p, image_folder): r for p, r in got.rejected}
    assert reasons["ghost.png"].startswith("unreadable") and reasons["notes.txt"] == "not an image"
    # rows are written reversed: the "dog" row of cat_000 comes first, the folder's own row is the repeat
    assert reasons["cat/cat_000.png"] == "listed again on line 35 of messy.csv (first on line 5)"
    assert reasons["cat/cat_001.png"].startswith("no label") and len(got.train) + len(got.val) == 30
    (tmp_path / "no_header.csv").write_text("cats/1.png,cat\n")
    with pytest.raises(PgError, match="needs a header with the columns path and label .* it has cats/1.png, cat"):
        D.resolve_data(str(tmp_path / "no_header.csv"))
    (tmp_path / "typo.csv").write_text("path,label,split\na.png,cat,trian\n")
    with pytest.raises(PgError, match="line 2 has split 'trian': use train, val or test"):
        D.resolve_data(str(tmp_path / "typo.csv"))
    (tmp_path / "bad.jsonl").write_text('{"path": "a.png", "label": "cat"}\n{"path": "b.png", label: dog}\n')
    with pytest.raises(PgError, match="line 2 is not JSON"):
        D.resolve_data(str(tmp_path / "bad.jsonl"))
    with pytest.raises(PgError, match="--root is for label files"):
        D.resolve_data(str(image_folder), root=str(tmp_path))
    one = _write_csv(tmp_path / "one.csv", [(p, c) for p, c in rows if c == "cat"])
    with pytest.raises(PgError, match="needs at least 2 classes"):
        D.resolve_data(str(one), root=str(image_folder))


# ------------------------------------------------------------------------------------------- Hugging Face
def test_a_save_to_disk_dataset_gives_the_folders_images_splits_and_quarantine(tmp_path, split_folder):
    folder = _hf_from_folders(split_folder, tmp_path / "hf", extra={"train": [(b"not an image", 1), (b"", 0)]})
    got, want = D.resolve_data(str(folder)), D.scan_folder(str(split_folder))
    assert got.classes == want.classes and got.test is None
    assert [y for _, y in got.train] == [y for _, y in want.train] and [y for _, y in got.val] == [y for _, y in want.val]
    assert got.layout == "hf: train/val as given (image 'img', label 'label')"
    for (uri, _), (file, _) in zip(got.train + got.val, want.train + want.val):
        assert uri.startswith(f"arrow:{folder}/") and D.load_image(uri).tobytes() == D.load_image(file).tobytes()
    assert sorted(r for _, r in got.rejected) == ["empty file", "not an image"]
    assert all(_arrow.parse(p)[2] in (30, 31) for p, _ in got.rejected)  # the two extra rows, listed by row
    bad = got.rejected[0][0]
    with pytest.raises(D.BadImage):
        D.load_image(bad)
    s = Session(root=tmp_path / "sessions")
    try:
        s.attach_data(str(folder), size=32)
        s.use_name("q")
        assert sorted((s.folder / "quarantine.txt").read_text().splitlines()) == sorted(
            f"{p}\t{r}" for p, r in got.rejected)
        assert s.data["path"] == str(folder.resolve())
    finally:
        s.close(save=False)


def _cached_hub_dataset(cache: Path, split_folder: Path, tmp_path: Path):
    """A dataset as `load_dataset("pgtest/tiny")` leaves it in the datasets cache, built offline by the parquet
    builder and moved to the hub name's folder."""
    from datasets.packaged_modules.parquet.parquet import Parquet

    disk = _hf_from_folders(split_folder, tmp_path / "src", splits=(("train", "train"), ("test", "val")))
    loaded = datasets.load_from_disk(str(disk))
    files = {}
    for split in ("train", "test"):
        files[split] = str(tmp_path / f"{split}.parquet")
        loaded[split].to_parquet(files[split])
    builder = Parquet(cache_dir=str(cache), dataset_name="tiny", config_id="default", hash="0123abcd",
                      data_files=files, features=loaded["train"].features)
    builder.download_and_prepare()
    os.rename(cache / "tiny", cache / "pgtest___tiny")


def test_a_dataset_from_the_local_cache_by_name(tmp_path, split_folder, monkeypatch):
    cache = tmp_path / "datasets-cache"
    _cached_hub_dataset(cache, split_folder, tmp_path)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    got = D.resolve_data("hf:pgtest/tiny", split=0.25, seed=1)
    assert got.classes == ["cat", "dog", "fox"] and len(got.test) == 12 and len(got.train) + len(got.val) == 30
    assert len(got.val) == 9 and got.layout.startswith("hf:pgtest/tiny: split 0.25 seed 1 from train, test as given")
    assert all(p.startswith(f"arrow:{cache}/pgtest___tiny/") for p, _ in got.train + got.test)
    with pytest.raises(PgError, match=f"not in the local datasets cache {cache} .*save_to_disk"):
        D.resolve_data("hf:pgtest/missing")
    with pytest.raises(PgError, match="hf:NAME or hf:NAME:CONFIG"):
        D.resolve_data("hf:")


def test_the_input_cache_key_follows_the_table_file(tmp_path, split_folder):
    folder = _hf_from_folders(split_folder, tmp_path / "hf")
    samples = D.resolve_data(str(folder)).train

    class Layout:  # what the key reads of the stored layout
        def desc(self):
            return "32|r"

    key = IC._key(samples, Layout())
    assert key == IC._key(samples, Layout()) and key != IC._key(samples[1:], Layout())
    table = Path(_arrow.parse(samples[0][0])[0])
    table.write_bytes(table.read_bytes() + b"\0")  # the table changed: the decoded images may have too
    assert IC._key(samples, Layout()) != key


# ------------------------------------------------------------------------------------------- training and resume
def _session(tmp_path, name, path, root=None):
    s = Session(root=tmp_path / "sessions")
    s.set("batch_size", 8)
    s.attach_data(str(path), size=32, root=root)
    s.load_model("test_resnet")
    s.use_name(name)
    return s


def _train(s, **kw):
    train_to_end(s, **kw)


def _rows(s):
    return [tuple(r[c] for c in EXACT_COLUMNS) for r in read_rows(s.folder / "metrics.csv")]


def _resumed_rows(tmp_path, name, path, root=None, steps=3):
    """`steps` batches, save, a new process's worth of state (Session.open), then on to the end of epoch 2."""
    s = _session(tmp_path, name, path, root)
    _train(s, steps=steps)
    file = s.save()
    s.close(save=False)
    torch.manual_seed(12345)  # resuming must not depend on the process's history
    r = Session.open(file)
    try:
        assert r.trainer.pos.step == steps and r.splits.layout == s.splits.layout
        _train(r, epochs=2 - r.trainer.pos.epoch)
        return _rows(r), {k: v.clone() for k, v in r.built.module.state_dict().items()}
    finally:
        r.close(save=False)


@pytest.fixture
def folder_reference(tmp_path, split_folder):
    s = _session(tmp_path, "ref", split_folder)
    try:
        _train(s, epochs=2)
        return _rows(s), {k: v.clone() for k, v in s.built.module.state_dict().items()}
    finally:
        s.close(save=False)


def test_a_csv_and_a_save_to_disk_dataset_train_and_resume_exactly_like_the_folder(tmp_path, split_folder,
                                                                                     folder_reference):
    ref_rows, ref_weights = folder_reference
    assert len([r for r in ref_rows if r[3] == "train"]) == 8 and len([r for r in ref_rows if r[3] == "val"]) == 2
    rows = _folder_rows(split_folder, "train") + _folder_rows(split_folder, "val")
    labels = _write_csv(tmp_path / "lists" / "labels.csv", rows, with_split={"train": "train", "val": "val"})
    hf = _hf_from_folders(split_folder, tmp_path / "hf")
    for name, path, root, steps in (("csv", labels, str(split_folder), 3), ("hf", hf, None, 5)):
        got_rows, weights = _resumed_rows(tmp_path, name, path, root, steps)
        assert got_rows == ref_rows, name
        assert all(torch.equal(weights[k], ref_weights[k]) for k in ref_weights), name


# ------------------------------------------------------------------------------------------- the shell
def test_the_data_command_takes_label_files_and_datasets_with_one_line_errors(tmp_path, split_folder, capsys):
    import io

    from pgshell.shell import PgShell

    app = PgShell(interactive=False, sessions_dir=str(tmp_path / "sessions"), stdout=io.StringIO())

    def run(line):
        app.failed.clear()
        app.last_result = None
        app.onecmd_plus_hooks(line)
        return not app.failed.is_set(), app.last_result

    try:
        rows = _folder_rows(split_folder, "train") + _folder_rows(split_folder, "val")
        labels = _write_csv(tmp_path / "labels.csv", rows, with_split={"train": "train", "val": "val"})
        ok, result = run(f"data {labels} --root {split_folder} --size 32")
        assert ok and [(r["class"], r["train"], r["val"]) for r in result["counts"]] == [
            ("cat", 10, 4), ("dog", 10, 4), ("fox", 10, 4)]
        data = app.session.data
        assert {k: data[k] for k in ("path", "split", "size", "root")} == {"path": str(labels), "split": 0.2,
                                                                            "size": 32, "root": str(split_folder)}
        ok, result = run(f"data {_hf_from_folders(split_folder, tmp_path / 'hf')} --check")
        assert ok and sum(r["train"] for r in result["counts"]) == 30 and result["rejected"] == []
        capsys.readouterr()
        for line, message in ((f"data {split_folder} --root {tmp_path}", "--root is for label files"),
                              (f"data {labels}", "unreadable"),  # paths relative to the file's folder: not there
                              ("data hf:pgtest/not-cached", "not in the local datasets cache")):
            ok, _ = run(line)
            err = capsys.readouterr().err
            assert not ok and message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    finally:
        app.session.close(save=False)

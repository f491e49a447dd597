"""Data that can be trusted: duplicates (exact, near) and leakage across splits, odd images, likely label errors by
confident learning, and `data --exclude` recorded so that reopen and replay stay exact. Small generated data only."""

import io
from pathlib import Path

import numpy as np
from PIL import Image

from pgshell.engine.report import audit as AU

from conftest import new_app, run, run_out

TINTS = [(200, 60, 60), (60, 200, 60), (60, 60, 200)]


def distinct_image(rng, px: int = 48, tint=(128, 128, 128)) -> Image.Image:
    """A picture of its own: a random 8x8 colour grid, smoothly enlarged, tinted towards its class's colour."""
    grid = rng.uniform(0, 255, (8, 8, 3)).astype(np.uint8)
    big = np.asarray(Image.fromarray(grid).resize((px, px), Image.Resampling.BICUBIC), dtype=np.float32)
    a = 0.6 * big + 0.4 * np.array(tint, np.float32) + rng.normal(0, 4, big.shape)
    return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8))


def make_distinct(root: Path, classes=("a", "b", "c"), per_class=20, seed=0, px=48) -> list[Path]:
    rng = np.random.default_rng(seed)
    files = []
    for c, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            f = root / name / f"{name}{i:03d}.png"
            distinct_image(rng, px, TINTS[c % 3]).save(f)
            files.append(f)
    return files


def near_copies(src: Path) -> dict[str, Image.Image]:
    """A re-encoded, a resized and a slightly cropped copy of `src`."""
    im = Image.open(src).convert("RGB")
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=60)
    w, h = im.size
    return {"jpeg": Image.open(io.BytesIO(buf.getvalue())).convert("RGB"),
            "resized": im.resize((w * 3 // 4, h * 3 // 4), Image.Resampling.BICUBIC),
            "cropped": im.crop((2, 1, w - 2, h - 2))}


# ---------------------------------------------------------------- the engine
def test_planted_exact_and_near_duplicates_are_found_without_false_alarms(tmp_path):
    files = make_distinct(tmp_path / "d", per_class=30)  # 90 distinct images
    planted_exact, planted_near = [], []
    for k, src in enumerate(files[:6]):  # 6 byte-for-byte copies under other names
        dst = src.with_name(f"copy{k}.png")
        dst.write_bytes(src.read_bytes())
        planted_exact.append({str(src), str(dst)})
    for k, src in enumerate(files[10:22]):  # 12 near copies: 4 of each kind
        kind, image = list(near_copies(src).items())[k % 3]
        dst = src.with_name(f"near{k}-{kind}.jpg" if kind == "jpeg" else f"near{k}-{kind}.png")
        image.save(dst, quality=95) if kind == "jpeg" else image.save(dst)
        planted_near.append({str(src), str(dst)})
    paths = sorted(str(p) for p in (tmp_path / "d").rglob("*.*"))
    facts = AU.image_facts(paths)
    exact = [{paths[i] for i in g} for g in AU.exact_groups(facts.digests)]
    assert sorted(map(sorted, exact)) == sorted(map(sorted, planted_exact))  # all 6, nothing else
    near = [{paths[i], paths[j]} for i, j, _ in AU.near_pairs(facts)]
    found = [p for p in planted_near if p in near]
    assert len(found) == 12, [p for p in planted_near if p not in near]
    assert [p for p in near if p not in planted_near] == []  # no false alarm among 102 distinct pictures


def test_hash_pairs_agree_with_a_plain_double_loop():
    rng = np.random.default_rng(3)
    h = rng.integers(0, 2**63, 300, dtype=np.uint64)
    h[5], h[17] = h[3] ^ np.uint64(0b1011), h[3]  # 3 bits and 0 bits from image 3
    i, j, d = AU.hash_pairs(h, max_bits=26, block=64)  # blocks of 64 rows: pairs across blocks are found too
    want = {(a, b, bin(int(h[a]) ^ int(h[b])).count("1")) for a in range(300) for b in range(a + 1, 300)
            if bin(int(h[a]) ^ int(h[b])).count("1") <= 26}
    assert set(zip(i.tolist(), j.tolist(), d.tolist())) == want and len(want) >= 3


def test_phash_is_the_median_test_of_the_lowest_dct_frequencies():
    """imagehash's definition (with the orthonormal DCT), computed here from the DCT-II sum itself: X[u, v] = sum over x, y of
    a(u) a(v) f[x, y] cos(pi (2x+1) u / 64) cos(pi (2y+1) v / 64), bit 8u+v set where X[u, v] > median."""
    grey = np.random.default_rng(4).uniform(0, 255, (32, 32))
    n = np.arange(32)
    basis = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 64) * np.where(n == 0, np.sqrt(1 / 32),
                                                                             np.sqrt(2 / 32))[:, None]
    low = np.einsum("ux,vy,xy->uv", basis[:8], basis[:8], grey).ravel()
    want = sum(1 << k for k in range(64) if low[k] > np.median(low))
    assert AU.phash(grey) == want and 20 < bin(want).count("1") <= 32


def test_odd_images_are_named_with_their_kind(tmp_path):
    rng = np.random.default_rng(1)
    d = tmp_path / "odd"
    d.mkdir()
    for i in range(12):
        distinct_image(rng, 48).save(d / f"ok{i}.png")
    Image.new("RGB", (48, 48), (90, 90, 90)).save(d / "blank.png")
    distinct_image(rng, 48).convert("L").save(d / "grey.png")
    distinct_image(rng, 8).save(d / "tiny.png")
    distinct_image(rng, 48).resize((240, 240)).save(d / "huge.png")
    distinct_image(rng, 48).resize((160, 40)).save(d / "wide.png")
    paths = sorted(str(p) for p in d.iterdir())
    odd = AU.odd_images(AU.image_facts(paths))
    named = {k: [Path(paths[i]).stem for i in v] for k, v in odd.items()}
    assert named == {"blank": ["blank"], "grey-scale": ["grey"], "tiny": ["tiny"], "huge": ["huge"],
                     "odd aspect": ["wide"]}


def test_feature_pairs_by_cosine_threshold():
    x = np.eye(4, 8, dtype=np.float32)
    x[3] = x[1] * 0.98 + x[2] * 0.1  # cos(x1, x3) = 0.995
    assert [(a, b) for a, b, _ in AU.feature_pairs(x, 0.95, block=2)] == [(1, 3)]
    assert AU.groups_of([(0, 2, 1.0), (2, 5, 1.0), (3, 4, 1.0)], 6) == [[0, 2, 5], [3, 4]]


# ---------------------------------------------------------------- confident learning
def test_confident_joint_by_hand():
    labels = np.array([0, 0, 0, 1, 1, 1])
    probs = np.array([[0.9, 0.1], [0.8, 0.2], [0.2, 0.8],  # the third is given 0 but looks like 1
                      [0.1, 0.9], [0.3, 0.7], [0.4, 0.6]])
    joint, thresholds, confident = AU.confident_joint(labels, probs)
    # thresholds: mean p0 over label 0 = (0.9+0.8+0.2)/3; mean p1 over label 1 = (0.9+0.7+0.6)/3
    assert np.allclose(thresholds, [1.9 / 3, 2.2 / 3], atol=1e-5)
    # 0.7 and 0.6 are below class 1's threshold (0.733), 0.3 and 0.4 below class 0's (0.633): not counted
    assert confident.tolist() == [0, 0, 1, 1, -1, -1]
    assert joint.tolist() == [[2, 1], [0, 1]]
    assert np.allclose(AU.calibrate_joint(joint, labels), [[2, 1], [0, 3]])
    assert AU.find_label_issues(labels, probs).tolist() == [2]


def test_label_flips_are_ranked_first_by_confident_learning():
    rng = np.random.default_rng(0)
    n, c = 2000, 5
    truth = rng.integers(0, c, n)
    logits = rng.normal(0, 1, (n, c))
    logits[np.arange(n), truth] += 3.0  # a decent model: about 90% right
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    given = truth.copy()
    flipped = rng.choice(n, 100, replace=False)
    given[flipped] = (truth[flipped] + rng.integers(1, c, 100)) % c
    issues = AU.find_label_issues(given, probs)
    hits = len(set(issues.tolist()) & set(flipped.tolist()))
    assert hits >= 85, hits  # recall of the flagged set
    assert len(issues) - hits <= 0.35 * len(issues), (len(issues), hits)  # mostly flips, the rest the model's errors
    top = set(issues[:100].tolist())
    assert len(top & set(flipped.tolist())) >= 80  # the least believed first
    ranking = AU.rank_label_issues(given, probs)
    assert ranking[:len(issues)].tolist() == issues.tolist() and sorted(ranking.tolist()) == list(range(n))
    assert len(set(ranking[:200].tolist()) & set(flipped.tolist())) >= 90


def test_out_of_fold_probabilities_find_flips_in_separable_features():
    rng = np.random.default_rng(2)
    centres = rng.normal(0, 1, (3, 16)) * 3
    y = rng.integers(0, 3, 300)
    x = centres[y] + rng.normal(0, 1, (300, 16))
    given = y.copy()
    flipped = np.arange(0, 300, 30)  # 10 flips
    given[flipped] = (y[flipped] + 1) % 3
    probs = AU.out_of_fold_probs(x, given, 3, folds=5, seed=0, weight_decay=1e-2)
    assert probs.shape == (300, 3) and np.allclose(probs.sum(1), 1, atol=1e-5)
    issues = AU.find_label_issues(given, probs)
    assert set(issues.tolist()) <= set(flipped.tolist()) and len(issues) >= 6  # no false alarm
    assert set(AU.rank_label_issues(given, probs)[:10].tolist()) == set(flipped.tolist())  # the flips first


def test_exclude_list_round_trips_odd_names(tmp_path):
    rows = [("train/a/x y.png", "exact duplicate of val/a/x.png (val)"), ("train/b/caf\udce9.png", "blank")]
    AU.write_exclude(tmp_path / "ex.txt", rows, "test")
    assert AU.read_exclude((tmp_path / "ex.txt").read_text()) == [p for p, _ in rows]


# ---------------------------------------------------------------- the shell: audit, data --exclude, reopen, replay
def leaky_split(root: Path) -> Path:
    """train/ (3 x 12) and val/ (3 x 4) of distinct pictures; 2 val images copied into train (under other names), a
    near copy (resized) of a third in train, and a blank training image."""
    make_distinct(root / "train", per_class=12, seed=1)
    make_distinct(root / "val", per_class=4, seed=2)
    for name in ("a000", "b001"):
        cls = name[0]
        (root / "train" / cls / f"dup-{name}.png").write_bytes((root / "val" / cls / f"{name}.png").read_bytes())
    near_copies(root / "val" / "c" / "c002.png")["resized"].save(root / "train" / "c" / "near-c002.png")
    Image.new("RGB", (48, 48), (10, 10, 10)).save(root / "train" / "a" / "blank.png")
    return root


def test_audit_names_leakage_writes_sheets_and_an_exclude_list(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = leaky_split(tmp_path / "tv")
    app = new_app(tmp_path / "sessions")
    try:
        ok, _ = run(app, f"data {data} --size 32")
        assert ok
        ok, res = run(app, f"audit --out {tmp_path / 'aud'}")
        assert ok, app.stdout.getvalue()
        out = app.stdout.getvalue()
        assert res["images"] == 40 + 12 and res["features"] is False  # no model: hashes only
        assert "3 val images also in train (2 exact, 1 near)" in out
        assert [len(g) for g in res["groups"]["exact"]] == [2, 2] and len(res["groups"]["near"]) == 1
        assert [m["path"] for m in res["odd"]["blank"]] == ["train/a/blank.png"]
        assert sorted(p.name for p in (tmp_path / "aud").iterdir()) == ["audit.csv", "blank.png", "exact.png",
                                                                       "exclude.txt", "near.png"]
        listed = AU.read_exclude((tmp_path / "aud" / "exclude.txt").read_text())
        assert listed == ["train/a/blank.png", "train/a/dup-a000.png", "train/b/dup-b001.png",
                          "train/c/near-c002.png"]  # the training copies go: val stays as it was
        app.stdout.seek(0), app.stdout.truncate()
        ok, res = run(app, f"data {data} --size 32 --check")
        assert ok and "audit: 3 val images also in train (2 exact, 1 near)" in app.stdout.getvalue()
    finally:
        app.session.close(save=False)


def test_data_exclude_is_recorded_reopened_and_replayed_exactly(tmp_path, monkeypatch):
    from pgshell.session import Session
    from pgshell.engine.store.digests import weights_digest
    from pgshell.session.replay import data_differences, export_plan, fork
    from pgshell.shell.cli import run_plan

    monkeypatch.chdir(tmp_path)
    data = leaky_split(tmp_path / "tv")
    exclude = tmp_path / "exclude.txt"
    AU.write_exclude(exclude, [("train/a/dup-a000.png", "dup"), ("train/b/dup-b001.png", "dup"),
                               ("train/zzz/gone.png", "not in the data")], "test")
    before = sorted((p, p.stat().st_size) for p in data.rglob("*.png"))
    s = Session(root=tmp_path / "sessions")
    try:
        s.set("batch_size", 8)
        s.attach_data(str(data), size=32, exclude=str(exclude))
        assert len(s.splits.train) == 36 + 4 - 2 and len(s.splits.excluded) == 2
        assert all("dup-" not in p for p, _ in s.splits.train)
        s.load_model("test_resnet")
        s.use_name("ex")
        s.train(steps=2)
        assert s.wait(120) and "error" not in s.status
        s.save()
        fingerprint = s.binding.identity["fingerprint"]
        entry = [e for e in s.changes.entries if e["kind"] == "data"][-1]
        assert entry["exclude"] == str(exclude) and entry["excluded"] == ["train/a/dup-a000.png",
                                                                          "train/b/dup-b001.png"]
        assert f"--exclude {exclude}" in entry["cmd"] and len(entry["exclude_sha256"]) == 64
        assert entry["files"] == 40 + 12  # the folder's manifest still covers the excluded files
        plan = export_plan(s, str(tmp_path / "ex.plan"))
        text = (tmp_path / "ex.plan").read_text()
        assert f"expect file {exclude} {entry['exclude_sha256']}" in text and plan["warnings"] == []
        manifest = next(tmp_path.glob("ex.plan.data-1.tsv"))
        assert data_differences(str(data), manifest) == []
        forked = fork(s, "ex-fork")
        digest = weights_digest(s.built.module)
    finally:
        s.close()
    replayed = new_app(tmp_path / "replayed")  # the plan, run from nothing: the same data, the same weights
    assert run_plan(replayed, text.splitlines()) == 0, replayed.stdout.getvalue()[-800:]
    assert replayed.session.binding.identity["fingerprint"] == fingerprint
    assert weights_digest(replayed.session.built.module) == digest
    assert sorted((p, p.stat().st_size) for p in data.rglob("*.png")) == before  # nothing moved or deleted
    exclude.write_text("")  # the list edited since: the session keeps the names it recorded
    for file in (tmp_path / "sessions" / "ex.session", forked):  # the session, and a fork of it
        s2 = Session.open(file)
        try:
            assert s2.data_change is None and s2.splits is not None
            assert s2.binding.identity["fingerprint"] == fingerprint and len(s2.splits.train) == 38
        finally:
            s2.close(save=False)


def test_the_plan_line_replays_the_same_exclusion(tmp_path, monkeypatch, capsys):
    from pgshell.shell.cli import run_plan

    monkeypatch.chdir(tmp_path)
    data = leaky_split(tmp_path / "tv")
    exclude = tmp_path / "exclude.txt"
    AU.write_exclude(exclude, [("train/c/near-c002.png", "near")], "test")
    fingerprints = []
    for name in ("one", "two"):
        app = new_app(tmp_path / name)
        try:
            assert run_plan(app, [f"data {data} --size 32 --exclude {exclude}"]) == 0
            fingerprints.append(app.session.binding.identity["fingerprint"])
            assert len(app.session.splits.train) == 39
        finally:
            app.session.close(save=False)
    assert fingerprints[0] == fingerprints[1]
    app = new_app(tmp_path / "three")
    try:
        exclude.write_text("train/a/nothing-like-this.png\n")
        ok, _, err = run_out(app, capsys, f"data {data} --size 32 --exclude {exclude}")
        assert not ok and "none of the 1 files" in err and "is it the list of this data?" in err
    finally:
        app.session.close(save=False)


def test_errors_suspect_ranks_flipped_validation_labels_first(tmp_path, monkeypatch):
    """A model that learned the classes' tints disbelieves the val images planted in the wrong class folder."""
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "tv"
    make_distinct(root / "train", per_class=16, seed=1, px=32)
    make_distinct(root / "val", per_class=8, seed=2, px=32)
    for src, dst in (("a/a001.png", "b/flip1.png"), ("b/b002.png", "c/flip2.png"), ("c/c003.png", "a/flip3.png")):
        (root / "val" / src).rename(root / "val" / dst)
    app = new_app(tmp_path / "sessions")
    try:
        for line in ("set batch_size 16", "set lr 0.01", "set optimizer adamw", "set augment off",
                     f"data {root} --size 32", "load test_resnet", "train 4", "wait"):
            ok, _ = run(app, line)
            assert ok, (line, app.stdout.getvalue()[-500:])
        ok, res = run(app, f"errors --suspect --top 5 --out {tmp_path / 'sus.png'}")
        assert ok, app.stdout.getvalue()[-500:]
        assert res["how"] == "model" and res["n"] == 24
        assert {Path(r["path"]).name for r in res["rows"][:3]} == {"flip1.png", "flip2.png", "flip3.png"}
        assert res["flagged"] >= 3 and all(r["flagged"] for r in res["rows"][:3])
        assert (tmp_path / "sus.png").stat().st_size > 1000
        assert (tmp_path / "sus.csv").read_text().count("\n") == 6
        ok, res = run(app, "errors --suspect --class b --top 2")
        assert ok and [r["true"] for r in res["rows"]] == ["b", "b"] and res["rows"][0]["path"] == "val/b/flip1.png"
    finally:
        app.session.close(save=False)


def test_feature_duplicates_are_grouped_and_named_as_leakage(tmp_path, monkeypatch):
    """Two different pictures (train c/c005, val a/a003) whose features agree: a feature group, named as leakage,
    reported but never put on the exclude list; a pair the hashes already found is not repeated."""
    import torch

    from pgshell.session import dataaudit as SA

    monkeypatch.chdir(tmp_path)
    data = leaky_split(tmp_path / "tv")
    app = new_app(tmp_path / "sessions")
    try:
        assert run(app, f"data {data} --size 32")[0] and run(app, "load test_resnet")[0]
        samples = app.session.splits.train + app.session.splits.val
        at = {p: i for i, (p, _) in enumerate(samples)}
        x = torch.eye(len(samples))  # every image its own direction, but for two pairs
        for a, b in (("train/c/c005.png", "val/a/a003.png"), ("train/c/near-c002.png", "val/c/c002.png")):
            x[at[str(data / b)]] = x[at[str(data / a)]]
        monkeypatch.setattr(SA, "model_features", lambda s, sm: (x[:len(sm)], torch.ones(len(sm), dtype=torch.bool)))
        ok, res = run(app, "audit --features")
        assert ok, app.stdout.getvalue()
        names = [sorted(m["path"] for m in g) for g in res["groups"]["features"]]
        assert names == [["train/c/c005.png", "val/a/a003.png"]]  # the near pair was found by its hash already
        assert "4 val images also in train (2 exact, 1 near, 1 by features)" in app.stdout.getvalue()
        assert "val/a/a003.png" not in dict(res["exclude"]) and "train/c/c005.png" not in dict(res["exclude"])
    finally:
        app.session.close(save=False)

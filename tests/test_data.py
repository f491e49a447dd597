"""pgshell.engine.data: folder scanning, bad images, odd modes, transforms, and exact reproducibility of batches."""

import io
import os
import random
import time
import warnings

import numpy as np
import PIL.Image
import pytest
import torch
from PIL import Image

from pgshell.engine.data.folders import Splits, scan_folder
from pgshell.engine.data.images import BadImage, load_image
from pgshell.engine.data.loading import ImageDataset, collate, make_loader
from pgshell.engine.data.sampling import EpochSampler, epoch_permutation, sample_seed
from pgshell.engine.data.transforms import build_transform
from pgshell.engine.errors import PgError

# test_resnet's resolved data config, written out so no model needs building; mean/std deliberately not ImageNet's.
DATA_CONFIG = {"input_size": (3, 160, 160), "interpolation": "bilinear", "mean": (0.5, 0.25, 0.1),
               "std": (0.5, 0.5, 0.25), "crop_pct": 0.95, "crop_mode": "center"}


# ---------------------------------------------------------------------------------------------------------------
# helpers: tiny images made on the spot
# ---------------------------------------------------------------------------------------------------------------

def noise_image(seed: int, size: int = 32, mode: str = "RGB") -> Image.Image:
    """Random pixels: every file differs, and JPEG can't shrink it to a header-sized stub."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)


def save(path, image: Image.Image, **kwargs) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return str(path)


def make_classes(root, counts: dict[str, int], ext: str = ".png") -> dict[str, list[str]]:
    """root/<class>/img<i><ext> for each class; returns the absolute paths per class."""
    paths = {}
    for c, (name, count) in enumerate(counts.items()):
        paths[name] = [save(root / name / f"img{i:02d}{ext}", noise_image(100 * c + i)) for i in range(count)]
    return paths


def truncated_jpeg(path) -> str:
    """A valid JPEG cut in half: the header still reads, the pixel data does not."""
    buffer = io.BytesIO()
    noise_image(7, 64).save(buffer, "JPEG")
    data = buffer.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return str(path)


def paths_of(samples):
    return {path for path, _ in samples}


def rejected_reasons(splits: Splits) -> dict[str, str]:
    return dict(splits.rejected)


# ---------------------------------------------------------------------------------------------------------------
# scan_folder: layouts and splits
# ---------------------------------------------------------------------------------------------------------------

def test_class_folders_split_per_class_with_exact_counts(tmp_path):
    files = make_classes(tmp_path, {"dogs": 5, "cats": 10, "owls": 2, "ants": 1})
    splits = scan_folder(str(tmp_path), split=0.2, seed=0)

    assert splits.classes == ["ants", "cats", "dogs", "owls"]
    assert splits.layout == "split 0.2 seed 0"
    assert splits.test is None and splits.rejected == []
    # round(n * 0.2), at least one val image when a class has two or more, never all of them
    assert splits.counts() == [
        {"class": "ants", "train": 1, "val": 0, "test": None},
        {"class": "cats", "train": 8, "val": 2, "test": None},
        {"class": "dogs", "train": 4, "val": 1, "test": None},
        {"class": "owls", "train": 1, "val": 1, "test": None},
    ]
    assert paths_of(splits.train).isdisjoint(paths_of(splits.val))
    for label, name in enumerate(splits.classes):
        in_class = {p for p, y in splits.train + splits.val if y == label}
        assert in_class == set(files[name])
    assert all(os.path.isabs(p) for p, _ in splits.train + splits.val)
    assert splits.train == sorted(splits.train, key=lambda s: (s[1], s[0]))  # listed in a stable order


def test_split_fraction_rounds_half_up(tmp_path):
    make_classes(tmp_path, {"a": 10, "b": 5})
    counts = scan_folder(str(tmp_path), split=0.25, seed=0).counts()
    assert [(r["train"], r["val"]) for r in counts] == [(7, 3), (4, 1)]  # 2.5 -> 3, 1.25 -> 1


def test_same_seed_same_split_other_seed_other_split(tmp_path):
    make_classes(tmp_path, {"cats": 20, "dogs": 20})
    first = scan_folder(str(tmp_path), seed=0)
    again = scan_folder(str(tmp_path), seed=0)
    other = scan_folder(str(tmp_path), seed=1)
    assert first.train == again.train and first.val == again.val
    assert paths_of(first.val) != paths_of(other.val)
    assert [r["val"] for r in other.counts()] == [4, 4]
    assert other.layout == "split 0.2 seed 1"


def test_checking_never_moves_a_good_file_to_another_split(tmp_path):
    make_classes(tmp_path, {"cats": 12, "dogs": 12})
    (tmp_path / "cats" / "empty.png").write_bytes(b"")
    checked = scan_folder(str(tmp_path), check=True)
    unchecked = scan_folder(str(tmp_path), check=False)
    bad = str(tmp_path / "cats" / "empty.png")
    assert rejected_reasons(checked) == {bad: "empty file"}
    assert bad in paths_of(unchecked.train + unchecked.val)
    assert paths_of(checked.train) == paths_of(unchecked.train) - {bad}
    assert paths_of(checked.val) == paths_of(unchecked.val) - {bad}


@pytest.mark.parametrize("split", [0, 1, -0.1, 1.5])
def test_split_outside_zero_one_is_refused(tmp_path, split):
    make_classes(tmp_path, {"a": 3, "b": 3})
    with pytest.raises(PgError, match="between 0 and 1"):
        scan_folder(str(tmp_path), split=split)


def test_train_val_folders_are_used_as_they_are(tmp_path):
    train = make_classes(tmp_path / "train", {"b": 3, "a": 4})
    val = make_classes(tmp_path / "val", {"a": 2, "b": 1})
    splits = scan_folder(str(tmp_path), split=0.5, seed=3)  # split and seed don't apply to this layout

    assert splits.layout == "train/val folders"
    assert splits.classes == ["a", "b"]
    assert splits.test is None
    assert splits.counts() == [{"class": "a", "train": 4, "val": 2, "test": None},
                               {"class": "b", "train": 3, "val": 1, "test": None}]
    assert splits.train == [(p, 0) for p in train["a"]] + [(p, 1) for p in train["b"]]
    assert splits.val == [(p, 0) for p in val["a"]] + [(p, 1) for p in val["b"]]


def test_test_folder_is_optional_and_may_lack_classes(tmp_path):
    make_classes(tmp_path / "train", {"a": 2, "b": 2, "c": 2})
    make_classes(tmp_path / "val", {"a": 1, "b": 1})
    test = make_classes(tmp_path / "test", {"c": 3})
    splits = scan_folder(str(tmp_path))
    assert [(r["class"], r["val"], r["test"]) for r in splits.counts()] == [("a", 1, 0), ("b", 1, 0), ("c", 0, 3)]
    assert splits.test == [(p, 2) for p in test["c"]]


def test_val_class_missing_from_train_is_an_error(tmp_path):
    make_classes(tmp_path / "train", {"a": 2, "b": 2})
    make_classes(tmp_path / "val", {"a": 1, "zebra": 1})
    with pytest.raises(PgError, match="zebra"):
        scan_folder(str(tmp_path))


def test_train_without_val_is_an_error_that_says_what_to_do(tmp_path):
    make_classes(tmp_path / "train", {"a": 2, "b": 2})
    with pytest.raises(PgError, match="no .*val/.*point at .*train alone"):
        scan_folder(str(tmp_path))


def test_nested_folders_included_hidden_and_non_images_skipped(tmp_path):
    make_classes(tmp_path, {"a": 2, "b": 2})
    nested = save(tmp_path / "a" / "2024" / "june" / "deep.png", noise_image(50))
    upper = save(tmp_path / "b" / "SHOUT.JPG", noise_image(51), format="JPEG")
    save(tmp_path / "a" / ".hidden.png", noise_image(52))
    save(tmp_path / "a" / ".thumbs" / "t.png", noise_image(53))
    save(tmp_path / ".cache" / "x.png", noise_image(54))  # a hidden folder is not a class
    (tmp_path / "a" / "notes.txt").write_text("not an image, not named like one")
    loose = save(tmp_path / "stray.png", noise_image(55))

    splits = scan_folder(str(tmp_path))
    everything = paths_of(splits.train + splits.val)
    assert splits.classes == ["a", "b"]
    assert len(everything) == 6
    assert nested in everything and upper in everything
    assert not any("hidden" in p or ".thumbs" in p or ".cache" in p or p.endswith(".txt") for p in everything)
    assert rejected_reasons(splits) == {loose: "not in a class folder"}


def test_empty_class_folder_is_noted_and_left_out(tmp_path):
    make_classes(tmp_path, {"a": 3, "b": 3})
    (tmp_path / "empty").mkdir()
    splits = scan_folder(str(tmp_path))
    assert splits.classes == ["a", "b"]
    assert rejected_reasons(splits) == {str(tmp_path / "empty"): "empty class folder"}


def test_path_errors(tmp_path):
    with pytest.raises(PgError, match="no such folder"):
        scan_folder(str(tmp_path / "nowhere"))
    (tmp_path / "file.png").write_bytes(b"x")
    with pytest.raises(PgError, match="not a folder"):
        scan_folder(str(tmp_path / "file.png"))


def test_no_images_is_an_error_naming_the_expected_layout(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "dogs").mkdir()
    (tmp_path / "dogs" / "readme.txt").write_text("hello")
    with pytest.raises(PgError, match=r"no images found under .*expected class folders like .*/cats/\*\.jpg"):
        scan_folder(str(tmp_path))


def test_one_class_is_an_error(tmp_path):
    make_classes(tmp_path, {"cats": 4})
    (tmp_path / "dogs").mkdir()  # empty: doesn't count
    with pytest.raises(PgError, match="at least 2 classes.*'cats'"):
        scan_folder(str(tmp_path))


def test_scan_check_is_fast(tmp_path):
    buffer = io.BytesIO()
    noise_image(0, 64).save(buffer, "JPEG")
    for c in range(4):
        (tmp_path / f"class{c}").mkdir()
        for i in range(500):
            (tmp_path / f"class{c}" / f"{i:04d}.jpg").write_bytes(buffer.getvalue())
    started = time.perf_counter()
    splits = scan_folder(str(tmp_path))
    assert time.perf_counter() - started < 2.0
    assert len(splits.train) + len(splits.val) == 2000


# ---------------------------------------------------------------------------------------------------------------
# bad files and odd modes
# ---------------------------------------------------------------------------------------------------------------

@pytest.fixture
def messy(tmp_path, monkeypatch):
    """A class-folder root with good images, every kind of bad file, and images in odd modes."""
    root = tmp_path / "data"
    files = {name: paths for name, paths in make_classes(root, {"good": 6, "other": 6}).items()}
    files["truncated"] = truncated_jpeg(root / "good" / "truncated.jpg")
    (root / "good" / "zero.jpg").write_bytes(b"")
    files["zero"] = str(root / "good" / "zero.jpg")
    (root / "other" / "text.jpg").write_text("I am a text file wearing a .jpg name\n")
    files["text"] = str(root / "other" / "text.jpg")
    files["cmyk"] = save(root / "other" / "cmyk.jpg", Image.new("CMYK", (32, 32), (255, 0, 0, 0)), quality=95)
    gradient = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    files["16bit"] = save(root / "other" / "gradient16.png", Image.fromarray(gradient))
    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    palette.paste(1, (0, 0, 16, 32))  # left half colour 1 (blue, opaque), right half colour 0 (red, transparent)
    files["palette"] = save(root / "good" / "palette.png", palette, transparency=0)
    files["unreadable"] = save(root / "other" / "locked.png", noise_image(99))

    locked = files["unreadable"]
    if os.geteuid() == 0:  # root reads anything: make PIL see the error a chmod 000 would cause
        real_open = PIL.Image.open

        def open_or_refuse(fp, *args, **kwargs):
            if str(fp) == locked:
                raise PermissionError(13, "Permission denied", locked)
            return real_open(fp, *args, **kwargs)

        monkeypatch.setattr(PIL.Image, "open", open_or_refuse)
    else:
        os.chmod(locked, 0)
    yield root, files
    os.chmod(locked, 0o644)


def test_scan_rejects_what_the_header_shows(messy):
    root, files = messy
    splits = scan_folder(str(root))
    assert rejected_reasons(splits) == {
        files["zero"]: "empty file",
        files["text"]: "not an image",
        files["unreadable"]: "unreadable (permission denied)",
    }
    kept = paths_of(splits.train + splits.val)
    assert len(kept) == 12 + 4
    for name in ("truncated", "cmyk", "16bit", "palette"):  # their headers are fine
        assert files[name] in kept


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # pytest resets data.py's filter per test
def test_decompression_bomb_rejected_by_scan_and_load(tmp_path, monkeypatch):
    for name in ("a", "b"):
        for i in range(2):
            save(tmp_path / name / f"{i}.png", noise_image(i, 16))  # 256 pixels: always fine here
    big = save(tmp_path / "a" / "big.png", noise_image(1, 48))  # 2304 pixels
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1500)  # over the limit but under twice it: PIL only warns
    assert rejected_reasons(scan_folder(str(tmp_path))) == {big: "decompression bomb 48x48"}
    with pytest.raises(BadImage, match="decompression bomb 48x48"):
        load_image(big)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # someone runs with -W error: still a BadImage, not a stray warning
        with pytest.raises(BadImage, match=r"decompression bomb \(2304 pixels\)"):
            load_image(big)

    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 1000)  # more than twice over: PIL raises before we see it
    with pytest.raises(BadImage, match=r"decompression bomb \(2304 pixels\)"):
        load_image(big)
    assert rejected_reasons(scan_folder(str(tmp_path))) == {big: "decompression bomb (2304 pixels)"}


def test_load_image_raises_bad_image_with_reasons(messy):
    _, files = messy
    expected = {"zero": "empty file", "text": "not an image", "unreadable": "unreadable (permission denied)",
                "truncated": "truncated or corrupt"}
    for name, reason in expected.items():
        with pytest.raises(BadImage, match=reason.replace("(", r"\(").replace(")", r"\)")):
            load_image(files[name])


def test_load_image_converts_odd_modes_to_rgb(messy):
    _, files = messy
    cmyk = load_image(files["cmyk"])
    assert cmyk.mode == "RGB"
    assert np.abs(np.asarray(cmyk).astype(int) - (0, 255, 255)).max() <= 8  # full cyan ink is cyan

    grey = np.asarray(load_image(files["16bit"]))
    assert grey.shape == (32, 32, 3)
    # scaled by 255/65535, not clipped: PIL's own convert("RGB") would turn all but the first row white
    assert grey.min() == 0 and grey[16, 0, 0] == 128  # 32768 -> 127.5 -> 128
    assert (grey == 255).mean() < 0.01 and abs(grey.mean() - 127.4) < 1

    palette = np.asarray(load_image(files["palette"]))
    assert (palette[:, :16] == (0, 0, 255)).all()  # opaque blue stays blue
    assert (palette[:, 16:] == (255, 255, 255)).all()  # transparent red becomes the white background


def test_alpha_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (8, 8), (200, 10, 10, 0))
    rgba.paste((0, 100, 0, 255), (0, 0, 4, 8))
    out = np.asarray(load_image(save(tmp_path / "rgba.png", rgba)))
    assert (out[:, :4] == (0, 100, 0)).all() and (out[:, 4:] == 255).all()
    la = np.asarray(load_image(save(tmp_path / "la.png", Image.new("LA", (8, 8), (40, 128)))))
    assert (np.abs(la.astype(int) - 147) <= 1).all()  # 40 at alpha 128/255 over white: 40*0.502 + 255*0.498


def test_a_full_epoch_over_bad_images_reports_instead_of_raising(messy):
    root, files = messy
    splits = scan_folder(str(root))
    samples = splits.train + splits.val
    dataset = ImageDataset(samples, build_transform(DATA_CONFIG, train=True, size=32))
    loader = make_loader(dataset, EpochSampler(len(samples), seed=0, epoch=0), batch_size=5, workers=0)

    seen, bad = 0, []
    for images, labels, problems in loader:
        bad += problems
        if images is not None:
            assert images.shape[1:] == (3, 32, 32) and len(labels) == len(images)
            seen += len(images)
    assert seen == len(samples) - 1
    assert len(bad) == 1 and bad[0][0] == files["truncated"] and bad[0][1].startswith("truncated or corrupt")


def test_collate_skips_bad_samples_and_an_all_bad_batch_is_none():
    good = (torch.ones(3, 4, 4), 1, None)
    bad = (None, 0, ("/x/broken.jpg", "truncated or corrupt"))
    images, labels, problems = collate([good, bad, good])
    assert images.shape == (2, 3, 4, 4) and labels.tolist() == [1, 1] and labels.dtype == torch.long
    assert problems == [("/x/broken.jpg", "truncated or corrupt")]
    assert collate([bad, bad]) == (None, None, [bad[2], bad[2]])


# ---------------------------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------------------------

def test_size_override_sets_output_shape():
    image = noise_image(0, 50)
    for train in (True, False):
        assert build_transform(DATA_CONFIG, train=train, size=40)(image).shape == (3, 40, 40)
    assert build_transform(DATA_CONFIG, train=False)(image).shape == (3, 160, 160)


def test_mean_and_std_of_the_config_are_applied():
    image = Image.new("RGB", (48, 48), (255, 0, 51))
    out = build_transform(DATA_CONFIG, train=False, size=32)(image)
    expected = (torch.tensor([1.0, 0.0, 0.2]) - torch.tensor(DATA_CONFIG["mean"])) / torch.tensor(DATA_CONFIG["std"])
    assert torch.allclose(out, expected[:, None, None].expand(3, 32, 32), atol=1e-5)  # (1, -0.5, 0.4)


def test_train_augments_by_seed_eval_is_deterministic(tmp_path):
    path = save(tmp_path / "a.png", noise_image(3, 48))
    train = ImageDataset([(path, 0)], build_transform(DATA_CONFIG, train=True, size=32))
    outputs = [train[(0, seed)][0] for seed in range(4)]
    assert all(not torch.equal(outputs[0], other) for other in outputs[1:])

    evaluate = build_transform(DATA_CONFIG, train=False, size=32)
    no_augment = build_transform(DATA_CONFIG, train=True, size=32, augment=False)
    image = load_image(path)
    torch.manual_seed(1)
    first = evaluate(image)
    torch.manual_seed(2)
    random.seed(2)
    assert torch.equal(first, evaluate(image))
    assert torch.equal(first, no_augment(image))


# ---------------------------------------------------------------------------------------------------------------
# determinism: seeds, sampler, loader
# ---------------------------------------------------------------------------------------------------------------

def test_sample_seed_is_mixed_not_summed():
    seeds = {sample_seed(s, e, i) for s in range(3) for e in range(10) for i in range(100)}
    assert len(seeds) == 3000
    assert all(0 <= x < 2**63 for x in seeds)
    assert sample_seed(0, 1, 0) != sample_seed(0, 0, 1)
    assert sample_seed(5, 2, 7) == sample_seed(5, 2, 7)


def test_epoch_permutation_depends_on_seed_and_epoch_only():
    first = epoch_permutation(50, seed=1, epoch=3)
    torch.manual_seed(123)
    torch.rand(10)
    assert epoch_permutation(50, seed=1, epoch=3) == first
    assert sorted(first) == list(range(50))
    assert epoch_permutation(50, seed=1, epoch=4) != first
    assert epoch_permutation(50, seed=2, epoch=3) != first


def test_sampler_resumes_with_the_exact_tail():
    full = list(EpochSampler(23, seed=4, epoch=2))
    assert [i for i, _ in full] == epoch_permutation(23, 4, 2)
    assert full[0][1] == sample_seed(4, 2, full[0][0])
    for start in (0, 1, 10, 22, 23):
        resumed = EpochSampler(23, seed=4, epoch=2, start=start)
        assert list(resumed) == full[start:] and len(resumed) == 23 - start


def test_sampler_shards_ranks_like_distributed_sampler():
    n = 11
    order = epoch_permutation(n, 0, 1)
    ranks = [list(EpochSampler(n, seed=0, epoch=1, rank=r, world=2)) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == 6 == len(EpochSampler(n, seed=0, epoch=1, rank=1, world=2))
    padded = order + order[:1]
    assert [i for i, _ in ranks[0]] == padded[0::2] and [i for i, _ in ranks[1]] == padded[1::2]
    assert {i for r in ranks for i, _ in r} == set(range(n))
    # resuming after 4 samples of the whole job: each rank skips its 2
    tails = [list(EpochSampler(n, seed=0, epoch=1, start=4, rank=r, world=2)) for r in range(2)]
    assert tails == [ranks[0][2:], ranks[1][2:]]


def test_sampler_without_shuffle_is_sequential_and_the_same_every_epoch():
    epoch0 = list(EpochSampler(5, seed=0, epoch=0, shuffle=False))
    epoch7 = list(EpochSampler(5, seed=0, epoch=7, shuffle=False))
    assert [i for i, _ in epoch0] == [0, 1, 2, 3, 4]
    assert epoch0 == epoch7


@pytest.fixture
def train_set(tmp_path):
    files = make_classes(tmp_path, {"a": 6, "b": 6})
    samples = [(p, 0) for p in files["a"]] + [(p, 1) for p in files["b"]]
    return ImageDataset(samples, build_transform(DATA_CONFIG, train=True, size=32))


def test_a_sample_depends_only_on_index_and_seed(train_set):
    first = train_set[(3, 12345)][0]
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    after = train_set[(5, 999)][0]
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state  # restored

    torch.manual_seed(7)
    torch.rand(100)
    random.random()
    np.random.rand(3)
    assert torch.equal(train_set[(3, 12345)][0], first)
    assert not torch.equal(train_set[(3, 12346)][0], first)
    assert not torch.equal(after, first)
    assert torch.equal(train_set[3][0], train_set[(3, 0)][0])


def batches(dataset, workers, start=0):
    sampler = EpochSampler(len(dataset), seed=9, epoch=1, start=start)
    return [(images, labels) for images, labels, _ in make_loader(dataset, sampler, batch_size=4, workers=workers)]


def test_workers_do_not_change_the_batches(train_set):
    serial = batches(train_set, workers=0)
    parallel = batches(train_set, workers=2)
    assert len(serial) == 3
    for (a, y), (b, z) in zip(serial, parallel, strict=True):
        assert torch.equal(a, b) and torch.equal(y, z)


def test_resuming_mid_epoch_gives_the_same_batches_and_leaves_global_rng_alone(train_set):
    full = batches(train_set, workers=0)
    torch.manual_seed(31)
    state = torch.get_rng_state()
    resumed = batches(train_set, workers=0, start=4)  # after the first batch of 4
    assert torch.equal(torch.get_rng_state(), state)
    for (a, y), (b, z) in zip(full[1:], resumed, strict=True):
        assert torch.equal(a, b) and torch.equal(y, z)

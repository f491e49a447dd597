"""Batch sources: the aspect-preserving input cache, device decode, the choice between them, all on a Trainer directly.

The cache and the decode path crop like timm's RandomResizedCrop over each image's real extent (a statistical test
against timm's own get_params), reach every pixel of a wide photo, decode and report bad files like the DataLoader,
and keep exact resume; `input_cache` picks cache / device decode / DataLoader by the memory limit and the device.
"""

import math
import os
import random

import numpy as np
import pytest
import torch
from PIL import Image

from pgshell.engine import data as D
from pgshell.engine.batches import inputcache as IC
from pgshell.engine import models as M
from pgshell.engine import batches as SRC
from pgshell.engine.config import TrainConfig
from pgshell.engine.train.device import Runtime
from pgshell.engine.train.loop import Trainer

SCALE, RATIO = (0.08, 1.0), (3 / 4, 4 / 3)


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("PGSHELL_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("PGSHELL_INPUT_CACHE_MAX", raising=False)
    return tmp_path / "cache" / "inputs"


def _trainer(folder, size=32, **settings) -> Trainer:
    splits = D.scan_folder(str(folder))
    torch.manual_seed(0)
    built = M.build_model(M.ModelSpec("test_resnet", len(splits.classes)))
    cfg = TrainConfig().replace(batch_size=8, **settings)
    return Trainer(built, M.ModelSpec("test_resnet", len(splits.classes)), splits, cfg, size=size)


def _run(tr: Trainer, **kw):
    notes, bad = [], []
    tr.notify, tr.on_bad = notes.append, bad.extend
    res = tr.run(**kw)
    return res, notes, bad


# ------------------------------------------------------------------ crop boxes: timm's distribution, every pixel
def _ks(a, b) -> float:
    """The two-sample Kolmogorov-Smirnov statistic."""
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    cdf_a, cdf_b = np.searchsorted(a, grid, "right") / len(a), np.searchsorted(b, grid, "right") / len(b)
    return float(np.max(np.abs(cdf_a - cdf_b)))


def _features(boxes, width, height):
    """Per box (top, left, h, w): area fraction, log aspect, horizontal and vertical centre (fractions of the image)."""
    b = np.array(boxes, dtype=float)
    return {"area": b[:, 2] * b[:, 3] / (width * height), "aspect": np.log(b[:, 3] / b[:, 2]),
            "cx": (b[:, 1] + b[:, 3] / 2) / width, "cy": (b[:, 0] + b[:, 2] / 2) / height}


def _timm_boxes(width, height, n):
    from timm.data.transforms import RandomResizedCropAndInterpolation as RRC

    img = Image.new("RGB", (width, height))
    random.seed(1)
    return [RRC.get_params(img, SCALE, RATIO) for _ in range(n)]


@pytest.mark.parametrize("width, height", [(500, 375), (375, 500), (100, 100), (300, 100), (57, 43)])
def test_crop_boxes_follow_timms_distribution(width, height):
    """Our boxes (one Random per image, seeded by its sample seed) and timm's get_params on the same image size:
    area fraction, aspect and position distributions agree (KS test at alpha 0.001, fixed seeds)."""
    n = 4000
    ours = [IC.crop_box(random.Random(D.sample_seed(0, 0, i)), width, height, SCALE, RATIO) for i in range(n)]
    theirs = _timm_boxes(width, height, n)
    critical = 1.95 * math.sqrt(2 / n)  # c(0.001) sqrt((n + m) / (n m))
    fo, ft = _features(ours, width, height), _features(theirs, width, height)
    for name in fo:
        assert _ks(fo[name], ft[name]) < critical, name
    assert all(0 <= t and 0 <= l and t + h <= height and l + w <= width for t, l, h, w in ours)


def test_the_crop_test_tells_a_centre_square_apart():
    """The statistic has power: boxes drawn over the centre square of a 3:1 image (the old cache) fail it."""
    n, width, height = 4000, 300, 100
    square = [IC.crop_box(random.Random(i), height, height, SCALE, RATIO) for i in range(n)]
    shifted = [(t, l + (width - height) // 2, h, w) for t, l, h, w in square]
    fo, ft = _features(shifted, width, height), _features(_timm_boxes(width, height, n), width, height)
    assert _ks(fo["cx"], ft["cx"]) > 5 * 1.95 * math.sqrt(2 / n)


def _augment(arr, extent, turned, width, height, n, size=16):
    """n crops of one stored image, and the boxes drawn for them (x1, y1, x2, y2 in the image's own orientation)."""
    aug = IC.DeviceAugment((size, size), SCALE, RATIO, None, (0.5, 0.0), (None, None, None), (0.0,) * 3, (1.0,) * 3, 32)
    seeds = [D.sample_seed(0, 0, i) for i in range(n)]
    u8 = torch.from_numpy(np.ascontiguousarray(arr)).expand(n, -1, -1, -1)
    x = IC.augment_batch(u8, np.array([extent] * n), np.array([turned] * n), seeds, aug)
    return x, np.array([aug.draw(s, width, height)[0] for s in seeds])


@pytest.mark.parametrize("portrait", [False, True])
def test_far_edge_pixels_are_reachable(portrait):
    """A 3:1 photo whose last 8 columns are red (or a 1:3 portrait whose last 8 rows are, stored with its axes
    swapped), stored by the cache's own code into a larger array: every crop whose box covers half the red band shows
    red, no crop whose box misses it does, such boxes come as often as timm's, and the array's padding never darkens
    a crop. (The old centre squares never showed the band.)"""
    width, height = (32, 96) if portrait else (96, 32)
    hwc = np.full((height, width, 3), 200, np.uint8)
    if portrait:
        hwc[-8:] = (255, 0, 0)
    else:
        hwc[:, -8:] = (255, 0, 0)
    arr = np.zeros((1, 3, 40, 104), np.uint8)
    extent, turned = IC._put(arr, 0, hwc, True)
    assert extent == (32, 96) and turned == portrait
    x, boxes = _augment(arr, extent, turned, width, height, 1000)
    red = ((x[:, 0] > 0.9) & (x[:, 1] < 0.45)).flatten(1).any(1).numpy()
    edge = height if portrait else width
    far = boxes[:, 3] if portrait else boxes[:, 2]  # y2 or x2
    covers, misses = far >= edge - 4, far <= edge - 8
    assert red[covers].all() and not red[misses].any()
    assert x[:, 0].min() > 200 / 255 - 1e-3, "padding leaked into a crop"
    theirs = np.mean([(t + h if portrait else l + w) >= edge - 4 for t, l, h, w in _timm_boxes(width, height, 4000)])
    assert theirs > 0.05 and abs(covers.mean() - theirs) < 0.025, (covers.mean(), theirs)


# ------------------------------------------------------------------ the aspect-preserving cache, end to end
@pytest.fixture
def photo_folder(tmp_path):
    """Two classes of JPEGs: wide 64x32 photos and tall 32x48 ones, one PNG, one truncated JPEG in class a."""
    root = tmp_path / "photos"
    rng = np.random.default_rng(0)
    for c, (w, h) in enumerate([(64, 32), (32, 48)]):
        d = root / "train" / f"c{c}"
        v = root / "val" / f"c{c}"
        d.mkdir(parents=True)
        v.mkdir(parents=True)
        for i in range(6):
            a = (rng.integers(0, 80, (h, w, 3)) + 120 * c).astype(np.uint8)
            Image.fromarray(a).save(d / f"{i}.jpg", quality=92)
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(v / f"{i}.jpg", quality=92)
    Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(root / "train" / "c0" / "p.png")
    good = (root / "train" / "c0" / "0.jpg").read_bytes()
    (root / "train" / "c0" / "z_truncated.jpg").write_bytes(good[: len(good) // 2])
    return root


def test_aspect_cache_stores_whole_images_at_the_short_side(photo_folder):
    tr = _trainer(photo_folder, input_cache="on")
    tr._prepare_batches()
    src = tr.source
    assert src.kind == "input cache"
    st, side = src.stores["train"], src.aug.side  # 32 px crops, test_resnet crop_pct 0.95: short side 33
    # never enlarged: 64x32 and 32x48 stay as they are (the tall ones turned), the 40x40 PNG goes to 33x33
    assert side == 33 and st.array.shape == (14, 3, 33, 64)
    samples = tr.splits.train
    from torchvision.transforms import functional as TF

    for i, (path, _) in enumerate(samples):
        if not st.ok[i]:
            continue
        img = D.load_image(path)
        short, long = IC.stored_size(img.width, img.height, side, 2 * side)
        size = [short, long] if img.height <= img.width else [long, short]
        if [img.height, img.width] != size:
            img = TF.resize(img, size, src.aug.interpolation, antialias=True)
        want = np.asarray(img).transpose(2, 0, 1)
        if img.height > img.width:
            want = want.transpose(0, 2, 1)
        h, w = st.extents[i]
        assert bool(st.transposed[i]) == (img.height > img.width)
        assert np.array_equal(st.array[i, :, :h, :w], want), path
    assert [p for p, _ in st.bad] == [str(photo_folder / "train" / "c0" / "z_truncated.jpg")]


def test_device_decode_trains_reports_bad_files_and_resumes_exactly(photo_folder):
    """input_cache decode on CPU (the GPU path's code with device="cpu"): bad files reported as the DataLoader
    reports them, an interrupted run continues bit for bit, and evaluation is the DataLoader's."""
    ref = _trainer(photo_folder, input_cache="decode", augment=True)
    _, notes, bad = _run(ref, epochs=2)
    assert ref.source.kind == "device decode" and any("decoding 14 training images" in m for m in notes)
    loader_bad = [p for _, _, _, ps in ref.loader.train_batches(0, 0, 0, 1, 8) for p in ps]
    assert sorted(bad) == sorted(loader_bad * 2) and len(loader_bad) == 1  # once per epoch, the same reason
    cut = _trainer(photo_folder, input_cache="decode", augment=True)
    _run(cut, steps=3)
    state = cut.state_dict()
    resumed = _trainer(photo_folder, input_cache="decode", augment=True)
    resumed.load_state_dict(state)
    _run(resumed, epochs=2 - resumed.pos.epoch)
    for k, v in ref.built.module.state_dict().items():
        assert torch.equal(v, resumed.built.module.state_dict()[k]), k
    plain = _trainer(photo_folder, input_cache="off", augment=True)
    plain.load_state_dict(ref.state_dict())
    assert ref.evaluate("val") == plain.evaluate("val")


def test_device_decode_and_the_cache_stage_the_same_images(photo_folder):
    """The two device paths hold each image at the same size and orientation, pixels within resampling rounding."""
    tr = _trainer(photo_folder, input_cache="on")
    tr._prepare_batches()
    st = tr.source.stores["train"]
    from pgshell.engine.batches import decode as DEC

    files = DEC._FileBytes(tr.splits.train, 0)
    for i in range(len(tr.splits.train)):
        if not st.ok[i]:
            continue
        (img,), _ = DEC.decode_batch([files[(i, 0)]], torch.device("cpu"))
        x, extents, turned = DEC.stage([img], tr.source.aug)
        h, w = extents[0]
        assert (h, w) == tuple(st.extents[i]) and turned[0] == st.transposed[i]
        diff = (x[0, :, :h, :w].float() - torch.from_numpy(st.array[i, :, :h, :w].copy()).float()).abs()
        assert diff.mean() < 3.0, (i, diff.mean())


def test_cache_resume_is_exact_with_augmentation(photo_folder, cache_dir):
    ref = _trainer(photo_folder, input_cache="on")
    _, notes, _ = _run(ref, epochs=2)
    assert len([m for m in notes if m.startswith("input cache: decoded")]) == 2  # train, val
    cut = _trainer(photo_folder, input_cache="on")
    _, notes, _ = _run(cut, steps=2)
    assert not [m for m in notes if m.startswith("input cache: decoded")]  # read back from disk
    resumed = _trainer(photo_folder, input_cache="on")
    resumed.load_state_dict(cut.state_dict())
    _run(resumed, epochs=2 - resumed.pos.epoch)
    assert all(torch.equal(v, resumed.built.module.state_dict()[k]) for k, v in ref.built.module.state_dict().items())
    assert len(list(cache_dir.glob("*.u8"))) == 2


# ------------------------------------------------------------------ choosing the source
@pytest.mark.parametrize("mode, device, fits, path", [
    ("auto", "cuda", True, "cache"), ("auto", "cuda", False, "decode"), ("auto", "cpu", True, "loader"),
    ("on", "cpu", True, "cache"), ("on", "cpu", False, "loader"), ("on", "cuda", False, "decode"),
    ("decode", "cpu", True, "decode"), ("off", "cuda", True, "loader")])
def test_input_path_policy(mode, device, fits, path):
    assert SRC.input_path(mode, device, fits) == path


def test_auto_picks_cache_then_device_decode_by_the_memory_limit(photo_folder, monkeypatch):
    """The choice itself, for a GPU runtime (nothing runs on it): the cache while it fits the limit, device decode
    over it; on the CPU `on` falls back to the DataLoader, saying why."""
    tr = _trainer(photo_folder)
    spec = tr.data_spec()
    spec.runtime = Runtime(torch.device("cuda"), None, False, [0])
    notes = []
    report = SRC.Report(notify=notes.append)
    need = 14 * 3 * 33 * 64 + 6 * 3 * 32 * 32  # train kept whole at short side 33; val as 32 px eval crops
    assert SRC.choose(spec, None, tr.loader, report, budget=need - 1).kind == "device decode"
    assert any("would take 0.1 MiB, over the 0.1 MiB allowed" in m for m in notes)
    assert SRC.choose(spec, None, tr.loader, report, budget=need).kind == "input cache"
    monkeypatch.setenv("PGSHELL_INPUT_CACHE_MAX", str(need - 1))
    cpu = _trainer(photo_folder, input_cache="on")
    cpu._prepare_batches(notes.append)
    assert cpu.source is cpu.loader and IC.budget() == need - 1  # on a CPU: no device decode, the DataLoader
    monkeypatch.setenv("PGSHELL_INPUT_CACHE_MAX", str(need))
    cpu._prepare_batches(notes.append)
    assert cpu.source.kind == "input cache"
    assert _trainer(photo_folder).source is None  # nothing chosen before a run
    auto = _trainer(photo_folder)
    auto._prepare_batches()
    assert auto.source is auto.loader  # auto on a CPU: the reference path


def test_unsupported_augmentation_falls_back_to_the_loader(photo_folder, monkeypatch):
    from torchvision import transforms as T

    tr = _trainer(photo_folder, input_cache="on")
    real = SRC.DataSpec.transform

    def with_erasing(self, train):
        tf = real(self, train)
        return T.Compose([*tf.transforms, T.RandomErasing()]) if train else tf

    monkeypatch.setattr(SRC.DataSpec, "transform", with_erasing)
    notes = []
    tr._prepare_batches(notes.append)
    assert tr.source is tr.loader and any("RandomErasing" in m for m in notes)


def test_flips_are_read_from_the_transform_and_applied(photo_folder, monkeypatch):
    """timm's RandomVerticalFlip (a recipe setting) is honoured; a whole-image crop flipped with probability 1 is the
    mirrored image, pixel for pixel."""
    from torchvision import transforms as T

    tr = _trainer(photo_folder, input_cache="on")
    real = SRC.DataSpec.transform
    monkeypatch.setattr(SRC.DataSpec, "transform", lambda self, train: T.Compose(
        [*real(self, train).transforms, T.RandomVerticalFlip(0.25)]) if train else real(self, train))
    assert IC.DeviceAugment.for_spec(tr.data_spec()).flip == (0.5, 0.25)
    img = torch.arange(3 * 8 * 8, dtype=torch.uint8).view(1, 3, 8, 8)
    for flip, dims in (((1.0, 0.0), [-1]), ((0.0, 1.0), [-2]), ((1.0, 1.0), [-2, -1])):
        aug = IC.DeviceAugment((8, 8), (1.0, 1.0), (1.0, 1.0), None, flip, (None, None, None), (0.0,) * 3, (1.0,) * 3, 8)
        out = IC.augment_batch(img, np.array([[8, 8]]), np.array([False]), [7], aug)
        assert torch.allclose(out, img.float().div(255).flip(dims), atol=1e-6)


def test_progress_of_long_builds(photo_folder):
    phases = []
    tr = _trainer(photo_folder, input_cache="on")
    tr.on_phase = lambda *a: phases.append(a)
    tr._prepare_batches()
    assert phases[-1] == ("decoding images", 6, 6)  # val, the last split
    assert ("decoding images", 14, 14) in phases
    M.freeze(tr.built, ["backbone"])
    tr.params_changed()
    phases.clear()
    tr._prepare_batches()
    assert tr.source.kind == "feature cache" and phases[-1] == ("caching features", 20, 20)


# ------------------------------------------------------------------ the same paths on a GPU (pytest -m gpu)
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_decode_matches_the_cpu_decoder_and_batches_do_not_depend_on_the_start(photo_folder):
    """nvJPEG on the GPU and libjpeg on the CPU give each image at the same size and orientation, pixels within
    decoder rounding; the GPU batches from a position on are those of the whole epoch (what exact resume needs)."""
    from pgshell.engine.batches import decode as DEC

    tr = _trainer(photo_folder, input_cache="decode", device="cuda", amp="off")
    files = DEC._FileBytes(tr.splits.train, 0)
    items = [files[(i, 0)] for i in range(len(tr.splits.train))]
    gpu, gpu_bad = DEC.decode_batch(items, torch.device("cuda"))
    cpu, cpu_bad = DEC.decode_batch(items, torch.device("cpu"))
    assert gpu_bad == cpu_bad and len(gpu_bad) == 1
    for g, c in zip(gpu, cpu):
        assert (g is None) == (c is None)
        if g is not None:
            assert g.is_cuda and g.shape == c.shape and (g.cpu().float() - c.float()).abs().mean() < 3.0
    tr._prepare_batches()
    assert tr.source.kind == "device decode"
    full = [(x.cpu(), y.cpu()) for x, y, _, _ in tr.source.train_batches(1, 0, 0, 1, 4)]
    tail = [(x.cpu(), y.cpu()) for x, y, _, _ in tr.source.train_batches(1, 8, 0, 1, 4)]
    assert len(tail) == len(full) - 2  # the data from a position on is the same, whatever ran before
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(full[2:], tail))


def test_big_jpegs_decode_at_reduced_scale_the_same_on_every_path(tmp_path):
    """A JPEG 20x the target size is decoded at 1/4 scale (both sides stay >= 4x the target), and the cache's eval
    crops equal the DataLoader's to the bit: every path decodes with the same rule."""
    root = tmp_path / "big"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        for split, n in (("train", 3), ("val", 2)):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                a = np.kron(rng.integers(0, 255, (20, 16, 3)), np.ones((16, 16, 1))).astype(np.uint8)
                Image.fromarray(a).save(root / split / c / f"{i}.jpg", quality=90)
    path = str(root / "val" / "a" / "0.jpg")
    assert D.load_image(path).size == (256, 320) and D.load_image(path, D.draft_side(16)).size == (64, 80)
    tr = _trainer(root, size=16, input_cache="on", augment=False)
    tr._prepare_batches()
    assert tr.loader.eval_set("val").min_side == 64 == tr.source.layouts(tr.data_spec(), None)["val"].min_side
    cached = [x for x, _, _ in tr.source.eval_batches("val", 64)]
    plain = [tr.runtime.to_input(x) for x, _, _ in tr.loader.eval_batches("val", 64)]
    assert len(cached) == len(plain) == 1 and torch.equal(cached[0], plain[0])


def test_head_steps_on_one_thread_and_the_feature_pass_beside_the_workers(photo_folder):
    """While the feature cache's batches are consumed the CPU runs one intra-op thread (restored when the loop leaves
    them); the feature pass leaves the loader's workers their cores."""
    from pgshell.engine.batches import features as FC

    cores = len(os.sched_getaffinity(0))
    assert FC.cores_beside(0) == cores and FC.cores_beside(cores + 3) == 1
    tr = _trainer(photo_folder)
    M.freeze(tr.built, ["backbone"])
    tr.params_changed()
    tr._prepare_batches()
    threads, seen = torch.get_num_threads(), []
    torch.set_num_threads(2)
    try:
        for _ in tr._batches():
            seen.append(torch.get_num_threads())
            break
        assert seen == [1] and torch.get_num_threads() == 2
        with FC.cpu_threads(torch.device("cuda"), 1):  # only a CPU's threads are touched
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)

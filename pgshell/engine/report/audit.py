"""Can the data be trusted: duplicates and leakage between splits, odd images, likely label errors. Pure functions.

Duplicates:
- exact: the same file bytes (BLAKE2b of the content; the name and folder do not matter).
- near: a perceptual hash (pHash after the `imagehash` package's: the 8x8 lowest frequencies of the 2-D DCT
  of a 32x32 grey thumbnail, each bit "above the median") within NEAR_BITS of 64 bits, confirmed by the 8x8 colour
  thumbnails correlating at least NEAR_CORRELATION (the hash alone ignores colour: a grey sky and a grey sea match).
  Re-encoded and resized copies stay within a few bits; a cropped copy does not (a 2-pixel border of a 32-pixel
  image moves half the bits), so each image is also hashed as its centre CROPS, and the whole of one image is
  compared with the whole and the centre crops of every other. A copy cropped off-centre by more than a few percent
  of its side can still escape the hash: the model's features catch those.
- by features (when a model is given): pooled features whose cosine similarity is at least FEATURE_COSINE.
Pairs are searched exhaustively in blocks (XOR and popcount of 64-bit hashes: 10,000 images are 50 million pairs,
a fraction of a second); groups are the connected pairs.

Odd images, with the thresholds stated: blank (the grey thumbnail's standard deviation below BLANK_STD of 255),
grey-scale (the three channels equal everywhere), tiny (shorter side below min(32, a quarter of the data's median)),
huge (more than HUGE_FACTOR times the data's median pixel count), odd aspect (ASPECT to 1 or more).

Label errors: confident learning (Northcutt, Jiang & Chuang 2021, cleanlab's `find_label_issues` with
`filter_by="prune_by_noise_rate"`), from out-of-sample class probabilities: per-class thresholds (the mean
probability of class j over the images labelled j), the confident joint, calibrated to the label counts, and in each
off-diagonal cell (given i, truly j) the images with the largest margin p_j - p_i, as many as the cell estimates.
The flagged images are ranked by their given label's probability (cleanlab's "self_confidence"), least first.
"""

from __future__ import annotations

import hashlib
import math
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from ..data.images import ARROW_PREFIX, BadImage, load_image

HASH_SIDE = 32  # the grey thumbnail the DCT is taken of (imagehash's phash: hash_size 8 x highfreq_factor 4)
HASH_LOW = 8  # the lowest 8x8 frequencies make the 64 bits
THUMB_SIDE = 8  # the colour thumbnail that confirms a near-duplicate
CROPS = (1.0, 0.9, 0.8)  # each image is hashed whole and as these centre crops (side fractions): cropped copies match
NEAR_BITS = 14  # pHash Hamming distance (of 64 bits) at most, for a near-duplicate
NEAR_CORRELATION = 0.95  # and the colour thumbnails' correlation at least
FEATURE_COSINE = 0.95  # near-duplicates by a model's pooled features: cosine similarity at least
BLANK_STD = 3.0  # a blank image: its grey thumbnail's standard deviation below this (of 255)
TINY_SIDE = 32  # tiny: shorter side below min(TINY_SIDE, a quarter of the median shorter side)
HUGE_FACTOR = 16  # huge: more than this many times the median pixel count
ASPECT = 3.0  # odd aspect: the longer side at least this many times the shorter
IMBALANCE = 5  # classes imbalanced: the largest training class at least this many times the smallest (as `data`)


# ---------------------------------------------------------------- per image
def _dct_matrix(n: int) -> np.ndarray:
    """The orthonormal DCT-II matrix: D @ x is scipy.fft.dct(x, norm="ortho")."""
    k = np.arange(n)[:, None]
    m = np.cos(np.pi * (2 * np.arange(n)[None, :] + 1) * k / (2 * n)) * math.sqrt(2 / n)
    m[0] /= math.sqrt(2)
    return m


_DCT = _dct_matrix(HASH_SIDE)
_BITS = (1 << np.arange(HASH_LOW * HASH_LOW, dtype=np.uint64)).astype(np.uint64)


def phash(grey: np.ndarray) -> int:
    """64-bit perceptual hash of a HASH_SIDE x HASH_SIDE grey image (float): bit k is set where the k-th of the 8x8
    lowest DCT frequencies (row-major, DC included) is above their median, as imagehash.phash (whose DCT is
    scipy's unnormalised one: its first row and column weigh a little more in the median; here it is orthonormal)."""
    low = (_DCT @ grey @ _DCT.T)[:HASH_LOW, :HASH_LOW].ravel()
    return int(np.bitwise_or.reduce(_BITS[low > np.median(low)]))


@dataclass
class Facts:
    """What `image_facts` finds, one entry per image in the order given."""

    paths: list[str]
    digests: list[str]  # BLAKE2b of the file's bytes ("" when unreadable)
    sizes: np.ndarray  # (N, 2) width, height (0, 0 when bad)
    hashes: np.ndarray  # (N, len(CROPS)) uint64 pHash of the whole image and of its centre crops
    thumbs: np.ndarray  # (N, len(CROPS), 8*8*3) float32 colour thumbnails, mean-centred, unit length (0 when flat)
    std: np.ndarray  # (N,) the grey thumbnail's standard deviation
    grey: np.ndarray  # (N,) bool: the channels are equal everywhere
    bad: dict[int, str] = field(default_factory=dict)  # index -> why it could not be read


def _one(path: str) -> tuple:
    """(digest, (w, h), hashes, thumbs, std, grey) of one image; BadImage for one that cannot be read."""
    data = b""
    if not path.startswith(ARROW_PREFIX):  # a dataset's row: its decoded pixels are its content (below)
        with open(path, "rb") as f:
            data = f.read()
    digest = hashlib.blake2b(data, digest_size=16).hexdigest() if data else ""
    image = load_image(path, min_side=2 * HASH_SIDE)  # a big JPEG decoded at a reduced scale: the hash survives it
    if not digest:
        digest = hashlib.blake2b(image.tobytes(), digest_size=16).hexdigest()
    size = _original_size(path, image)
    rgb = np.asarray(image)
    grey_flag = bool((rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all())
    hashes, thumbs, std = [], [], 0.0
    w, h = image.size
    for frac in CROPS:
        part = image if frac == 1 else image.crop(((w - w * frac) / 2, (h - h * frac) / 2,
                                                   (w + w * frac) / 2, (h + h * frac) / 2))
        small = part.resize((HASH_SIDE, HASH_SIDE), Image.Resampling.BOX if min(part.size) >= HASH_SIDE
                            else Image.Resampling.BILINEAR)
        grey = np.asarray(small.convert("L"), dtype=np.float64)
        thumb = np.asarray(small.resize((THUMB_SIDE, THUMB_SIDE), Image.Resampling.BOX), dtype=np.float32).ravel()
        thumb = thumb - thumb.mean()
        norm = float(np.linalg.norm(thumb))
        hashes.append(phash(grey))
        thumbs.append(thumb / norm if norm > 1e-6 else thumb * 0)
        if frac == 1:
            std = float(grey.std())
    return digest, size, hashes, thumbs, std, grey_flag


def _original_size(path: str, image: Image.Image) -> tuple[int, int]:
    """The stored size (a draft decode gives a smaller image)."""
    if path.startswith(ARROW_PREFIX):
        return image.size
    try:
        with Image.open(path) as im:
            return im.size
    except OSError:
        return image.size


def image_facts(paths: list[str], workers: int = 2, progress=None) -> Facts:
    """Read every image once: content digest, size, pHash, colour thumbnail, flatness, grey-scale. Bad images are
    noted in `bad`, never raised. `workers` threads (PIL decodes without the GIL); `progress(done, total)`."""
    n = len(paths)
    v = len(CROPS)
    out = Facts(paths=list(paths), digests=[""] * n, sizes=np.zeros((n, 2), np.int64),
                hashes=np.zeros((n, v), np.uint64), thumbs=np.zeros((n, v, THUMB_SIDE * THUMB_SIDE * 3), np.float32),
                std=np.zeros(n), grey=np.zeros(n, bool))

    def work(i):
        try:
            return i, _one(paths[i]), None
        except BadImage as e:
            return i, None, str(e)
        except OSError as e:
            return i, None, f"unreadable ({e.strerror or e})"

    with ThreadPoolExecutor(max(1, workers)) as pool:
        for done, (i, facts, why) in enumerate(pool.map(work, range(n), chunksize=64), 1):
            if facts is None:
                out.bad[i] = why
            else:
                out.digests[i], out.sizes[i], out.hashes[i], out.thumbs[i], out.std[i], out.grey[i] = facts
            if progress and done % 500 == 0:
                progress(done, n)
    return out


# ---------------------------------------------------------------- pairs and groups
def exact_groups(digests: list[str]) -> list[list[int]]:
    """Indices sharing a content digest, each group sorted, groups in order of their first member."""
    by: dict[str, list[int]] = {}
    for i, d in enumerate(digests):
        if d:
            by.setdefault(d, []).append(i)
    return [g for g in by.values() if len(g) > 1]


def hash_pairs(hashes: np.ndarray, max_bits: int = NEAR_BITS, skip: np.ndarray | None = None, others=None,
               block: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) of every pair whose hashes differ in at most `max_bits` bits: i < j of `hashes` (N,), or with
    `others` (N,) given, every i != j comparing hashes[i] with others[j]. Rows where `skip` is True take no part.
    Exhaustive, in blocks of `block` rows (XOR and popcount)."""
    h = np.asarray(hashes, dtype=np.uint64)
    o = h if others is None else np.asarray(others, dtype=np.uint64)
    keep = np.ones(len(h), bool) if skip is None else ~np.asarray(skip, bool)
    ii, jj, dd = [], [], []
    for start in range(0, len(h), block):
        stop = min(start + block, len(h))
        first = start if others is None else 0  # symmetric: only j > i, each pair once
        d = np.bitwise_count(h[start:stop, None] ^ o[None, first:])
        a, b = np.nonzero(d <= max_bits)
        dist = d[a, b]
        a, b = a + start, b + first
        ok = keep[a] & keep[b] & ((b > a) if others is None else (b != a))
        ii.append(a[ok]), jj.append(b[ok]), dd.append(dist[ok])
    return (np.concatenate(ii).astype(np.int64), np.concatenate(jj).astype(np.int64),
            np.concatenate(dd).astype(np.int64)) if ii else (np.zeros(0, np.int64),) * 3


def near_pairs(facts: Facts, max_bits: int = NEAR_BITS, min_corr: float = NEAR_CORRELATION,
               exclude: set[int] | frozenset = frozenset()) -> list[tuple[int, int, float]]:
    """(i, j, correlation) of near-duplicate pairs, i < j: the whole of one within `max_bits` of the whole or a centre
    crop of the other, with their colour thumbnails correlating at least `min_corr` (the best such match). Bad and
    blank images take no part (a flat image's hash is noise), nor pairs of the same file bytes (those are exact
    duplicates), nor indices in `exclude`."""
    skip = facts.std < BLANK_STD
    for i in list(facts.bad) + list(exclude):
        skip[i] = True
    best: dict[tuple[int, int], float] = {}
    for v in range(facts.hashes.shape[1]):
        i, j, _ = hash_pairs(facts.hashes[:, 0], max_bits, skip, None if v == 0 else facts.hashes[:, v])
        corr = np.einsum("nd,nd->n", facts.thumbs[i, 0], facts.thumbs[j, v]) if len(i) else np.zeros(0)
        for a, b, c in zip(i[corr >= min_corr], j[corr >= min_corr], corr[corr >= min_corr]):
            key = (int(min(a, b)), int(max(a, b)))
            if facts.digests[key[0]] != facts.digests[key[1]] and c > best.get(key, -1.0):
                best[key] = float(c)
    return [(a, b, c) for (a, b), c in sorted(best.items())]


def feature_pairs(features, min_cosine: float = FEATURE_COSINE, block: int = 1024) -> list[tuple[int, int, float]]:
    """(i, j, cosine) of every pair i < j of feature rows (a tensor or array (N, D)) at least `min_cosine` alike."""
    import torch

    x = torch.nn.functional.normalize(torch.as_tensor(features).float(), dim=1)
    out = []
    for start in range(0, len(x), block):
        sim = x[start:start + block] @ x[start:].T
        sim = torch.triu(sim, diagonal=1)  # row r of the block is image start + r; column c is image start + c
        a, b = torch.nonzero(sim >= min_cosine, as_tuple=True)
        out += [(int(r) + start, int(c) + start, float(sim[r, c])) for r, c in zip(a, b)]
    return out


def groups_of(pairs, n: int) -> list[list[int]]:
    """Connected components (union-find) of `pairs` [(i, j, ...)], each sorted, only those with 2+ members."""
    parent = list(range(n))

    def root(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, *_ in pairs:
        a, b = root(i), root(j)
        if a != b:
            parent[max(a, b)] = min(a, b)
    by: dict[int, list[int]] = {}
    for i, *_ in pairs:
        by.setdefault(root(i), [])
    for k in range(n):
        r = root(k)
        if r in by:
            by[r].append(k)
    return sorted((sorted(g) for g in by.values() if len(g) > 1), key=lambda g: g[0])


# ---------------------------------------------------------------- odd images
def odd_images(facts: Facts) -> dict[str, list[int]]:
    """{"blank", "grey-scale", "tiny", "huge", "odd aspect"}: the indices of each kind (thresholds above)."""
    ok = np.array([i not in facts.bad for i in range(len(facts.paths))], bool)
    w, h = facts.sizes[:, 0].astype(float), facts.sizes[:, 1].astype(float)
    short, long_ = np.minimum(w, h), np.maximum(w, h)
    if ok.any():
        median_short, median_pixels = float(np.median(short[ok])), float(np.median((w * h)[ok]))
    else:
        median_short = median_pixels = 0.0
    tiny = min(TINY_SIDE, median_short / 4)
    found = {
        "blank": ok & (facts.std < BLANK_STD),
        "grey-scale": ok & facts.grey & (facts.std >= BLANK_STD),  # a blank image is said once, as blank
        "tiny": ok & (short < tiny),
        "huge": ok & (w * h > HUGE_FACTOR * median_pixels),
        "odd aspect": ok & (long_ >= ASPECT * np.maximum(short, 1)),
    }
    return {k: np.nonzero(v)[0].tolist() for k, v in found.items()}


def thresholds() -> dict[str, str]:
    """The thresholds in words: what a report states beside its findings."""
    return {"exact duplicate": "the same file bytes (BLAKE2b)",
            "near-duplicate": f"pHash within {NEAR_BITS} of 64 bits (whole image against whole or centre crops "
                              f"{', '.join(f'{c:g}' for c in CROPS[1:])}) and 8x8 colour thumbnails correlating "
                              f">= {NEAR_CORRELATION:g}",
            "near-duplicate by features": f"cosine similarity of the model's pooled features >= {FEATURE_COSINE:g}",
            "blank": f"grey standard deviation < {BLANK_STD:g} of 255",
            "tiny": f"shorter side < min({TINY_SIDE}, a quarter of the median shorter side)",
            "huge": f"more than {HUGE_FACTOR}x the median pixel count",
            "odd aspect": f"{ASPECT:g}:1 or more",
            "imbalance": f"the largest training class {IMBALANCE}x the smallest or more"}


# ---------------------------------------------------------------- label errors (confident learning)
def confident_joint(labels: np.ndarray, probs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(joint (C, C) counts of given label i confidently of class j, thresholds (C,), each image's confident class
    or -1). An image counts in row `given`, column the class of highest probability among those at or above their
    class's threshold (the mean probability of that class over the images given it), as cleanlab."""
    labels = np.asarray(labels, int)
    probs = np.asarray(probs, float)
    c = probs.shape[1]
    counts = np.bincount(labels, minlength=c)
    thresholds = np.array([probs[labels == j, j].mean() if counts[j] else 1.0 for j in range(c)])
    thresholds = thresholds - 1e-6  # cleanlab's epsilon: an image at exactly the threshold counts
    above = probs >= thresholds[None, :]
    masked = np.where(above, probs, -np.inf)
    confident = np.where(above.any(1), masked.argmax(1), -1)
    joint = np.zeros((c, c), np.int64)
    keep = confident >= 0
    np.add.at(joint, (labels[keep], confident[keep]), 1)
    return joint, thresholds, confident


def calibrate_joint(joint: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """The confident joint scaled so each row sums to its label's count (cleanlab's calibrate_confident_joint)."""
    c = joint.shape[0]
    counts = np.bincount(np.asarray(labels, int), minlength=c).astype(float)
    rows = joint.sum(1, keepdims=True).astype(float)
    return np.where(rows > 0, joint / np.maximum(rows, 1) * counts[:, None], 0.0)


def find_label_issues(labels, probs) -> np.ndarray:
    """Indices of the images whose given label is likely wrong, ranked by self-confidence (least first).

    prune_by_noise_rate: for each off-diagonal cell (given i, truly j) of the calibrated confident joint, the
    round(cell) images given i with the largest margin p_j - p_i; an image is never taken by two cells, and each
    class keeps at least one image."""
    labels = np.asarray(labels, int)
    probs = np.asarray(probs, float)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(f"{len(labels)} labels but probabilities of shape {probs.shape}")
    c = probs.shape[1]
    joint, _, _ = confident_joint(labels, probs)
    calibrated = calibrate_joint(joint, labels)
    flagged = np.zeros(len(labels), bool)
    for i in range(c):
        members = np.nonzero(labels == i)[0]
        budget = max(0, len(members) - 1)  # keep at least one image of each class
        for j in np.argsort(-calibrated[i]):
            n = int(round(calibrated[i, j]))
            if j == i or n < 1 or budget < 1:
                continue
            free = members[~flagged[members]]
            margin = probs[free, j] - probs[free, i]
            take = free[np.argsort(-margin, kind="stable")[:min(n, budget)]]
            take = take[probs[take, j] - probs[take, i] > 0]  # only images that favour j over their label
            flagged[take] = True
            budget -= len(take)
    issues = np.nonzero(flagged)[0]
    self_conf = probs[issues, labels[issues]]
    return issues[np.argsort(self_conf, kind="stable")]


def rank_label_issues(labels, probs) -> np.ndarray:
    """Every index, most suspect first: the flagged images (`find_label_issues`, least self-confident first), then
    the others by their given label's probability, least first. Confident learning's estimate of how many labels are
    wrong can fall short when the probabilities are soft; the flips it leaves out then follow right after."""
    labels = np.asarray(labels, int)
    probs = np.asarray(probs, float)
    issues = find_label_issues(labels, probs)
    flagged = np.zeros(len(labels), bool)
    flagged[issues] = True
    rest = np.argsort(probs[np.arange(len(labels)), labels], kind="stable")
    return np.concatenate([issues, rest[~flagged[rest]]])


def out_of_fold_probs(features, labels, num_classes: int, folds: int = 5, seed: int = 0,
                      weight_decay: float | None = None):
    """Class probabilities (N, C) for each image from a linear probe (engine/report/probe.py) fitted on the other folds:
    out-of-sample, as confident learning needs. The L2 strength (`weight_decay`, default: the probe's own choice
    on all the images) is then the same for every fold."""
    import torch

    from ..batches.features import cpu_threads

    x = torch.as_tensor(features).float()
    with cpu_threads(x.device, 1 if x.numel() < SMALL_FIT else torch.get_num_threads()):
        return _out_of_fold(x, labels, num_classes, folds, seed, weight_decay)


SMALL_FIT = 4_000_000  # feature values below which a probe fits on one thread: OpenMP's waits cost more than it gains


def _out_of_fold(x, labels, num_classes: int, folds: int, seed: int, weight_decay: float | None):
    import torch

    from . import probe as PR

    y = torch.as_tensor(np.asarray(labels), dtype=torch.long)
    if len(x) < 2 * folds:
        raise ValueError(f"{len(x)} images are too few for {folds} folds")
    wd = weight_decay if weight_decay is not None else PR.fit_linear(x, y, num_classes, seed=seed).weight_decay
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    probs = torch.zeros(len(x), num_classes)
    for k in range(folds):
        held = order[k::folds]
        rest = torch.ones(len(x), dtype=torch.bool)
        rest[held] = False
        fitted = PR.fit_linear(x[rest], y[rest], num_classes, weight_decays=(wd,), seed=seed)
        probs[held] = fitted.scores(x[held]).softmax(1).cpu()
    return probs.numpy()


# ---------------------------------------------------------------- the exclude list
EXCLUDE_HEADER = "# pgshell exclude list"


def write_exclude(path: str | os.PathLike, rows: list[tuple[str, str]], title: str) -> None:
    """`rows` [(path relative to the data, why)] as the file `data --exclude` reads: one escaped name per line, the
    reason after a tab (as quarantine.txt)."""
    from ..store.checkpoint import atomic_write_bytes
    from ..names import escape

    lines = [f"{EXCLUDE_HEADER}: {title}", "# one file per line, relative to the data folder; after a tab, why. "
             "Delete a line to keep that file."]
    lines += [f"{escape(p)}\t{' '.join(why.split())}" for p, why in rows]
    from pathlib import Path

    atomic_write_bytes(Path(path), ("\n".join(lines) + "\n").encode())


def read_exclude(text: str) -> list[str]:
    """The names of an exclude list (or any file of one path per line: after a tab, a comment; # lines skipped)."""
    from ..names import unescape

    names = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        names.append(unescape(line.split("\t", 1)[0].strip()))
    return names

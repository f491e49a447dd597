"""Images: reading one (a file or an Arrow row) into RGB, safely — decompression bombs refused by their declared
size, transparency onto white, 16-bit and float modes scaled, JPEGs drafted near the target size — and checking files
before a run (`check_image`, `find_undecodable`). A bad image raises `BadImage` with the reason shown to the user.
"""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
from PIL import Image, UnidentifiedImageError


# We check every image's size against PIL.Image.MAX_IMAGE_PIXELS ourselves and report it as a rejected file or a
# BadImage, so PIL's own DecompressionBombWarning would only repeat that on stderr (and garble the shell's prompt).
# A process-wide filter is used because warnings.catch_warnings() swaps global state and is not thread-safe.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


ARROW_PREFIX = "arrow:"  # a sample in a row of an Arrow table: arrow:FILE#COLUMN[ROW] (engine/data/_arrow.py)
_ALPHA_BACKGROUND = (255, 255, 255)  # transparent pixels become white: logos/icons are usually drawn for white pages


class BadImage(Exception):
    """An image that cannot be used; str(exc) is the reason shown to the user ("not an image", "empty file", ...)."""


def check_image(path: str) -> str | None:
    """The reason `path` is not a usable image, from its size and header alone (fast: no decode), else None."""
    try:
        with Image.open(_source(path)) as im:
            return _bomb_reason(im.size)
    except BadImage as exc:
        return str(exc)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning, under -W error
        return f"decompression bomb ({_pixels_in(exc)} pixels)"
    except UnidentifiedImageError:
        return "not an image"
    except PermissionError:
        return "unreadable (permission denied)"
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except (SyntaxError, ValueError, EOFError) as exc:  # some PIL plugins signal a broken header this way
        return f"corrupt header ({exc})"


def _source(path: str):
    """What PIL opens for a sample: its file, or the bytes in a row of an Arrow table (a Hugging Face dataset's
    sample, `arrow:FILE#COLUMN[ROW]`). BadImage for what is empty or not there; OSError from the file system."""
    if not path.startswith(ARROW_PREFIX):
        if os.stat(path).st_size == 0:
            raise BadImage("empty file")
        return path
    from . import _arrow

    try:
        data, file = _arrow.image_cell(path)
    except FileNotFoundError:
        raise BadImage("file not found (moved or deleted since the scan?)") from None
    except (KeyError, IndexError, ValueError, OSError) as exc:  # pyarrow's errors are ValueErrors and OSErrors
        raise BadImage(f"unreadable row ({str(exc).splitlines()[0][:120] if str(exc) else type(exc).__name__})") \
            from None
    if data is None:  # a dataset that refers to image files instead of holding their bytes
        if not file:
            raise BadImage("no image in this row")
        return _source(file)
    if not data:
        raise BadImage("empty file")
    return io.BytesIO(data)


def sample_file(path: str) -> str:
    """The file holding a sample's bytes (an Arrow row's table file): what a cache key stats."""
    if path.startswith(ARROW_PREFIX):
        from . import _arrow

        return _arrow.parse(path)[0]
    return path


def find_undecodable(paths) -> list[tuple[str, str]]:
    """(path, reason) for every file that fails a full decode — what check_image's look at the header cannot see
    (truncated data). Slow: every image is decoded; `data --check` asks for it."""
    bad = []
    for path in paths:
        try:
            load_image(path)
        except BadImage as exc:
            bad.append((path, str(exc)))
    return bad


def _bomb_reason(size: tuple[int, int]) -> str | None:
    """PIL warns between MAX_IMAGE_PIXELS and twice that, and only raises beyond; we refuse from the first."""
    limit = Image.MAX_IMAGE_PIXELS
    width, height = size
    if limit is not None and width * height > limit:
        return f"decompression bomb {width}x{height}"
    return None


def _pixels_in(exc: Exception) -> str:
    """The pixel count from PIL's DecompressionBombError message (PIL raises before it tells us width and height)."""
    words = str(exc).split()
    return next((w.strip("(") for w in words if w.strip("(").isdigit()), "too many")


# --------------------------------------------------------------------------------------------------------------
# Loading one image
# --------------------------------------------------------------------------------------------------------------

DRAFT_FACTOR = 4  # JPEGs are decoded with both sides at least this many times the target size


def draft_side(size: int) -> int:
    """The smallest side a JPEG is decoded at when the pipeline's target is `size` pixels: DRAFT_FACTOR x the target.

    A 3024 px phone photo trained at 64 px needs neither its full decode nor the resize of 9 megapixels: libjpeg
    decodes it at 1/2, 1/4 or 1/8 scale straight from the DCT (PIL's draft mode), several times faster. Keeping 4x the
    target means even timm's smallest random crop (8 % of the area, 0.28 of a side) still has more pixels than the
    output, so what the model sees is a downscale either way. Every image path (the DataLoader, the decoded-input
    cache, the feature pass) decodes with the same rule, so their figures stay identical.
    """
    return DRAFT_FACTOR * size if size > 0 else 0


def load_image(path: str, min_side: int = 0) -> Image.Image:
    """Decode `path` to an 8-bit RGB image, or raise BadImage(reason).

    min_side > 0: a JPEG much larger than that is decoded at a reduced scale (1/2 to 1/8) whose width and height both
    stay >= min_side (PIL's draft mode; see draft_side). Other formats are decoded in full.

    Odd modes are converted so that the picture survives, not just the type:
    - 16-bit ('I;16*') images are scaled 0..65535 -> 0..255: PIL's own convert("RGB") clips them, so most
      pixels would turn white. 32-bit 'I' and float 'F' images: see _to_uint8.
    - anything with transparency (RGBA, LA, 'P' or 'L'/'RGB' with a transparency key) is composited on white.
    - CMYK, YCbCr, 1-bit, grey, palette: PIL's conversion.
    """
    try:
        im = Image.open(_source(path))
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:  # the warning, under -W error
        raise BadImage(f"decompression bomb ({_pixels_in(exc)} pixels)") from None
    except UnidentifiedImageError:
        raise BadImage("not an image") from None
    except PermissionError:
        raise BadImage("unreadable (permission denied)") from None
    except FileNotFoundError:
        raise BadImage("file not found (moved or deleted since the scan?)") from None
    except OSError as exc:
        raise BadImage(f"unreadable ({exc.strerror or exc})") from None
    except (SyntaxError, ValueError, EOFError) as exc:
        raise BadImage(f"corrupt header ({exc})") from None

    with im:
        reason = _bomb_reason(im.size)
        if reason:
            raise BadImage(reason)
        try:
            if min_side and im.format == "JPEG" and min(im.size) >= 2 * min_side:
                im.draft(im.mode, (min_side, min_side))
            im.load()
            return _to_rgb(im)
        except OSError as exc:  # "image file is truncated", broken compressed data
            raise BadImage(f"truncated or corrupt ({exc})") from None
        except (SyntaxError, ValueError, EOFError, IndexError) as exc:
            raise BadImage(f"corrupt ({exc})") from None


def _to_rgb(im: Image.Image) -> Image.Image:
    """A loaded image of any mode -> a new 8-bit RGB image (see load_image for the rules)."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        return Image.fromarray(_to_uint8(np.asarray(im))).convert("RGB")
    if "transparency" in im.info and im.mode in ("P", "L", "RGB"):
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, _ALPHA_BACKGROUND + (255,))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return im.convert("RGB")


def _to_uint8(values: np.ndarray) -> np.ndarray:
    """Pixel values of a wide mode -> uint8, keeping their meaning where the range is known.

    uint16 ('I;16*'): full range 0..65535. 32-bit 'I' within 0..255: already 8-bit data stored wide; within
    0..65535: 16-bit data (PGM/TIFF often load so). Anything else (float 'F', negative or larger ints): stretched
    from its own min..max, as there is no range to honour.
    """
    low, high = float(values.min()), float(values.max())
    if values.dtype == np.uint16:
        scaled = values / 65535.0
    elif values.dtype.kind in "iu" and low >= 0 and high <= 255:
        scaled = values / 255.0
    elif values.dtype.kind in "iu" and low >= 0 and high <= 65535:
        scaled = values / 65535.0
    elif high > low:
        scaled = (values.astype(np.float64) - low) / (high - low)
    else:
        scaled = np.zeros(values.shape)
    return np.clip(np.rint(scaled * 255.0), 0, 255).astype(np.uint8)


def image_side(samples: list[tuple[str, int]], limit: int = 25) -> int | None:
    """The median shorter side of up to `limit` images spread over `samples`, from their headers (no decoding)."""
    if not samples:
        return None
    step = max(1, len(samples) // limit)
    sides = []
    for path, _ in samples[::step][:limit]:
        try:
            with Image.open(path) as im:
                sides.append(min(im.size))
        except Exception:  # a bad file is reported elsewhere; here it simply does not count
            continue
    return sorted(sides)[len(sides) // 2] if sides else None

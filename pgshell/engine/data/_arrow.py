"""Rows of Arrow files as image samples: how a Hugging Face dataset reaches ImageDataset, the input cache and the
feature cache without going through `datasets` at training time.

A sample is the string `arrow:FILE#COLUMN[ROW]` — FILE one of the table files `datasets` keeps (its cache, or a
`save_to_disk` folder), COLUMN the image column, ROW the row in that file. Everything that takes a sample's path
takes it (decoding, quarantine lists, cache keys), so exact resume, bad-image handling and caches work as for files.
The file is memory-mapped once per process (loader workers each map their own), so reading row i costs a lookup,
not a load of the table.

An image cell is what `datasets.Image` stores: a struct of `bytes` (the encoded file) and `path` (the original file,
used when the bytes were not embedded). Plain binary or string columns are read the same way.
"""

from __future__ import annotations

import functools
import os
import re

_URI = re.compile(r"arrow:(?P<file>.+)#(?P<column>[^#\[\]]+)\[(?P<row>\d+)\]")


def row_uri(file: str, column: str, row: int) -> str:
    return f"arrow:{file}#{column}[{row}]"


def parse(uri: str) -> tuple[str, str, int]:
    """`arrow:FILE#COLUMN[ROW]` -> (FILE, COLUMN, ROW); ValueError for anything else."""
    match = _URI.fullmatch(uri)
    if match is None:
        raise ValueError(f"not an Arrow row: {uri!r}")
    return match["file"], match["column"], int(match["row"])


def table(file: str):
    """The Arrow table in `file`, memory-mapped; re-mapped when the file changes (its size or time)."""
    st = os.stat(file)
    return _mapped(file, st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=64)
def _mapped(file: str, mtime_ns: int, size: int):
    import pyarrow as pa

    source = pa.memory_map(file, "r")
    try:  # `datasets` writes the streaming format; the random-access file format is read too
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        source.seek(0)
        return pa.ipc.open_file(source).read_all()


def num_rows(file: str) -> int:
    return table(file).num_rows


def column_values(file: str, column: str) -> list:
    return table(file).column(column).to_pylist()


def image_cell(uri: str) -> tuple[bytes | None, str | None]:
    """(encoded image bytes, original file path) of a sample; either may be None."""
    file, column, row = parse(uri)
    value = table(file).column(column)[row].as_py()
    if isinstance(value, dict):
        return value.get("bytes"), value.get("path")
    if isinstance(value, (bytes, bytearray)):
        return bytes(value), None
    if isinstance(value, str):
        return None, value
    return None, None

"""File names as text, losslessly: any name the file system holds (bytes that are not UTF-8, a tab, a newline) can be
written to a line-based file or printed, and read back to the same name.

Python gives such names as `str` with lone surrogates (PEP 383, `os.fsdecode`): they cannot be encoded to UTF-8, so
printing or writing them raises UnicodeEncodeError. `escape` turns every byte that is not printable UTF-8 (and the
backslash itself) into `\\xNN`; `unescape` undoes it. Ordinary names come out unchanged.
"""

from __future__ import annotations

import os
import re

_ESCAPED = re.compile(r"\\(\\|x[0-9a-fA-F]{2})")


def escape(name: str | os.PathLike | bytes) -> str:
    """`name` as printable, single-line text; `unescape` gives the exact name back."""
    raw = os.fsencode(name)
    text = raw.decode("utf-8", "surrogateescape")  # bytes that are not UTF-8 become U+DC80..U+DCFF
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\x{code:02x}")
        else:
            out.append(ch)
    return "".join(out)


def unescape(text: str) -> str:
    """The name `escape` wrote, as the `str` the os module uses (undecodable bytes as surrogates)."""
    def one(m: re.Match) -> str:
        token = m.group(1)
        if token == "\\":
            return "\\"
        code = int(token[1:], 16)
        return chr(code) if code < 0x80 else chr(0xDC00 + code)

    return _ESCAPED.sub(one, text)  # valid characters were kept as they are; raw bytes come back as surrogates


def printable(text: str) -> str:
    """A message that may hold such names, safe to print (not reversible: for messages, not for files)."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def folded(text: str, limit: int = 60) -> str:
    """A long name (a label file's 5,000-character class) shortened for a table cell, its length said: the table
    stays readable; files keep the full name."""
    if len(text) <= limit:
        return text
    head = limit - 20
    return f"{text[:head]}…{text[-8:]} ({len(text):,} chars)"


_FORMULA = ("=", "+", "-", "@", "\t", "\r")  # what a spreadsheet takes for a formula at the start of a cell


def cell(value):
    """A CSV cell a spreadsheet shows as text: a string starting like a formula (`=cmd|...`, a label from a file
    someone else wrote) gets a leading apostrophe (OWASP's CSV injection advice); numbers are left as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA):
        return "'" + value
    return value

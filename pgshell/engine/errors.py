"""The one exception type users see: its message says what went wrong and what to do next."""


class PgError(Exception):
    """A user-facing error (bad input, missing file, impossible request). Never a bug."""

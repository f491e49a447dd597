"""Tuning commands: lrfind, tune."""

from __future__ import annotations

from cmd2 import CommandSet


class TuningCommands(CommandSet):
    DEFAULT_CATEGORY = "Tuning"

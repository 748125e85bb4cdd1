"""Failures the project anticipates, reported in one line.

An ``AnticipatedError`` is a failure whose message names its cause and its fix (a bad
run config, a data set that cannot be found or reached, a missing device, a
checkpoint that cannot be resumed, a round left without usable updates). When one
ends a run, ``fedcifar_app.compat.reported_in_one_line`` logs it as a single
``[fedcifar] ERROR`` line (Flower's own report of it depends on flwr's logging, hence
there). No Flower import: task.py raises these too.
"""

from __future__ import annotations


class AnticipatedError(Exception):
    """A failure whose message says what went wrong and how to fix it."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line: its lines joined by '; '."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines).replace(":; ", ": ")

"""Failures the project anticipates, reported in one line.

An ``AnticipatedError`` is a failure whose message names its cause and its fix (a bad
run config, a data set that cannot be found or reached, a missing device, a
checkpoint that cannot be resumed, a round left without usable updates). When one
ends a run, ``reported_in_one_line`` logs it as a single ``[fedcifar] ERROR`` line,
with the traceback at DEBUG only, and keeps Flower from reporting it again: Flower
logs whatever a ServerApp raises with its traceback, then an exit-code footer that
calls it unhandled, both to its 'flwr' logger. Anything else keeps Flower's report.
No Flower import: task.py raises these too.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

FLOWER_LOGGER = logging.getLogger("flwr")  # flwr.common.logger.FLOWER_LOGGER's name


class AnticipatedError(Exception):
    """A failure whose message says what went wrong and how to fix it."""


def one_line(error: BaseException) -> str:
    """The message of ``error`` on one line: its lines joined by '; '."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return "; ".join(lines).replace(":; ", ": ")


@contextmanager
def reported_in_one_line() -> Iterator[None]:
    """Report an AnticipatedError raised inside as one line, then re-raise it (the run
    still fails, with Flower's status and exit code)."""
    try:
        yield
    except AnticipatedError as error:
        FLOWER_LOGGER.debug("[fedcifar] where the error below was raised", exc_info=error)
        FLOWER_LOGGER.error("[fedcifar] ERROR %s", one_line(error))
        FLOWER_LOGGER.addFilter(_AlreadyReported(error))
        raise


class _AlreadyReported(logging.Filter):
    """Drops Flower's traceback of ``error`` and the exit-code footer after it."""

    def __init__(self, error: BaseException) -> None:
        super().__init__()
        self.error = error

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is self.error:
            return False
        return not (record.levelno >= logging.ERROR
                    and str(record.msg).startswith("Exit Code: "))

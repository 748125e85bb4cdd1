"""What time it is for a strategy that does not work in rounds: the wall clock, or a
simulated one.

An asynchronous strategy (extensions/fedbuff) dispatches work whenever a client is
free, so it needs a clock: to stamp its server steps, to know which nodes can take
work now, and to let time pass when nothing can be done. A Grid that simulates time
(the heterogeneity extension's ``SimulatedClockGrid``) is its own ``Clock``; any other
Grid runs on the ``WallClock``, and is pulled through ``BackgroundPulls``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable
from typing import Protocol, runtime_checkable

from flwr.app import Message
from flwr.serverapp import Grid

from fedcifar_app.strategies.recovery import MIN_POLL_INTERVAL, POLL_INTERVAL, WrappedGrid


@runtime_checkable
class Clock(Protocol):
    simulated: bool  # whether now() is simulated seconds (results.json: simulated_seconds)

    def now(self) -> float:
        """Seconds since the run started (a resumed simulated clock: since the first)."""

    def idle(self, seconds: float) -> None:
        """Nothing can be done: let up to ``seconds`` pass, or less if something changes."""

    def available(self, node_ids: list[int]) -> list[int]:
        """Those of ``node_ids`` (connected nodes) that can take work now."""


class WallClock:
    """Real time: every connected node is available."""

    simulated = False

    def __init__(self, started: float | None = None) -> None:
        self.started = time.monotonic() if started is None else started

    def now(self) -> float:
        return time.monotonic() - self.started

    def idle(self, seconds: float) -> None:
        time.sleep(seconds)

    def available(self, node_ids: list[int]) -> list[int]:
        return list(node_ids)


def clock_of(grid: Grid, started: float | None = None) -> Clock:
    """The clock ``grid`` keeps, or the wall clock from ``started`` (time.monotonic();
    default: now)."""
    return grid if isinstance(grid, Clock) else WallClock(started)


class BackgroundPulls(WrappedGrid):
    """A Grid whose ``pull_messages`` never waits: each message ID asked for is pulled
    in a thread of its own, and a call returns the replies those threads have got.

    Flower's pull of a reply waits until all of its arrays are uploaded: over a slow
    link that is as long as the upload, and pulling all replies in one call would hold
    up every other reply (and every timeout) meanwhile. A call names every message
    still wanted: the threads of the others stop. ``close`` stops them all."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.lock = threading.Lock()
        self.wanted: set[str] = set()
        self.pulled: dict[str, Message] = {}
        self.failure: BaseException | None = None
        self.closed = threading.Event()

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = set(message_ids)
        with self.lock:
            if self.failure is not None:
                raise self.failure
            for message_id in message_ids - self.wanted - set(self.pulled):
                threading.Thread(target=self._pull, args=(message_id,), daemon=True).start()
            self.wanted = message_ids - set(self.pulled)
            return [self.pulled.pop(m) for m in list(self.pulled) if m in message_ids]

    def _pull(self, message_id: str) -> None:
        started = time.monotonic()
        while not self.closed.is_set():
            with self.lock:
                if message_id not in self.wanted:
                    return
            try:
                replies = list(self.grid.pull_messages([message_id]))
            except BaseException as err:  # the SuperLink is gone: the run's thread raises it
                with self.lock:
                    self.failure = err
                return
            if replies:
                with self.lock:
                    self.pulled[message_id] = replies[0]
                    self.wanted.discard(message_id)
                return
            waited = time.monotonic() - started
            self.closed.wait(min(POLL_INTERVAL, max(MIN_POLL_INTERVAL, waited / 100)))

    def close(self) -> None:
        self.closed.set()

"""What time it is for a strategy that does not work in rounds: the wall clock, or a
simulated one.

An asynchronous strategy (extensions/fedbuff) dispatches work whenever a client is
free, so it needs a clock: to stamp its server steps, to know which nodes can take
work now, and to let time pass when nothing can be done. A Grid that simulates time
(the heterogeneity extension's ``SimulatedClockGrid``) is its own ``Clock``; any other
Grid runs on the ``WallClock``.
"""

from __future__ import annotations

import time
from typing import Protocol, runtime_checkable

from flwr.serverapp import Grid


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

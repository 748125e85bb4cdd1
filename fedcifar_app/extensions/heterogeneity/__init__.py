"""Heterogeneous clients on a simulated clock (``devices``): each client's device
(``devices``: seeded draws or FedScale traces) and, for synchronous strategies, the
Grid that moves the clock and fails clients whose device is unavailable (``clock``).
"""

from __future__ import annotations

from pathlib import Path

from flwr.serverapp import Grid

from fedcifar_app.config import RunConfig
from fedcifar_app.extensions.heterogeneity.clock import SimulatedClockGrid
from fedcifar_app.extensions.heterogeneity.devices import (Device, drawn_devices,
                                                          traced_devices)
from fedcifar_app.strategies.safeguards import Safeguarded

def devices_for(config: RunConfig, count: int) -> list[Device]:
    """The devices of ``count`` clients, as the config says."""
    if config.devices == "fedscale":
        behaviour = Path(config.behaviour_trace) if config.behaviour_trace else None
        return traced_devices(Path(config.device_trace), behaviour, count)
    return drawn_devices(count, config.seed, config.device_seconds_per_sample,
                         config.device_kbps, config.device_spread, config.straggler_fraction,
                         (config.straggler_slowdown_min, config.straggler_slowdown_max))


def training_grid(config: RunConfig, grid: Grid, strategy: Safeguarded) -> Grid | None:
    """With ``devices``, the simulated clock's Grid over ``grid``'s nodes, one device per
    partition (the nodes' partitions are known once the strategy has met them)."""
    if config.devices == "none":
        return None
    partitions = [p for p in strategy.partitions.partition_of.values() if p is not None]
    count = max(max(partitions, default=-1) + 1, len(strategy.partitions.partition_of), 1)
    return SimulatedClockGrid(grid, devices_for(config, count), strategy.partitions,
                              strategy.recorder, config.local_epochs,
                              keep_first=config.over_selection_keep)

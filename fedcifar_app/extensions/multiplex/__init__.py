"""Multiplexed simulation (``virtual-clients``): many virtual clients per SuperNode, one
message per node and phase. Server side: ``MultiplexingGrid`` (``server``); node side:
the mod that serves a bundle of clients (``node``); their messages and the mean a node
sends for its clients (``clients``).
"""

from __future__ import annotations

import os
from collections.abc import Callable

from flwr.serverapp import Grid

from fedcifar_app.config import ROBUST_STRATEGIES, RunConfig
from fedcifar_app.extensions.multiplex.node import serving_mod
from fedcifar_app.extensions.multiplex.server import MultiplexingGrid
from fedcifar_app.node import NodeHooks
from fedcifar_app.strategies.safeguards import Safeguarded


def node_mods(message_type: str, hooks: NodeHooks) -> list[Callable]:
    return [serving_mod(hooks)]


def training_grid(config: RunConfig, grid: Grid, strategy: Safeguarded) -> Grid | None:
    """With ``virtual-clients``, a MultiplexingGrid of that many clients over the
    nodes of ``grid``."""
    if not config.virtual_clients:
        return None
    serving = config.serving_nodes or concurrent_clients()
    return MultiplexingGrid(grid, config.virtual_clients, strategy.partitions, serving,
                            # e.g. SCAFFOLD keeps each client's control variate on its node.
                            sticky=getattr(strategy.strategy, "keeps_client_state", False),
                            # Robust aggregators need every update, not a mean.
                            each=config.strategy in ROBUST_STRATEGIES)


def concurrent_clients() -> int:
    """How many ClientApps can train at once, assuming one CPU each: the CPUs of the
    Ray cluster this process drives (a simulation's ServerApp), else this machine's."""
    try:
        import ray
    except ImportError:
        ray = None
    if ray is not None and ray.is_initialized():
        cpus = int(ray.cluster_resources().get("CPU", 0))
        if cpus > 0:
            return cpus
    return os.cpu_count() or 1

"""Asynchronous federated learning: FedBuff (``strategy='fedbuff'``, Nguyen et al.,
AISTATS 2022), in simulation on the simulated clock (``devices``) and in deployments on
the wall clock.

``buffer``: the staleness-weighted update buffer and the server step; ``server``: the
loop that keeps clients training without rounds, through the Grid's push and pull.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.serverapp.strategy import FedAvg

from fedcifar_app.config import RunConfig
from fedcifar_app.extensions.fedbuff.server import run_fedbuff

# The safeguards wrap a FedAvg (its node waits and update filter serve FedBuff); the
# runner below does the steps.
STRATEGIES = {"fedbuff": FedAvg}


def runner(config: RunConfig) -> Callable | None:
    return run_fedbuff if config.strategy == "fedbuff" else None

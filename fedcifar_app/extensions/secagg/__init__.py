"""Secure aggregation (``secure-aggregation``): training rounds through Flower's SecAgg+.

Node side (``node``): Flower's ``secaggplus_mod`` around the train handler, and the
translation between its legacy messages and this app's. What a node masks, and the
checks it makes first: ``updates``. Server side (``server``): the legacy workflow
driving the run's own strategy.
"""

from __future__ import annotations

from collections.abc import Callable

from fedcifar_app.config import RunConfig
from fedcifar_app.extensions.secagg.node import secure_aggregation_mod
from fedcifar_app.extensions.secagg.server import run_secure_aggregation


def node_mods(message_type: str, hooks: object) -> list[Callable]:
    return [secure_aggregation_mod]


def runner(config: RunConfig) -> Callable | None:
    return run_secure_aggregation if config.secure_aggregation else None


def replacement_problem(config: RunConfig) -> str | None:
    """SecAgg+ cannot take a replacement mid-protocol; it tolerates drop-outs instead."""
    return "secure aggregation" if config.secure_aggregation else None

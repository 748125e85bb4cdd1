"""SCAFFOLD (``strategy='scaffold'``), which Flower 1.42 does not ship: the strategy on
the server (``server``), the control variates on the nodes (``node``)."""

from __future__ import annotations

from fedcifar_app.config import RunConfig
from fedcifar_app.extensions.scaffold.node import ScaffoldControls
from fedcifar_app.extensions.scaffold.server import Scaffold
from fedcifar_app.node import TrainingHook

STRATEGIES = {"scaffold": Scaffold}


def training_hooks(config: RunConfig, node_config: dict) -> list[TrainingHook]:
    # Driven by the message: a node keeps its c_i whenever the server sends a control.
    return [ScaffoldControls()]

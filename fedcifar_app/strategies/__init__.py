"""Server-side core: Flower's strategies, made safe for deployments.

* ``safeguards``: ``Safeguarded``, the wrapper every run's strategy goes in (bounded
  waits, update filter, loud failure, results, checkpoints), with ``ServerHook``, the
  seam extensions plug into;
* ``checkpoint``: checkpoints, and what a resumed run must share;
* ``replies``: what the server checks and counts in replies;
* ``recovery``: ``RecoveringGrid``, which replaces nodes that fail mid-round;
* ``sampling``: reproducible node draws and aggregation order.

Which Flower strategy a run uses, with which options and hooks, the registry in
``fedcifar_app.extensions`` decides.
"""

from __future__ import annotations

from typing import Any

from flwr.serverapp.strategy import (Bulyan, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx,
                                     FedTrimmedAvg, Krum, MultiKrum)

from fedcifar_app.config import RunConfig
from fedcifar_app.strategies.checkpoint import (CHECKPOINT_FILE, Checkpoint, load_checkpoint,
                                                resume_problems)
from fedcifar_app.strategies.recovery import RecoveringGrid
from fedcifar_app.strategies.safeguards import (RunEndsEarly, RunFailedError, Safeguarded,
                                                ServerHook)

__all__ = ["CHECKPOINT_FILE", "FLOWER_STRATEGIES", "Checkpoint", "RecoveringGrid",
           "RunEndsEarly", "RunFailedError", "Safeguarded", "ServerHook", "flower_options",
           "load_checkpoint", "resume_problems"]

FLOWER_STRATEGIES = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM,
                     "fedadam": FedAdam, "fedmedian": FedMedian,
                     "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "multikrum": MultiKrum,
                     "bulyan": Bulyan}


def flower_options(config: RunConfig) -> dict[str, Any]:
    """The keyword arguments of Flower's strategy for ``config``: sampling, and the
    options of FedProx, FedAvgM and FedAdam (extensions add theirs)."""
    specific = {
        "fedprox": {"proximal_mu": config.fedprox_mu},
        "fedavgm": {"server_learning_rate": config.fedavgm_server_lr,
                    "server_momentum": config.fedavgm_momentum},
        "fedadam": {"eta": config.fedadam_eta, "tau": config.fedadam_tau},
    }.get(config.strategy, {})
    return {"fraction_train": config.fraction_train,
            "fraction_evaluate": config.fraction_evaluate,
            # Sample by fraction alone; min-available-nodes says how many must be connected.
            "min_train_nodes": 1, "min_evaluate_nodes": 1,
            "min_available_nodes": config.min_available_nodes, **specific}

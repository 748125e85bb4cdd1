"""User-level differential privacy (``dp``): DP-FedAvg with Poisson sampling, clipping,
noise from private draws, and PLD or RDP accounting with a budget.

Node side (``node``): unit weights and, with dp='client', clipping on the node.
Server side (``server``): the ``DifferentialPrivacy`` hook of the safeguarded
strategy (cohort, clipping, noised release, ledger) and the accounting.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fedcifar_app.config import RunConfig
from fedcifar_app.extensions.privacy.node import UnitWeight, client_clipping_mod
from fedcifar_app.extensions.privacy.server import DifferentialPrivacy
from fedcifar_app.node import UNIT_WEIGHT, TrainingHook
from fedcifar_app.results import RunRecorder
from fedcifar_app.strategies.safeguards import ServerHook

# With DP the mechanism and its accounting must not change on resume: the ledger goes
# on from the checkpoint.
DP_RESUME_KEYS = ("fraction-train", "dp-noise-multiplier", "dp-clipping-norm", "dp-clipping",
                  "dp-target-quantile", "dp-clip-learning-rate", "dp-clipped-count-stddev",
                  "dp-delta", "dp-accountant")


def node_mods(message_type: str, hooks: object) -> list[Callable]:
    return [client_clipping_mod] if message_type == "train" else []


def training_hooks(config: RunConfig, node_config: dict) -> list[TrainingHook]:
    return [UnitWeight()] if config.dp != "none" else []


def evaluation_hooks(config: RunConfig) -> list[TrainingHook]:
    return [UnitWeight()] if config.dp != "none" else []


def strategy_options(config: RunConfig) -> dict[str, Any]:
    # DP-FedAvg averages clients unweighted.
    return {"weighted_by_key": UNIT_WEIGHT} if config.dp != "none" else {}


def server_hooks(config: RunConfig, recorder: RunRecorder) -> list[ServerHook]:
    return [DifferentialPrivacy(config, recorder)] if config.dp != "none" else []


def replacement_problem(config: RunConfig) -> str | None:
    """A replacement is a client the Poisson draw did not pick: the accountant would
    credit an amplification that did not happen."""
    return "DP" if config.dp != "none" else None


def resume_keys(config: RunConfig) -> tuple[str, ...]:
    return DP_RESUME_KEYS if config.dp != "none" else ()

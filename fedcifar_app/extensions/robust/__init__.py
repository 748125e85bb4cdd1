"""Defences against harmful, well-formed updates: Flower's robust aggregators and
update-norm bounding.

The aggregators are Flower's own (``FedMedian``, ``FedTrimmedAvg``, ``Krum``,
``MultiKrum``, ``Bulyan``), built with their keys (``strategy_options``) and
safeguarded like any other strategy. What this module adds, as server hooks:

* ``SampleSize``: Krum-style rules need enough updates for the attackers they assume
  (Krum and MultiKrum n > 2f + 2, Bulyan n >= 4f + 3); a run whose round would
  sample fewer fails before training, naming the keys; MultiKrum's number of updates
  kept (multikrum-keep 0) follows each round's usable updates;
* ``NormBound`` (``update-norm-bound``): each update (its difference from the global
  model) is clipped to an L2 norm before aggregation, with Flower's DP clipping
  function and no noise; it works with every strategy.
"""

from __future__ import annotations

from typing import Any

from flwr.app import ArrayRecord, Message
from flwr.serverapp.strategy import Strategy

from fedcifar_app.config import ROBUST_STRATEGIES, RunConfig
from fedcifar_app.results import RunRecorder
from fedcifar_app.strategies.replies import bound_update_norms, clipped_on_nodes, is_node_mean
from fedcifar_app.strategies.safeguards import RunFailedError, ServerHook


def minimum_updates(strategy: str, num_malicious: int) -> int:
    """The fewest updates a round of ``strategy`` needs against ``num_malicious``."""
    if strategy == "bulyan":
        return 4 * num_malicious + 3  # El Mhamdi et al. 2018
    if strategy in ("krum", "multikrum"):
        return 2 * num_malicious + 3  # Blanchard et al. 2017: n > 2f + 2
    return 1


def sample_size_problem(strategy: str, num_malicious: int, sampled: int) -> str | None:
    """Why a round that samples ``sampled`` nodes cannot run ``strategy``, or None."""
    needed = minimum_updates(strategy, num_malicious)
    if sampled >= needed:
        return None
    rule = "4f + 3" if strategy == "bulyan" else "2f + 3"
    return (f"strategy '{strategy}' with num-malicious-nodes={num_malicious} needs at least "
            f"{needed} updates per round ({rule}), but a round samples {sampled} "
            "(fraction-train times the connected nodes): raise fraction-train, connect more "
            "nodes or lower num-malicious-nodes")


def strategy_options(config: RunConfig) -> dict[str, Any]:
    """The robust aggregators' keyword arguments."""
    return {
        "fedtrimmedavg": {"beta": config.trimmed_beta},
        "krum": {"num_malicious_nodes": config.num_malicious_nodes},
        # multikrum-keep 0 (sampled minus f) is set per round, from the replies.
        "multikrum": {"num_malicious_nodes": config.num_malicious_nodes,
                      "num_nodes_to_select": max(config.multikrum_keep, 1)},
        "bulyan": {"num_malicious_nodes": config.num_malicious_nodes},
    }.get(config.strategy, {})


def server_hooks(config: RunConfig, recorder: RunRecorder) -> list[ServerHook]:
    hooks: list[ServerHook] = []
    if config.strategy in ROBUST_STRATEGIES:
        hooks.append(SampleSize(config.strategy, config.num_malicious_nodes,
                                config.multikrum_keep))
    if config.update_norm_bound > 0:
        hooks.append(NormBound(config.update_norm_bound))
    return hooks


class SampleSize(ServerHook):
    """A robust aggregator's minimum sample, checked before each round's training."""

    def __init__(self, strategy: str, num_malicious: int, multikrum_keep: int) -> None:
        self.strategy, self.num_malicious = strategy, num_malicious
        self.multikrum_keep = multikrum_keep

    def check_sample(self, run_round: int, sampled: int) -> None:
        problem = sample_size_problem(self.strategy, self.num_malicious, sampled)
        if problem is not None:
            raise RunFailedError(f"round {run_round}: {problem}")

    def before_aggregation(self, strategy: Strategy, usable: list[Message]) -> None:
        if self.strategy == "multikrum" and self.multikrum_keep == 0:
            strategy.num_nodes_to_select = max(len(usable) - self.num_malicious, 1)


class NormBound(ServerHook):
    """update-norm-bound: every usable update clipped to this L2 norm, no noise."""

    def __init__(self, bound: float) -> None:
        self.bound = bound

    def clip(self, run_round: int, usable: list[Message], global_arrays: ArrayRecord) -> int:
        # Multiplexed nodes clip each client's update before averaging them.
        single = [r for r in usable if not is_node_mean(r)]
        return clipped_on_nodes(usable) + bound_update_norms(single, global_arrays, self.bound)

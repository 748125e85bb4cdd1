"""Server-side strategies: Flower's, made safe for deployments, plus SCAFFOLD.

* ``safeguards``: ``SafeguardsMixin`` (bounded waits, update filter, loud failure,
  checkpoints, results) mixed into every strategy;
* ``scaffold``: SCAFFOLD, which Flower 1.42 does not ship;
* ``recovery``: ``RecoveringGrid``, which replaces nodes that fail mid-round;
* ``sampling``: reproducible node draws and aggregation order;
* ``robust``: checks for Flower's Byzantine-robust aggregators, and update-norm
  bounding for every strategy;
* ``multiplex``: ``MultiplexingGrid``, many virtual clients per SuperNode
  (``virtual-clients``);
* ``privacy``: user-level differential privacy (DP-FedAvg) and its accounting;
* ``secure``: training rounds through Flower's SecAgg+ (``secure-aggregation``), a
  bridge from its legacy workflow to the run's strategy.
"""

from __future__ import annotations

import os
from logging import INFO
from typing import Any

from flwr.common import log
from flwr.serverapp.strategy import (Bulyan, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx,
                                     FedTrimmedAvg, Krum, MultiKrum)

from flwr.serverapp import Grid

from fedcifar_app.config import ROBUST_STRATEGIES, RunConfig
from fedcifar_app.virtual_clients import DP_WEIGHT
from fedcifar_app.results import RunRecorder
from fedcifar_app.strategies.safeguards import (CHECKPOINT_FILE, Checkpoint, RunFailedError,
                                                SafeguardsMixin, load_checkpoint,
                                                resume_problems, resume_settings)
from fedcifar_app.strategies.multiplex import MultiplexingGrid
from fedcifar_app.strategies.privacy import (ACCOUNTING, AdaptiveClipping, PrivacyBudgetSpent,
                                             PrivacyLedger)
from fedcifar_app.strategies.recovery import RecoveringGrid
from fedcifar_app.strategies.sampling import PartitionDirectory
from fedcifar_app.strategies.scaffold import Scaffold

__all__ = ["CHECKPOINT_FILE", "Checkpoint", "PrivacyBudgetSpent", "RecoveringGrid",
           "RunFailedError", "build_strategy", "load_checkpoint", "phase_retries",
           "resume_problems", "strategy_grid"]

STRATEGY_CLASSES = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM,
                    "fedadam": FedAdam, "scaffold": Scaffold, "fedmedian": FedMedian,
                    "fedtrimmedavg": FedTrimmedAvg, "krum": Krum, "multikrum": MultiKrum,
                    "bulyan": Bulyan}


def build_strategy(config: RunConfig, recorder: RunRecorder) -> FedAvg:
    """The configured Flower strategy with the safeguards mixed in."""
    base = STRATEGY_CLASSES[config.strategy]
    specific: dict[str, Any] = {
        "fedavg": {},
        "fedprox": {"proximal_mu": config.fedprox_mu},
        "fedavgm": {"server_learning_rate": config.fedavgm_server_lr,
                    "server_momentum": config.fedavgm_momentum},
        "fedadam": {"eta": config.fedadam_eta, "tau": config.fedadam_tau},
        "scaffold": {},
        "fedmedian": {},
        "fedtrimmedavg": {"beta": config.trimmed_beta},
        "krum": {"num_malicious_nodes": config.num_malicious_nodes},
        # multikrum-keep 0 (sampled minus f) is set per round, from the replies.
        "multikrum": {"num_malicious_nodes": config.num_malicious_nodes,
                      "num_nodes_to_select": max(config.multikrum_keep, 1)},
        "bulyan": {"num_malicious_nodes": config.num_malicious_nodes},
    }[config.strategy]
    if config.dp != "none":  # DP-FedAvg averages clients unweighted (see privacy)
        specific["weighted_by_key"] = DP_WEIGHT
    strategy_class = type(f"Safe{base.__name__}", (SafeguardsMixin, base), {})
    strategy = strategy_class(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        # Sample by fraction alone; min-available-nodes says how many must be connected.
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=config.min_available_nodes,
        **specific,
    )
    if config.dp != "none":
        strategy.ledger = PrivacyLedger(config.dp_noise_multiplier, config.fraction_train,
                                        config.dp_delta, config.dp_max_epsilon,
                                        config.dp_accountant)
        strategy.dp_clipping_norm = config.dp_clipping_norm
        strategy.dp_clips_on_server = config.dp == "server"
        recorder.extra["privacy"] = {
            "accountant": config.dp_accountant,
            "accounting": ACCOUNTING[config.dp_accountant], "clipping": config.dp,
            "noise_multiplier": config.dp_noise_multiplier,
            "clipping_norm": config.dp_clipping_norm,
            "sampling_rate": config.fraction_train, "delta": config.dp_delta,
            "max_epsilon": config.dp_max_epsilon, "adaptive_clipping": None}
        if config.dp_clipping == "adaptive":
            strategy.adaptive_clipping = AdaptiveClipping(
                config.dp_target_quantile, config.dp_clip_learning_rate,
                config.dp_clipped_count_stddev)
            recorder.extra["privacy"]["adaptive_clipping"] = {
                "target_quantile": config.dp_target_quantile,
                "learning_rate": config.dp_clip_learning_rate,
                "clipped_count_stddev": config.dp_clipped_count_stddev or "cohort / 20"}
    strategy.recorder = recorder
    strategy.local_epochs = config.local_epochs
    strategy.node_wait_timeout = config.node_wait_timeout
    strategy.checkpoint_path = recorder.run_dir / CHECKPOINT_FILE
    strategy.evaluate_in_train = config.evaluate_in_train
    strategy.seed = config.seed
    strategy.resume_settings = resume_settings(config)
    strategy.model_name = config.model
    strategy.strategy_name = config.strategy
    strategy.assumed_malicious = config.num_malicious_nodes
    strategy.multikrum_keep = config.multikrum_keep
    strategy.update_norm_bound = config.update_norm_bound
    strategy.partitions = PartitionDirectory(timeout=config.round_timeout)
    return strategy


def phase_retries(config: RunConfig) -> int:
    """How many failed nodes RecoveringGrid may replace per phase: round-retries, but
    none under DP (a replacement is a client the Poisson draw did not pick, and the
    accountant would credit an amplification that did not happen) or SecAgg+ (it
    cannot take a replacement mid-protocol; it tolerates drop-outs instead)."""
    if config.round_retries and (config.dp != "none" or config.secure_aggregation):
        log(INFO, "[fedcifar] round-retries %d not used: with %s a failed node is left "
            "out, not replaced", config.round_retries,
            "DP" if config.dp != "none" else "secure aggregation")
        return 0
    return config.round_retries


def strategy_grid(config: RunConfig, grid: Grid, strategy: FedAvg) -> Grid:
    """The Grid the strategy runs on: ``grid`` (per-node mode), or with
    ``virtual-clients`` a MultiplexingGrid of that many clients over its nodes."""
    if not config.virtual_clients:
        return grid
    serving = config.serving_nodes or concurrent_clients()
    return MultiplexingGrid(grid, config.virtual_clients, strategy.partitions, serving,
                            # SCAFFOLD keeps each client's control variate on its node.
                            sticky=config.strategy == "scaffold",
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

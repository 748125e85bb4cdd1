"""Capabilities beyond the seed, one package each, and the registry that plugs them in.

Each package holds its node side, its server side and what it needs of the run config:

* ``secagg``: training rounds through Flower's SecAgg+ (``secure-aggregation``);
* ``multiplex``: many virtual clients per SuperNode (``virtual-clients``);
* ``attacks``: simulated malicious nodes (``attack``, node config ``attack``);
* ``scaffold``: SCAFFOLD (``strategy='scaffold'``), which Flower does not ship;
* ``privacy``: user-level differential privacy, DP-FedAvg (``dp``);
* ``robust``: Byzantine-robust aggregation checks and update-norm bounding;
* ``heterogeneity``: devices of different speeds, links and availability, on a
  simulated clock (``devices``);
* ``fedbuff``: asynchronous training, FedBuff (``strategy='fedbuff'``).

An extension module may define any of these, each deciding from the run config whether
it acts (the core never asks "is DP on?"):

* ``node_mods(message_type, hooks)``: Flower mods around the ClientApp's train or
  evaluate handler;
* ``training_hooks(config, node_config)`` / ``evaluation_hooks(config)``:
  ``node.TrainingHook`` objects around one client's training or evaluation;
* ``server_hooks(config, recorder)``: ``strategies.ServerHook`` objects the
  safeguarded strategy calls (sampling, checks, clipping, release, checkpoint state);
* ``STRATEGIES``: strategies it adds (name -> Flower strategy class);
* ``strategy_options(config)``: keyword arguments for the Flower strategy;
* ``training_grid(config, grid, strategy)``: a Grid wrapper, or None;
* ``runner(config)``: a function that runs the rounds (or steps) instead of
  ``strategy.start``, on the training grid;
* ``replacement_problem(config)``: why a failed node must not be replaced, or None;
* ``resume_keys(config)``: run-config keys a resumed run must share.

EXTENSIONS lists them in order: mods wrap outermost first, hooks run in that order.
"""

from __future__ import annotations

from collections.abc import Callable
from logging import INFO
from types import ModuleType

from flwr.app import ArrayRecord, Context
from flwr.common import log
from flwr.serverapp import Grid

from fedcifar_app.config import RunConfig
from fedcifar_app.extensions import (attacks, fedbuff, heterogeneity, multiplex, privacy,
                                     robust, scaffold, secagg)
from fedcifar_app.node import NodeHooks, TrainingHook
from fedcifar_app.results import RunRecorder
from fedcifar_app.strategies import FLOWER_STRATEGIES, Safeguarded, flower_options
from fedcifar_app.strategies.checkpoint import RESUME_KEYS, resume_settings
from fedcifar_app.strategies.safeguards import SafeguardSettings
from fedcifar_app.strategies.sampling import PartitionDirectory

EXTENSIONS: tuple[ModuleType, ...] = (secagg, multiplex, attacks, scaffold, privacy, robust,
                                      heterogeneity, fedbuff)


def _parts(name: str) -> list:
    """Each extension's ``name`` (a function or table), in EXTENSIONS order."""
    return [getattr(extension, name) for extension in EXTENSIONS if hasattr(extension, name)]


def training_hooks(config: RunConfig, node_config: dict) -> list[TrainingHook]:
    return [hook for hooks in _parts("training_hooks") for hook in hooks(config, node_config)]


def evaluation_hooks(config: RunConfig) -> list[TrainingHook]:
    return [hook for hooks in _parts("evaluation_hooks") for hook in hooks(config)]


def node_mods(message_type: str) -> list[Callable]:
    """The Flower mods around the ClientApp's ``message_type`` handler."""
    hooks = NodeHooks(training_hooks, evaluation_hooks)
    return [mod for mods in _parts("node_mods") for mod in mods(message_type, hooks)]


# --- Server side ----------------------------------------------------------------------

def build_strategy(config: RunConfig, recorder: RunRecorder) -> Safeguarded:
    """The configured Flower strategy, safeguarded, with the extensions' hooks."""
    classes = {**FLOWER_STRATEGIES,
               **{name: strategy for table in _parts("STRATEGIES")
                  for name, strategy in table.items()}}
    options = flower_options(config)
    for extension_options in _parts("strategy_options"):
        options.update(extension_options(config))
    settings = SafeguardSettings(
        node_wait_timeout=config.node_wait_timeout,
        min_available_nodes=config.min_available_nodes, local_epochs=config.local_epochs,
        evaluate_in_train=config.evaluate_in_train, seed=config.seed,
        model_name=config.model, strategy_name=config.strategy,
        resume_settings=resume_settings(config, resume_keys(config)))
    hooks = [hook for server_hooks in _parts("server_hooks")
             for hook in server_hooks(config, recorder)]
    return Safeguarded(classes[config.strategy](**options), settings, recorder,
                       PartitionDirectory(timeout=config.round_timeout), hooks)


def resume_keys(config: RunConfig) -> tuple[str, ...]:
    """The run-config keys a resumed run must share with the run it continues."""
    return RESUME_KEYS + tuple(key for keys in _parts("resume_keys") for key in keys(config))


def phase_retries(config: RunConfig) -> int:
    """How many failed nodes RecoveringGrid may replace per phase: round-retries, unless
    an extension forbids replacements (DP, SecAgg+): then a failed node is left out."""
    reasons = [reason for problem in _parts("replacement_problem")
               if (reason := problem(config)) is not None]
    if config.round_retries and reasons:
        log(INFO, "[fedcifar] round-retries %d not used: with %s a failed node is left "
            "out, not replaced", config.round_retries, reasons[0])
        return 0
    return config.round_retries


def training_grid(config: RunConfig, grid: Grid, strategy: Safeguarded) -> Grid:
    """The Grid the strategy trains on: ``grid``, or an extension's wrapper of it."""
    for wrap in _parts("training_grid"):
        wrapped = wrap(config, grid, strategy)
        if wrapped is not None:
            return wrapped
    return grid


def run_rounds(grid: Grid, context: Context, config: RunConfig, strategy: Safeguarded,
               initial_arrays: ArrayRecord, evaluate_fn: Callable, num_rounds: int
               ) -> ArrayRecord:
    """Run the rounds: Flower's ``strategy.start``, unless an extension runs them (SecAgg+,
    FedBuff); return the final global model."""
    grid = training_grid(config, grid, strategy)
    for runner in _parts("runner"):
        run = runner(config)
        if run is not None:
            return run(grid, context, config, strategy, initial_arrays, evaluate_fn,
                       num_rounds)
    return strategy.start(grid=grid,
                          initial_arrays=initial_arrays, num_rounds=num_rounds,
                          timeout=config.round_timeout, evaluate_fn=evaluate_fn).arrays

"""Secure aggregation: training rounds through Flower's SecAgg+.

flwr 1.42 ships SecAgg+ only for its legacy API: ``SecAggPlusWorkflow`` is a fit
workflow of the legacy ``DefaultWorkflow``, which drives a legacy
``flwr.server.strategy.Strategy`` (FitIns / FitRes) in a ``LegacyContext``. This
app's strategies are Message-API ones. ``SecureAggregationBridge`` is the legacy
strategy the workflow drives; it hands every decision to the run's own strategy
(the configured Flower strategy with the safeguards), translating between the two
formats, so that sampling, DP, results, checkpoints and evaluation run the same
code as without secure aggregation:

* ``configure_fit`` / ``configure_evaluate``: the strategy's own instructions, as
  FitIns / EvaluateIns to the same nodes (legacy Parameters carry no names; the
  bridge keeps the global model with its names);
* ``aggregate_fit``: SecAgg+ gives every result the same parameters, the weighted
  mean of the updates of the nodes that finished (nodes mask updates, not weights:
  see ``updates.py``). The strategy receives, per finished
  node, a reply holding global model + that mean and the node's own metrics (which
  travel unmasked), and an error reply per node that dropped out. Its weighted
  average of equal models is that model: FedAvg and FedProx release the secure
  mean, FedAvgM and FedAdam take their server step from it, DP adds its noise;
* ``evaluate``: the run's server-side evaluation.

SecAgg+ abandons a round when fewer of a node's share holders than the
reconstruction threshold survive; that round fails the run, like a round without
usable replies, instead of keeping the old model.
"""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import (Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord,
                      RecordDict)
from flwr.common import (EvaluateIns, FitIns, Parameters, ndarrays_to_parameters,
                         parameters_to_ndarrays)
from flwr.common.constant import ErrorCode
from flwr.server import ClientManager, LegacyContext, ServerConfig
from flwr.server.strategy import Strategy as LegacyStrategy
from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow
from flwr.serverapp import Grid

from fedcifar_app import compat
from fedcifar_app.config import RunConfig
from fedcifar_app.extensions.secagg.updates import CLIPPING_RANGE, max_weight
from fedcifar_app.strategies.safeguards import RunFailedError, Safeguarded

EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


class SecureAggregationBridge(LegacyStrategy):
    """The legacy strategy SecAgg+'s workflow drives, over the run's strategy."""

    def __init__(self, strategy: Safeguarded, grid: Grid, initial_arrays: ArrayRecord,
                 evaluate_fn: EvaluateFn) -> None:
        self.strategy = strategy
        self.grid = grid
        self.global_arrays = initial_arrays
        self.evaluate_fn = evaluate_fn
        self.aggregated_round = 0
        self._instructions: dict[int, Message] = {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters:
        return ndarrays_to_parameters(self.global_arrays.to_numpy_ndarrays())

    def configure_fit(self, server_round: int, parameters: Parameters,
                      client_manager: ClientManager) -> list:
        instructions = list(self.strategy.configure_train(
            server_round, self.global_arrays, ConfigRecord(), self.grid))
        if not instructions and self.strategy.releases_empty_rounds:
            # E.g. an empty Poisson cohort: DP still releases (noise only); nothing to sum.
            self._aggregated(server_round, self.strategy.aggregate_train(server_round, []))
        return self._legacy(instructions, FitIns, parameters, client_manager)

    def aggregate_fit(self, server_round: int, results: list, failures: list) -> tuple:
        contents = {}
        if results:  # every result holds the same secure mean of the updates
            mean_update = parameters_to_ndarrays(results[0][1].parameters)
            starts = self.global_arrays.to_numpy_ndarrays()
            model = ArrayRecord({
                name: Array((start + update).astype(start.dtype, copy=False))
                for name, start, update in zip(self.global_arrays, starts, mean_update,
                                               strict=True)})
            contents = {proxy.node_id: RecordDict({
                "arrays": model, "metrics": MetricRecord(fit_result.metrics)})
                for proxy, fit_result in results}
        return self._aggregated(server_round, self.strategy.aggregate_train(
            server_round, self._replies(contents)))

    def evaluate(self, server_round: int, parameters: Parameters) -> tuple | None:
        metrics = self.evaluate_fn(server_round, self.global_arrays)
        return None if metrics is None else (float(metrics["test-loss"]), dict(metrics))

    def configure_evaluate(self, server_round: int, parameters: Parameters,
                           client_manager: ClientManager) -> list:
        instructions = list(self.strategy.configure_evaluate(
            server_round, self.global_arrays, ConfigRecord(), self.grid))
        return self._legacy(instructions, EvaluateIns, parameters, client_manager)

    def aggregate_evaluate(self, server_round: int, results: list, failures: list) -> tuple:
        contents = {proxy.node_id: RecordDict({"metrics": MetricRecord(evaluate_result.metrics)})
                    for proxy, evaluate_result in results}
        metrics = dict(self.strategy.aggregate_evaluate(
            server_round, self._replies(contents)) or {})
        return metrics.get("eval-loss"), metrics

    def _replies(self, contents: dict[int, RecordDict]) -> list[Message]:
        """The phase's replies as the strategy expects them, one per instruction: the
        content from the node's result, or an error for a node that dropped out."""
        return [Message(contents[node], reply_to=instruction) if node in contents
                else _dropped(instruction) for node, instruction in self._instructions.items()]

    def _legacy(self, instructions: list[Message], kind: type, parameters: Parameters,
                client_manager: ClientManager) -> list:
        """The strategy's instructions as legacy (proxy, FitIns or EvaluateIns) pairs."""
        self._instructions = {m.metadata.dst_node_id: m for m in instructions}
        proxies = {proxy.node_id: proxy for proxy in client_manager.all().values()}
        return [(proxies[node], kind(parameters, dict(m.content["config"])))
                for node, m in self._instructions.items()]

    def _aggregated(self, server_round: int, result: tuple) -> tuple:
        arrays, metrics = result
        self.global_arrays = arrays
        self.aggregated_round = server_round
        return ndarrays_to_parameters(arrays.to_numpy_ndarrays()), dict(metrics or {})


def _dropped(instruction: Message) -> Message:
    return Message(Error(code=ErrorCode.UNKNOWN,
                         reason="dropped out of the secure aggregation round"),
                   reply_to=instruction)


def _count_or_fraction(value: float) -> int | float:
    """Flower's convention: an int counts, a float is a fraction."""
    return int(value) if value > 1 else float(value)


def run_secure_aggregation(grid: Grid, context: Context, config: RunConfig,
                           strategy: Safeguarded, initial_arrays: ArrayRecord,
                           evaluate_fn: EvaluateFn, num_rounds: int) -> ArrayRecord:
    """Run ``num_rounds`` rounds whose training goes through SecAgg+; return the final
    global model."""
    bridge = SecureAggregationBridge(strategy, grid, initial_arrays, evaluate_fn)
    secagg = SecAggPlusWorkflow(
        num_shares=_count_or_fraction(config.secagg_num_shares),
        reconstruction_threshold=_count_or_fraction(config.secagg_reconstruction_threshold),
        max_weight=max_weight(config.dp, config.secagg_max_weight),
        clipping_range=CLIPPING_RANGE, timeout=config.round_timeout)

    def fit_round(grid: Grid, legacy_context: LegacyContext) -> None:
        server_round = compat.legacy_current_round(legacy_context)
        secagg(grid, legacy_context)
        if bridge.aggregated_round != server_round:
            raise RunFailedError(
                f"round {server_round + strategy.round_offset}: SecAgg+ abandoned the round "
                "(see the log above: fewer than 2 nodes sampled, or fewer surviving share "
                "holders than secagg-reconstruction-threshold); stopping instead of "
                "carrying the old model forward")

    legacy_context = LegacyContext(context, config=ServerConfig(num_rounds=num_rounds),
                                   strategy=bridge)
    DefaultWorkflow(fit_workflow=fit_round)(grid, legacy_context)
    return bridge.global_arrays

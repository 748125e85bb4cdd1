"""fedcifar ServerApp: the configured strategy, server-side evaluation, run outputs."""

from __future__ import annotations

import random
from collections.abc import Iterable
from logging import INFO, WARNING
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from fedcifar_app import task
from fedcifar_app.config import RunConfig
from fedcifar_app.data import load_split
from fedcifar_app.results import RunRecorder
from fedcifar_app.task import BatchLoader

app = ServerApp()


class RecordingMixin:
    """Adds per-round client metrics and reply counts to the run's results.json."""

    recorder: RunRecorder
    local_epochs: int
    samples_trained: int = 0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        arrays, metrics = super().aggregate_train(server_round, replies)  # type: ignore[misc]
        ok = [r for r in replies if not r.has_error()]
        self.samples_trained += self.local_epochs * sum(
            int(r.content["metrics"]["num-examples"]) for r in ok)
        self.recorder.record(server_round, train=dict(metrics or {}),
                             train_replies=len(ok), train_failures=len(replies) - len(ok),
                             samples_trained=self.samples_trained)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        failures = sum(r.has_error() for r in replies)
        self.recorder.record(server_round, evaluate=dict(metrics or {}),
                             evaluate_replies=len(replies) - failures,
                             evaluate_failures=failures)
        return metrics


STRATEGY_CLASSES = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM,
                    "fedadam": FedAdam}


def build_strategy(config: RunConfig, recorder: RunRecorder) -> FedAvg:
    """The configured Flower strategy, with results recording mixed in."""
    base = STRATEGY_CLASSES[config.strategy]
    specific: dict[str, Any] = {
        "fedavg": {},
        "fedprox": {"proximal_mu": config.fedprox_mu},
        "fedavgm": {"server_learning_rate": config.fedavgm_server_lr,
                    "server_momentum": config.fedavgm_momentum},
        "fedadam": {"eta": config.fedadam_eta, "tau": config.fedadam_tau},
    }[config.strategy]
    strategy_class = type(f"Recording{base.__name__}", (RecordingMixin, base), {})
    strategy = strategy_class(
        fraction_train=config.fraction_train,
        fraction_evaluate=config.fraction_evaluate,
        # Sample by fraction alone; min-available-nodes says how many must be connected.
        min_train_nodes=1,
        min_evaluate_nodes=1,
        min_available_nodes=config.min_available_nodes,
        **specific,
    )
    strategy.recorder = recorder
    strategy.local_epochs = config.local_epochs
    return strategy


def seed_everything(seed: int) -> None:
    random.seed(seed)  # Flower samples nodes with the random module.
    np.random.seed(seed)
    torch.manual_seed(seed)


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured strategy, evaluating the global model on the test split."""
    config = RunConfig.from_mapping(context.run_config)
    run_dir = config.output_root / f"flwr-run-{context.run_id}"
    log(INFO, "[fedcifar] outputs of this run: %s", run_dir)
    recorder = RunRecorder(run_dir, kind="federated", unit="round",
                           run_config=config.to_dict(), extra={"run_id": context.run_id})
    seed_everything(config.seed)
    net = task.Net()
    # The test split is decoded (or mapped from the cache) once for the whole run.
    test_loader = BatchLoader(load_split(config.dataset, "test", config.cache_root),
                              task.EVAL_BATCH_SIZE)

    def evaluate_global_model(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        net.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = task.test(net, test_loader)
        recorder.record(server_round, net.state_dict(), test_loss=loss,
                        test_accuracy=accuracy)
        return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})

    strategy = build_strategy(config, recorder)
    result = strategy.start(
        grid=grid,
        initial_arrays=ArrayRecord(net.state_dict()),
        num_rounds=config.num_server_rounds,
        evaluate_fn=evaluate_global_model,
    )
    if len(result.arrays) == 0:
        recorder.finish(None, status="failed")
        raise RuntimeError(f"no round produced a model (see {run_dir}/results.json): "
                           "every training reply failed")
    net.load_state_dict(result.arrays.to_torch_state_dict())
    recorder.finish(net.state_dict())
    if recorder.best_index is None:
        log(WARNING, "[fedcifar] no server-side evaluation was recorded")
    else:
        log(INFO, "[fedcifar] best test accuracy %.4f (round %s)", recorder.best_accuracy,
            recorder.best_index)
    log(INFO, "[fedcifar] results, models and plot written to %s", run_dir)

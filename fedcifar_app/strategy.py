"""Flower strategies made safe for real deployments.

``build_strategy`` subclasses the configured Flower strategy (FedAvg, FedProx,
FedAvgM, FedAdam, or ``Scaffold`` below) with ``SafeguardsMixin``, which adds what
Flower 1.42 leaves to the app, without copying the strategy's loop:

* waiting for nodes is bounded by ``node-wait-timeout``; too few nodes fail the run;
* training replies whose arrays are not a finite copy of the global model's
  layout (missing or extra keys, other shapes or dtypes, NaN/Inf) or that lack a
  positive ``num-examples`` are dropped and logged, never aggregated;
* a round with no usable training reply fails the run instead of silently
  keeping the old model;
* every round's global model and round number go to ``checkpoint.pt``, from
  which ``resume-from`` continues;
* per-round metrics, reply and failure counts go to results.json.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAdam, FedAvg, FedAvgM, FedProx

from fedcifar_app.config import RunConfig
from fedcifar_app.results import RunRecorder, atomic_write

CHECKPOINT_FILE = "checkpoint.pt"


class RunFailedError(RuntimeError):
    """The run cannot go on: too few nodes, or no usable training replies."""


@dataclass(frozen=True)
class Checkpoint:
    """The global model after ``round`` rounds, as ``save_checkpoint`` wrote it."""

    round: int
    model: dict[str, torch.Tensor]
    samples_trained: int
    path: Path


def load_checkpoint(location: str) -> Checkpoint:
    """Read a checkpoint.pt, or the one in the run folder ``location`` names."""
    path = Path(location).expanduser().resolve()
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"resume-from: no checkpoint at {path} (give a run folder "
                                f"or its {CHECKPOINT_FILE}, as an absolute path)")
    saved = torch.load(path, weights_only=True)
    return Checkpoint(saved["round"], saved["model"], saved["samples_trained"], path)


def update_problem(reply: Message, global_arrays: ArrayRecord,
                   record_names: tuple[str, ...] = ("arrays",)) -> str | None:
    """Why a (non-error) training reply must not be aggregated, or None if it may.

    Each ArrayRecord in ``record_names`` must be a finite copy of the global model's
    layout, and the reply may hold no other ArrayRecord (Flower's aggregation fails
    the whole round on one that does)."""
    content = reply.content
    for name in record_names:
        if name not in content.array_records:
            return f"no ArrayRecord '{name}' in the reply"
    unexpected = sorted(set(content.array_records) - set(record_names))
    if unexpected:
        return f"unexpected ArrayRecords {unexpected}"
    if list(content.metric_records) != ["metrics"]:
        return (f"MetricRecords {sorted(content.metric_records)}, expected exactly one, "
                "'metrics'")
    examples = content.metric_records["metrics"].get("num-examples")
    if not isinstance(examples, (int, float)) or not examples > 0:
        return f"'num-examples' must be a positive number, got {examples!r}"
    for name in record_names:
        problem = layout_problem(content.array_records[name], global_arrays)
        if problem is not None:
            return f"{name}: {problem}"
    return None


def metric_names(reply: Message) -> frozenset[str]:
    return frozenset(reply.content.metric_records["metrics"].keys())


def most_common_metric_names(replies: list[Message]) -> frozenset[str]:
    """The metric names most replies send (the first reply's set wins a tie)."""
    names = [metric_names(r) for r in replies]
    return max(names, key=names.count, default=frozenset())


def layout_problem(arrays: ArrayRecord, global_arrays: ArrayRecord) -> str | None:
    """How ``arrays`` differs from the global model's keys, shapes and dtypes, or holds
    NaN/Inf; None if it does not."""
    missing = sorted(set(global_arrays) - set(arrays))
    extra = sorted(set(arrays) - set(global_arrays))
    if missing or extra:
        return f"keys differ from the global model (missing {missing}, unexpected {extra})"
    for name, expected in global_arrays.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
            return (f"'{name}' is {got.dtype}{list(got.shape)}, the global model has "
                    f"{expected.dtype}{list(expected.shape)}")
        values = got.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"'{name}' holds NaN or Inf"
    return None


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al. 2020) with a global learning rate of 1, as in
    NIID-Bench: FedAvg of the clients' weights, plus control variates that correct
    each client's drift towards its own optimum.

    Every training instruction carries the server control ``c`` as the ArrayRecord
    'server-control'; the ClientApp keeps its own ``c_i`` in its node state and
    replies with 'control-delta' (its change of ``c_i``), and ``c`` moves by the
    mean delta times the fraction of nodes that trained. ``c`` is not in the
    checkpoint: a resumed run starts it at zero, like the clients' node state.
    """

    reply_records = ("arrays", "control-delta")
    server_control: dict[str, np.ndarray] | None = None
    nodes_connected: int = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.server_control is None:
            self.server_control = {k: np.zeros_like(v.numpy()) for k, v in arrays.items()}
        control = ArrayRecord({k: Array(v) for k, v in self.server_control.items()})
        for message in messages:
            message.content["server-control"] = control
        self.nodes_connected = len(list(grid.get_node_ids()))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        deltas = []
        for reply in replies:
            if not reply.has_error():
                deltas.append(reply.content["control-delta"])
                # FedAvg aggregates every ArrayRecord of a reply into the model.
                del reply.content["control-delta"]
        arrays, metrics = super().aggregate_train(server_round, replies)
        if deltas and self.server_control is not None:
            participation = len(deltas) / max(self.nodes_connected, len(deltas))
            for key, control in self.server_control.items():
                mean_delta = sum(delta[key].numpy() for delta in deltas) / len(deltas)
                control += participation * mean_delta
        return arrays, metrics


class SafeguardsMixin:
    """Mixed in before a Flower strategy class; see the module docstring."""

    recorder: RunRecorder
    local_epochs: int
    node_wait_timeout: float
    checkpoint_path: Path
    round_offset: int = 0  # rounds already done by the run this one resumes
    samples_trained: int = 0
    min_available_nodes: int
    _global_arrays: ArrayRecord

    def resume_from(self, checkpoint: Checkpoint) -> None:
        """Number rounds and count samples on from where ``checkpoint`` stopped."""
        self.round_offset = checkpoint.round
        self.samples_trained = checkpoint.samples_trained

    def wait_for_nodes(self, grid: Grid) -> None:
        """Return once min-available-nodes are connected; fail after the timeout."""
        deadline = time.monotonic() + self.node_wait_timeout
        while (connected := len(list(grid.get_node_ids()))) < self.min_available_nodes:
            if time.monotonic() >= deadline:
                raise RunFailedError(
                    f"only {connected} of the {self.min_available_nodes} nodes the run needs "
                    f"(min-available-nodes) connected within {self.node_wait_timeout:g} s "
                    "(node-wait-timeout): start more SuperNodes or lower min-available-nodes")
            log(INFO, "Waiting for nodes: %d of %d connected", connected,
                self.min_available_nodes)
            time.sleep(1)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.wait_for_nodes(grid)
        self._global_arrays = arrays
        return super().configure_train(  # type: ignore[misc]
            server_round + self.round_offset, arrays, config, grid)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        self.wait_for_nodes(grid)
        return super().configure_evaluate(  # type: ignore[misc]
            server_round + self.round_offset, arrays, config, grid)

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        server_round += self.round_offset
        replies = list(replies)
        errors = [r for r in replies if r.has_error()]
        rejected = []

        def reject(reply: Message, problem: str) -> None:
            rejected.append(reply)
            log(WARNING, "Round %d: dropped the update of node %d: %s", server_round,
                reply.metadata.src_node_id, problem)

        # The ArrayRecords a training reply holds: the strategy's own (Scaffold) or Flower's.
        record_names = getattr(self, "reply_records", ("arrays",))
        candidates = []
        for reply in replies:
            if reply.has_error():
                continue
            problem = update_problem(reply, self._global_arrays, record_names)
            if problem is None:
                candidates.append(reply)
            else:
                reject(reply, problem)
        # Flower's aggregation fails the whole round unless all metric names match.
        common_names = most_common_metric_names(candidates)
        usable = []
        for reply in candidates:
            if metric_names(reply) == common_names:
                usable.append(reply)
            else:
                reject(reply, f"metric names {sorted(metric_names(reply))} differ from the "
                              f"other replies' {sorted(common_names)}")
        self.recorder.record(server_round, train_replies=len(usable),
                             train_failures=len(errors), train_rejected=len(rejected))
        if not usable:
            raise RunFailedError(
                f"round {server_round}: none of the {len(replies)} training replies could be "
                f"aggregated ({len(errors)} failed, {len(rejected)} rejected); stopping "
                "instead of carrying the old model forward")
        arrays, metrics = super().aggregate_train(  # type: ignore[misc]
            server_round, [*usable, *errors])
        self.samples_trained += self.local_epochs * sum(
            int(r.content["metrics"]["num-examples"]) for r in usable)
        # Summed, unlike the weighted mean in `train`: the round's compute in CPU-seconds.
        client_train_seconds = sum(float(r.content["metrics"].get("train-seconds", 0.0))
                                   for r in usable)
        self.recorder.record(server_round, train=dict(metrics or {}),
                             samples_trained=self.samples_trained,
                             client_train_seconds=round(client_train_seconds, 3))
        self.save_checkpoint(server_round, arrays)
        return arrays, metrics

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Any:
        server_round += self.round_offset
        replies = list(replies)
        metrics = super().aggregate_evaluate(server_round, replies)  # type: ignore[misc]
        if not replies:  # fraction-evaluate 0: nothing was asked
            return metrics
        failures = sum(r.has_error() for r in replies)
        if failures == len(replies):
            log(WARNING, "Round %d: no client evaluation succeeded", server_round)
        self.recorder.record(server_round, evaluate=dict(metrics or {}),
                             evaluate_replies=len(replies) - failures,
                             evaluate_failures=failures)
        return metrics

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        checkpoint = {"round": server_round, "model": arrays.to_torch_state_dict(),
                      "samples_trained": self.samples_trained}
        atomic_write(self.checkpoint_path, lambda tmp: torch.save(checkpoint, tmp))


STRATEGY_CLASSES = {"fedavg": FedAvg, "fedprox": FedProx, "fedavgm": FedAvgM,
                    "fedadam": FedAdam, "scaffold": Scaffold}


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
    }[config.strategy]
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
    strategy.recorder = recorder
    strategy.local_epochs = config.local_epochs
    strategy.node_wait_timeout = config.node_wait_timeout
    strategy.checkpoint_path = recorder.run_dir / CHECKPOINT_FILE
    return strategy

"""Multiplexed mode on the node: serve the virtual clients a message lists.

The mod answers a bundle (a message with a ``VIRTUAL_CLIENTS`` record) itself: it trains
or evaluates the clients one after another on one model, each as its own client (its
partition, random stream, node state and the extensions' hooks), and replies once for
all. A client that fails is reported, not fatal to the others.
"""

from __future__ import annotations

from logging import WARNING

import torch
from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log

from fedcifar_app import task
from fedcifar_app.config import NodeConfigError
from fedcifar_app.data import load_partitions
from fedcifar_app.extensions.multiplex.clients import (EACH, SEPARATOR, VIRTUAL_CLIENTS,
                                                       ClientMean)
from fedcifar_app.node import (ClientRound, NodeHooks, StateDict, checked_arrays,
                               client_evaluation, clip_update, node_setup, non_finite,
                               partition_scheme, train_client, worker_identity)


def serving_mod(hooks: NodeHooks):  # noqa: ANN201 - a Flower mod
    """The mod that serves bundles; ``hooks`` gives each client's training hooks."""

    def multiplexing_mod(msg: Message, context: Context,
                         call_next: ClientAppCallable) -> Message:
        if VIRTUAL_CLIENTS not in msg.content.config_records:
            return call_next(msg, context)
        return serve_virtual_clients(msg, context, hooks)

    return multiplexing_mod


def serve_virtual_clients(msg: Message, context: Context, hooks: NodeHooks) -> Message:
    """Train or evaluate, one after another, the virtual clients the message lists,
    and reply once for all."""
    if "data-path" in context.node_config:
        raise NodeConfigError(
            "multiplexed mode ('virtual-clients') needs nodes that hold the whole data set "
            "and serve partitions of it (simulation); this node holds its own data-path: "
            "run deployments with virtual-clients=0")
    config, device = node_setup(context)
    bundle = msg.content[VIRTUAL_CLIENTS]
    clients = [int(c) for c in bundle["partition-ids"]]
    each = bundle["reply"] == EACH
    training = msg.metadata.message_type == MessageType.TRAIN
    net = task.build_model(config.model).to(device)
    received = {name: tensor.to(device) for name, tensor in
                checked_arrays(msg, net.state_dict(), config.model).items()}
    net.load_state_dict(received)
    data = load_partitions(config.dataset, config.cache_root,
                           partition_scheme(config, config.virtual_clients), clients)
    results = _ServedClients(each)
    # The bound the server would clip each update to: DP's clipping norm, which the
    # server sends with DP, else update-norm-bound (0: none).
    bound = float(msg.content["config"].get("dp-clipping-norm", config.update_norm_bound))
    start = [received[name] for name in net.state_dict()]
    for client, (train_data, validation_data) in zip(clients, data, strict=True):
        _reset(net, start)
        node_config = {**context.node_config, "partition-id": client,
                       "num-partitions": config.virtual_clients}
        try:
            if training:
                round_ = ClientRound(config, msg, net, train_data.to(device),
                                     validation_data.to(device), node_config, context.state,
                                     client_id=client, state_suffix=f"/{client}")
                train_client(round_, hooks.training(config, node_config))
                metrics, tensors = round_.metrics, round_.tensors
            else:
                metrics, tensors = client_evaluation(net, validation_data.to(device),
                                                     hooks.evaluation(config)), {}
        except Exception as err:  # noqa: BLE001 - one client's failure is reported
            results.failed(client, err)
            continue
        # The trained weights as they are (no copy): used before the next client loads.
        weights = {k: v.detach() for k, v in net.state_dict().items()} if training else None
        problem = None if each else _client_problem(metrics, weights)
        if problem is not None:
            results.rejected(client, problem)
            continue
        clipped = (weights is not None and not each and bound > 0
                   and clip_update(weights, received, bound))
        results.served(client, metrics, weights, tensors, clipped)
    content = results.content()
    content["worker"] = worker_identity()
    return Message(content=content, reply_to=msg)


class _ServedClients:
    """One multiplexed reply in the making: what became of each client, and their
    mean result (or, with ``each``, every client's result)."""

    def __init__(self, each: bool) -> None:
        self.each = each
        self.mean = ClientMean(weight_key=None)  # as the clients' metrics say
        self.records = RecordDict()
        self.outcome: dict[str, list] = {"served": [], "failed": [], "failure-reasons": [],
                                         "rejected": []}
        self.clipped = 0
        self.train_seconds = 0.0

    def failed(self, client: int, err: Exception) -> None:
        log(WARNING, "virtual client %d failed: %s: %s", client, type(err).__name__, err)
        self.outcome["failed"].append(client)
        self.outcome["failure-reasons"].append(f"{type(err).__name__}: {err}")

    def rejected(self, client: int, problem: str) -> None:
        log(WARNING, "virtual client %d: dropped its result: %s", client, problem)
        self.outcome["rejected"].append(client)

    def served(self, client: int, metrics: dict[str, float], weights: StateDict | None,
               tensors: dict[str, StateDict], clipped: bool) -> None:
        self.outcome["served"].append(client)
        self.clipped += int(clipped)
        self.train_seconds += float(metrics.get("train-seconds", 0.0))
        if self.each:
            self.records[f"arrays{SEPARATOR}{client}"] = ArrayRecord(
                {k: v.cpu() for k, v in weights.items()})
            self.records[f"metrics{SEPARATOR}{client}"] = MetricRecord(metrics)
            for name, record in tensors.items():
                self.records[f"{name}{SEPARATOR}{client}"] = ArrayRecord(
                    {k: v.cpu() for k, v in record.items()})
        else:
            self.mean.add(weights, metrics, tensors)

    def content(self) -> RecordDict:
        if self.mean.clients:
            self.records["metrics"] = MetricRecord(self.mean.metrics())
            model = self.mean.model()
            if model:
                self.records["arrays"] = ArrayRecord({k: v.cpu() for k, v in model.items()})
            for name, mean in self.mean.per_client_means().items():
                self.records[name] = ArrayRecord(mean)
        self.records[VIRTUAL_CLIENTS] = ConfigRecord({
            **self.outcome, "clipped": self.clipped, "train-seconds": self.train_seconds})
        return self.records


@torch.no_grad()
def _reset(net: torch.nn.Module, start: list[torch.Tensor]) -> None:
    """Load the received weights back into ``net`` (its state_dict order) for the next
    client: a copy per tensor, without load_state_dict's checks (already made once)."""
    for tensor, value in zip(net.state_dict().values(), start, strict=True):
        tensor.copy_(value)


def _client_problem(metrics: dict[str, float], weights: StateDict | None) -> str | None:
    """Why one virtual client's result must not join its node's mean: the server's
    per-update checks, made on the node because the server sees only the mean."""
    if not metrics["num-examples"] > 0:
        return f"'num-examples' must be positive, got {metrics['num-examples']}"
    return None if weights is None else non_finite(weights)

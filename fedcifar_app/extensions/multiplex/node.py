"""Multiplexed mode on the node: serve the virtual clients a message lists.

The mod answers a bundle (a message with a ``VIRTUAL_CLIENTS`` record) itself, and
replies once for all. It trains the clients together, ``batched-clients`` at a time
(``node.train_clients``: one batched computation, each client with its own weights,
partition, random stream, node state and the extensions' hooks), and evaluates them
one after another. A client that fails is reported, not fatal to the others.
"""

from __future__ import annotations

from logging import WARNING

import torch
from flwr.app import (ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord,
                      RecordDict)
from flwr.clientapp.typing import ClientAppCallable
from flwr.common import log

from fedcifar_app import task
from fedcifar_app.config import NodeConfigError, RunConfig
from fedcifar_app.data import load_partitions
from fedcifar_app.extensions.multiplex.clients import (EACH, SEPARATOR, VIRTUAL_CLIENTS,
                                                       ClientMean)
from fedcifar_app.node import (ClientRound, NodeHooks, StateDict, checked_arrays,
                               client_evaluation, clip_update, node_setup, non_finite,
                               partition_scheme, train_clients, worker_identity)
from fedcifar_app.task import ImageTensors


def serving_mod(hooks: NodeHooks):  # noqa: ANN201 - a Flower mod
    """The mod that serves bundles; ``hooks`` gives each client's training hooks."""

    def multiplexing_mod(msg: Message, context: Context,
                         call_next: ClientAppCallable) -> Message:
        if VIRTUAL_CLIENTS not in msg.content.config_records:
            return call_next(msg, context)
        return serve_virtual_clients(msg, context, hooks)

    return multiplexing_mod


def serve_virtual_clients(msg: Message, context: Context, hooks: NodeHooks) -> Message:
    """Train (up to ``batched-clients`` at once) or evaluate (one after another) the
    virtual clients the message lists, and reply once for all."""
    if "data-path" in context.node_config:
        raise NodeConfigError(
            "multiplexed mode ('virtual-clients') needs nodes that hold the whole data set "
            "and serve partitions of it (simulation); this node holds its own data-path: "
            "run deployments with virtual-clients=0")
    config, device = node_setup(context)
    bundle = msg.content[VIRTUAL_CLIENTS]
    clients = [int(c) for c in bundle["partition-ids"]]
    net = task.build_model(config.model).to(device)
    received = {name: tensor.to(device) for name, tensor in
                checked_arrays(msg, net.state_dict(), config.model).items()}
    net.load_state_dict(received)
    data = load_partitions(config.dataset, config.cache_root,
                           partition_scheme(config, config.virtual_clients), clients)
    served = _ServedClients(bundle["reply"] == EACH,
                            # The bound the server would clip each update to: DP's
                            # clipping norm, which the server sends with DP, else
                            # update-norm-bound (0: none).
                            float(msg.content["config"].get("dp-clipping-norm",
                                                            config.update_norm_bound)),
                            received)
    start = [received[name] for name in net.state_dict()]
    if msg.metadata.message_type == MessageType.TRAIN:
        _train(msg, context, config, hooks, net, start, dict(zip(clients, data, strict=True)),
               served)
    else:
        for client, (_, validation_data) in zip(clients, data, strict=True):
            _reset(net, start)
            try:
                metrics = client_evaluation(net, validation_data.to(device),
                                            hooks.evaluation(config))
            except Exception as err:  # noqa: BLE001 - one client's failure is reported
                served.failed(client, err)
                continue
            served.add(client, metrics, None, {})
    content = served.content()
    content["worker"] = worker_identity()
    return Message(content=content, reply_to=msg)


def _train(msg: Message, context: Context, config: RunConfig, hooks: NodeHooks,
           net: torch.nn.Module, start: list[torch.Tensor],
           data: dict[int, tuple[ImageTensors, ImageTensors]], served: _ServedClients) -> None:
    """Train the clients in chunks of ``batched-clients``, each client on a copy of
    the received model, each with its own round (partition, random stream, node
    state and the extensions' hooks)."""
    device = next(net.parameters()).device
    together = config.batched_clients or task.BATCHED_CLIENTS[config.model]
    nets = [net] + [task.copy_model(net) for _ in range(min(together, len(data)) - 1)]
    clients = list(data)
    for first in range(0, len(clients), together):
        chunk = clients[first:first + together]
        rounds = []
        for client, client_net in zip(chunk, nets[:len(chunk)], strict=True):
            if first:  # the nets hold the received weights until a chunk trains them
                _reset(client_net, start)
            train_data, validation_data = data[client]
            node_config = {**context.node_config, "partition-id": client,
                           "num-partitions": config.virtual_clients}
            rounds.append((ClientRound(config, msg, client_net, train_data.to(device),
                                       validation_data.to(device), node_config,
                                       context.state, client_id=client,
                                       state_suffix=f"/{client}"),
                           hooks.training(config, node_config)))
        for (round_, _), failure in zip(rounds, train_clients(rounds), strict=True):
            if failure is not None:
                served.failed(round_.client_id, failure)
                continue
            # The trained weights as they are (no copy): used before the net is reset.
            weights = {k: v.detach() for k, v in round_.net.state_dict().items()}
            served.add(round_.client_id, round_.metrics, weights, round_.tensors)


class _ServedClients:
    """One multiplexed reply in the making: what became of each client, and their
    mean result (or, with ``each``, every client's result). A result joins the mean
    after the server's per-update checks, its update clipped to ``bound`` (0: none)
    around ``received``."""

    def __init__(self, each: bool, bound: float, received: StateDict) -> None:
        self.each = each
        self.bound = bound
        self.received = received
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

    def add(self, client: int, metrics: dict[str, float], weights: StateDict | None,
            tensors: dict[str, StateDict]) -> None:
        """A client's result (weights None: an evaluation)."""
        problem = None if self.each else _client_problem(metrics, weights)
        if problem is not None:
            log(WARNING, "virtual client %d: dropped its result: %s", client, problem)
            self.outcome["rejected"].append(client)
            return
        clipped = (weights is not None and not self.each and self.bound > 0
                   and clip_update(weights, self.received, self.bound))
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

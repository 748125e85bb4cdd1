"""SCAFFOLD, which Flower 1.42 does not ship, as a Flower strategy."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from fedcifar_app.extensions.scaffold.node import CONTROL_DELTA, SERVER_CONTROL
from fedcifar_app.strategies.replies import served


class Scaffold(FedAvg):
    """SCAFFOLD (Karimireddy et al. 2020) with a global learning rate of 1, as in
    NIID-Bench: FedAvg of the clients' weights, plus control variates that correct
    each client's drift towards its own optimum.

    Every training instruction carries the server control ``c`` as the ArrayRecord
    'server-control'; the ClientApp keeps its own ``c_i`` in its node state and
    replies with 'control-delta' (its change of ``c_i``), and ``c`` moves by the
    mean delta times the fraction of nodes that trained. A multiplexed node's reply
    holds the mean delta of its clients and counts as that many clients. ``c`` is not
    in the checkpoint: a resumed run starts it at zero, like the clients' node state.
    """

    reply_records = ("arrays", CONTROL_DELTA)
    keeps_client_state = True  # on the nodes: a client goes to the same node each time
    server_control: dict[str, np.ndarray] | None = None
    nodes_connected: int = 0

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, arrays, config, grid))
        if self.server_control is None:
            self.server_control = {k: np.zeros_like(v.numpy()) for k, v in arrays.items()}
        control = ArrayRecord({k: Array(v) for k, v in self.server_control.items()})
        for message in messages:
            message.content[SERVER_CONTROL] = control
        self.nodes_connected = len(list(grid.get_node_ids()))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        replies = list(replies)
        deltas, clients = [], []
        for reply in replies:
            if not reply.has_error():
                deltas.append(reply.content[CONTROL_DELTA])
                clients.append(len(served(reply)))
                # FedAvg aggregates every ArrayRecord of a reply into the model.
                del reply.content[CONTROL_DELTA]
        arrays, metrics = super().aggregate_train(server_round, replies)
        if deltas and self.server_control is not None:
            trained = sum(clients)
            participation = trained / max(self.nodes_connected, trained)
            for key, control in self.server_control.items():
                mean_delta = sum(count * delta[key].numpy()
                                 for delta, count in zip(deltas, clients)) / trained
                control += participation * mean_delta
        return arrays, metrics

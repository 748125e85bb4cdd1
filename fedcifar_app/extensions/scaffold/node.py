"""SCAFFOLD on the node: the server's control ``c`` from the message, the client's own
``c_i`` from its node state (zero at first), the drift correction ``c - c_i`` during
local training, and afterwards the new ``c_i`` kept and its change sent back as the
ArrayRecord 'control-delta'. Parameters are taken in ``net.named_parameters()`` order."""

from __future__ import annotations

import torch
from flwr.app import ArrayRecord

from fedcifar_app import task
from fedcifar_app.node import ClientRound, TrainingHook

SERVER_CONTROL = "server-control"
CONTROL_DELTA = "control-delta"
CLIENT_CONTROL = "client-control"  # in the node state (one per client when multiplexed)


class ScaffoldControls(TrainingHook):
    """The SCAFFOLD round of one client (does nothing without a server control)."""

    server: list[torch.Tensor] | None = None

    def before_training(self, client: ClientRound) -> None:
        content = client.instruction.content
        if SERVER_CONTROL not in content.array_records:
            return
        net, key = client.net, client.state_key(CLIENT_CONTROL)
        self.server = _parameter_tensors(content[SERVER_CONTROL], net)
        self.client = (_parameter_tensors(client.state[key], net)
                       if key in client.state.array_records
                       else [torch.zeros_like(t) for t in self.server])
        self.global_weights = [p.detach().clone() for p in net.parameters()]
        client.drift_correction = [c - c_i for c, c_i in zip(self.server, self.client,
                                                              strict=True)]

    def after_training(self, client: ClientRound) -> None:
        """Store the new ``c_i`` in the node state; reply with its change."""
        if self.server is None:
            return
        net = client.net
        new_client = task.scaffold_client_control(
            self.client, self.server, self.global_weights,
            [p.detach() for p in net.parameters()], client.steps, client.config.learning_rate)
        names = [name for name, _ in net.named_parameters()]
        client.state[client.state_key(CLIENT_CONTROL)] = ArrayRecord(
            {name: tensor.cpu() for name, tensor in zip(names, new_client, strict=True)})
        client.tensors[CONTROL_DELTA] = {
            name: new - old for name, new, old in zip(names, new_client, self.client,
                                                      strict=True)}


def _parameter_tensors(record: ArrayRecord, net: torch.nn.Module) -> list[torch.Tensor]:
    """A record's tensors in ``net.named_parameters()`` order, on ``net``'s device."""
    tensors = record.to_torch_state_dict()
    return [tensors[name].to(param.device) for name, param in net.named_parameters()]

"""fedcifar ClientApp: the seed's handlers, grown up.

An honest round reads top to bottom in ``train``: the node's configs and device, the
received model, the node's data, local training (``task.train``) between the
extensions' hooks, the reply. Capabilities plug in through two seams that
``fedcifar_app.extensions`` builds from the run config: Flower mods around the
handlers (secure aggregation, multiplexed clients, clipping for DP) and training hooks
(attacks, SCAFFOLD's controls, DP's weighting). ``node.py`` holds the rest of a
node's side: data, checks, local training, evaluation.
"""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedcifar_app import extensions
from fedcifar_app.node import (ClientRound, client_evaluation, node_data_on, node_setup,
                               received_model, reply, train_client, worker_identity)

app = ClientApp()


@app.train(mods=extensions.node_mods("train"))
def train(msg: Message, context: Context) -> Message:
    """Train the received model on this node's training data."""
    config, device = node_setup(context)
    net = received_model(msg, config, device)
    train_data, validation_data = node_data_on(device, config, context.node_config)
    client = ClientRound(config, msg, net, train_data, validation_data, context.node_config,
                         context.state,
                         client_id=context.node_config.get("partition-id", context.node_id))
    train_client(client, extensions.training_hooks(config, context.node_config))
    answer = reply(msg, client.metrics, net, client.tensors)
    answer.content["worker"] = worker_identity()
    return answer


@app.evaluate(mods=extensions.node_mods("evaluate"))
def evaluate(msg: Message, context: Context) -> Message:
    """Evaluate the received model on this node's validation data."""
    config, device = node_setup(context)
    net = received_model(msg, config, device)
    _, validation_data = node_data_on(device, config, context.node_config)
    return reply(msg, client_evaluation(net, validation_data,
                                        extensions.evaluation_hooks(config)))


@app.query()
def query(msg: Message, context: Context) -> Message:
    """Answer the server's questions about this node: which partition it holds
    (simulation), so that its draws follow the seed (a node with its own ``data-path``
    holds none and answers with no partition id); how many training examples it holds,
    from which the simulated clock models its compute."""
    asked = msg.content["config"].get("query")
    if asked == "partition-id":
        partition = context.node_config.get("partition-id")
        return reply(msg, {} if partition is None else {"partition-id": int(partition)})
    if asked == "num-examples":
        config, device = node_setup(context)
        train_data, _ = node_data_on(device, config, context.node_config)
        return reply(msg, {"num-examples": len(train_data)})
    raise ValueError(f"unknown query {asked!r}; this ClientApp answers 'partition-id' and "
                     "'num-examples'")

"""The ClientApp handlers, called directly with Flower Messages."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict

from fedcifar_app import client_app, task
from fedcifar_app.config import NodeConfigError
from fedcifar_app.node import MalformedInstruction
from fedcifar_app.config import ConfigError


def make_context(tiny_dataset: Path, cache_dir: Path, node_config: dict,
                 **run_config: object) -> Context:
    config = {"dataset": str(tiny_dataset), "cache-dir": str(cache_dir), **run_config}
    return Context(run_id=1, node_id=7, node_config=node_config, state=RecordDict(),
                   run_config=config)


def make_message(message_type: str, net: task.Net, **config: object) -> Message:
    content = RecordDict({"arrays": ArrayRecord(net.state_dict()),
                          "config": ConfigRecord({"server-round": 1, **config})})
    return Message(content=content, dst_node_id=7, message_type=message_type)


SIMULATED = {"partition-id": 1, "num-partitions": 4}


@pytest.fixture(autouse=True)
def task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's runtime sets who is running before any Message is built."""
    from flwr.supercore.task_identity import TaskIdentity

    for attribute, value in {"_run_id": 1, "_node_id": 7, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, attribute, value)


def test_train_returns_updated_arrays_and_metrics(tiny_dataset: Path, cache_dir: Path) -> None:
    torch.manual_seed(0)
    net = task.Net()
    context = make_context(tiny_dataset, cache_dir, SIMULATED, **{"local-epochs": 2})
    reply = client_app.app(make_message("train", net), context)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 90  # 400 / 4 partitions, 10 % held out
    assert metrics["train-loss"] > 0
    assert reply.content["worker"]["host"] == socket.gethostname()  # where it trained
    trained = reply.content["arrays"].to_torch_state_dict()
    assert trained.keys() == net.state_dict().keys()
    assert any(not torch.equal(trained[k], v) for k, v in net.state_dict().items())


def test_training_is_reproducible_for_the_same_round_and_node(
        tiny_dataset: Path, cache_dir: Path) -> None:
    net = task.Net()
    context = make_context(tiny_dataset, cache_dir, SIMULATED)
    first = client_app.app(make_message("train", net), context)
    second = client_app.app(make_message("train", net), context)
    a = first.content["arrays"].to_torch_state_dict()
    b = second.content["arrays"].to_torch_state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_evaluate_reports_validation_metrics(tiny_dataset: Path, cache_dir: Path) -> None:
    context = make_context(tiny_dataset, cache_dir, SIMULATED)
    reply = client_app.app(make_message("evaluate", task.Net()), context)
    assert not reply.has_error(), reply.error
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 10
    assert 0 <= metrics["eval-accuracy"] <= 1 and metrics["eval-loss"] > 0
    assert "arrays" not in reply.content


def test_fedprox_mu_from_the_round_config_is_used(tiny_dataset: Path, cache_dir: Path) -> None:
    torch.manual_seed(0)
    net = task.Net()
    context = make_context(tiny_dataset, cache_dir, SIMULATED, **{"learning-rate": 0.05})
    start = net.state_dict()

    def drift(reply: Message) -> float:
        trained = reply.content["arrays"].to_torch_state_dict()
        return sum((trained[k] - start[k]).pow(2).sum().item() for k in start)

    free = client_app.app(make_message("train", net), context)
    anchored = client_app.app(make_message("train", net, **{"proximal-mu": 50.0}), context)
    assert drift(anchored) < drift(free)


def test_a_node_with_its_own_data_directory(tiny_dataset: Path, cache_dir: Path) -> None:
    context = make_context(tiny_dataset, cache_dir, {"data-path": str(tiny_dataset)})
    reply = client_app.app(make_message("train", task.Net()), context)
    assert reply.content["metrics"]["num-examples"] == 360


def test_a_node_without_data_config_fails_clearly(tiny_dataset: Path, cache_dir: Path) -> None:
    context = make_context(tiny_dataset, cache_dir, {})
    with pytest.raises(NodeConfigError, match="data-path=.*partition-id=0 num-partitions=N"):
        client_app.app(make_message("train", task.Net()), context)


def test_a_bad_run_config_fails_before_training(tiny_dataset: Path, cache_dir: Path) -> None:
    context = make_context(tiny_dataset, cache_dir, SIMULATED, **{"batch-size": "big"})
    with pytest.raises(ConfigError, match="'batch-size' expects an integer"):
        client_app.app(make_message("train", task.Net()), context)


def test_arrays_of_another_model_are_rejected(tiny_dataset: Path, cache_dir: Path) -> None:
    context = make_context(tiny_dataset, cache_dir, SIMULATED)
    other = RecordDict({"arrays": ArrayRecord({"fc.weight": torch.zeros(2, 2)}),
                        "config": ConfigRecord({"server-round": 1})})
    with pytest.raises(MalformedInstruction,
                       match="arrays are not the tutorial-cnn model's"):
        client_app.app(Message(content=other, dst_node_id=7, message_type="train"), context)
    assert not cache_dir.exists()  # refused before the node's data was decoded and cached


def test_scaffold_keeps_the_client_control_in_the_node_state(
        tiny_dataset: Path, cache_dir: Path) -> None:
    torch.manual_seed(0)
    net = task.Net()
    start = net.state_dict()
    context = make_context(tiny_dataset, cache_dir, SIMULATED, **{"learning-rate": 0.05})
    message = make_message("train", net)
    zero = {k: torch.zeros_like(v) for k, v in start.items()}
    message.content["server-control"] = ArrayRecord(zero)
    first = client_app.app(message, context)
    assert not first.has_error(), first.error
    trained = first.content["arrays"].to_torch_state_dict()
    delta = first.content["control-delta"].to_torch_state_dict()
    stored = context.state["client-control"].to_torch_state_dict()
    # c = c_i = 0 at first: c_i' = (x - y) / (K * lr), K = 2 epochs * ceil(90 / 32) batches.
    for k in start:
        torch.testing.assert_close(stored[k], (start[k] - trained[k]) / (2 * 3 * 0.05))
        torch.testing.assert_close(delta[k], stored[k])

    second = client_app.app(message, context)
    delta = second.content["control-delta"].to_torch_state_dict()
    restored = context.state["client-control"].to_torch_state_dict()
    assert all(torch.allclose(restored[k], stored[k] + delta[k]) for k in start)
    # The stored c_i corrected the second round: it trained elsewhere than the first.
    again = second.content["arrays"].to_torch_state_dict()
    assert any(not torch.allclose(again[k], trained[k]) for k in start)


def test_evaluate_in_train_reports_the_received_models_evaluation(
        tiny_dataset: Path, cache_dir: Path) -> None:
    net = task.Net()
    context = make_context(tiny_dataset, cache_dir, SIMULATED)
    separate = client_app.app(make_message("evaluate", net), context).content["metrics"]
    folded_context = make_context(tiny_dataset, cache_dir, SIMULATED,
                                  **{"evaluate-in-train": True})
    reply = client_app.app(make_message("train", net), folded_context)
    metrics = reply.content["metrics"]
    # The model it received, not the one it trained, was evaluated.
    assert metrics["eval-accuracy"] == separate["eval-accuracy"]
    assert metrics["eval-loss"] == pytest.approx(separate["eval-loss"])
    assert metrics["eval-num-examples"] == 10 and metrics["num-examples"] == 90


def test_a_node_says_which_partition_it_holds(tiny_dataset: Path, cache_dir: Path) -> None:
    question = Message(content=RecordDict({"config": ConfigRecord({"query": "partition-id"})}),
                       dst_node_id=7, message_type="query")
    simulated = client_app.app(question, make_context(tiny_dataset, cache_dir, SIMULATED))
    assert simulated.content["metrics"]["partition-id"] == 1
    own_data = client_app.app(question, make_context(tiny_dataset, cache_dir,
                                                     {"data-path": "/srv/site-data"}))
    assert "partition-id" not in own_data.content["metrics"]
    unknown = Message(content=RecordDict({"config": ConfigRecord({"query": "colour"})}),
                      dst_node_id=7, message_type="query")
    with pytest.raises(ValueError, match="unknown query 'colour'"):
        client_app.app(unknown, make_context(tiny_dataset, cache_dir, SIMULATED))


def test_a_node_config_device_overrides_the_run_config(tiny_dataset: Path,
                                                        cache_dir: Path) -> None:
    net = task.Net()
    context = make_context(tiny_dataset, cache_dir, {**SIMULATED, "device": "cuda:7"},
                           device="cpu")
    with pytest.raises(task.DeviceUnavailableError, match="device 'cuda:7' is not available"):
        client_app.app(make_message("train", net), context)
    context = make_context(tiny_dataset, cache_dir, {**SIMULATED, "device": "gpu"})
    with pytest.raises(NodeConfigError, match="node config 'device' must be auto"):
        client_app.app(make_message("train", net), context)
    context = make_context(tiny_dataset, cache_dir, {**SIMULATED, "device": "cpu"},
                           device="cuda:7")
    assert not client_app.app(make_message("train", net), context).has_error()


def test_the_strong_model_trains_on_a_node(tiny_dataset: Path, cache_dir: Path) -> None:
    net = task.build_model("resnet9-gn")
    context = make_context(tiny_dataset, cache_dir, SIMULATED, model="resnet9-gn",
                           **{"local-epochs": 1})
    reply = client_app.app(make_message("train", net), context)
    trained = reply.content["arrays"].to_torch_state_dict()
    assert trained.keys() == net.state_dict().keys()
    assert any(not torch.equal(trained[k], v) for k, v in net.state_dict().items())

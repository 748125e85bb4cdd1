"""Multiplexed mode (virtual-clients): many clients per SuperNode, same results.

The rounds run in process: ``InProcessGrid`` hands each message to the real
ClientApp with that node's Context (kept across rounds, as a SuperNode keeps its
state), so the strategy, the grids and the handlers are the ones a simulation
runs, without the per-message machinery in between.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Error, Message, RecordDict
from flwr.common.constant import ErrorCode

from fedcifar_app import client_app, node, task
from fedcifar_app.config import NodeConfigError
from fedcifar_app.config import RunConfig
from fedcifar_app.results import RunRecorder, load_results
from fedcifar_app.extensions import build_strategy, scaffold, training_grid
from fedcifar_app.extensions.multiplex.clients import VIRTUAL_CLIENTS, ClientMean
from fedcifar_app.extensions.multiplex.server import assign
from fedcifar_app.node import clip_update, non_finite

CLIENTS = 6


class InProcessGrid:
    """SuperNodes in this process: node ``100 + i`` holds partition i of ``nodes``
    (what the simulation engine puts in their node configs); ``failing`` nodes
    answer every training or evaluation instruction with an error."""

    def __init__(self, nodes: int, run_config: dict, failing: tuple[int, ...] = ()) -> None:
        self.contexts = {100 + i: Context(run_id=1, node_id=100 + i,
                                          node_config={"partition-id": i,
                                                       "num-partitions": nodes},
                                          state=RecordDict(), run_config=run_config)
                         for i in range(nodes)}
        self.failing = failing
        self.sent: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        replies = []
        for message in messages:
            self.sent.append(message)
            node = message.metadata.dst_node_id
            if node in self.failing and message.metadata.message_type != "query":
                replies.append(Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                             reason="node crashed"), reply_to=message))
            else:
                replies.append(client_app.app(message, self.contexts[node]))
        return replies


def start_in_process(tmp_path: Path, run_config: dict, grid: InProcessGrid) -> tuple:
    """(config, recorder, strategy) of a run on ``grid`` writing into ``tmp_path``, its
    nodes met and torch seeded as the ServerApp does before the first round."""
    config = RunConfig.from_mapping(run_config)
    recorder = RunRecorder(tmp_path, kind="federated", unit="round",
                           run_config=config.to_dict())
    strategy = build_strategy(config, recorder)
    strategy.meet_nodes(grid)
    torch.manual_seed(config.seed)
    return config, recorder, strategy


def run_rounds(tmp_path: Path, tiny_dataset: Path, nodes: int, rounds: int = 3,
               failing: tuple[int, ...] = (), **overrides: object) -> tuple[dict, dict]:
    """Run ``rounds`` rounds; return (final model, results.json)."""
    run_config = {"dataset": str(tiny_dataset), "cache-dir": str(tmp_path.parent / "cache"),
                  "fraction-train": 0.5, "fraction-evaluate": 0.5, "local-epochs": 1,
                  "batch-size": 16, "min-available-nodes": 1, "seed": 5, "serving-nodes": 2,
                  **overrides}
    grid = InProcessGrid(nodes, run_config, failing)
    config, recorder, strategy = start_in_process(tmp_path, run_config, grid)
    result = strategy.start(grid=training_grid(config, grid, strategy),
                            initial_arrays=ArrayRecord(task.Net().state_dict()),
                            num_rounds=rounds, timeout=60)
    recorder.finish(None)
    return result.arrays.to_torch_state_dict(), load_results(tmp_path)


def assert_same_model(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for name in first:
        torch.testing.assert_close(first[name], second[name], rtol=1e-4, atol=1e-5)


def round_entries(results: dict) -> list[dict]:
    return [e for e in results["entries"] if e["round"] > 0]


@pytest.mark.parametrize("strategy,folded,extra", [
    ("fedavg", False, {}), ("fedprox", False, {}), ("fedavgm", False, {}),
    ("scaffold", False, {}), ("fedavg", True, {}),
    # Augmented batches, weight decay, and SCAFFOLD's clients in chunks of two.
    ("fedprox", False, {"augment": True, "weight-decay": 0.01}),
    ("scaffold", False, {"augment": True, "batched-clients": 2}),
    ("fedavg", False, {"batched-clients": 1})])
def test_a_multiplexed_round_gives_the_per_node_model(
        strategy: str, folded: bool, extra: dict, tmp_path: Path, tiny_dataset: Path,
        server_task_identity: None) -> None:
    """Six clients as six SuperNodes, or as six virtual clients on two, each node
    training its clients together (batched-clients; 1: one after another): same
    draws, same training streams, same global model (and SCAFFOLD's controls follow
    their clients across rounds on the nodes that keep them); with evaluate-in-train,
    the same evaluation folded into the training replies."""
    settings = {"strategy": strategy, "fedprox-mu": 0.1, "evaluate-in-train": folded,
                **extra}
    per_node_settings = {k: v for k, v in settings.items() if k != "batched-clients"}
    per_node, per_node_results = run_rounds(tmp_path / "per-node", tiny_dataset, CLIENTS,
                                            **per_node_settings)
    multiplexed, multiplexed_results = run_rounds(
        tmp_path / "multiplexed", tiny_dataset, 2, **{"virtual-clients": CLIENTS}, **settings)
    assert_same_model(per_node, multiplexed)
    for node_round, mux_round in zip(per_node_results["entries"],
                                     multiplexed_results["entries"], strict=True):
        # With evaluate-in-train the evaluation of round r's model comes with round r + 1.
        if folded:
            evaluated = 3 if node_round["round"] < 3 else None
        else:
            evaluated = 3 if node_round["round"] > 0 else None
        assert node_round.get("evaluate_replies") == mux_round.get("evaluate_replies") \
            == evaluated
        for key in ("train", "evaluate"):
            for name, value in node_round.get(key, {}).items():
                if name == "train-seconds":  # a time, not a result
                    continue
                assert mux_round[key][name] == pytest.approx(value, rel=1e-5), (key, name)
        if node_round["round"] == 0:
            continue
        # The same partitions trained: per-node mode lists node IDs 100 + partition.
        assert sorted(n - 100 for n in node_round["train_nodes"]) == sorted(
            mux_round["train_nodes"])
        assert node_round["train_replies"] == mux_round["train_replies"] == 3
        assert node_round["samples_trained"] == mux_round["samples_trained"]


def test_robust_aggregators_get_every_update_and_agree_with_per_node_mode(
        tmp_path: Path, tiny_dataset: Path, server_task_identity: None) -> None:
    settings = {"strategy": "fedmedian", "fraction-train": 1.0, "rounds": 2}
    rounds = settings.pop("rounds")
    per_node, _ = run_rounds(tmp_path / "per-node", tiny_dataset, CLIENTS, rounds, **settings)
    multiplexed, results = run_rounds(tmp_path / "multiplexed", tiny_dataset, 2, rounds,
                                      **{"virtual-clients": CLIENTS}, **settings)
    assert_same_model(per_node, multiplexed)
    assert round_entries(results)[0]["train_nodes"] == list(range(CLIENTS))


class Breaks(node.TrainingHook):
    """A client whose round fails: before training, or by diverging in the middle of
    the batched computation (an infinite drift correction)."""

    def __init__(self, how: str) -> None:
        self.how = how

    def before_training(self, client: node.ClientRound) -> None:
        if self.how == "raises":
            raise RuntimeError(f"client {client.client_id} broke")
        client.drift_correction = [torch.full_like(p, float("inf"))
                                   for p in client.net.parameters()]


@pytest.mark.parametrize("how", ["raises", "diverges"])
def test_a_failing_client_costs_only_itself_and_a_failing_node_its_clients(
        how: str, tmp_path: Path, tiny_dataset: Path, server_task_identity: None,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Client 2 fails on node 100, which trains clients 0-2 together: only client 2
    is lost; the others' mean is the one of a run without client 2's failure, less
    client 2 (checked against per-node mode with client 2's node failing)."""
    honest = scaffold.training_hooks

    def hooks(config: RunConfig, node_config: dict) -> list[node.TrainingHook]:
        extra = [Breaks(how)] if node_config.get("partition-id") == 2 else []
        return honest(config, node_config) + extra

    monkeypatch.setattr(scaffold, "training_hooks", hooks)
    multiplexed, results = run_rounds(tmp_path / "one-client", tiny_dataset, 2, rounds=1,
                                      **{"virtual-clients": CLIENTS, "fraction-train": 1.0})
    (first,) = round_entries(results)
    assert first["train_replies"] == CLIENTS - 1
    assert first["train_failures"] == 1
    assert 2 not in first["train_nodes"]
    monkeypatch.setattr(scaffold, "training_hooks", honest)
    per_node, _ = run_rounds(tmp_path / "per-node", tiny_dataset, CLIENTS, rounds=1,
                             failing=(102,), **{"fraction-train": 1.0, "round-retries": 0})
    assert_same_model(per_node, multiplexed)
    # Node 100 serves clients 0-2 (equal contiguous shares); it fails as a whole.
    _, results = run_rounds(tmp_path / "one-node", tiny_dataset, 2, rounds=1,
                            failing=(100,), **{"virtual-clients": CLIENTS,
                                               "fraction-train": 1.0, "round-retries": 0})
    (first,) = round_entries(results)
    assert first["train_nodes"] == [3, 4, 5]
    assert first["train_failures"] == 3


def one_round(tmp_path: Path, tiny_dataset: Path, nodes: int,
              **overrides: object) -> InProcessGrid:
    """One multiplexed round of six clients, all training, on the first two of
    ``nodes`` SuperNodes; the grid, with every message it was sent."""
    run_config = {"dataset": str(tiny_dataset), "cache-dir": str(tmp_path / "cache"),
                  "virtual-clients": CLIENTS, "serving-nodes": 2, "fraction-train": 1.0,
                  "min-available-nodes": 1, **overrides}
    config = RunConfig.from_mapping(run_config)
    strategy = build_strategy(config, RunRecorder(tmp_path, kind="federated", unit="round",
                                                  run_config=config.to_dict()))
    grid = InProcessGrid(nodes, run_config)
    strategy.meet_nodes(grid)
    strategy.start(grid=training_grid(config, grid, strategy),
                   initial_arrays=ArrayRecord(task.Net().state_dict()), num_rounds=1)
    return grid


def test_each_node_gets_one_message_per_phase(tmp_path: Path, tiny_dataset: Path,
                                              server_task_identity: None) -> None:
    grid = one_round(tmp_path, tiny_dataset, 2, **{"fraction-evaluate": 0.5})
    kinds = [(m.metadata.message_type, m.metadata.dst_node_id) for m in grid.sent]
    assert kinds == [("query", 100), ("query", 101), ("train", 100), ("train", 101),
                     ("evaluate", 100), ("evaluate", 101)]
    evaluated = [list(m.content["virtual-clients"]["partition-ids"]) for m in grid.sent[-2:]]
    assert sum(len(clients) for clients in evaluated) == 3  # fraction-evaluate of 6


def test_serving_nodes_limits_the_nodes_that_get_clients(
        tmp_path: Path, tiny_dataset: Path, server_task_identity: None) -> None:
    """Three SuperNodes connected, two serving: the third gets only the census query."""
    grid = one_round(tmp_path, tiny_dataset, 3, **{"fraction-evaluate": 0.0})
    trained = {m.metadata.dst_node_id: list(m.content["virtual-clients"]["partition-ids"])
               for m in grid.sent if m.metadata.message_type == "train"}
    assert trained == {100: [0, 1, 2], 101: [3, 4, 5]}


def test_shares_are_equal_or_sticky() -> None:
    assert assign([5, 1, 4, 0, 3], [10, 11], sticky=False) == {10: [0, 1, 3], 11: [4, 5]}
    assert assign([5, 1, 4, 0, 3], [10, 11], sticky=True) == {10: [0, 4], 11: [1, 3, 5]}
    assert assign([7], [10, 11, 12], sticky=False) == {10: [7]}


def test_the_node_mean_weights_models_and_metrics_by_examples() -> None:
    mean = ClientMean()
    mean.add({"w": torch.tensor([1.0, 0.0])}, {"num-examples": 1, "train-loss": 4.0})
    mean.add({"w": torch.tensor([4.0, 3.0])}, {"num-examples": 2, "train-loss": 1.0})
    torch.testing.assert_close(mean.model()["w"], torch.tensor([3.0, 2.0]))
    assert mean.metrics() == {"num-examples": 3, "train-loss": pytest.approx(2.0)}
    assert mean.model()["w"].dtype == torch.float32


def test_node_side_checks_match_the_servers() -> None:
    start = {"a": torch.zeros(3), "b": torch.zeros(4)}
    weights = {"a": torch.tensor([3.0, 0.0, 0.0]), "b": torch.tensor([0.0, 4.0, 0.0, 0.0])}
    assert clip_update(weights, start, 1.0)  # norm 5 -> 1
    torch.testing.assert_close(weights["a"], torch.tensor([0.6, 0.0, 0.0]))
    torch.testing.assert_close(weights["b"], torch.tensor([0.0, 0.8, 0.0, 0.0]))
    assert not clip_update(weights, start, 1.001)  # within the bound: unchanged
    torch.testing.assert_close(weights["a"], torch.tensor([0.6, 0.0, 0.0]))
    assert non_finite(weights) is None
    weights["b"][0] = float("nan")
    assert non_finite(weights) == "'b' holds NaN or Inf"


def test_a_node_with_its_own_data_refuses_virtual_clients(
        tmp_path: Path, tiny_dataset: Path, server_task_identity: None) -> None:
    context = Context(run_id=1, node_id=3, node_config={"data-path": str(tiny_dataset)},
                      state=RecordDict(), run_config={"dataset": str(tiny_dataset),
                                                      "virtual-clients": 4})
    bundle = Message(RecordDict({"arrays": ArrayRecord(task.Net().state_dict()),
                                 "config": ConfigRecord({"server-round": 1}),
                                 VIRTUAL_CLIENTS: ConfigRecord({"partition-ids": [0],
                                                                "reply": "mean"})}),
                     dst_node_id=3, message_type="train")
    with pytest.raises(NodeConfigError, match="virtual-clients=0"):
        client_app.app(bundle, context)

"""The strategy safeguards: update filter, loud failure, bounded waits, resume."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from fedcifar_app import task
from fedcifar_app.config import RunConfig
from fedcifar_app.results import RunRecorder
from fedcifar_app.extensions import build_strategy
from fedcifar_app.strategies import RunFailedError, load_checkpoint
from fedcifar_app.strategies.replies import update_problem
from tests.conftest import resumable_checkpoint


pytestmark = pytest.mark.usefixtures("server_task_identity")


def state_dict() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return task.Net().state_dict()


def reply(arrays: dict[str, torch.Tensor] | None, num_examples: object = 10,
          node: int = 5, **extra_records: dict[str, torch.Tensor]) -> Message:
    content = RecordDict({"metrics": MetricRecord({"num-examples": num_examples,
                                                   "train-loss": 1.0})})
    if arrays is not None:
        content["arrays"] = ArrayRecord(arrays)
    for name, record in extra_records.items():
        content[name] = ArrayRecord(record)
    instruction = Message(content=RecordDict(), dst_node_id=node, message_type="train")
    return Message(content=content, reply_to=instruction)


GLOBAL = ArrayRecord(state_dict())


def test_a_copy_of_the_global_layout_is_accepted() -> None:
    assert update_problem(reply(state_dict()), GLOBAL) is None


@pytest.mark.parametrize("change, expected", [
    (lambda s: s.update({"fc1.bias": torch.full_like(s["fc1.bias"], float("nan"))}),
     "'fc1.bias' holds NaN or Inf"),
    (lambda s: s.update({"conv1.weight": s["conv1.weight"] * float("inf")}),
     "'conv1.weight' holds NaN or Inf"),
    (lambda s: s.pop("fc3.weight"), "missing ['fc3.weight']"),
    (lambda s: s.update({"extra": torch.zeros(1)}), "unexpected ['extra']"),
    (lambda s: s.update({"fc2.weight": torch.zeros(84, 121)}),
     "'fc2.weight' is float32[84, 121], the global model has float32[84, 120]"),
    (lambda s: s.update({"fc2.bias": torch.zeros(84, dtype=torch.float64)}),
     "'fc2.bias' is float64[84]"),
    (lambda s: s.update({"fc3.bias": torch.zeros(1, 10)}), "'fc3.bias' is float32[1, 10]"),
])
def test_bad_updates_are_named(change, expected: str) -> None:
    arrays = state_dict()
    change(arrays)
    problem = update_problem(reply(arrays), GLOBAL)
    assert problem is not None and expected in problem


def test_replies_without_arrays_or_examples_are_rejected() -> None:
    assert "no ArrayRecord" in update_problem(reply(None), GLOBAL)
    assert "'num-examples'" in update_problem(reply(state_dict(), num_examples=0), GLOBAL)
    # Flower would fail the whole round on a reply with a second ArrayRecord.
    extra = reply(state_dict(), **{"control-delta": state_dict()})
    assert "unexpected ArrayRecords ['control-delta']" in update_problem(extra, GLOBAL)
    two_metric_records = reply(state_dict())
    two_metric_records.content["more"] = MetricRecord({"x": 1.0})
    assert "expected exactly one" in update_problem(two_metric_records, GLOBAL)


def make_strategy(tmp_path: Path, **config: object):
    run_config = RunConfig.from_mapping({"output-dir": str(tmp_path), **config})
    recorder = RunRecorder(tmp_path / "run", "federated", "round", run_config.to_dict())
    strategy = build_strategy(run_config, recorder)
    strategy._global_arrays = GLOBAL
    return strategy, recorder


def test_aggregation_skips_bad_updates_and_counts_them(tmp_path: Path) -> None:
    strategy, recorder = make_strategy(tmp_path)
    good = {k: torch.ones_like(v) for k, v in state_dict().items()}
    poisoned = {k: torch.full_like(v, float("nan")) for k, v in state_dict().items()}
    wrong_shape = dict(good, **{"fc3.weight": torch.ones(10, 85)})
    arrays, _ = strategy.aggregate_train(1, [reply(good, node=1), reply(poisoned, node=2),
                                             reply(wrong_shape, node=3)])
    aggregated = arrays.to_torch_state_dict()
    assert all(torch.equal(aggregated[k], good[k]) for k in good)
    entry = recorder.entries[0]
    assert (entry["train_replies"], entry["train_rejected"], entry["train_failures"]) == (1, 2, 0)


def test_replies_whose_metric_names_differ_from_the_others_are_dropped(tmp_path: Path) -> None:
    strategy, recorder = make_strategy(tmp_path)
    good = {k: torch.ones_like(v) for k, v in state_dict().items()}
    odd = reply({k: torch.full_like(v, 5.0) for k, v in good.items()}, node=3)
    odd.content["metrics"]["extra-metric"] = 1.0
    arrays, metrics = strategy.aggregate_train(1, [reply(good, node=1), odd,
                                                   reply(good, node=2)])
    assert all(torch.equal(v, good[k]) for k, v in arrays.to_torch_state_dict().items())
    assert "extra-metric" not in metrics
    assert recorder.entries[0]["train_rejected"] == 1


def test_a_round_without_usable_updates_fails_the_run(tmp_path: Path) -> None:
    strategy, _ = make_strategy(tmp_path)
    poisoned = {k: torch.full_like(v, float("nan")) for k, v in state_dict().items()}
    with pytest.raises(RunFailedError, match="none of the 1 training replies"):
        strategy.aggregate_train(1, [reply(poisoned)])
    with pytest.raises(RunFailedError, match="none of the 0 training replies"):
        strategy.aggregate_train(2, [])


class FakeGrid:
    """``nodes`` connected nodes; node i holds ``partition_of[i]`` (default: none)."""

    def __init__(self, nodes: int | list[int],
                 partition_of: dict[int, int] | None = None) -> None:
        self.node_ids = list(range(1, nodes + 1)) if isinstance(nodes, int) else nodes
        self.partition_of = partition_of or {}
        self.questions: list[Message] = []

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages, *, timeout=None) -> list[Message]:
        self.questions += messages
        answers = []
        for question in messages:
            partition = self.partition_of.get(question.metadata.dst_node_id)
            metrics = {} if partition is None else {"partition-id": partition}
            answers.append(Message(RecordDict({"metrics": MetricRecord(metrics)}),
                                   reply_to=question))
        return answers


def sampled_partitions(strategy, grid: FakeGrid, server_round: int) -> list[int]:
    messages = strategy.configure_train(server_round, GLOBAL, ConfigRecord(), grid)
    return sorted(grid.partition_of[m.metadata.dst_node_id] for m in messages)


def test_the_seed_draws_the_same_partitions_whatever_the_node_ids(tmp_path: Path) -> None:
    """Simulated node IDs are new in every run; the draw follows the partitions."""
    config = {"fraction-train": 0.3, "seed": 7}
    first_ids, second_ids = [11, 52, 23, 94, 35, 76, 17, 88, 9, 60], [3, 1, 4, 15, 9, 26,
                                                                     5, 35, 8, 97]
    draws = []
    for node_ids in (first_ids, second_ids):
        grid = FakeGrid(node_ids, {node: i for i, node in enumerate(node_ids)})
        strategy, _ = make_strategy(tmp_path, **config)
        draws.append([sampled_partitions(strategy, grid, r) for r in (1, 2, 3)])
        assert len(grid.questions) == 10  # each node was asked once, not every round
        assert {q.metadata.message_type for q in grid.questions} == {"query"}
    assert draws[0] == draws[1]
    assert all(len(draw) == 3 for draw in draws[0]) and len(set(map(tuple, draws[0]))) > 1
    other_seed, _ = make_strategy(tmp_path, **{**config, "seed": 8})
    grid = FakeGrid(first_ids, {node: i for i, node in enumerate(first_ids)})
    assert [sampled_partitions(other_seed, grid, r) for r in (1, 2, 3)] != draws[0]


def test_replies_are_aggregated_in_partition_order_not_arrival_order(tmp_path: Path) -> None:
    strategy, recorder = make_strategy(tmp_path)
    strategy.configure_train(1, GLOBAL, ConfigRecord(),
                             FakeGrid([30, 10, 20], {30: 0, 10: 2, 20: 1}))
    # Values whose float32 sum depends on the order of the terms.
    updates = {node: {k: torch.full_like(v, value) for k, v in state_dict().items()}
               for node, value in ((30, 1e8), (10, 1.0), (20, -1e8))}
    results = []
    for arrival in ([30, 10, 20], [10, 20, 30], [20, 30, 10]):
        arrays, _ = strategy.aggregate_train(1, [reply(updates[n], node=n) for n in arrival])
        results.append(arrays.to_torch_state_dict()["fc3.bias"])
    assert all(torch.equal(results[0], other) for other in results[1:])
    assert recorder.entries[0]["train_nodes"] == [30, 20, 10]  # partitions 0, 1, 2


def test_waiting_for_nodes_is_bounded(tmp_path: Path) -> None:
    strategy, _ = make_strategy(tmp_path, **{"min-available-nodes": 3,
                                             "node-wait-timeout": 1.0})
    with pytest.raises(RunFailedError, match="only 2 of the 3 nodes .* within 1 s"):
        strategy.configure_train(1, GLOBAL, ConfigRecord(), FakeGrid(2))
    assert strategy.configure_train(1, GLOBAL, ConfigRecord(), FakeGrid(3))


def test_each_round_is_checkpointed_and_resumable(tmp_path: Path) -> None:
    strategy, _ = make_strategy(tmp_path)
    good = {k: torch.full_like(v, 0.5) for k, v in state_dict().items()}
    strategy.aggregate_train(1, [reply(good)])
    checkpoint = load_checkpoint(str(tmp_path / "run"))
    assert checkpoint.round == 1 and checkpoint.samples_trained == 20  # 2 local epochs
    assert all(torch.equal(checkpoint.model[k], good[k]) for k in good)

    resumed, recorder = make_strategy(tmp_path / "again")
    resumed.resume_from(checkpoint)
    resumed._global_arrays = GLOBAL
    resumed.aggregate_train(1, [reply(good)])  # Flower's round 1 of the rest is round 2
    assert recorder.entries[0]["round"] == 2
    assert recorder.entries[0]["samples_trained"] == 40
    assert load_checkpoint(str(tmp_path / "again" / "run" / "checkpoint.pt")).round == 2


def test_a_missing_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="resume-from"):
        load_checkpoint(str(tmp_path / "nothing-here"))


def test_rounds_without_client_evaluation_record_nothing_for_it(tmp_path: Path) -> None:
    strategy, recorder = make_strategy(tmp_path, **{"fraction-evaluate": 0.0,
                                                    "validation-fraction": 0.0})
    assert strategy.aggregate_evaluate(1, []) is None
    assert recorder.entries == []


def test_scaffold_sends_its_control_and_moves_it_by_the_clients_deltas(tmp_path: Path) -> None:
    strategy, _ = make_strategy(tmp_path, strategy="scaffold")
    messages = list(strategy.configure_train(1, GLOBAL, ConfigRecord(), FakeGrid(4)))
    assert len(messages) == 2  # fraction-train 0.5 of 4 nodes
    sent = messages[0].content["server-control"].to_torch_state_dict()
    assert all(torch.equal(sent[k], torch.zeros_like(v)) for k, v in state_dict().items())

    ones = {k: torch.ones_like(v) for k, v in state_dict().items()}
    threes = {k: torch.full_like(v, 3.0) for k, v in state_dict().items()}
    arrays, _ = strategy.aggregate_train(1, [
        reply(ones, node=1, **{"control-delta": ones}),
        reply(threes, node=2, **{"control-delta": threes}),
        reply(ones, node=3),  # no control-delta: rejected, not aggregated
    ])
    model = arrays.to_torch_state_dict()
    assert all(torch.equal(model[k], torch.full_like(v, 2.0)) for k, v in ones.items())
    # c += |S|/N * mean(delta) = 2/4 * 2
    messages = list(strategy.configure_train(2, arrays, ConfigRecord(), FakeGrid(4)))
    sent = messages[0].content["server-control"].to_torch_state_dict()
    assert all(torch.equal(sent[k], torch.ones_like(v)) for k, v in ones.items())
    assert strategy.recorder.entries[0]["train_rejected"] == 1


def test_evaluate_in_train_records_the_nodes_evaluation_of_the_previous_model(
        tmp_path: Path) -> None:
    strategy, recorder = make_strategy(tmp_path, **{"evaluate-in-train": True})
    assert list(strategy.configure_evaluate(1, GLOBAL, ConfigRecord(), FakeGrid(4))) == []
    round_two_ended = recorder.record(2, test_accuracy=0.1)["elapsed_s"]
    time.sleep(0.01)
    good = {k: torch.ones_like(v) for k, v in state_dict().items()}
    replies = [reply(good, node=1), reply(good, node=2)]
    for message, (accuracy, examples) in zip(replies, [(0.5, 30), (0.8, 10)]):
        message.content["metrics"].update({"eval-loss": 1.0, "eval-accuracy": accuracy,
                                           "eval-num-examples": examples})
    _, metrics = strategy.aggregate_train(3, replies)
    assert set(metrics) == {"train-loss"}  # Flower drops the weight, num-examples
    round_two, round_three = recorder.entries
    assert round_two["round"] == 2 and round_two["evaluate_replies"] == 2
    assert round_two["elapsed_s"] == round_two_ended  # still when round 2 ended
    # Weighted by the validation examples, not by the training examples.
    assert round_two["evaluate"]["eval-accuracy"] == pytest.approx((0.5 * 30 + 0.8 * 10) / 40)
    assert "evaluate" not in round_three and round_three["train_nodes"] == [1, 2]


def test_evaluation_replies_flower_cannot_aggregate_are_dropped_not_fatal(
        tmp_path: Path) -> None:
    strategy, recorder = make_strategy(tmp_path)

    def evaluation(node: int, **metrics: float) -> Message:
        instruction = Message(content=RecordDict(), dst_node_id=node, message_type="evaluate")
        return Message(content=RecordDict({"metrics": MetricRecord(metrics)}),
                       reply_to=instruction)

    replies = [evaluation(1, **{"eval-accuracy": 0.5, "num-examples": 10}),
               evaluation(2, **{"eval-accuracy": 0.7, "num-examples": 10}),
               evaluation(3, **{"eval-accuracy": 0.1, "num-examples": 10, "odd": 1.0}),
               evaluation(4, **{"eval-accuracy": 0.1})]
    metrics = strategy.aggregate_evaluate(1, replies)
    assert metrics["eval-accuracy"] == pytest.approx(0.6)
    entry = recorder.entries[0]
    assert (entry["evaluate_replies"], entry["evaluate_rejected"]) == (2, 2)
    assert strategy.aggregate_evaluate(2, replies[3:]) is None


def test_a_checkpoint_of_the_strong_model_loads_into_a_fresh_one(tmp_path: Path) -> None:
    strategy, _ = make_strategy(tmp_path, model="resnet9-gn")
    torch.manual_seed(1)
    trained = task.build_model("resnet9-gn").state_dict()
    strategy.save_checkpoint(3, ArrayRecord(trained))
    checkpoint = load_checkpoint(str(tmp_path / "run"))
    assert (checkpoint.round, checkpoint.model_name) == (3, "resnet9-gn")
    fresh = task.build_model(checkpoint.model_name)
    fresh.load_state_dict(checkpoint.model)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in trained.items())
    # Resuming it as another architecture is refused before anything runs.
    from fedcifar_app.config import ConfigError
    config = RunConfig.from_mapping({"resume-from": str(tmp_path / "run")})
    with pytest.raises(ConfigError, match="holds a resnet9-gn model, 'model' is tutorial-cnn"):
        resumable_checkpoint(config)


class LeavingGrid(FakeGrid):
    """Three nodes; after the first listing, two of them are gone."""

    def __init__(self) -> None:
        super().__init__(3)
        self.listings = 0

    def get_node_ids(self) -> list[int]:
        self.listings += 1
        return list(self.node_ids if self.listings == 1 else self.node_ids[:1])


def test_a_node_leaving_between_the_wait_and_the_draw_does_not_hang_the_round(
        tmp_path: Path) -> None:
    """The draw uses the nodes the wait counted; listing them again would find one of
    the two needed, and Flower's sampling would wait for the second without end."""
    strategy, _ = make_strategy(tmp_path, **{"min-available-nodes": 2,
                                             "node-wait-timeout": 1.0})
    drawn: list = []
    worker = threading.Thread(target=lambda: drawn.append(strategy.configure_train(
        1, GLOBAL, ConfigRecord(), LeavingGrid())), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert not worker.is_alive(), "the round hung after a node left"
    assert len(drawn[0]) == 1  # fraction 0.5 of the three nodes counted

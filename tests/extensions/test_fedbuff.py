"""FedBuff (fedcifar_app/extensions/fedbuff): the staleness-weighted buffer, the server
loop on the simulated clock and on the wall clock, failures, resume, refusals."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, Error, Message, MessageType, MetricRecord,
                      RecordDict)

from fedcifar_app import extensions
from fedcifar_app.config import ConfigError, RunConfig
from fedcifar_app.extensions.fedbuff.buffer import UpdateBuffer
from fedcifar_app.extensions.fedbuff.server import FedBuff
from fedcifar_app.extensions.heterogeneity.clock import SimulatedClockGrid
from fedcifar_app.extensions.heterogeneity.devices import Device
from fedcifar_app.results import RunRecorder, load_results
from fedcifar_app.strategies import RunFailedError, load_checkpoint
from tests.conftest import completed_run_and_output
from tests.extensions.test_heterogeneity import traces_with_a_sleeper


def arrays(value: float) -> ArrayRecord:
    return ArrayRecord({"w": Array(np.full(4, value, np.float32))})


# --- The buffer ------------------------------------------------------------------------------

def test_a_step_weights_updates_by_examples_and_staleness():
    buffer = UpdateBuffer("inverse-sqrt")
    buffer.add(arrays(1.0), arrays(0.0), examples=100, staleness=0, metrics={"loss": 1.0})
    buffer.add(arrays(5.0), arrays(2.0), examples=300, staleness=3, metrics={"loss": 3.0})
    stepped = buffer.step(arrays(10.0), server_lr=0.5)
    # 0.5 x (100 x 1 x 1 + 300 x 1/2 x 3) / 400
    assert stepped["w"].numpy() == pytest.approx(np.full(4, 10.0 + 0.5 * 550 / 400))
    assert buffer.mean_metrics() == {"loss": pytest.approx(2.5)}
    assert buffer.staleness == [0, 3]


@pytest.mark.parametrize("weighting, expected", [
    ("inverse-sqrt", 1 / math.sqrt(4)), ("inverse", 1 / 4), ("none", 1.0)])
def test_staleness_weightings(weighting: str, expected: float):
    buffer = UpdateBuffer(weighting)
    buffer.add(arrays(1.0), arrays(0.0), examples=10, staleness=3, metrics={})
    assert buffer.step(arrays(0.0), 1.0)["w"].numpy()[0] == pytest.approx(expected)


def test_without_staleness_a_step_is_fedavgs_weighted_mean():
    buffer = UpdateBuffer("inverse-sqrt")
    for value, examples in ((1.0, 1), (4.0, 2)):
        buffer.add(arrays(value), arrays(0.5), examples, staleness=0, metrics={})
    assert buffer.step(arrays(0.5), 1.0)["w"].numpy()[0] == pytest.approx(3.0)


# --- The server loop, over a fake federation ------------------------------------------------

class FakeFederation:
    """Nodes 1..n holding partitions 0..n-1 with 100 examples each. A job trains
    instantly: node k's model is the received one plus k (or NaN / an error, for the
    nodes in ``broken`` / ``failing``)."""

    def __init__(self, nodes: int, failing: frozenset = frozenset(),
                 broken: frozenset = frozenset()) -> None:
        self.nodes = list(range(1, nodes + 1))
        self.failing, self.broken = failing, broken
        self.waiting: dict[str, Message] = {}
        self.ids = itertools.count()
        self.trained: list[int] = []

    def get_node_ids(self):  # noqa: ANN201
        return list(self.nodes)

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        return [self.answer(m) for m in messages]

    def push_messages(self, messages):  # noqa: ANN001, ANN201
        ids = []
        for message in messages:
            message_id = f"m{next(self.ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            self.waiting[message_id] = message
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids):  # noqa: ANN001, ANN201
        return [self.answer(self.waiting.pop(m)) for m in list(message_ids)
                if m in self.waiting]

    def answer(self, message: Message) -> Message:
        node = message.metadata.dst_node_id
        if message.metadata.message_type == MessageType.QUERY:
            asked = message.content["config"]["query"]
            value = node - 1 if asked == "partition-id" else 100
            return Message(RecordDict({"metrics": MetricRecord({asked: value})}),
                           reply_to=message)
        self.trained.append(node)
        if node in self.failing:
            return Message(Error(code=0, reason="the ClientApp raised"), reply_to=message)
        received = message.content["arrays"]["w"].numpy()
        shift = math.nan if node in self.broken else float(node)
        trained = ArrayRecord({"w": Array((received + shift).astype(np.float32))})
        return Message(RecordDict({"arrays": trained, "metrics": MetricRecord(
            {"num-examples": 100, "train-loss": float(node)})}), reply_to=message)


def fedbuff_over(tmp_path: Path, federation: FakeFederation, devices: list[Device] | None,
                 resume: tuple | None = None, **settings) -> tuple[FedBuff, RunRecorder, list]:
    """FedBuff over ``federation`` (on the simulated clock of ``devices``, else the wall
    clock), every node training at once unless ``settings`` say otherwise; ``resume``:
    (checkpoint, entries) of the run to continue."""
    config = RunConfig.from_mapping({
        "strategy": "fedbuff", "fedbuff-concurrency": len(federation.nodes),
        "fedbuff-buffer-size": 2, "local-epochs": 1, "min-available-nodes": 1,
        "node-wait-timeout": 1.0, **settings})
    recorder = RunRecorder(tmp_path, kind="federated", unit="round",
                           run_config=config.to_dict())
    strategy = extensions.build_strategy(config, recorder)
    if resume is not None:
        strategy.resume_from(resume[0])
        recorder.restore(resume[1])
    strategy.meet_nodes(federation)
    grid = (federation if devices is None else SimulatedClockGrid(
        federation, devices, strategy.partitions, recorder, config.local_epochs))
    evaluated = []
    server = FedBuff(grid, config, strategy, lambda step, model: evaluated.append(
        (step, float(model["w"].numpy()[0]))))
    return server, recorder, evaluated


def steps_of(recorder: RunRecorder) -> list[dict]:
    return [e for e in recorder.entries if e["round"] > 0]


def jobs_of(entry: dict) -> list[tuple]:
    return [(j["client"], j["sent"], j["arrived"], j.get("staleness"), j["outcome"])
            for j in entry["jobs"]]


# 100 examples x 1 epoch at 0.01 / 0.1 s per sample; 16 bytes each way at 0.128 kbit/s: 2 s.
# A fast client's job takes 3 s, a slow one's 12 s.
FAST, SLOW = Device(0.01, 0.128), Device(0.1, 0.128)


def test_on_the_simulated_clock_updates_are_buffered_in_order_of_arrival(
        tmp_path: Path, server_task_identity):
    server, recorder, evaluated = fedbuff_over(tmp_path, FakeFederation(nodes=3),
                                               [FAST, SLOW, FAST])
    final = server.run(arrays(0.0), num_steps=4)
    steps = steps_of(recorder)
    # Clients 0 and 2 (nodes 1 and 3, +1 and +3) step the model every 3 s. Client 0's
    # update comes first (ties go by client), so it is sent the model again before
    # client 2's update steps it: its next update is 1 step stale, weighted 1/sqrt(2).
    assert [e["simulated_seconds"] for e in steps] == [3.0, 6.0, 9.0, 12.0]
    assert jobs_of(steps[0]) == [(0, 0.0, 3.0, 0, "used"), (2, 0.0, 3.0, 0, "used")]
    assert jobs_of(steps[1]) == [(0, 3.0, 6.0, 1, "used"), (2, 3.0, 6.0, 0, "used")]
    assert [step for step, _ in evaluated] == [0, 1, 2, 3, 4]
    after_stale_step = (1 / math.sqrt(2) + 3) / 2
    assert [value for _, value in evaluated[:4]] == pytest.approx(
        [0.0, 2.0, 2.0 + after_stale_step, 2.0 + 2 * after_stale_step])
    # The slow client's update on version 0 arrives at 12 s, 3 steps stale, weighted
    # 1/sqrt(1 + 3).
    assert jobs_of(steps[3]) == [(0, 9.0, 12.0, 1, "used"), (1, 0.0, 12.0, 3, "used")]
    assert steps[3]["staleness"] == [1, 3]
    assert final["w"].numpy()[0] == pytest.approx(
        evaluated[3][1] + (1 / math.sqrt(2) + 2.0 / 2) / 2)
    assert steps[3]["samples_trained"] == 800


def test_the_same_seed_gives_the_same_steps(tmp_path: Path, server_task_identity):
    runs = []
    for name in ("first", "second"):
        server, recorder, _ = fedbuff_over(tmp_path / name, FakeFederation(nodes=5),
                                           [FAST, SLOW, FAST, SLOW, FAST],
                                           **{"fedbuff-concurrency": 3})
        final = server.run(arrays(0.0), num_steps=6)
        runs.append(([(jobs_of(e), e["simulated_seconds"]) for e in steps_of(recorder)],
                     float(final["w"].numpy()[0])))
    assert runs[0] == runs[1]
    other_seed, recorder, _ = fedbuff_over(tmp_path / "other", FakeFederation(nodes=5),
                                           [FAST, SLOW, FAST, SLOW, FAST],
                                           **{"fedbuff-concurrency": 3, "seed": 7})
    other_seed.run(arrays(0.0), num_steps=6)
    assert [jobs_of(e) for e in steps_of(recorder)] != [jobs for jobs, _ in runs[0][0]]


def test_a_stale_update_counts_less(tmp_path: Path, server_task_identity):
    # One update per step: client 0 steps at 3, 6, 9 and 12 s; client 1's update of
    # version 0 (+2) arrives at 12 s, after client 0's: 4 steps stale.
    server, recorder, _ = fedbuff_over(tmp_path, FakeFederation(nodes=2), [FAST, SLOW],
                                       **{"fedbuff-buffer-size": 1})
    final = server.run(arrays(0.0), num_steps=5)
    steps = steps_of(recorder)
    assert jobs_of(steps[4]) == [(1, 0.0, 12.0, 4, "used")]
    assert final["w"].numpy()[0] == pytest.approx(4.0 + 2.0 / math.sqrt(5))


def test_updates_beyond_max_staleness_are_dropped_as_stale(tmp_path: Path,
                                                           server_task_identity):
    server, recorder, _ = fedbuff_over(tmp_path, FakeFederation(nodes=2), [FAST, SLOW],
                                       **{"fedbuff-buffer-size": 1,
                                          "fedbuff-max-staleness": 3})
    final = server.run(arrays(0.0), num_steps=5)
    steps = steps_of(recorder)
    assert jobs_of(steps[4]) == [(1, 0.0, 12.0, None, "stale"), (0, 12.0, 15.0, 0, "used")]
    assert steps[4]["train_stale"] == 1 and steps[4]["simulated_seconds"] == 15.0
    assert final["w"].numpy()[0] == pytest.approx(5.0)


def test_failed_and_rejected_jobs_are_counted_and_their_slots_refilled(
        tmp_path: Path, server_task_identity):
    federation = FakeFederation(nodes=4, failing=frozenset({2}), broken=frozenset({3}))
    # On the simulated clock, so that each step buffers one update of node 1 and one of
    # node 4 (on the wall clock node 1 may answer twice first, as it did under load).
    server, recorder, evaluated = fedbuff_over(tmp_path, federation, [FAST] * 4,
                                               **{"fedbuff-staleness": "none"})
    server.run(arrays(0.0), num_steps=3)
    steps = steps_of(recorder)
    outcomes = {(client, outcome) for e in steps for client, *_, outcome in jobs_of(e)}
    assert outcomes == {(0, "used"), (1, "failed"), (2, "rejected"), (3, "used")}
    assert sum(e["train_failures"] for e in steps) >= 3
    assert sum(e["train_rejected"] for e in steps) >= 3
    # Only nodes 1 and 4 (+1 and +4) moved the model, each step by their mean.
    assert [value for _, value in evaluated] == [0.0, 2.5, 5.0, 7.5]
    # Every freed slot got new work: more jobs than the 4 first sent.
    assert len(federation.trained) > 4 + 2


def test_a_run_whose_jobs_all_fail_stops_with_the_first_failure(tmp_path: Path,
                                                                 server_task_identity):
    federation = FakeFederation(nodes=2, failing=frozenset({1, 2}))
    server, _, _ = fedbuff_over(tmp_path, federation, None)
    with pytest.raises(RunFailedError, match="the last 10 jobs gave no usable update.*"
                                             "the ClientApp raised"):
        server.run(arrays(0.0), num_steps=2)
    # Jobs in flight when the tenth failed may have been trained too (2 at once).
    assert 10 <= len(federation.trained) <= 12


def test_each_step_is_a_checkpoint_a_resumed_run_continues(tmp_path: Path,
                                                           server_task_identity):
    server, recorder, _ = fedbuff_over(tmp_path / "first", FakeFederation(nodes=3),
                                       [FAST, SLOW, FAST])
    final = server.run(arrays(0.0), num_steps=2)
    checkpoint = load_checkpoint(str(tmp_path / "first"))
    assert (checkpoint.round, checkpoint.samples_trained) == (2, 400)
    assert checkpoint.model["w"].numpy() == pytest.approx(final["w"].numpy())
    resumed, resumed_recorder, evaluated = fedbuff_over(
        tmp_path / "resumed", FakeFederation(nodes=3), [FAST, SLOW, FAST],
        resume=(checkpoint, recorder.entries))
    resumed.run(final, num_steps=1)
    steps = steps_of(resumed_recorder)
    assert [e["round"] for e in steps] == [1, 2, 3]
    # The clock goes on from 6 s; the slow client's job of the first run is lost.
    assert jobs_of(steps[2]) == [(0, 6.0, 9.0, 0, "used"), (2, 6.0, 9.0, 0, "used")]
    assert steps[2]["samples_trained"] == 600
    assert [step for step, _ in evaluated] == [0, 1]


@pytest.mark.parametrize("settings, named", [
    ({"secure-aggregation": True}, "'fedbuff': 'secure-aggregation'"),
    ({"dp": "server"}, "'fedbuff': 'dp'"),
    ({"update-norm-bound": 1.0}, "'fedbuff': 'update-norm-bound'"),
    ({"virtual-clients": 4}, "'fedbuff': multiplexed mode"),
    ({"devices": "drawn", "over-selection-keep": 2}, "'fedbuff': 'over-selection-keep'"),
    ({"evaluate-in-train": True}, "'fedbuff': 'evaluate-in-train'"),
])
def test_what_fedbuff_cannot_honour_is_refused_by_name(settings: dict, named: str):
    with pytest.raises(ConfigError, match=named):
        RunConfig.from_mapping({"strategy": "fedbuff", **settings})


# --- Whole simulations (flwr run .) ----------------------------------------------------------

def fedbuff_run(env: dict[str, str], tiny_dataset: Path, tmp_path: Path, out: str,
                settings: str) -> list[dict]:
    """3 FedBuff steps of 2 updates, 2 of the 3 nodes training at once, on the tiny data;
    the steps' entries."""
    run_dir, _ = completed_run_and_output(
        env, tiny_dataset, tmp_path, "strategy='fedbuff' num-server-rounds=3 "
        f"fedbuff-concurrency=2 fedbuff-buffer-size=2 local-epochs=1 min-available-nodes=3 "
        f"{settings}", out)
    return load_results(run_dir)["entries"][1:]


@pytest.mark.slow
def test_the_same_seed_gives_the_same_simulated_fedbuff_run(
        local_simulation: dict[str, str], tiny_dataset: Path, tmp_path: Path):
    drawn = "devices='drawn' straggler-fraction=0.34 device-kbps=100.0"
    first, second = (fedbuff_run(local_simulation, tiny_dataset, tmp_path, out, drawn)
                     for out in ("first", "second"))
    assert [e["round"] for e in first] == [1, 2, 3]
    for key in ("jobs", "simulated_seconds", "staleness", "test_accuracy", "test_loss"):
        assert [e[key] for e in first] == [e[key] for e in second], key
    assert first[0]["simulated_seconds"] > 0


@pytest.mark.slow
def test_a_fedscale_trace_drives_a_fedbuff_run_and_the_wall_clock_one_runs_too(
        local_simulation: dict[str, str], tiny_dataset: Path, tmp_path: Path):
    # The third client sleeps through the first 1,000 s: it is never sent work then.
    traced = fedbuff_run(local_simulation, tiny_dataset, tmp_path, "traced",
                         traces_with_a_sleeper(tmp_path))
    jobs = [job for entry in traced for job in entry["jobs"]]
    assert {job["client"] for job in jobs if job["sent"] < 1_000} <= {0, 1}
    assert all(job["outcome"] == "used" for job in jobs)
    assert 0 < traced[0]["simulated_seconds"] < traced[-1]["simulated_seconds"]
    wall = fedbuff_run(local_simulation, tiny_dataset, tmp_path, "wall", "")
    assert [e["train_replies"] for e in wall] == [2, 2, 2]
    assert "simulated_seconds" not in wall[0] and wall[-1]["test_accuracy"] > 0

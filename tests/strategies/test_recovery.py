"""RecoveringGrid: failed, silent and vanished nodes are replaced within a phase."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections.abc import Iterable

import pytest
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid

from fedcifar_app.strategies import recovery
from fedcifar_app.strategies.recovery import PhaseReport, RecoveringGrid

pytestmark = pytest.mark.usefixtures("server_task_identity")


class FakeGrid(Grid):
    """Connected nodes that each behave one way: 'ok' (reply at the next pull),
    'error' (error reply), 'silent' (never reply) or 'vanish' (disconnect once sent to)."""

    def __init__(self, behaviour: dict[int, str]) -> None:
        self.behaviour = behaviour
        self.connected = set(behaviour)
        self.sent: dict[str, Message] = {}
        self.ids = itertools.count()

    def set_run(self, run_id):  # noqa: ANN001, ANN201
        pass

    @property
    def run(self):  # noqa: ANN201
        return None

    def create_message(self, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        raise NotImplementedError

    def get_node_ids(self) -> Iterable[int]:
        return sorted(self.connected)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message_id = f"m{next(self.ids)}"
            message.metadata.__dict__["_message_id"] = message_id
            self.sent[message_id] = message
            if self.behaviour[message.metadata.dst_node_id] == "vanish":
                self.connected.discard(message.metadata.dst_node_id)
            ids.append(message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        replies = []
        for message_id in message_ids:
            instruction = self.sent[message_id]
            how = self.behaviour[instruction.metadata.dst_node_id]
            if how == "ok":
                content = RecordDict({"metrics": MetricRecord({"num-examples": 1})})
                replies.append(Message(content=content, reply_to=instruction))
            elif how == "error":
                replies.append(Message(Error(code=2, reason="ClientApp raised"),
                                       reply_to=instruction))
        return replies

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        raise AssertionError("RecoveringGrid must not delegate send_and_receive")

    def destinations(self) -> list[int]:
        return [m.metadata.dst_node_id for m in self.sent.values()]


def instructions(nodes: list[int], server_round: int = 4) -> list[Message]:
    content = RecordDict({"config": ConfigRecord({"server-round": server_round})})
    return [Message(content=content, dst_node_id=node, message_type="train")
            for node in nodes]


def recovering(fake: FakeGrid, retries: int = 3) -> tuple[RecoveringGrid, list[PhaseReport]]:
    reports: list[PhaseReport] = []
    grid = RecoveringGrid(fake, retries, on_phase_end=reports.append, poll_interval=0.01,
                          rng=random.Random(0))
    return grid, reports


def test_a_failed_node_is_replaced_by_an_untried_one() -> None:
    fake = FakeGrid({1: "error", 2: "ok", 3: "ok", 4: "ok"})
    grid, reports = recovering(fake)
    replies = list(grid.send_and_receive(instructions([1, 2]), timeout=5))
    # The replacement is one of the nodes not sampled, and gets the same content.
    replacement = fake.destinations()[2]
    assert replacement in {3, 4}
    assert sorted(r.metadata.src_node_id for r in replies if not r.has_error()) == \
        sorted([2, replacement])
    assert [r.metadata.src_node_id for r in replies if r.has_error()] == [1]
    (report,) = reports
    assert (report.server_round, report.message_type) == (4, "train")
    assert report.replacements == 1 and report.timeouts == 0
    assert report.failures == [(1, "error 2: ClientApp raised")]
    sent = list(fake.sent.values())
    assert sent[2].content is sent[0].content


def test_a_silent_node_times_out_counts_as_failed_and_is_replaced() -> None:
    fake = FakeGrid({1: "silent", 2: "ok"})
    grid, reports = recovering(fake)
    replies = list(grid.send_and_receive(instructions([1]), timeout=0.2))
    assert fake.destinations() == [1, 2]
    (failed,) = [r for r in replies if r.has_error()]
    assert "round-timeout" in failed.error.reason and failed.metadata.src_node_id == 1
    assert [r.metadata.src_node_id for r in replies if not r.has_error()] == [2]
    assert reports[0].timeouts == 1 and reports[0].replacements == 1


def test_a_node_that_disconnects_is_replaced_without_waiting_for_the_timeout(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(recovery, "MEMBERSHIP_INTERVAL", 0.05)
    fake = FakeGrid({1: "vanish", 2: "ok"})
    grid, reports = recovering(fake)
    replies = list(grid.send_and_receive(instructions([1]), timeout=60))
    assert [r.metadata.src_node_id for r in replies if not r.has_error()] == [2]
    assert reports[0].failures == [(1, "disconnected")] and reports[0].timeouts == 0


def test_replacements_stop_after_round_retries() -> None:
    fake = FakeGrid({1: "error", 2: "error", 3: "error", 4: "error"})
    grid, reports = recovering(fake, retries=1)
    replies = list(grid.send_and_receive(instructions([1, 2]), timeout=5))
    assert len(fake.sent) == 3  # two sampled, one replacement
    assert all(r.has_error() for r in replies) and len(replies) == 3
    assert reports[0].replacements == 1 and len(reports[0].failures) == 3


def test_without_untried_nodes_the_failure_stands() -> None:
    fake = FakeGrid({1: "error", 2: "ok"})
    grid, reports = recovering(fake)
    replies = list(grid.send_and_receive(instructions([1, 2]), timeout=5))
    assert len(fake.sent) == 2
    assert sorted(r.has_error() for r in replies) == [False, True]
    assert reports[0].replacements == 0


def test_an_empty_phase_sends_nothing() -> None:
    fake = FakeGrid({1: "ok"})
    grid, reports = recovering(fake)
    assert list(grid.send_and_receive([], timeout=5)) == []
    assert fake.sent == {} and reports == []


class Clock:
    """A stand-in for the time module that RecoveringGrid uses: sleeping moves it on."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def thread_time(self) -> float:  # as if every pull were all CPU
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class SlowGrid(FakeGrid):
    """One node that replies once ``ready_at`` has passed; every pull costs ``pull_cost``."""

    def __init__(self, clock: Clock, pull_cost: float, ready_at: float) -> None:
        super().__init__({1: "ok"})
        self.clock, self.pull_cost, self.ready_at = clock, pull_cost, ready_at
        self.pulls = 0

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        self.clock.now += self.pull_cost
        return super().pull_messages(message_ids) if self.clock.now >= self.ready_at else []


@pytest.mark.parametrize("pull_cost", [0.0, 0.005])
def test_polling_waits_longer_when_pulls_are_costly(monkeypatch: pytest.MonkeyPatch,
                                                    pull_cost: float) -> None:
    clock = Clock()
    monkeypatch.setattr(recovery, "time", clock)
    fake = SlowGrid(clock, pull_cost, ready_at=2.0)
    grid = RecoveringGrid(fake, retries=0, poll_interval=0.25)
    (reply,) = grid.send_and_receive(instructions([1]), timeout=60)
    assert not reply.has_error()
    assert max(clock.sleeps) <= 0.25
    # Picked up at most ~1 % late (free pulls) or one pause late (costly ones).
    assert clock.now - 2.0 <= max(0.02, recovery.POLL_COST_FACTOR * pull_cost) + pull_cost
    if pull_cost == 0:
        assert clock.sleeps[0] == recovery.MIN_POLL_INTERVAL
        assert fake.pulls > 100
    else:  # polling takes at most 1/POLL_COST_FACTOR of the time
        assert min(clock.sleeps) >= recovery.POLL_COST_FACTOR * pull_cost - 1e-9
        assert fake.pulls * pull_cost <= clock.now / recovery.POLL_COST_FACTOR + pull_cost


class SignallingGrid(FakeGrid):
    """One node whose reply is stored (and ``replies`` set) by another thread, after the
    grid's first pull found nothing."""

    def __init__(self, replies: threading.Event) -> None:
        super().__init__({1: "ok"})
        self.replies = replies
        self.ready = threading.Event()
        self.pulls = 0

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        self.pulls += 1
        if self.pulls == 1:
            threading.Timer(0.2, self.store_reply).start()
        return super().pull_messages(message_ids) if self.ready.is_set() else []

    def store_reply(self) -> None:
        self.ready.set()
        self.replies.set()


def test_with_a_replies_event_the_grid_pulls_when_it_is_set_instead_of_polling() -> None:
    replies = threading.Event()
    fake = SignallingGrid(replies)
    # Without the event it would pull again only after a minute.
    grid = RecoveringGrid(fake, retries=0, poll_interval=60, replies=replies)
    started = time.monotonic()
    (reply,) = grid.send_and_receive(instructions([1]), timeout=120)
    assert not reply.has_error()
    assert time.monotonic() - started < 30
    assert fake.pulls == 2  # one that found nothing, one when the reply was stored

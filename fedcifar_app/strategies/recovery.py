"""Rounds that survive node loss: a Grid that replaces the nodes that fail.

Flower's strategies send a round's instructions with ``grid.send_and_receive``
and aggregate whatever comes back. ``RecoveringGrid`` wraps the Grid the
ServerApp is given and reimplements only that call, so every strategy keeps its
own sampling and aggregation:

* an instruction whose node fails (an error reply: the ClientApp raised, the node
  disconnected or missed its heartbeats), whose node is no longer connected, or
  that has no reply after ``timeout`` seconds, is sent again, unchanged, to a
  connected node not yet tried in this phase, until every instruction has a
  reply or ``retries`` replacements were sent in this phase;
* a node that never replied gets an error reply of its own, so it counts as
  failed like any other;
* replies are pulled often, not every 3 s as flwr 1.42's HTTP Grid does, so a
  round ends soon after its last reply is there: the pause between pulls is 1/100
  of the time the phase has waited so far, from ``MIN_POLL_INTERVAL`` up to
  ``poll_interval`` (a reply is picked up at most ~1 % late, a 0.3 s simulated
  round is not rounded up to 0.25 s steps, and a long phase pulls 4 times a second),
  but at least ``POLL_COST_FACTOR`` times the CPU time the last empty pull took in
  this thread, so that polling takes at most ~5 % of a core from training (an
  in-memory pull in simulation costs a fraction of a millisecond; a deployment's, an
  HTTPS request, a few milliseconds here and about as much in the SuperLink; the
  thread's CPU time leaves out waiting for the GIL or the network). Given ``replies``,
  an event set whenever a reply may have arrived (a simulation's engine sets one:
  ``compat.wake_simulation_engine``), it pulls when that is set instead (and at least
  every ``poll_interval``): no polling, and no reply picked up late.

The failed replies stay in the list the strategy receives, which counts them;
replacements, timeouts and each instruction's journey (``Job``: node, sent, answered,
how) go to ``on_phase_end``.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from logging import INFO, WARNING

from flwr.app import Error, Message, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

POLL_INTERVAL = 0.25
MIN_POLL_INTERVAL = 0.001
POLL_COST_FACTOR = 20
# How often pending nodes are checked against the connected ones (one get_node_ids call).
MEMBERSHIP_INTERVAL = 1.0


@dataclass
class Job:
    """One instruction to one node: when it was sent and answered (time.monotonic), and
    how: 'replied', 'failed' (an error reply), 'timed out' or 'disconnected'."""

    node: int
    sent: float
    answered: float
    outcome: str


@dataclass
class PhaseReport:
    """What one send_and_receive call (a round's train or evaluate phase) went through."""

    message_type: str
    server_round: int | None
    sent: int = 0
    replacements: int = 0
    timeouts: int = 0
    # (node id, why) for each instruction that failed, replaced or not.
    failures: list[tuple[int, str]] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)


@dataclass
class _Pending:
    instruction: Message
    deadline: float
    sent: float


class WrappedGrid(Grid):
    """A Grid that passes every call to the Grid it wraps; subclasses override some."""

    grid: Grid

    def set_run(self, run_id):  # type: ignore[no-untyped-def]
        self.grid.set_run(run_id)

    @property
    def run(self):  # type: ignore[no-untyped-def]
        return self.grid.run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int,
                       group_id: str, ttl: float | None = None) -> Message:
        return self.grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)


class RecoveringGrid(WrappedGrid):
    """A Grid that replaces failed nodes within a phase; see the module docstring."""

    def __init__(self, grid: Grid, retries: int,
                 on_phase_end: Callable[[PhaseReport], None] | None = None,
                 poll_interval: float = POLL_INTERVAL,
                 rng: random.Random | None = None,
                 replies: threading.Event | None = None) -> None:
        self.grid = grid
        self.retries = retries
        self.on_phase_end = on_phase_end
        self.poll_interval = poll_interval
        self.rng = rng or random.Random()
        self.replies = replies

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages:
            return []
        patience = float("inf") if timeout is None else timeout
        report = PhaseReport(messages[0].metadata.message_type, server_round_of(messages[0]),
                             sent=len(messages))
        tried = {m.metadata.dst_node_id for m in messages}
        pending: dict[str, _Pending] = {}
        replies: list[Message] = []
        retries_left = self.retries

        def send(instructions: list[Message]) -> None:
            sent = time.monotonic()
            ids = self.grid.push_messages(instructions)
            for instruction, message_id in zip(instructions, ids, strict=True):
                if message_id is None:  # Flower logs why; the node counts as failed.
                    fail(instruction, None, "the SuperLink did not accept the message",
                         sent, "failed")
                else:
                    pending[message_id] = _Pending(instruction, sent + patience, sent)

        def fail(instruction: Message, reply: Message | None, why: str, sent: float,
                 outcome: str) -> None:
            nonlocal retries_left
            node = instruction.metadata.dst_node_id
            report.failures.append((node, why))
            report.jobs.append(Job(node, sent, time.monotonic(), outcome))
            if reply is not None:
                replies.append(reply)
            if retries_left == 0:
                log(WARNING, "%s: node %d failed (%s); no retries left (round-retries)",
                    _phase(report), node, why)
                return
            candidates = sorted(set(self.grid.get_node_ids()) - tried)
            if not candidates:
                log(WARNING, "%s: node %d failed (%s); no untried node is connected",
                    _phase(report), node, why)
                return
            replacement = self.rng.choice(candidates)
            tried.add(replacement)
            retries_left -= 1
            report.replacements += 1
            log(INFO, "%s: node %d failed (%s); sending its instruction to node %d",
                _phase(report), node, why, replacement)
            send([_readdressed(instruction, replacement)])

        started = time.monotonic()
        send(messages)
        next_membership_check = time.monotonic() + MEMBERSHIP_INTERVAL
        empty_pull_s = 0.0
        while pending:
            if self.replies is not None:
                self.replies.clear()  # before the pull: a reply stored during it wakes the wait
            pull_started = time.thread_time()
            pulled = list(self.grid.pull_messages(list(pending)))
            if not pulled:
                empty_pull_s = time.thread_time() - pull_started
            for reply in pulled:
                message_id = reply.metadata.reply_to_message_id
                if message_id not in pending:
                    continue
                entry = pending.pop(message_id)
                if reply.has_error():
                    fail(entry.instruction, reply,
                         f"error {reply.error.code}: {reply.error.reason}", entry.sent,
                         "failed")
                else:
                    replies.append(reply)
                    report.jobs.append(Job(reply.metadata.src_node_id, entry.sent,
                                           time.monotonic(), "replied"))
            now = time.monotonic()
            for message_id, entry in list(pending.items()):
                if now >= entry.deadline:
                    report.timeouts += 1
                    del pending[message_id]
                    fail(entry.instruction, _error_reply(
                        entry.instruction, ErrorCode.UNKNOWN,
                        f"no reply within {patience:g} s (round-timeout)"), "timed out",
                        entry.sent, "timed out")
            if pending and now >= next_membership_check:
                next_membership_check = now + MEMBERSHIP_INTERVAL
                connected = set(self.grid.get_node_ids())
                for message_id, entry in list(pending.items()):
                    if entry.instruction.metadata.dst_node_id not in connected:
                        del pending[message_id]
                        fail(entry.instruction, _error_reply(
                            entry.instruction, ErrorCode.NODE_UNAVAILABLE,
                            "the node is no longer connected"), "disconnected",
                            entry.sent, "disconnected")
            if pending:
                self._pause(time.monotonic() - started, empty_pull_s)
        if self.on_phase_end is not None:
            self.on_phase_end(report)
        return replies

    def _pause(self, waited: float, empty_pull_s: float) -> None:
        """Until the next pull: see the module docstring."""
        if self.replies is not None:
            self.replies.wait(self.poll_interval)
        else:
            time.sleep(min(self.poll_interval, max(MIN_POLL_INTERVAL, waited / 100,
                                                   POLL_COST_FACTOR * empty_pull_s)))


def _readdressed(instruction: Message, node_id: int) -> Message:
    metadata = instruction.metadata
    return Message(content=instruction.content, dst_node_id=node_id,
                   message_type=metadata.message_type, group_id=metadata.group_id)


def _error_reply(instruction: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=instruction)


def server_round_of(message: Message) -> int | None:
    """The round an instruction belongs to (its config's 'server-round'), if it says."""
    config = message.content.config_records.get("config")
    value = None if config is None else config.get("server-round")
    return int(value) if isinstance(value, int) else None


def _phase(report: PhaseReport) -> str:
    return f"Round {report.server_round} ({report.message_type})"

"""The simulated clock of a synchronous run on heterogeneous devices.

``SimulatedClockGrid`` is the Grid a synchronous strategy trains on when ``devices`` is
set. The simulation does not sleep; the clock is a number the grid moves on:

* a training round is dispatched at the clock's time T. A sampled client whose device
  is not available at T fails at once (its instruction is not sent), as an unreachable
  device fails in a deployment;
* every other client trains for real; its reply arrives, on the clock, after its
  device's round seconds (model down, epochs x examples samples, update up). A client
  whose availability window closes before that went offline mid-round: its reply is
  replaced by an error reply, as if it never came;
* with over-selection (``keep_first`` K, run-config ``over-selection-keep``; sample
  more than K with fraction-train), only the first K updates to arrive are aggregated,
  as production systems do against stragglers; the later ones are dropped as late;
* the round ends when the last reply it uses arrives: the clock moves to T + the
  longest of them. results.json records, per round, ``simulated_round_seconds``,
  ``simulated_seconds`` (the clock at the round's end), and the clients that were
  ``unavailable``, went ``offline`` or arrived ``late``.

Asynchronous strategies (FedBuff) use the grid as their ``Clock``
(strategies.clock) and send work with ``push_messages``: each training instruction's
arrival is set at dispatch (the device's round seconds for the examples the node said
it holds, asked once with a QUERY), and ``pull_messages`` hands back one reply at a
time, the next to arrive on the simulated clock, once it has really been trained
(ties by client): a run is the same for the same seed, however fast the simulation
computes. A client unavailable at dispatch, or whose window closes before its update
arrives, fails then. ``available`` lists the nodes whose devices are reachable now;
``idle`` with nothing in flight moves the clock to when the next device comes back.

Evaluation phases are off the clock (they go to available clients, and take no
simulated time). The clock starts at 0, and a resumed run continues it from the last
round results.json recorded.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedcifar_app.extensions.heterogeneity.devices import Device
from fedcifar_app.results import RunRecorder
from fedcifar_app.strategies.recovery import WrappedGrid, server_round_of
from fedcifar_app.strategies.sampling import PartitionDirectory

# How long (real seconds) one pull waits for the next arrival to be trained.
PULL_WAIT_SECONDS = 0.1
EXAMPLES_GROUP = "num-examples-census"


@dataclass(frozen=True)
class Arrival:
    """When, on the simulated clock, the reply to a pushed instruction arrives."""

    at: float
    client: int
    instruction: Message
    failure: str | None  # why it fails then; None: its real reply arrives then


class SimulatedClockGrid(WrappedGrid):
    """See the module docstring. ``devices[i]`` is the device of the client holding
    partition i (a node without a partition id takes devices[node ID mod count])."""

    def __init__(self, grid: Grid, devices: list[Device], partitions: PartitionDirectory,
                 recorder: RunRecorder, local_epochs: int, keep_first: int = 0) -> None:
        self.grid = grid
        self.keep_first = keep_first  # over-selection: aggregate the first K (0: all)
        self.devices = devices
        self.partitions = partitions
        self.recorder = recorder
        self.local_epochs = local_epochs
        self.time = max((entry.get("simulated_seconds", 0.0) for entry in recorder.entries),
                        default=0.0)
        self.arrivals: dict[str, Arrival] = {}  # pushed instructions, by message id
        self.examples: dict[int, int] = {}  # training examples, by node

    # --- Clock (strategies.clock) ----------------------------------------------------

    simulated = True

    def now(self) -> float:
        return self.time

    def available(self, node_ids: list[int]) -> list[int]:
        return [node for node in node_ids if self.device_of(node)[1].available(self.time)]

    def idle(self, seconds: float) -> None:
        if self.arrivals:  # the next arrival is still being trained, in real time
            time.sleep(min(seconds, PULL_WAIT_SECONDS))
            return
        comebacks = [d.next_available(self.time) for d in self.devices]
        self.time = min((t for t in comebacks if t > self.time), default=self.time + seconds)

    def device_of(self, node_id: int) -> tuple[int, Device]:
        """(client, its device) for a node: the client is its partition id."""
        partition = self.partitions.partition_of.get(node_id)
        client = partition if partition is not None else node_id
        return client, self.devices[client % len(self.devices)]

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return self.grid.send_and_receive(messages, timeout=timeout)
        start = self.time
        reachable, unavailable = [], []
        for message in messages:
            client, device = self.device_of(message.metadata.dst_node_id)
            (reachable if device.available(start) else unavailable).append((client, message))
        results = [_failed(m, f"client {c}'s device is unavailable at simulated second "
                              f"{start:.1f}") for c, m in unavailable]
        model_bytes = _model_bytes(messages[0].content["arrays"])
        arrivals, offline = [], []
        replies = self.grid.send_and_receive([m for _, m in reachable], timeout=timeout)
        for reply in replies:
            if reply.has_error():
                results.append(reply)
                continue
            client, device = self.device_of(reply.metadata.src_node_id)
            samples = self.local_epochs * int(reply.content["metrics"]["num-examples"])
            seconds = device.round_seconds(samples, model_bytes)
            if device.available_until(start) < start + seconds:
                offline.append(client)
                results.append(_failed(_instruction_answered_by(reply),
                                       f"client {client} went offline before its update "
                                       f"arrived (simulated second {start + seconds:.1f})"))
                continue
            arrivals.append((seconds, client, reply))
        arrivals.sort(key=lambda arrival: arrival[:2])  # by arrival, then client: seeded
        kept = arrivals[:self.keep_first] if self.keep_first else arrivals
        late = arrivals[len(kept):]
        results += [reply for _, _, reply in kept]
        results += [_failed(_instruction_answered_by(reply), f"client {client}'s update "
                            f"arrived after the first {self.keep_first} (simulated second "
                            f"{start + seconds:.1f}): dropped as late")
                    for seconds, client, reply in late]
        self.time = start + max((seconds for seconds, _, _ in kept), default=0.0)
        server_round = server_round_of(messages[0])
        if server_round is not None:
            jobs = [_job(client, start, start, "unavailable") for client, _ in unavailable]
            jobs += [_job(c, start, self.devices[c % len(self.devices)].available_until(start),
                          "offline") for c in offline]
            jobs += [_job(c, start, start + s, "used") for s, c, _ in kept]
            jobs += [_job(c, start, start + s, "late") for s, c, _ in late]
            self.recorder.record(server_round, save=False,
                                 simulated_round_seconds=round(self.time - start, 3),
                                 simulated_seconds=round(self.time, 3), jobs=jobs,
                                 unavailable=sorted(c for c, _ in unavailable),
                                 offline=sorted(offline),
                                 late=sorted(client for _, client, _ in late))
        return results

    # --- Asynchronous: push now, pull in order of simulated arrival ---------------------

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        if not messages or messages[0].metadata.message_type != MessageType.TRAIN:
            return self.grid.push_messages(messages)
        self._learn_examples([m.metadata.dst_node_id for m in messages])
        model_bytes = _model_bytes(messages[0].content["arrays"])
        message_ids = list(self.grid.push_messages(messages))
        for message, message_id in zip(messages, message_ids, strict=True):
            if message_id is not None:
                self.arrivals[message_id] = self._arrival(message, model_bytes)
        return message_ids

    def _arrival(self, instruction: Message, model_bytes: int) -> Arrival:
        node = instruction.metadata.dst_node_id
        client, device = self.device_of(node)
        if not device.available(self.time):
            return Arrival(self.time, client, instruction, f"client {client}'s device is "
                           f"unavailable at simulated second {self.time:.1f}")
        if node not in self.examples:
            return Arrival(self.time, client, instruction, f"client {client} did not say "
                           "how many examples it holds")
        arrives = self.time + device.round_seconds(
            self.local_epochs * self.examples[node], model_bytes)
        offline = device.available_until(self.time)
        if offline < arrives:
            return Arrival(offline, client, instruction, f"client {client} went offline "
                           f"before its update arrived (simulated second {offline:.1f})")
        return Arrival(arrives, client, instruction, None)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        message_ids = list(message_ids)
        timed = [m for m in message_ids if m in self.arrivals]
        replies = list(self.grid.pull_messages([m for m in message_ids
                                                 if m not in self.arrivals]))
        if not timed:
            return replies
        message_id = min(timed, key=lambda m: (self.arrivals[m].at, self.arrivals[m].client))
        arrival = self.arrivals[message_id]
        reply = (_failed(arrival.instruction, arrival.failure) if arrival.failure
                 else self._trained(message_id))
        if reply is not None:
            del self.arrivals[message_id]
            self.time = max(self.time, arrival.at)
            replies.append(reply)
        return replies

    def _trained(self, message_id: str) -> Message | None:
        """The real reply to ``message_id``, if it comes within PULL_WAIT_SECONDS."""
        deadline = time.monotonic() + PULL_WAIT_SECONDS
        while True:
            replies = list(self.grid.pull_messages([message_id]))
            if replies or time.monotonic() >= deadline:
                return replies[0] if replies else None
            time.sleep(0.002)

    def _learn_examples(self, node_ids: list[int]) -> None:
        """Ask the nodes not asked yet how many training examples they hold."""
        unknown = [node for node in node_ids if node not in self.examples]
        if not unknown:
            return
        content = RecordDict({"config": ConfigRecord({"query": "num-examples"})})
        questions = [Message(content=content, dst_node_id=node, message_type=MessageType.QUERY,
                             group_id=EXAMPLES_GROUP) for node in unknown]
        for answer in self.grid.send_and_receive(questions):
            examples = None if answer.has_error() else answer.content["metrics"].get(
                "num-examples")
            if isinstance(examples, int):
                self.examples[answer.metadata.src_node_id] = examples


def _job(client: int, sent: float, arrived: float, outcome: str) -> dict:
    """A round's job for results.json ('jobs'), as FedBuff records its jobs."""
    return {"client": client, "sent": round(sent, 3), "arrived": round(arrived, 3),
            "outcome": outcome}


def _model_bytes(arrays: ArrayRecord) -> int:
    """The model's size as it travels: its values, without serialisation headers."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize for a in arrays.values())


def _failed(instruction: Message, reason: str) -> Message:
    return Message(Error(code=ErrorCode.NODE_UNAVAILABLE, reason=reason), reply_to=instruction)


def _instruction_answered_by(reply: Message) -> Message:
    """A stand-in for the instruction ``reply`` answers (to the node that sent it, in its
    phase), so that the reply can be replaced by an error reply from that node."""
    metadata = reply.metadata
    return Message(RecordDict(), dst_node_id=metadata.src_node_id,
                   message_type=metadata.message_type, group_id=metadata.group_id)

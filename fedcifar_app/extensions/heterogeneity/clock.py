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

Evaluation phases are off the clock (they go to available clients, and take no
simulated time). The clock starts at 0, and a resumed run continues it from the last
round results.json recorded.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
from flwr.app import ArrayRecord, Error, Message, MessageType, RecordDict
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedcifar_app.extensions.heterogeneity.devices import Device
from fedcifar_app.results import RunRecorder
from fedcifar_app.strategies.recovery import WrappedGrid, server_round_of
from fedcifar_app.strategies.sampling import PartitionDirectory


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
        self.now = max((entry.get("simulated_seconds", 0.0) for entry in recorder.entries),
                       default=0.0)

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
        start = self.now
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
        self.now = start + max((seconds for seconds, _, _ in kept), default=0.0)
        server_round = server_round_of(messages[0])
        if server_round is not None:
            self.recorder.record(server_round, save=False,
                                 simulated_round_seconds=round(self.now - start, 3),
                                 simulated_seconds=round(self.now, 3),
                                 unavailable=sorted(c for c, _ in unavailable),
                                 offline=sorted(offline),
                                 late=sorted(client for _, client, _ in late))
        return results


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

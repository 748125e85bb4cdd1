"""Multiplexed simulation: many virtual clients per SuperNode, one message per node.

In per-node mode every simulated client is a SuperNode, and each round pays
Flower's per-message path (a message, a ClientApp call in a Ray actor, the model
serialised both ways) once per sampled client: on small cross-device clients that
costs more than their training. With ``virtual-clients`` N:

* the strategy samples among N virtual clients whose IDs are their partition ids
  (``MultiplexingGrid.get_node_ids``), seeded as per-node mode samples nodes ordered
  by partition, so the same seed draws the same partitions;
* ``MultiplexingGrid`` bundles a phase's instructions (Flower's own, one per sampled
  client, all with the same content) into one message per SuperNode, whose
  ``VIRTUAL_CLIENTS`` ConfigRecord lists the clients it must serve: equal shares,
  or, for strategies that keep per-client state on the nodes (SCAFFOLD's control
  variates), always the same node for the same client;
* the ClientApp serves them one after another and replies with their weighted mean
  update and total weight, which Flower's weighted average over the node replies
  turns into the same average over the clients; or, for aggregators that need each
  update (``EACH``: median, Krum, Bulyan), with every update, which this grid splits
  back into one reply per client;
* a client that failed on its node, and every client of a node that failed, gets
  an error reply of its own, so failures count per client as in per-node mode.
"""

from __future__ import annotations

from collections.abc import Iterable
from logging import WARNING

from flwr.app import ConfigRecord, Error, Message, RecordDict
from flwr.common import log
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

from fedcifar_app.extensions.multiplex.clients import EACH, MEAN, SEPARATOR, VIRTUAL_CLIENTS
from fedcifar_app.strategies.recovery import WrappedGrid
from fedcifar_app.strategies.sampling import PartitionDirectory


def assign(clients: list[int], nodes: list[int], sticky: bool) -> dict[int, list[int]]:
    """Which node serves which clients: equal contiguous shares of the sorted clients,
    or (``sticky``) client ``c`` on node ``c mod len(nodes)``, so that state a node
    keeps for a client is there the next time the client is sampled."""
    clients = sorted(clients)
    if sticky:
        shares = {node: [c for c in clients if c % len(nodes) == index]
                  for index, node in enumerate(nodes)}
    else:
        size, extra = divmod(len(clients), len(nodes))
        shares, start = {}, 0
        for index, node in enumerate(nodes):
            end = start + size + (index < extra)
            shares[node] = clients[start:end]
            start = end
    return {node: share for node, share in shares.items() if share}


class MultiplexingGrid(WrappedGrid):
    """The Grid a strategy sees in multiplexed mode; see the module docstring.

    ``grid`` is the Grid of the real SuperNodes (a RecoveringGrid, which resends a
    failed node's bundle to a node that has none); ``directory`` orders them, and the
    first ``serving`` of them get the clients (the others stand by for replacements)."""

    virtual = True  # its node IDs are clients, already in partition order

    def __init__(self, grid: Grid, num_clients: int, directory: PartitionDirectory,
                 serving: int, sticky: bool = False, each: bool = False) -> None:
        self.grid = grid
        self.num_clients = num_clients
        self.directory = directory
        self.serving = serving
        self.sticky = sticky
        self.each = each

    def get_node_ids(self) -> list[int]:
        """The virtual clients, whose IDs are their partition ids."""
        return list(range(self.num_clients))

    def serving_nodes(self) -> list[int]:
        """The first ``serving`` connected SuperNodes, in the order of the partitions
        they hold."""
        return self.directory.ordered_connected(self.grid)[:self.serving]

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("multiplexed mode sends with send_and_receive only")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("multiplexed mode sends with send_and_receive only")

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        """Send one bundle per serving node; return the replies the strategy expects."""
        instructions = {m.metadata.dst_node_id: m for m in messages}
        if not instructions:
            return []
        first = next(iter(instructions.values()))
        if any(m.content is not first.content for m in instructions.values()):
            raise ValueError("multiplexed mode needs the same instruction for every client "
                             "of a phase (this strategy sends different ones)")
        nodes = self.serving_nodes()
        if not nodes:
            return [_error(m, ErrorCode.NODE_UNAVAILABLE, "no SuperNode is connected")
                    for m in instructions.values()]
        shares = assign(list(instructions), nodes, self.sticky)
        each = self.each and first.metadata.message_type == "train"
        bundles = [_bundle(first, node, share, EACH if each else MEAN)
                   for node, share in shares.items()]
        replies = list(self.grid.send_and_receive(bundles, timeout=timeout))
        return self._per_client(replies, instructions, shares, each)

    def _per_client(self, replies: list[Message], instructions: dict[int, Message],
                    shares: dict[int, list[int]], each: bool) -> list[Message]:
        """What the strategy receives: the node replies (MEAN) or one reply per served
        client (EACH), and an error reply for every client not served."""
        results: list[Message] = []
        accounted: set[int] = set()
        node_errors = {}
        for reply in replies:
            if reply.has_error():
                node_errors[reply.metadata.src_node_id] = reply.error.reason
                continue
            record = reply.content[VIRTUAL_CLIENTS]
            accounted.update(record["served"], record["failed"], record["rejected"])
            for client, why in zip(record["failed"], record["failure-reasons"], strict=True):
                results.append(_error(instructions[client],
                                      ErrorCode.CLIENT_APP_RAISED_EXCEPTION, why))
            if each:
                results.extend(_split(reply, instructions))
            elif record["served"]:  # a reply whose clients all failed holds no result
                results.append(reply)
        for node, share in shares.items():
            for client in share:
                if client not in accounted:
                    why = node_errors.get(node, "no reply from the node that served it")
                    results.append(_error(instructions[client], ErrorCode.UNKNOWN,
                                          f"node {node} failed: {why}"))
        if node_errors:
            log(WARNING, "Multiplexed phase: %d node(s) failed: %s", len(node_errors),
                node_errors)
        return results


def _bundle(instruction: Message, node: int, clients: list[int], reply_kind: str) -> Message:
    content = RecordDict(dict(instruction.content))
    content[VIRTUAL_CLIENTS] = ConfigRecord({"partition-ids": clients, "reply": reply_kind})
    return Message(content=content, dst_node_id=node,
                   message_type=instruction.metadata.message_type,
                   group_id=instruction.metadata.group_id)


def _split(reply: Message, instructions: dict[int, Message]) -> list[Message]:
    """An EACH reply as one reply per served client, as if that client's node sent it."""
    content = reply.content
    worker = content.config_records.get("worker")
    replies = []
    for client in content[VIRTUAL_CLIENTS]["served"]:
        suffix = f"{SEPARATOR}{client}"
        records = RecordDict({name[:-len(suffix)]: record for name, record in content.items()
                              if name.endswith(suffix)})
        if worker is not None:
            records["worker"] = worker
        replies.append(Message(content=records, reply_to=instructions[client]))
    return replies


def _error(instruction: Message, code: int, reason: str) -> Message:
    return Message(Error(code=code, reason=reason), reply_to=instruction)

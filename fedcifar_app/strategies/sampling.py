"""Reproducible rounds: nodes in the order of the partitions they hold, seeded draws.

Flower 1.42 samples with ``random.sample(grid.get_node_ids(), k)``, and node IDs
are drawn afresh in every simulation, so the same seed picks other data every run.
``PartitionDirectory`` asks each node once (a QUERY message) which partition it
holds; the strategy then hands Flower's sampling the connected nodes ordered by
partition id, after seeding ``random`` with (seed, round, phase), and aggregates
replies in that same order instead of arrival order. A node with no partition id
(a deployed SuperNode with its own ``data-path``) sorts after those with one, by
node ID: its draws stay seeded but depend on which nodes are connected.
"""

from __future__ import annotations

import random
from collections.abc import Iterable
from logging import INFO, WARNING

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

# The node-config key Flower's simulation sets, and the one the QUERY asks for.
PARTITION_ID = "partition-id"
CENSUS_GROUP = "partition-census"


class PartitionDirectory:
    """Which partition each node holds, learned with one QUERY per node."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout
        # node id -> partition id; None for a node that holds none or did not say.
        self.partition_of: dict[int, int | None] = {}

    def sort_key(self, node_id: int) -> tuple[int, int]:
        partition = self.partition_of.get(node_id)
        return (0, partition) if partition is not None else (1, node_id)

    def ordered(self, node_ids: Iterable[int]) -> list[int]:
        """``node_ids`` ordered by partition id (then by node ID, for nodes with none)."""
        return sorted(node_ids, key=self.sort_key)

    def ordered_connected(self, grid: Grid, node_ids: list[int] | None = None) -> list[int]:
        """The connected nodes (or the snapshot ``node_ids`` of them), ordered; nodes
        seen for the first time are asked first."""
        node_ids = list(grid.get_node_ids()) if node_ids is None else node_ids
        unknown = [node for node in node_ids if node not in self.partition_of]
        if unknown:
            self._ask(grid, unknown)
        return self.ordered(node_ids)

    def _ask(self, grid: Grid, node_ids: list[int]) -> None:
        log(INFO, "Asking %d new node(s) which partition they hold", len(node_ids))
        content = RecordDict({"config": ConfigRecord({"query": PARTITION_ID})})
        questions = [Message(content=content, dst_node_id=node,
                             message_type=MessageType.QUERY, group_id=CENSUS_GROUP)
                     for node in node_ids]
        for node in node_ids:
            self.partition_of[node] = None
        for reply in grid.send_and_receive(questions, timeout=self.timeout):
            node = reply.metadata.src_node_id
            if reply.has_error():
                log(WARNING, "Node %d did not say which partition it holds (%s); it is "
                    "sampled by node ID", node, reply.error.reason)
                continue
            partition = reply.content["metrics"].get(PARTITION_ID)
            if isinstance(partition, int) and not isinstance(partition, bool):
                self.partition_of[node] = partition


class NodeList:
    """What Flower's ``configure_train``/``configure_evaluate`` read from a Grid: the
    connected nodes, here in a fixed order."""

    def __init__(self, node_ids: list[int]) -> None:
        self.node_ids = node_ids

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)


def seed_draw(seed: int, run_round: int, phase: str) -> None:
    """Seed ``random`` (which Flower samples with) for one round's phase.

    A string seed is hashed with SHA-512, so it does not depend on PYTHONHASHSEED."""
    random.seed(f"{seed}:{run_round}:{phase}")

"""FedBuff's server loop on the Message API: no rounds, work sent whenever a client is
free.

The server keeps ``fedbuff-concurrency`` clients training. Each gets the current global
model (its version) and a job number (the instruction's 'server-round', so that every
job shuffles its data differently); replies are pulled as they arrive, checked by the
safeguards' update filter (``Safeguarded.update_problem``) and buffered with their
staleness (see buffer); every ``fedbuff-buffer-size`` buffered updates the server
steps, writes the checkpoint and results.json, and tests the model every
``evaluate-every`` steps; freed clients get fresh work at once.

It runs on the Grid's clock (strategies.clock): in a deployment the wall clock, replies
pulled in the background as they come (``BackgroundPulls``: one slow upload holds up
no other reply); in a simulation with ``devices`` the simulated clock, whose Grid hands
back replies in the order of their simulated arrival, so that the run is the same for
the same seed.

Failures: a job that fails (error reply, node gone, no reply within ``round-timeout``
real seconds) is counted and its slot goes to another client. A timed-out node gets
no new work until it answers (its answer is then dropped). ``3 x concurrency``
jobs in a row (at least 10) without a usable update fail the run. Updates older than
``fedbuff-max-staleness`` server steps are dropped as stale.

A resumed run continues from the checkpoint's step; the jobs in flight when the first
run stopped are lost (their clients are given new work).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedcifar_app.config import RunConfig
from fedcifar_app.extensions.fedbuff.buffer import UpdateBuffer
from fedcifar_app.strategies.clock import BackgroundPulls, clock_of
from fedcifar_app.strategies.safeguards import RunFailedError, Safeguarded

POLL_SECONDS = 0.02  # between pulls when nothing arrived
MEMBERSHIP_SECONDS = 1.0  # between listings of the connected nodes


@dataclass
class Job:
    """Work sent to one client."""

    node: int
    client: int  # the partition id (node ID for a node without one)
    version: int  # of the global model it trains on
    sent: float  # clock seconds
    deadline: float  # time.monotonic() after which it counts as failed


class FedBuff:
    """See the module docstring."""

    def __init__(self, grid: Grid, config: RunConfig, strategy: Safeguarded,
                 evaluate_fn: Callable[[int, ArrayRecord], Any]) -> None:
        self.config = config
        self.strategy = strategy
        self.evaluate_fn = evaluate_fn
        # On the wall clock, jobs are timed as results.json's elapsed_s is.
        self.clock = clock_of(grid, strategy.recorder.started)
        self.grid = grid if self.clock.simulated else BackgroundPulls(grid)
        self.rng = random.Random(f"{config.seed}:fedbuff:{strategy.round_offset}")
        self.buffer = UpdateBuffer(config.fedbuff_staleness)
        self.version = strategy.round_offset
        self.models: dict[int, ArrayRecord] = {}
        self.jobs: dict[str, Job] = {}  # by instruction message id
        self.timed_out: dict[str, int] = {}  # message id -> node, until the node answers
        self.concluded: list[dict[str, Any]] = []  # the jobs since the last step
        self.unusable_in_a_row = 0
        self.first_failure = ""
        self.jobs_sent = sum(len(entry.get("jobs", ())) for entry in strategy.recorder.entries)
        self.nodes: list[int] = []  # the connected nodes, in partition order ...
        self.nodes_listed_at = -MEMBERSHIP_SECONDS  # ... as of then (time.monotonic())

    def run(self, initial_arrays: ArrayRecord, num_steps: int) -> ArrayRecord:
        """Step the server ``num_steps`` times; return the final global model."""
        try:
            return self._run(initial_arrays, num_steps)
        finally:
            if isinstance(self.grid, BackgroundPulls):
                self.grid.close()

    def _run(self, initial_arrays: ArrayRecord, num_steps: int) -> ArrayRecord:
        self.models[self.version] = initial_arrays
        self.evaluate_fn(0, initial_arrays)
        last = self.version + num_steps
        log(INFO, "[fedcifar] FedBuff: %d steps of %d updates, %d clients training at once, "
            "on the %s clock", num_steps, self.config.fedbuff_buffer_size,
            self.config.fedbuff_concurrency, "simulated" if self.clock.simulated else "wall")
        while self.version < last:
            self.dispatch()
            if not self.jobs:
                self.wait_for_free_nodes()
                continue
            arrived = list(self.grid.pull_messages([*self.jobs, *self.timed_out]))
            for reply in self.strategy.in_partition_order(arrived):
                self.conclude(reply)
                if self.version == last:
                    break
            self.fail_lost_jobs()
            if not arrived:
                self.clock.idle(POLL_SECONDS)
        if self.jobs:
            log(INFO, "[fedcifar] FedBuff: %d jobs still training are not waited for",
                len(self.jobs))
        return self.models[self.version]

    # --- Sending work ------------------------------------------------------------------

    def dispatch(self) -> None:
        """Give fresh work to free clients until ``fedbuff-concurrency`` are training."""
        slots = self.config.fedbuff_concurrency - len(self.jobs)
        if slots <= 0:
            return
        busy = {job.node for job in self.jobs.values()} | set(self.timed_out.values())
        free = [node for node in self.clock.available(self.connected()) if node not in busy]
        chosen = self.rng.sample(free, min(slots, len(free)))
        if not chosen:
            return
        messages = [self.instruction(node) for node in chosen]
        deadline = time.monotonic() + self.config.round_timeout
        for message, message_id in zip(messages, self.grid.push_messages(messages),
                                       strict=True):
            node = message.metadata.dst_node_id
            job = Job(node, self.client_of(node), self.version, self.clock.now(), deadline)
            if message_id is None:  # Flower logs why
                self.record_job(job, "failed", "the SuperLink did not accept the message")
            else:
                self.jobs[message_id] = job

    def connected(self) -> list[int]:
        """The connected nodes in partition order, listed at most once a second (every
        pass of the loop needs them: to dispatch, and to fail the jobs of nodes gone)."""
        if time.monotonic() - self.nodes_listed_at >= MEMBERSHIP_SECONDS:
            self.nodes = self.strategy.partitions.ordered_connected(self.grid)
            self.nodes_listed_at = time.monotonic()
        return self.nodes

    def instruction(self, node: int) -> Message:
        self.jobs_sent += 1
        config = ConfigRecord({"server-round": self.jobs_sent, "model-version": self.version})
        return Message(RecordDict({"arrays": self.models[self.version], "config": config}),
                       dst_node_id=node, message_type=MessageType.TRAIN,
                       group_id=f"fedbuff-{self.version}")

    def client_of(self, node: int) -> int:
        partition = self.strategy.partitions.partition_of.get(node)
        return node if partition is None else partition

    def wait_for_free_nodes(self) -> None:
        """No job is out: too few nodes are connected (wait for them, failing after
        node-wait-timeout), or none can take work now (let time pass)."""
        if len(self.connected()) < self.config.min_available_nodes:
            self.strategy.wait_for_nodes(self.grid)
        else:
            self.clock.idle(POLL_SECONDS)

    # --- Receiving updates -------------------------------------------------------------

    def conclude(self, reply: Message) -> None:
        """Buffer, reject or count the reply to a job; step when the buffer is full."""
        message_id = reply.metadata.reply_to_message_id
        if message_id in self.timed_out:  # its job already failed: the node is free again
            del self.timed_out[message_id]
            return
        job = self.jobs.pop(message_id, None)
        if job is None:
            return
        if reply.has_error():
            self.record_job(job, "failed", f"error {reply.error.code}: {reply.error.reason}")
            return
        base = self.models[job.version]
        staleness = self.version - job.version
        problem = self.strategy.update_problem(reply, base)
        max_staleness = self.config.fedbuff_max_staleness
        if problem is not None:
            log(WARNING, "FedBuff: dropped the update of node %d: %s", job.node, problem)
            self.record_job(job, "rejected", problem)
        elif max_staleness and staleness > max_staleness:
            self.record_job(job, "stale", f"staleness {staleness} > {max_staleness}")
        else:
            metrics = reply.content["metrics"]
            self.buffer.add(reply.content["arrays"], base, int(metrics["num-examples"]),
                            staleness, dict(metrics))
            self.record_job(job, "used", staleness=staleness)
        if len(self.buffer) >= self.config.fedbuff_buffer_size:
            self.step()

    def record_job(self, job: Job, outcome: str, why: str = "",
                   staleness: int | None = None) -> None:
        """Note how a job ended (results.json: the step's 'jobs'); fail the run when too
        many in a row gave no usable update."""
        entry = {"client": job.client, "version": job.version, "sent": round(job.sent, 3),
                 "arrived": round(self.clock.now(), 3), "outcome": outcome}
        if staleness is not None:
            entry["staleness"] = staleness
        if why:
            entry["why"] = why
        self.concluded.append(entry)
        if outcome == "used":
            self.unusable_in_a_row = 0
            return
        if outcome == "failed":
            log(WARNING, "FedBuff: the job of node %d failed: %s", job.node, why)
        self.first_failure = self.first_failure or f"{outcome}: {why}"
        self.unusable_in_a_row += 1
        limit = max(3 * self.config.fedbuff_concurrency, 10)
        if self.unusable_in_a_row >= limit:
            raise RunFailedError(
                f"FedBuff: the last {limit} jobs gave no usable update (the first: "
                f"{self.first_failure}); stopping instead of waiting on without end")

    def fail_lost_jobs(self) -> None:
        """Jobs past round-timeout, or whose node left, fail; a timed-out node gets no
        new work until it answers."""
        now = time.monotonic()
        for message_id, job in list(self.jobs.items()):
            if now >= job.deadline:
                del self.jobs[message_id]
                self.timed_out[message_id] = job.node
                self.record_job(job, "failed", f"no reply within {self.config.round_timeout:g}"
                                " s (round-timeout)")
        connected = set(self.connected())
        for message_id, job in list(self.jobs.items()):
            if job.node not in connected:
                del self.jobs[message_id]
                self.record_job(job, "failed", "the node is no longer connected")
        self.timed_out = {m: n for m, n in self.timed_out.items() if n in connected}

    # --- The server step ---------------------------------------------------------------

    def step(self) -> None:
        """Apply the buffered updates: the next version of the global model."""
        arrays = self.buffer.step(self.models[self.version], self.config.fedbuff_server_lr)
        self.version += 1
        self.models[self.version] = arrays
        in_use = {job.version for job in self.jobs.values()} | {self.version}
        self.models = {v: model for v, model in self.models.items() if v in in_use}
        self.strategy.samples_trained += self.config.local_epochs * self.buffer.examples
        outcomes = [job["outcome"] for job in self.concluded]
        clock = {"simulated_seconds": round(self.clock.now(), 3)} if self.clock.simulated else {}
        self.strategy.recorder.record(
            self.version, save=False, train=self.buffer.mean_metrics(),
            train_replies=len(self.buffer), train_failures=outcomes.count("failed"),
            train_rejected=outcomes.count("rejected"), train_stale=outcomes.count("stale"),
            staleness=list(self.buffer.staleness), jobs=self.concluded,
            samples_trained=self.strategy.samples_trained, **clock)
        log(INFO, "[fedcifar] FedBuff step %d: %d updates (staleness %s), %d failed, %d "
            "rejected, %d stale; %s second %.1f", self.version, len(self.buffer),
            self.buffer.staleness, outcomes.count("failed"), outcomes.count("rejected"),
            outcomes.count("stale"), "simulated" if self.clock.simulated else "wall",
            self.clock.now())
        self.buffer.clear()
        self.concluded = []
        self.strategy.save_checkpoint(self.version, arrays)
        self.evaluate_fn(self.version - self.strategy.round_offset, arrays)


def run_fedbuff(grid: Grid, context: Context, config: RunConfig, strategy: Safeguarded,
                initial_arrays: ArrayRecord, evaluate_fn: Callable, num_steps: int
                ) -> ArrayRecord:
    """The extensions' runner for strategy='fedbuff'."""
    return FedBuff(grid, config, strategy, evaluate_fn).run(initial_arrays, num_steps)

"""Safeguards that make Flower's strategies fit for real deployments.

``Safeguarded`` wraps the configured Flower strategy (it is a Flower ``Strategy``
whose four steps call the wrapped one's) and adds what Flower 1.42 leaves to the app,
without copying the strategy's loop:

* waiting for nodes is bounded by ``node-wait-timeout``; too few nodes fail the run;
* training replies whose arrays are not a finite copy of the global model's
  layout (missing or extra keys, other shapes or dtypes, NaN/Inf) or that lack a
  positive ``num-examples`` are dropped and logged, never aggregated;
* a round with no usable training reply fails the run instead of silently
  keeping the old model; evaluation never fails a run (replies Flower could not
  aggregate are dropped and counted);
* with ``evaluate-in-train``, the nodes' evaluation of the model they received
  comes with their training replies and is recorded for the previous round;
* nodes are drawn reproducibly: in the order of the partitions they hold, with
  ``random`` seeded per (seed, round, phase), and replies are aggregated in that
  order, not as they arrive (see ``sampling``);
* ``record_phase`` writes what ``RecoveringGrid`` did (replaced, timed-out and
  failed nodes) into the round's results;
* every round's global model goes to ``checkpoint.pt`` (see ``checkpoint``);
* per-round metrics, reply and failure counts, and where each update was trained
  (the nodes' 'worker' record: host, Ray node) go to results.json, written with each
  checkpoint and with the server's evaluation that ends a round (or when the run fails).

Extensions take part through ``ServerHook`` objects (see extensions/): they may check
a round's sample, draw its cohort, reject or clip updates, transform the aggregate
before it is released, and keep state in the checkpoint.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg, Strategy

from fedcifar_app import compat
from fedcifar_app.errors import AnticipatedError
from fedcifar_app.results import RunRecorder
from fedcifar_app.strategies.checkpoint import CHECKPOINT_FILE, Checkpoint, save_checkpoint
from fedcifar_app.strategies.recovery import Job, PhaseReport
from fedcifar_app.strategies.replies import (FOLDED_EVALUATION_PREFIX, folded_evaluation,
                                             metric_names, metrics_problem,
                                             most_common_metric_names, rejected_on_nodes,
                                             served, train_seconds, update_problem, worker)
from fedcifar_app.strategies.sampling import NodeList, PartitionDirectory, seed_draw


class RunFailedError(AnticipatedError, RuntimeError):
    """The run cannot go on: too few nodes, or no usable training replies."""


class RunEndsEarly(RuntimeError):
    """A clean end before the last round (e.g. a privacy budget spent): the run keeps
    the model of the last round it ran."""


class ServerHook:
    """What an extension does in a safeguarded round; every step is optional."""

    def check_sample(self, run_round: int, sampled: int) -> None:
        """Raise RunFailedError if a training round of ``sampled`` nodes cannot run."""

    def configure_train(self, strategy: Strategy, run_round: int, arrays: ArrayRecord,
                        config: ConfigRecord, nodes: NodeList) -> list[Message] | None:
        """The round's instructions, if this hook draws them; None: the strategy does."""
        return None

    def reply_problem(self, reply: Message, global_arrays: ArrayRecord) -> str | None:
        """Why a training reply must not be aggregated (beyond the core checks)."""
        return None

    def clip(self, run_round: int, usable: list[Message],
             global_arrays: ArrayRecord) -> int | None:
        """Clip the usable updates; return how many were longer (None: not clipping)."""
        return None

    def before_aggregation(self, strategy: Strategy, usable: list[Message]) -> None:
        """Adjust the strategy to this round's usable updates."""

    def release(self, run_round: int, global_arrays: ArrayRecord,
                aggregate: ArrayRecord | None, usable: list[Message]) -> ArrayRecord:
        """The global model to release from the aggregate (None: a round without
        replies, see ``releases_empty_rounds``)."""
        return aggregate

    releases_empty_rounds = False  # a round with no instructions still releases a model

    def checkpoint_state(self) -> dict[str, Any]:
        """What the checkpoint keeps for this hook (top-level keys of checkpoint.pt)."""
        return {}

    def resume(self, checkpoint: Checkpoint) -> None:
        """Continue from the state ``checkpoint_state`` saved."""


@dataclass(frozen=True)
class SafeguardSettings:
    """What the safeguards take from the run config."""

    node_wait_timeout: float
    min_available_nodes: int
    local_epochs: int
    evaluate_in_train: bool
    seed: int
    model_name: str
    strategy_name: str  # the run-config key 'strategy'
    resume_settings: dict[str, Any]  # what checkpoints record (see checkpoint)


class Safeguarded(Strategy):
    """A Flower strategy with the safeguards and the extensions' hooks; see the module
    docstring. ``strategy`` does the sampling and aggregation."""

    def __init__(self, strategy: FedAvg, settings: SafeguardSettings, recorder: RunRecorder,
                 partitions: PartitionDirectory, hooks: list[ServerHook]) -> None:
        self.strategy = strategy
        self.settings = settings
        self.recorder = recorder
        self.partitions = partitions
        self.hooks = hooks
        self.checkpoint_path: Path = recorder.run_dir / CHECKPOINT_FILE
        self.round_offset = 0  # rounds already done by the run this one resumes
        self.samples_trained = 0
        self._global_arrays: ArrayRecord | None = None

    def summary(self) -> None:
        log(INFO, "\t├──> Safeguards (fedcifar) over %s, extensions: %s",
            type(self.strategy).__name__,
            ", ".join(type(h).__name__ for h in self.hooks) or "none")
        self.strategy.summary()

    @property
    def releases_empty_rounds(self) -> bool:
        return any(h.releases_empty_rounds for h in self.hooks)

    def resume_from(self, checkpoint: Checkpoint) -> None:
        """Number rounds and count samples on from where ``checkpoint`` stopped."""
        self.round_offset = checkpoint.round
        self.samples_trained = checkpoint.samples_trained
        for hook in self.hooks:
            hook.resume(checkpoint)

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes, once at least min-available-nodes are; fail after the
        timeout. Callers use this one snapshot: a node that leaves after it is a failed
        node, whereas listing the nodes again could find too few, and Flower's sampling
        would then wait for them without end."""
        needed, timeout = self.settings.min_available_nodes, self.settings.node_wait_timeout
        deadline = time.monotonic() + timeout
        while (connected := len(node_ids := list(grid.get_node_ids()))) < needed:
            if time.monotonic() >= deadline:
                raise RunFailedError(
                    f"only {connected} of the {needed} nodes the run needs "
                    f"(min-available-nodes) connected within {timeout:g} s "
                    "(node-wait-timeout): start more SuperNodes or lower min-available-nodes")
            log(INFO, "Waiting for nodes: %d of %d connected", connected, needed)
            time.sleep(1)
        return node_ids

    def meet_nodes(self, grid: Grid) -> None:
        """Before the run's first evaluation: wait for min-available-nodes and ask them
        which partitions they hold (nodes that join later are asked when first seen)."""
        self.partitions.ordered_connected(grid, self.wait_for_nodes(grid))

    def seeded_nodes(self, grid: Grid, run_round: int, phase: str) -> NodeList:
        """The connected nodes in partition order, with Flower's draw seeded for this
        round and phase: what the strategy's own sampling then picks from (on a grid of
        virtual clients, those clients in partition order)."""
        if getattr(grid, "virtual", False):
            self.wait_for_nodes(grid.grid)
            nodes = NodeList(list(grid.get_node_ids()))
        else:
            nodes = NodeList(self.partitions.ordered_connected(grid, self.wait_for_nodes(grid)))
        if phase == "train":  # as many as Flower's FedAvg.configure_train will sample
            sampled = compat.flower_sample_size(len(nodes.node_ids), self.strategy.fraction_train,
                                                self.strategy.min_train_nodes)
            for hook in self.hooks:
                hook.check_sample(run_round, sampled)
        seed_draw(self.settings.seed, run_round, phase)
        return nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global_arrays = arrays
        run_round = server_round + self.round_offset
        nodes = self.seeded_nodes(grid, run_round, "train")
        for hook in self.hooks:
            messages = hook.configure_train(self.strategy, run_round, arrays, config, nodes)
            if messages is not None:
                return messages
        return self.strategy.configure_train(run_round, arrays, config, nodes)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.settings.evaluate_in_train:  # the training replies carry the evaluation
            return []
        run_round = server_round + self.round_offset
        return self.strategy.configure_evaluate(
            run_round, arrays, config, self.seeded_nodes(grid, run_round, "evaluate"))

    def in_partition_order(self, replies: Iterable[Message]) -> list[Message]:
        """Replies in a fixed order: floating-point sums depend on the order of terms."""
        return sorted(replies, key=lambda r: self.partitions.sort_key(r.metadata.src_node_id))

    def record_phase(self, report: PhaseReport) -> None:
        """RecoveringGrid's account of a phase: replacements, timeouts, failed nodes."""
        if report.server_round is None:
            return
        phase = "train" if report.message_type == MessageType.TRAIN else "evaluate"
        jobs = {"jobs": [self._job(job) for job in report.jobs]} if phase == "train" else {}
        self.recorder.record(report.server_round, save=False, **jobs, **{
            f"{phase}_replacements": report.replacements,
            f"{phase}_timeouts": report.timeouts,
            f"{phase}_failed_nodes": [[node, why] for node, why in report.failures]})

    def _job(self, job: Job) -> dict[str, Any]:
        """A training job on the wall clock, for the timeline (a simulated clock's grid
        records its own jobs over these); a reply counts as used until rejected."""
        partition = self.partitions.partition_of.get(job.node)
        return {"client": job.node if partition is None else partition, "node": job.node,
                "sent": round(job.sent - self.recorder.started, 3),
                "arrived": round(job.answered - self.recorder.started, 3),
                "outcome": "used" if job.outcome == "replied" else job.outcome}

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        run_round = server_round + self.round_offset
        replies = self.in_partition_order(replies)
        if not replies and self.releases_empty_rounds:  # e.g. an empty Poisson cohort
            arrays = self._release(run_round, None, [])
            self.save_checkpoint(run_round, arrays)
            return arrays, MetricRecord()
        errors = [r for r in replies if r.has_error()]
        usable, rejected = self._usable(run_round, replies)
        self._mark_rejected(run_round, {r.metadata.src_node_id for r in rejected})
        # Counted per client: a multiplexed node's reply holds several (see replies).
        self.recorder.record(run_round, save=False,
                             train_replies=sum(len(served(r)) for r in usable),
                             train_failures=len(errors),
                             train_rejected=sum(len(served(r)) for r in rejected)
                             + rejected_on_nodes(replies),
                             train_nodes=[c for r in usable for c in served(r)],
                             train_workers=[worker(r) for r in usable])
        if not usable:
            first_failure = (f"; the first failure: {errors[0].error.reason}" if errors
                             else "")
            raise RunFailedError(
                f"round {run_round}: none of the {len(replies)} training replies could be "
                f"aggregated ({len(errors)} failed, {len(rejected)} rejected); stopping "
                f"instead of carrying the old model forward{first_failure}")
        self._clip(run_round, usable)
        for hook in self.hooks:
            hook.before_aggregation(self.strategy, usable)
        arrays, metrics = self.strategy.aggregate_train(run_round, [*usable, *errors])
        if arrays is None:  # e.g. Bulyan, left with fewer than 4f + 3 updates
            raise RunFailedError(
                f"round {run_round}: strategy '{self.settings.strategy_name}' could not "
                f"aggregate the {len(usable)} usable updates (see the warning above); "
                "stopping instead of carrying the old model forward")
        arrays = self._release(run_round, arrays, usable)
        self.samples_trained += self.settings.local_epochs * sum(
            int(r.content["metrics"]["num-examples"]) for r in usable)
        # Summed, unlike the weighted mean in `train`: the round's compute in CPU-seconds.
        client_train_seconds = sum(train_seconds(r) for r in usable)
        train_metrics = {k: v for k, v in (metrics or {}).items()
                         if not k.startswith(FOLDED_EVALUATION_PREFIX)}
        self.recorder.record(run_round, save=False, train=train_metrics,
                             samples_trained=self.samples_trained,
                             client_train_seconds=round(client_train_seconds, 3))
        if self.settings.evaluate_in_train:
            # The nodes evaluated the model they received: the previous round's.
            self.recorder.record(run_round - 1, timed=False, save=False,
                                 evaluate=folded_evaluation(usable),
                                 evaluate_replies=sum(len(served(r)) for r in usable))
        self.save_checkpoint(run_round, arrays)
        return arrays, MetricRecord(train_metrics)

    def _mark_rejected(self, run_round: int, nodes: set[int]) -> None:
        for job in self.recorder.entry(run_round).get("jobs", ()):
            if job.get("node") in nodes and job["outcome"] == "used":
                job["outcome"] = "rejected"

    def _usable(self, run_round: int, replies: list[Message]
                ) -> tuple[list[Message], list[Message]]:
        """(usable, rejected) among the replies that are not errors."""
        rejected = []

        def reject(reply: Message, problem: str) -> None:
            rejected.append(reply)
            log(WARNING, "Round %d: dropped the update of node %d: %s", run_round,
                reply.metadata.src_node_id, problem)

        candidates = []
        for reply in replies:
            if reply.has_error():
                continue
            problem = self.update_problem(reply, self._global_arrays)
            if problem is None:
                candidates.append(reply)
            else:
                reject(reply, problem)
        # Flower's aggregation fails the whole round unless all metric names match.
        common_names = most_common_metric_names(candidates)
        usable = []
        for reply in candidates:
            if metric_names(reply) == common_names:
                usable.append(reply)
            else:
                reject(reply, f"metric names {sorted(metric_names(reply))} differ from the "
                              f"other replies' {sorted(common_names)}")
        return usable, rejected

    def update_problem(self, reply: Message, global_arrays: ArrayRecord) -> str | None:
        """Why a (non-error) training reply on ``global_arrays`` must not be aggregated:
        the core checks (see replies.update_problem), then the hooks'."""
        # The ArrayRecords a training reply holds: the strategy's own (Scaffold) or Flower's.
        record_names = getattr(self.strategy, "reply_records", ("arrays",))
        return (update_problem(reply, global_arrays, record_names)
                or next(filter(None, (h.reply_problem(reply, global_arrays)
                                      for h in self.hooks)), None))

    def _clip(self, run_round: int, usable: list[Message]) -> None:
        """Let the hooks clip the usable updates; record how many were longer."""
        counts = [h.clip(run_round, usable, self._global_arrays) for h in self.hooks]
        counts = [count for count in counts if count is not None]
        if counts:
            self.recorder.record(run_round, save=False, train_clipped=sum(counts))

    def _release(self, run_round: int, arrays: ArrayRecord | None,
                 usable: list[Message]) -> ArrayRecord:
        for hook in self.hooks:
            arrays = hook.release(run_round, self._global_arrays, arrays, usable)
        return arrays

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Any:
        run_round = server_round + self.round_offset
        replies = self.in_partition_order(replies)
        if not replies:  # fraction-evaluate 0 or evaluate-in-train: nothing was asked
            return None
        failures = [r for r in replies if r.has_error()]
        # Evaluation never fails a run: replies Flower could not aggregate are dropped.
        candidates = [r for r in replies
                      if not r.has_error() and metrics_problem(r) is None]
        common_names = most_common_metric_names(candidates)
        usable = [r for r in candidates if metric_names(r) == common_names]
        usable_ids = {id(r) for r in usable}
        metrics = self.strategy.aggregate_evaluate(run_round, usable)
        if not usable:
            log(WARNING, "Round %d: no client evaluation succeeded", run_round)
        self.recorder.record(run_round, save=False, evaluate=dict(metrics or {}),
                             evaluate_replies=sum(len(served(r)) for r in usable),
                             evaluate_failures=len(failures),
                             evaluate_rejected=sum(len(served(r)) for r in replies
                                                   if not r.has_error()
                                                   and id(r) not in usable_ids)
                             + rejected_on_nodes(replies))
        return metrics

    def latest_arrays(self) -> ArrayRecord:
        """The global model the last round started from (a run stopped before a round
        ends with it)."""
        return self._global_arrays

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        # results.json first: a run resumed from this checkpoint takes its history from
        # there, so the history must reach the checkpoint's round whenever it exists.
        self.recorder.write()
        state = {key: value for hook in self.hooks
                 for key, value in hook.checkpoint_state().items()}
        save_checkpoint(self.checkpoint_path, server_round, arrays.to_torch_state_dict(),
                        self.samples_trained, self.settings.model_name,
                        self.settings.resume_settings, state)

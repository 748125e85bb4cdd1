"""Safeguards that make Flower's strategies fit for real deployments.

``build_strategy`` (in this package) subclasses the configured Flower strategy with
``SafeguardsMixin``, which adds what Flower 1.42 leaves to the app, without
copying the strategy's loop:

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
* with ``update-norm-bound``, each usable update is clipped to that norm before the
  strategy aggregates it; a robust aggregator's minimum sample (see ``robust``) is
  checked before each round's training;
* every round's global model and round number go to ``checkpoint.pt``, with the
  settings a resumed run must share (``resume_problems``) and, with DP, the privacy
  ledger, from which ``resume-from`` continues;
* per-round metrics, reply and failure counts, and where each update was trained
  (the nodes' 'worker' record: host, Ray node) go to results.json, written with each
  checkpoint and with the server's evaluation that ends a round (or when the run fails).
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.supercore.differential_privacy import compute_stdv

from fedcifar_app.config import ConfigError, RunConfig
from fedcifar_app.errors import AnticipatedError, one_line
from fedcifar_app.results import RunRecorder, atomic_write
from fedcifar_app.strategies.multiplex import (MultiplexingGrid, clipped_on_nodes,
                                               is_node_mean, rejected_on_nodes, served,
                                               train_seconds)
from fedcifar_app.strategies.recovery import PhaseReport
from fedcifar_app.strategies.privacy import (AdaptiveClipping, PrivacyLedger, noised_update,
                                             poisson_cohort)
from fedcifar_app.strategies.robust import (bound_update_norms, sample_size_problem,
                                            update_norm)
from fedcifar_app.strategies.sampling import NodeList, PartitionDirectory, seed_draw
from fedcifar_app.virtual_clients import DP_CLIPPED

CHECKPOINT_FILE = "checkpoint.pt"
# What a resumed run must share with the run it continues (run-config keys).
RESUME_KEYS = ("model", "strategy", "seed", "dp")
# With DP also the mechanism and its accounting: the ledger goes on from the checkpoint.
DP_RESUME_KEYS = ("fraction-train", "dp-noise-multiplier", "dp-clipping-norm", "dp-clipping",
                  "dp-target-quantile", "dp-clip-learning-rate", "dp-clipped-count-stddev",
                  "dp-delta", "dp-accountant")
# With evaluate-in-train, a training reply's metrics that start with this prefix are
# the node's evaluation of the model it received, weighted by 'eval-num-examples'.
FOLDED_EVALUATION_PREFIX = "eval-"
FOLDED_EVALUATION_WEIGHT = "eval-num-examples"


class RunFailedError(AnticipatedError, RuntimeError):
    """The run cannot go on: too few nodes, or no usable training replies."""


class CheckpointNotFound(AnticipatedError, FileNotFoundError):
    """resume-from names no checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """The global model after ``round`` rounds, as ``save_checkpoint`` wrote it."""

    round: int
    model: dict[str, torch.Tensor]
    samples_trained: int
    path: Path
    model_name: str  # the architecture (run-config key 'model') the weights belong to
    dp_clipping_norm: float | None = None  # DP: the clipping norm of the next round
    settings: dict[str, Any] | None = None  # RESUME_KEYS of the run; None: older file
    privacy_ledger: dict | None = None  # DP: PrivacyLedger.state() after ``round``


def load_checkpoint(location: str) -> Checkpoint:
    """Read a checkpoint.pt, or the one in the run folder ``location`` names."""
    path = Path(location).expanduser().resolve()
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointNotFound(f"resume-from: no checkpoint at {path} (give a run folder "
                                 f"or its {CHECKPOINT_FILE}, as an absolute path)")
    try:
        saved = torch.load(path, weights_only=True)
        if not {"round", "model", "samples_trained"} <= set(saved):
            raise ValueError(f"keys {sorted(saved)}")
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise ConfigError(f"resume-from: {path} is not a readable fedcifar checkpoint "
                          f"({type(err).__name__}: {one_line(err)[:200]}); give the "
                          f"{CHECKPOINT_FILE} of a run, or start afresh") from err
    # Checkpoints written before the 'model' key existed hold the tutorial CNN.
    return Checkpoint(saved["round"], saved["model"], saved["samples_trained"], path,
                      saved.get("model_name", "tutorial-cnn"), saved.get("dp_clipping_norm"),
                      saved.get("settings"), saved.get("privacy_ledger"))


def resume_settings(config: RunConfig) -> dict[str, Any]:
    """The run-config values a checkpoint records and a resumed run must share: what
    the model's history and, with DP, the privacy spent depend on."""
    values = config.to_dict()
    keys = RESUME_KEYS + (DP_RESUME_KEYS if config.dp != "none" else ())
    return {key: values[key] for key in keys}


def resume_problems(checkpoint: Checkpoint, config: RunConfig) -> list[str]:
    """How ``config`` differs from the run that wrote ``checkpoint`` (empty: none)."""
    if checkpoint.settings is None:
        return ["it records no run settings (written by an older fedcifar): its privacy "
                "spent and strategy cannot be checked, start afresh"]
    wanted = resume_settings(config)
    keys = sorted(set(wanted) | set(checkpoint.settings))
    return [f"'{key}' was {checkpoint.settings.get(key, '(not set)')!r}, is "
            f"{wanted.get(key, '(not set)')!r}" for key in keys
            if checkpoint.settings.get(key) != wanted.get(key)]


def update_problem(reply: Message, global_arrays: ArrayRecord,
                   record_names: tuple[str, ...] = ("arrays",)) -> str | None:
    """Why a (non-error) training reply must not be aggregated, or None if it may.

    Each ArrayRecord in ``record_names`` must be a finite copy of the global model's
    layout, and the reply may hold no other ArrayRecord (Flower's aggregation fails
    the whole round on one that does)."""
    content = reply.content
    for name in record_names:
        if name not in content.array_records:
            return f"no ArrayRecord '{name}' in the reply"
    unexpected = sorted(set(content.array_records) - set(record_names))
    if unexpected:
        return f"unexpected ArrayRecords {unexpected}"
    problem = metrics_problem(reply)
    if problem is not None:
        return problem
    for name in record_names:
        problem = layout_problem(content.array_records[name], global_arrays)
        if problem is not None:
            return f"{name}: {problem}"
    return None


def metrics_problem(reply: Message) -> str | None:
    """Why a (non-error) reply's metrics cannot be aggregated (training or evaluation),
    or None if they can."""
    records = reply.content.metric_records
    if list(records) != ["metrics"]:
        return f"MetricRecords {sorted(records)}, expected exactly one, 'metrics'"
    examples = records["metrics"].get("num-examples")
    if not isinstance(examples, (int, float)) or not examples > 0:
        return f"'num-examples' must be a positive number, got {examples!r}"
    return None


def folded_evaluation(replies: list[Message]) -> dict[str, float]:
    """The evaluation metrics training replies carry (evaluate-in-train), averaged
    weighted by each node's number of validation examples, as Flower's evaluation is."""
    rows = [r.content["metrics"] for r in replies
            if FOLDED_EVALUATION_WEIGHT in r.content["metrics"]]
    total = sum(float(m[FOLDED_EVALUATION_WEIGHT]) for m in rows)
    if total == 0:
        return {}
    names = [k for k in rows[0] if k.startswith(FOLDED_EVALUATION_PREFIX)
             and k != FOLDED_EVALUATION_WEIGHT]
    return {name: sum(float(m[name]) * float(m[FOLDED_EVALUATION_WEIGHT]) for m in rows)
            / total for name in names}


def worker(reply: Message) -> dict[str, str]:
    """Where the node says it trained (its 'worker' ConfigRecord: host, Ray node)."""
    record = reply.content.config_records.get("worker")
    return {} if record is None else {k: str(v) for k, v in record.items()}


def metric_names(reply: Message) -> frozenset[str]:
    return frozenset(reply.content.metric_records["metrics"].keys())


def most_common_metric_names(replies: list[Message]) -> frozenset[str]:
    """The metric names most replies send (the first reply's set wins a tie)."""
    names = [metric_names(r) for r in replies]
    return max(names, key=names.count, default=frozenset())


def layout_problem(arrays: ArrayRecord, global_arrays: ArrayRecord) -> str | None:
    """How ``arrays`` differs from the global model's keys, shapes and dtypes, or holds
    NaN/Inf; None if it does not."""
    missing = sorted(set(global_arrays) - set(arrays))
    extra = sorted(set(arrays) - set(global_arrays))
    if missing or extra:
        return f"keys differ from the global model (missing {missing}, unexpected {extra})"
    for name, expected in global_arrays.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(expected.shape) or got.dtype != expected.dtype:
            return (f"'{name}' is {got.dtype}{list(got.shape)}, the global model has "
                    f"{expected.dtype}{list(expected.shape)}")
        values = got.numpy()
        if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
            return f"'{name}' holds NaN or Inf"
    return None


class SafeguardsMixin:
    """Mixed in before a Flower strategy class; see the module docstring."""

    recorder: RunRecorder
    local_epochs: int
    node_wait_timeout: float
    checkpoint_path: Path
    round_offset: int = 0  # rounds already done by the run this one resumes
    samples_trained: int = 0
    min_available_nodes: int
    evaluate_in_train: bool = False
    model_name: str = "tutorial-cnn"
    strategy_name: str = "fedavg"
    assumed_malicious: int = 0
    multikrum_keep: int = 0
    update_norm_bound: float = 0.0
    seed: int = 0
    resume_settings: dict[str, Any]  # what checkpoints record (see resume_settings)
    partitions: PartitionDirectory
    ledger: PrivacyLedger | None = None  # DP (see privacy), else None
    dp_clipping_norm: float = 0.0  # this round's C (adaptive clipping moves it)
    dp_clips_on_server: bool = True  # dp='server'; dp='client': the server checks C
    adaptive_clipping: AdaptiveClipping | None = None
    _expected_cohort: float = 0.0
    _update_noise_multiplier: float = 0.0
    _count_stddev: float = 0.0
    _global_arrays: ArrayRecord

    def resume_from(self, checkpoint: Checkpoint) -> None:
        """Number rounds and count samples on from where ``checkpoint`` stopped."""
        self.round_offset = checkpoint.round
        self.samples_trained = checkpoint.samples_trained
        if self.ledger is not None:  # resume_problems found the same mechanism
            self.ledger.continue_from(checkpoint.privacy_ledger)
            self.dp_clipping_norm = checkpoint.dp_clipping_norm  # where adaptive got to

    def wait_for_nodes(self, grid: Grid) -> list[int]:
        """The connected nodes, once at least min-available-nodes are; fail after the
        timeout. Callers use this one snapshot: a node that leaves after it is a failed
        node, whereas listing the nodes again could find too few, and Flower's sampling
        would then wait for them without end."""
        deadline = time.monotonic() + self.node_wait_timeout
        while (connected := len(node_ids := list(grid.get_node_ids()))) \
                < self.min_available_nodes:
            if time.monotonic() >= deadline:
                raise RunFailedError(
                    f"only {connected} of the {self.min_available_nodes} nodes the run needs "
                    f"(min-available-nodes) connected within {self.node_wait_timeout:g} s "
                    "(node-wait-timeout): start more SuperNodes or lower min-available-nodes")
            log(INFO, "Waiting for nodes: %d of %d connected", connected,
                self.min_available_nodes)
            time.sleep(1)
        return node_ids

    def meet_nodes(self, grid: Grid) -> None:
        """Before the run's first evaluation: wait for min-available-nodes and ask them
        which partitions they hold (nodes that join later are asked when first seen)."""
        self.partitions.ordered_connected(grid, self.wait_for_nodes(grid))

    def seeded_nodes(self, grid: Grid, run_round: int, phase: str) -> NodeList:
        """The connected nodes in partition order, with Flower's draw seeded for this
        round and phase: what the strategy's own sampling then picks from (in
        multiplexed mode, the virtual clients in partition order)."""
        if isinstance(grid, MultiplexingGrid):
            self.wait_for_nodes(grid.grid)
            nodes = NodeList(grid.get_node_ids())
        else:
            nodes = NodeList(self.partitions.ordered_connected(grid, self.wait_for_nodes(grid)))
        if phase == "train":  # as many as Flower's FedAvg.configure_train will sample
            sampled = max(int(len(nodes.node_ids) * self.fraction_train),  # type: ignore
                          self.min_train_nodes)  # type: ignore[attr-defined]
            problem = sample_size_problem(self.strategy_name, self.assumed_malicious, sampled)
            if problem is not None:
                raise RunFailedError(f"round {run_round}: {problem}")
        seed_draw(self.seed, run_round, phase)
        return nodes

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global_arrays = arrays
        run_round = server_round + self.round_offset
        nodes = self.seeded_nodes(grid, run_round, "train")
        if self.ledger is None:
            return super().configure_train(  # type: ignore[misc]
                run_round, arrays, config, nodes)
        return self._configure_private_round(run_round, arrays, config, nodes)

    def _configure_private_round(self, run_round: int, arrays: ArrayRecord,
                                 config: ConfigRecord, nodes: NodeList) -> list[Message]:
        """DP: stop before a round past the budget; sample a Poisson cohort and hand
        Flower's configure_train exactly those nodes."""
        ledger = self.ledger
        population = len(nodes.node_ids)
        if ledger.delta >= 1 / population:
            raise RunFailedError(
                f"'dp-delta' {ledger.delta:g} is not below 1 / {population} clients: such "
                "a delta allows releasing a client's data outright; lower dp-delta")
        ledger.check_next(run_round)
        self._expected_cohort = ledger.sampling_rate * population
        self._update_noise_multiplier = ledger.noise_multiplier
        if self.adaptive_clipping is not None:
            try:
                self._count_stddev, self._update_noise_multiplier = \
                    self.adaptive_clipping.noise(ledger.noise_multiplier, self._expected_cohort)
            except ValueError as err:
                raise RunFailedError(
                    f"adaptive clipping: 'dp-noise-multiplier' {ledger.noise_multiplier:g} "
                    f"needs 'dp-clipped-count-stddev' above {ledger.noise_multiplier / 2:g} "
                    f"(with {self._expected_cohort:g} clients expected per round): {err}"
                ) from err
        config["dp-clipping-norm"] = self.dp_clipping_norm  # what clients clip to
        cohort = poisson_cohort(nodes.node_ids, ledger.sampling_rate)
        if not cohort:  # the round still releases (noise only)
            return []
        # Flower samples int(n * fraction-train) of the nodes it is given once
        # min-available-nodes of them are there: here, all of the cohort at once.
        saved = self.fraction_train, self.min_available_nodes  # type: ignore[has-type]
        self.fraction_train, self.min_available_nodes = 1.0, 1
        try:
            return list(super().configure_train(  # type: ignore[misc]
                run_round, arrays, config, NodeList(cohort)))
        finally:
            self.fraction_train, self.min_available_nodes = saved

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord,
                           config: ConfigRecord, grid: Grid) -> Iterable[Message]:
        if self.evaluate_in_train:  # the training replies carry the evaluation
            return []
        run_round = server_round + self.round_offset
        return super().configure_evaluate(  # type: ignore[misc]
            run_round, arrays, config, self.seeded_nodes(grid, run_round, "evaluate"))

    def in_partition_order(self, replies: Iterable[Message]) -> list[Message]:
        """Replies in a fixed order: floating-point sums depend on the order of terms."""
        return sorted(replies, key=lambda r: self.partitions.sort_key(r.metadata.src_node_id))

    def record_phase(self, report: PhaseReport) -> None:
        """RecoveringGrid's account of a phase: replacements, timeouts, failed nodes."""
        if report.server_round is None:
            return
        phase = "train" if report.message_type == MessageType.TRAIN else "evaluate"
        self.recorder.record(report.server_round, save=False, **{
            f"{phase}_replacements": report.replacements,
            f"{phase}_timeouts": report.timeouts,
            f"{phase}_failed_nodes": [[node, why] for node, why in report.failures]})

    def aggregate_train(self, server_round: int, replies: Iterable[Message]) -> Any:
        server_round += self.round_offset
        replies = self.in_partition_order(replies)
        errors = [r for r in replies if r.has_error()]
        rejected = []

        def reject(reply: Message, problem: str) -> None:
            rejected.append(reply)
            log(WARNING, "Round %d: dropped the update of node %d: %s", server_round,
                reply.metadata.src_node_id, problem)

        # The ArrayRecords a training reply holds: the strategy's own (Scaffold) or Flower's.
        record_names = getattr(self, "reply_records", ("arrays",))
        candidates = []
        for reply in replies:
            if reply.has_error():
                continue
            problem = (update_problem(reply, self._global_arrays, record_names)
                       or self._clipping_problem(reply))
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
        # Counted per client: a multiplexed node's reply holds several (see multiplex).
        if not replies and self.ledger is not None:  # an empty Poisson cohort
            return self._private_release(server_round, None, 0, 0), MetricRecord()
        self.recorder.record(server_round, save=False,
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
                f"round {server_round}: none of the {len(replies)} training replies could be "
                f"aggregated ({len(errors)} failed, {len(rejected)} rejected); stopping "
                f"instead of carrying the old model forward{first_failure}")
        clipped = self._clip(server_round, usable)
        if self.strategy_name == "multikrum" and self.multikrum_keep == 0:
            self.num_nodes_to_select = max(len(usable) - self.assumed_malicious, 1)
        arrays, metrics = super().aggregate_train(  # type: ignore[misc]
            server_round, [*usable, *errors])
        if arrays is None:  # e.g. Bulyan, left with fewer than 4f + 3 updates
            raise RunFailedError(
                f"round {server_round}: strategy '{self.strategy_name}' could not aggregate "
                f"the {len(usable)} usable updates (see the warning above); stopping instead "
                "of carrying the old model forward")
        if self.ledger is not None:
            clients = sum(len(served(r)) for r in usable)
            arrays = self._private_release(server_round, arrays, clients, clients - clipped)
        self.samples_trained += self.local_epochs * sum(
            int(r.content["metrics"]["num-examples"]) for r in usable)
        # Summed, unlike the weighted mean in `train`: the round's compute in CPU-seconds.
        client_train_seconds = sum(train_seconds(r) for r in usable)
        train_metrics = {k: v for k, v in (metrics or {}).items()
                         if not k.startswith(FOLDED_EVALUATION_PREFIX)}
        self.recorder.record(server_round, save=False, train=train_metrics,
                             samples_trained=self.samples_trained,
                             client_train_seconds=round(client_train_seconds, 3))
        if self.evaluate_in_train:
            # The nodes evaluated the model they received: the previous round's.
            self.recorder.record(server_round - 1, timed=False, save=False,
                                 evaluate=folded_evaluation(usable),
                                 evaluate_replies=sum(len(served(r)) for r in usable))
        self.save_checkpoint(server_round, arrays)
        return arrays, MetricRecord(train_metrics)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> Any:
        server_round += self.round_offset
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
        metrics = super().aggregate_evaluate(server_round, usable)  # type: ignore[misc]
        if not usable:
            log(WARNING, "Round %d: no client evaluation succeeded", server_round)
        self.recorder.record(server_round, save=False, evaluate=dict(metrics or {}),
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

    def _clip(self, server_round: int, usable: list[Message]) -> int:
        """Clip the usable updates to the round's bound where the server clips, and
        record how many were longer (also those clipped on their node); return that."""
        if self.ledger is None:
            bound = self.update_norm_bound
            if bound == 0:
                return 0
        else:
            bound = self.dp_clipping_norm if self.dp_clips_on_server else 0.0
        # Multiplexed nodes clip each client's update before averaging them.
        single = [r for r in usable if not is_node_mean(r)]
        clipped = clipped_on_nodes(usable)
        if bound > 0:
            clipped += bound_update_norms(single, self._global_arrays, bound)
        else:  # dp='client': each client says whether it clipped
            clipped += sum(int(r.content["metrics"].get(DP_CLIPPED, 0)) for r in single)
        self.recorder.record(server_round, save=False, train_clipped=clipped)
        return clipped

    def _clipping_problem(self, reply: Message) -> str | None:
        """With dp='client': why an update is longer than the clipping norm, or None."""
        if self.ledger is None or self.dp_clips_on_server or is_node_mean(reply):
            return None
        norm = update_norm(reply.content["arrays"], self._global_arrays)
        if norm <= self.dp_clipping_norm * (1 + 1e-5):
            return None
        return (f"update norm {norm:.4g} exceeds this round's clipping norm "
                f"{self.dp_clipping_norm:.4g} (dp='client': clients clip)")

    def _private_release(self, server_round: int, mean: ArrayRecord | None,
                         clients: int, unclipped: int) -> ArrayRecord:
        """DP-FedAvg's release: the clipped updates' sum over the expected cohort, plus
        noise; with adaptive clipping, the next round's norm from the noised count of
        ``unclipped`` updates. The round's epsilon goes to the log and results.json."""
        ledger = self.ledger
        norm = self.dp_clipping_norm
        noise_std = compute_stdv(self._update_noise_multiplier, norm, self._expected_cohort)
        arrays = noised_update(self._global_arrays, mean, clients, self._expected_cohort,
                               noise_std)
        epsilon = ledger.spend(server_round)
        log(INFO, "Round %d: privacy spent so far epsilon=%.4f at delta=%g (%d clients, "
            "clipping norm %.4g, noise std %.3g)", server_round, epsilon, ledger.delta,
            clients, norm, noise_std)
        self.recorder.record(server_round, save=False, dp_epsilon=epsilon,
                             dp_delta=ledger.delta, dp_clients=clients,
                             dp_clipping_norm=norm, dp_noise_std=noise_std)
        if self.adaptive_clipping is not None:
            self.dp_clipping_norm, fraction = self.adaptive_clipping.next_norm(
                norm, unclipped, clients, self._expected_cohort, self._count_stddev)
            self.recorder.record(server_round, save=False, dp_unclipped_fraction=fraction)
        if mean is None:
            self.save_checkpoint(server_round, arrays)
        return arrays

    def save_checkpoint(self, server_round: int, arrays: ArrayRecord) -> None:
        # results.json first: a run resumed from this checkpoint takes its history from
        # there, so the history must reach the checkpoint's round whenever it exists.
        self.recorder.write()
        checkpoint = {"round": server_round, "model": arrays.to_torch_state_dict(),
                      "samples_trained": self.samples_trained, "model_name": self.model_name,
                      "settings": self.resume_settings}
        if self.ledger is not None:  # the spending so far and the next round's norm
            checkpoint["privacy_ledger"] = self.ledger.state()
            checkpoint["dp_clipping_norm"] = self.dp_clipping_norm
        atomic_write(self.checkpoint_path, lambda tmp: torch.save(checkpoint, tmp))

"""fedcifar ServerApp: the configured strategy, server-side evaluation, run outputs.

``run`` reads top to bottom as the seed's ServerApp grown up: the validated config (and
the checkpoint it resumes), the model and the test split, the strategy the extensions
registry composes, the rounds, the outputs. Failures the project anticipates end the
run in one line (see errors).
"""

from __future__ import annotations

import random
import time
from collections.abc import Iterable
from logging import INFO, WARNING
from pathlib import Path

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid, ServerApp

from fedcifar_app import extensions, task
from fedcifar_app.compat import (reported_in_one_line, shorten_object_pull_backoff,
                                 wake_simulation_engine)
from fedcifar_app.config import RunConfig
from fedcifar_app.data import load_split, plot_label_distribution
from fedcifar_app.node import partition_scheme
from fedcifar_app.results import PARTITIONS_PLOT_FILE, RunRecorder
from fedcifar_app.strategies import RecoveringGrid, RunEndsEarly
from fedcifar_app.strategies.checkpoint import checkpoint_to_resume, earlier_entries
from fedcifar_app.task import BatchLoader
from fedcifar_app.tracking import open_trackers
from fedcifar_app.tracking.progress import RoundProgress

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the configured strategy, evaluating the global model on the test split."""
    with reported_in_one_line():
        run(grid, context)


def run(grid: Grid, context: Context) -> None:
    config = RunConfig.from_mapping(context.run_config)
    checkpoint = checkpoint_to_resume(config, extensions.resume_keys(config))
    run_dir = config.output_root / f"flwr-run-{context.run_id}"
    log(INFO, "[fedcifar] outputs of this run: %s", run_dir)
    seed_everything(config.seed)
    device = task.resolve_device(config.device)
    net = task.build_model(config.model).to(device)
    log(INFO, "[fedcifar] model %s, server-side evaluation on %s", config.model, device)
    # The test split is decoded (or mapped from the cache) once, and goes to the device once.
    test_loader = BatchLoader(
        load_split(config.dataset, "test", config.cache_root).to(device), task.EVAL_BATCH_SIZE)
    run_config = config.to_dict()
    recorder = RunRecorder(run_dir, kind="federated", unit="round", run_config=run_config,
                           extra={"run_id": context.run_id},
                           tracker=open_trackers(config, run_dir, run_config,
                                                 warn=lambda line: log(WARNING, line)))
    progress = RoundProgress(config.num_server_rounds, "round",
                             "step" if config.strategy == "fedbuff" else "round")
    strategy = extensions.build_strategy(config, recorder)
    if checkpoint is not None:
        log(INFO, "[fedcifar] resuming after round %d from %s", checkpoint.round,
            checkpoint.path)
        net.load_state_dict(checkpoint.model)
        strategy.resume_from(checkpoint)
        recorder.extra["resumed_from"] = {"checkpoint": str(checkpoint.path),
                                          "round": checkpoint.round}
        recorder.restore(earlier_entries(checkpoint))

    def evaluate_global_model(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        run_round = server_round + strategy.round_offset
        # A resumed run's starting model was evaluated, and recorded, by the first run.
        if server_round == 0 and checkpoint is not None:
            return None
        if not config.is_evaluation_round(run_round):
            recorder.record(run_round, evaluated=False, save=False)
            log(INFO, progress.line(recorder.publish(run_round)))
            return None
        started = time.perf_counter()
        net.load_state_dict(arrays.to_torch_state_dict())
        loss, accuracy = task.test(net, test_loader)
        recorder.record(run_round, task.cpu_state_dict(net), evaluated=True, test_loss=loss,
                        test_accuracy=accuracy,
                        test_seconds=round(time.perf_counter() - started, 3), save=False)
        log(INFO, progress.line(recorder.publish(run_round)))
        return MetricRecord({"test-loss": loss, "test-accuracy": accuracy})

    # A reply seen before its arrays are all pushed should not cost Flower's 1 s backoff.
    shorten_object_pull_backoff()
    # In a simulation: its engine would look for this app's messages only every 0.1 s,
    # and the grid could only poll for the replies.
    wakeups = wake_simulation_engine()
    # Replaces nodes that fail mid-round, and pulls replies without Flower's 3 s pauses.
    recovering_grid = RecoveringGrid(grid, extensions.phase_retries(config),
                                     on_phase_end=strategy.record_phase,
                                     rng=random.Random(config.seed),
                                     replies=wakeups.replies if wakeups else None)
    try:
        strategy.meet_nodes(recovering_grid)
        final = extensions.run_rounds(
            recovering_grid, context, config, strategy, ArrayRecord(task.cpu_state_dict(net)),
            evaluate_global_model, config.num_server_rounds - strategy.round_offset)
    except RunEndsEarly as ended:  # a clean end: the model of the last round run
        log(INFO, "[fedcifar] %s", ended)
        recorder.extra["stopped"] = str(ended)
        final = strategy.latest_arrays()
    except Exception as err:
        recorder.extra["error"] = f"{type(err).__name__}: {err}"
        recorder.finish(None, status="failed")
        raise
    net.load_state_dict(final.to_torch_state_dict())
    # At the end: in simulation the nodes have cached the training split by now.
    plot_partitions(config, strategy.partitions.partition_of.values(),
                    run_dir / PARTITIONS_PLOT_FILE)
    recorder.finish(task.cpu_state_dict(net))
    log(INFO, "[fedcifar] best test accuracy %.4f (round %s)", recorder.best_accuracy,
        recorder.best_index)
    log(INFO, "[fedcifar] results, models and plot written to %s", run_dir)


def plot_partitions(config: RunConfig, partition_ids: Iterable[int | None], path: Path) -> None:
    """The label distribution of the nodes' partitions (multiplexed: of the virtual
    clients'), where this machine has the training split cached, as in simulation."""
    known = [partition for partition in partition_ids if partition is not None]
    count = config.virtual_clients or (max(known) + 1 if known else 0)
    if not (count and plot_label_distribution(config.dataset, config.cache_root,
                                              partition_scheme(config, count), path)):
        log(INFO, "[fedcifar] no %s: the nodes hold their own data, or this machine has "
            "no cached training split", path.name)


def seed_everything(seed: int) -> None:
    random.seed(seed)  # Flower samples nodes with the random module.
    np.random.seed(seed)
    torch.manual_seed(seed)

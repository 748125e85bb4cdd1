"""Attacks against defences, side by side: test accuracy of every (split, attack,
defence) cell with the same clients, rounds and seed.

    python benchmarks/robustness.py --dataset /abs/path/to/cifar10 [--rounds 10]
        [--splits iid dir0.5] [--attacks ...] [--defences ...]

20 simulated clients, all training one local epoch every round (the tutorial CNN,
batch 32, SGD lr 0.01 momentum 0.9), 20 % of them malicious (the same four
partitions in every cell: they are drawn from the seed). Defences: FedAvg (none),
FedMedian, FedTrimmedAvg (beta 0.2), MultiKrum and Bulyan (f = 4 assumed: the true
number), and FedAvg with update-norm bounding (--norm-bound, default 0.5: an honest
client's first-round update here has norm 0.36-0.43). Each cell is one run; the
score is the final test accuracy (and the best). ``--costs`` instead times each
defence's aggregation of one round's 20 updates, in this process. Runs go one at a time, are saved to
robustness.json under --out after each, and a cut-off run resumes from its
checkpoint, so the script can be restarted across work periods.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

from common import add_data_arguments, data_config, load, machine, run_resumable, save

CLIENTS = 20
MALICIOUS_FRACTION = 0.2
ASSUMED_MALICIOUS = round(CLIENTS * MALICIOUS_FRACTION)
COMMON = ("local-epochs=1 batch-size=32 learning-rate=0.01 momentum=0.9 fraction-train=1.0 "
          f"fraction-evaluate=0.0 validation-fraction=0.0 min-available-nodes={CLIENTS} "
          "seed=42")
SPLITS = {"iid": "partitioner='iid'",
          "dir0.5": "partitioner='dirichlet' dirichlet-alpha=0.5"}
ATTACKS = ("none", "label-flip", "sign-flip", "scale", "gaussian", "little-is-enough")
DEFENCES = {"fedavg": "strategy='fedavg'",
            "fedmedian": "strategy='fedmedian'",
            "fedtrimmedavg": "strategy='fedtrimmedavg' trimmed-beta=0.2",
            "multikrum": f"strategy='multikrum' num-malicious-nodes={ASSUMED_MALICIOUS}",
            "bulyan": f"strategy='bulyan' num-malicious-nodes={ASSUMED_MALICIOUS}",
            "norm-bound": "strategy='fedavg' update-norm-bound={bound}"}
FEDERATION = f"num-supernodes={CLIENTS} client-resources-num-cpus=1"


def attack_config(attack: str) -> str:
    return "" if attack == "none" else (f"attack='{attack}' "
                                        f"malicious-fraction={MALICIOUS_FRACTION}")


def record(cell: dict, run_dir: Path, wall: float) -> None:
    results = load(run_dir / "results.json")
    entries = results["entries"]
    round_s = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(entries, entries[1:])]
    cell.update(run_dir=str(run_dir), status=results["status"], error=results.get("error"),
                wall_s=cell.get("wall_s", 0) + wall, best=results["best"],
                final_accuracy=entries[-1].get("test_accuracy"),
                median_round_s=statistics.median(round_s) if round_s else None,
                accuracy_by_round=[e.get("test_accuracy") for e in entries])


def aggregation_seconds(defence: str, norm_bound: float, repeats: int = 5) -> float:
    """Seconds one round's aggregation of CLIENTS tutorial-CNN updates takes with
    ``defence`` (the safeguards' checks included), median of ``repeats``: the part of
    a round's time that depends on the defence."""
    import tempfile

    import torch
    from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

    from fedcifar_app import compat, task
    from fedcifar_app.config import RunConfig
    from fedcifar_app.extensions import build_strategy
    from fedcifar_app.results import RunRecorder

    # Flower's runtime says who is running before a Message is built; here: a ServerApp.
    compat.act_as_serverapp()
    start = task.Net().state_dict()
    generator = torch.Generator().manual_seed(0)
    times = []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            config = RunConfig.from_mapping({**compat.parse_run_config(
                DEFENCES[defence].format(bound=norm_bound)), "min-available-nodes": 1})
            strategy = build_strategy(config, RunRecorder(Path(folder), kind="federated",
                                                          unit="round", run_config={}))
            strategy._global_arrays = ArrayRecord(start)
            replies = []
            for node in range(CLIENTS):
                trained = {k: v + 0.002 * torch.randn(v.shape, generator=generator)
                           for k, v in start.items()}
                instruction = Message(RecordDict({"config": ConfigRecord()}),
                                      dst_node_id=node + 1, message_type="train")
                replies.append(Message(RecordDict({
                    "arrays": ArrayRecord(trained),
                    "metrics": MetricRecord({"num-examples": 2500, "train-loss": 1.0})}),
                    reply_to=instruction))
            started = time.perf_counter()
            strategy.aggregate_train(1, replies)
            times.append(time.perf_counter() - started)
    return statistics.median(times)


def table(report: dict, split: str) -> None:
    cells = report["cells"].get(split, {})
    defences = list(DEFENCES)
    print(f"\n{split}: final test accuracy % (rows: attack, columns: defence)")
    print(f"{'attack':<17}" + "".join(f"{d:>14}" for d in defences))
    for attack in ATTACKS:
        row = cells.get(attack, {})
        print(f"{attack:<17}" + "".join(_cell_text(row.get(d, {})) for d in defences))


def _cell_text(cell: dict) -> str:
    if cell.get("status") == "failed":
        return f"{'failed':>14}"
    value = cell.get("final_accuracy")
    return f"{100 * value:>14.2f}" if value is not None else f"{'-':>14}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS))
    parser.add_argument("--attacks", nargs="+", choices=ATTACKS, default=list(ATTACKS))
    parser.add_argument("--defences", nargs="+", choices=list(DEFENCES),
                        default=list(DEFENCES))
    parser.add_argument("--norm-bound", type=float, default=0.5,
                        help="update-norm-bound of the norm-bound defence (default 0.5)")
    parser.add_argument("--costs", action="store_true",
                        help="only measure each defence's aggregation time per round")
    args = parser.parse_args()
    out = args.out.resolve()
    report_path = out / "robustness.json"
    report = load(report_path) or {"machine": machine(), "common": COMMON,
                                   "rounds": args.rounds, "cells": {}}
    if args.costs:  # a file of its own: the cells' runs may be writing the report
        costs = {"machine": machine(), "clients": CLIENTS, "aggregation_seconds": {
            d: aggregation_seconds(d, args.norm_bound) for d in args.defences}}
        save(out / "robustness_costs.json", costs)
        for defence, seconds in costs["aggregation_seconds"].items():
            print(f"{defence:<14} {1000 * seconds:8.1f} ms per round")
        return
    for split in args.splits:
        for attack in args.attacks:
            for defence in args.defences:
                cell = report["cells"].setdefault(split, {}).setdefault(attack, {}) \
                    .setdefault(defence, {})
                # A failed run (e.g. training diverged under the attack) is a result too.
                if cell.get("status") in ("completed", "failed"):
                    continue
                run_root = out / "runs" / "robustness" / split / attack / defence
                config = (f"{data_config(args, run_root)} {COMMON} {SPLITS[split]} "
                          f"{attack_config(attack)} "
                          f"{DEFENCES[defence].format(bound=args.norm_bound)} "
                          f"num-server-rounds={args.rounds}")
                run_dir, wall = run_resumable(config, run_root, f"{split} {attack} {defence}",
                                              FEDERATION)
                record(cell, run_dir, wall)
                save(report_path, report)
    for split in args.splits:
        table(report, split)


if __name__ == "__main__":
    main()

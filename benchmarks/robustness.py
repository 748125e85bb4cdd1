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
score is the final test accuracy (and the best). Runs go one at a time, are saved to
robustness.json under --out after each, and a cut-off run resumes from its
checkpoint, so the script can be restarted across work periods.
"""

from __future__ import annotations

import argparse
import statistics
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
    cell.update(run_dir=str(run_dir), status=results["status"],
                wall_s=cell.get("wall_s", 0) + wall, best=results["best"],
                final_accuracy=entries[-1].get("test_accuracy"),
                median_round_s=statistics.median(round_s) if round_s else None,
                accuracy_by_round=[e.get("test_accuracy") for e in entries])


def table(report: dict, split: str) -> None:
    cells = report["cells"].get(split, {})
    defences = list(DEFENCES)
    print(f"\n{split}: final test accuracy % (rows: attack, columns: defence)")
    print(f"{'attack':<17}" + "".join(f"{d:>14}" for d in defences))
    for attack in ATTACKS:
        row = cells.get(attack, {})
        values = [row.get(d, {}).get("final_accuracy") for d in defences]
        print(f"{attack:<17}" + "".join(f"{100 * v:>14.2f}" if v is not None else f"{'-':>14}"
                                        for v in values))


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
    args = parser.parse_args()
    out = args.out.resolve()
    report_path = out / "robustness.json"
    report = load(report_path) or {"machine": machine(), "common": COMMON,
                                   "rounds": args.rounds, "cells": {}}
    for split in args.splits:
        for attack in args.attacks:
            for defence in args.defences:
                cell = report["cells"].setdefault(split, {}).setdefault(attack, {}) \
                    .setdefault(defence, {})
                if cell.get("status") == "completed":
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

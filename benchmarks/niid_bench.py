"""NIID-Bench CIFAR-10 reproduction (Li et al., "Federated Learning on Non-IID Data
Silos"; Flower's niid_bench baseline).

    python benchmarks/niid_bench.py --dataset /abs/path/to/cifar10 [--only NAME ...]

The setup of the paper: the tutorial CNN, 10 clients all sampled every round, 50
rounds of 10 local epochs, batch 64, SGD lr 0.01 momentum 0.9, random crop (4 px
padding) and horizontal flip; clients train on all their data (no validation
hold-out, so no client-side evaluation); the score is the best server-side test
accuracy over the rounds. Dirichlet splits use flwr-datasets' DirichletPartitioner
with NIID-Bench's minimum partition size of 10 and no self-balancing (NIID-Bench
resamples without limit; flwr-datasets gives up after 10 draws, which never happens
at alpha 0.5). "#C=2" is flwr-datasets' PathologicalPartitioner with 2 labels per
client, first label assigned deterministically as in the paper.

Each run takes ~500 CIFAR-10 epochs of compute. Runs go one at a time; progress
is saved in niid_bench.json under --out after every run, and a run that was cut
off (its run folder has a checkpoint but no "completed" status) is resumed from
its last round with ``resume-from``, so the script can be restarted across work
periods until every run is done.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from common import add_data_arguments, data_config, flwr_run, load, machine, save

COMMON = ("local-epochs=10 batch-size=64 learning-rate=0.01 "
          "momentum=0.9 augment=true fraction-train=1.0 fraction-evaluate=0.0 "
          "validation-fraction=0.0 min-available-nodes=10 dirichlet-min-partition-size=10 "
          "dirichlet-self-balancing=false seed=42")
RUNS = {
    "fedavg-iid": "strategy='fedavg' partitioner='iid'",
    "fedavg-dir0.5": "strategy='fedavg' partitioner='dirichlet' dirichlet-alpha=0.5",
    "fedavg-c2": "strategy='fedavg' partitioner='pathological' classes-per-partition=2",
    "fedprox-dir0.5": ("strategy='fedprox' fedprox-mu=0.01 partitioner='dirichlet' "
                       "dirichlet-alpha=0.5"),
    # Server momentum 0.5, not the 0.9 tuned for 1-epoch rounds: after 10 local epochs
    # a round already lands near the clients' optimum, and heavy server momentum then
    # overshoots it round after round.
    "fedavgm-dir0.5": ("strategy='fedavgm' fedavgm-server-lr=1.0 fedavgm-momentum=0.5 "
                       "partitioner='dirichlet' dirichlet-alpha=0.5"),
    "scaffold-dir0.5": "strategy='scaffold' partitioner='dirichlet' dirichlet-alpha=0.5",
}
PUBLISHED = {"fedavg-iid": 71.32, "fedavg-dir0.5": 62.47, "fedavg-c2": 51.17,
             "fedprox-dir0.5": 65.63, "scaffold-dir0.5": 68.08}
FEDERATION = "num-supernodes=10 client-resources-num-cpus=1"


def record(state: dict, run_dir: Path, wall: float) -> None:
    results = load(run_dir / "results.json")
    state.update(run_dir=str(run_dir), status=results["status"],
                 wall_s=state.get("wall_s", 0) + wall, best=results["best"],
                 accuracy_by_round=[e.get("test_accuracy") for e in results["entries"]])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--only", nargs="+", choices=list(RUNS), help="run only these")
    parser.add_argument("--rounds", type=int, default=50,
                        help="rounds per run (50 in the paper; fewer for a smoke test)")
    args = parser.parse_args()
    out = args.out.resolve()
    report_path = out / "niid_bench.json"
    report = load(report_path) or {"machine": machine(), "common": COMMON, "runs": {}}
    for name in args.only or RUNS:
        state = report["runs"].setdefault(name, {"config": RUNS[name]})
        if state.get("status") == "completed":
            continue
        # One output folder per run, so that a run cut off mid-way can be found again.
        run_root = out / "runs" / "niid-bench" / name
        config = (f"{data_config(args, run_root)} {COMMON} {RUNS[name]} "
                  f"num-server-rounds={args.rounds}")
        checkpoints = sorted(run_root.glob("flwr-run-*/checkpoint.pt"),
                             key=lambda p: p.stat().st_mtime)
        if checkpoints and load(checkpoints[-1].parent / "results.json").get(
                "status") == "completed":
            record(state, checkpoints[-1].parent, wall=0.0)
            save(report_path, report)
            continue
        if checkpoints:
            config += f" resume-from='{checkpoints[-1].parent}'"
            print(f"{name}: resuming from {checkpoints[-1].parent}", flush=True)
        else:
            print(f"{name}: starting", flush=True)
        wall, run_dir, _ = flwr_run(config, FEDERATION, timeout=6 * 3600)
        record(state, run_dir, wall)
        save(report_path, report)
    print(f"{'run':<16} {'best %':>7} {'round':>6} {'published %':>12} {'wall h':>7}")
    for name, state in report["runs"].items():
        best = state.get("best") or {}
        published = PUBLISHED.get(name)
        print(f"{name:<16} {100 * best.get('test_accuracy', float('nan')):>7.2f} "
              f"{best.get('round', '-'):>6} "
              f"{published if published else '-':>12} {state.get('wall_s', 0) / 3600:>7.2f}")


if __name__ == "__main__":
    main()

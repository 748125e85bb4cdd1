"""SecAgg+'s cost per round against plain FedAvg, at 3, 10 and 50 nodes.

    python benchmarks/secure_aggregation.py --dataset /abs/path/to/cifar10
        [--nodes 3 10 50] [--rounds 11] [--repeats 2]

For each number of nodes N: N simulated SuperNodes (one CPU each) hold IID shares of
the training set and train on a tenth of their share (``validation-fraction`` 0.9:
5,000 images a round in all, whatever N, so that the compute does not hide what the
protocol costs), all of them every round, one local epoch (the tutorial CNN, default
batch and learning rate), no client-side evaluation, the server tests only the final
model; with plain FedAvg and with ``secure-aggregation`` (SecAgg+: 3 shares,
reconstruction threshold 2, the defaults), alternately, --repeats times, so that the
machine's drift hits both alike. The difference is what SecAgg+ costs: its three extra
message phases (key setup, key shares, unmasking) and the masking and unmasking
arithmetic. Seconds per round: the median over rounds 2 to --rounds of all repeats
(the first round starts the Ray workers). Results go to secure_aggregation.json under
--out after each run; runs already there are skipped.
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

from common import add_data_arguments, data_config, flwr_run, load, machine, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 10, 50])
    parser.add_argument("--rounds", type=int, default=11)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    out = args.out.resolve()
    report_path = out / "secure_aggregation.json"
    report = load(report_path) or {"machine": machine(), "rounds": args.rounds, "runs": {}}
    for nodes in args.nodes:
        for repeat in range(1, args.repeats + 1):
            for secure in (False, True):
                name = f"{nodes} nodes, {'SecAgg+' if secure else 'plain'}, repeat {repeat}"
                if report["runs"].get(name, {}).get("status") == "completed":
                    continue
                report["runs"][name] = measure(args, out, name, nodes, secure)
                save(report_path, report)
                print(f"{name}: {report['runs'][name]['median_round_s']:.2f} s/round",
                      flush=True)
    print(f"\n{'nodes':>6}{'plain s/round':>15}{'SecAgg+ s/round':>17}{'cost s/round':>14}"
          f"{'accuracy plain / SecAgg+':>27}")
    for nodes in args.nodes:
        plain, secure = (summary(report, nodes, kind) for kind in ("plain", "SecAgg+"))
        if plain and secure:
            print(f"{nodes:>6}{plain['median_round_s']:>15.2f}{secure['median_round_s']:>17.2f}"
                  f"{secure['median_round_s'] - plain['median_round_s']:>14.2f}"
                  f"{100 * plain['accuracy']:>17.2f} / {100 * secure['accuracy']:.2f} %")


def measure(args: argparse.Namespace, out: Path, name: str, nodes: int, secure: bool) -> dict:
    settings = (f"partitioner='iid' validation-fraction=0.9 fraction-evaluate=0.0 "
                f"local-epochs=1 fraction-train=1.0 min-available-nodes={nodes} "
                f"num-server-rounds={args.rounds} evaluate-every={args.rounds} seed=42 "
                f"secure-aggregation={str(secure).lower()}")
    run_root = out / "runs" / "secure_aggregation" / name.replace(",", "").replace(" ", "-")
    print(f"{name}: starting", flush=True)
    _, run_dir, _ = flwr_run(f"{data_config(args, run_root)} {settings}",
                             f"num-supernodes={nodes} client-resources-num-cpus=1")
    results = load(run_dir / "results.json")
    entries = results["entries"]
    round_s = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(entries, entries[1:])]
    return {"nodes": nodes, "secure": secure, "status": results["status"],
            "run_dir": str(run_dir), "round_s": round_s,
            "median_round_s": statistics.median(round_s[1:]),
            "final_accuracy": entries[-1].get("test_accuracy"),
            "train_replies": [e.get("train_replies") for e in entries[1:]]}


def summary(report: dict, nodes: int, kind: str) -> dict | None:
    """Median seconds per round over the steady rounds of every repeat, and the mean
    final accuracy."""
    runs = [run for name, run in report["runs"].items()
            if name.startswith(f"{nodes} nodes, {kind},") and run["status"] == "completed"]
    if not runs:
        return None
    return {"median_round_s": statistics.median(s for run in runs for s in run["round_s"][1:]),
            "accuracy": statistics.mean(run["final_accuracy"] for run in runs)}


if __name__ == "__main__":
    main()

"""SecAgg+'s cost per round against plain FedAvg, at 3, 10 and 50 nodes.

    python benchmarks/secure_aggregation.py --dataset /abs/path/to/cifar10
        [--nodes 3 10 50] [--rounds 6]

For each number of nodes N: N simulated SuperNodes (one CPU each) hold IID shares of
the training set, all train every round (one local epoch, the tutorial CNN, default
batch and learning rate), no client-side evaluation, the server tests only the final
model; once with plain FedAvg, once with ``secure-aggregation`` (SecAgg+: 3 shares,
reconstruction threshold 2, the defaults). The compute per round is the same in both
(the whole training set, whatever N), so the difference is what SecAgg+ costs: its
three extra message phases (key setup, key shares, unmasking) and the masking and
unmasking arithmetic. Seconds per round are the median over rounds 2 to --rounds
(the first starts the Ray workers). Results go to secure_aggregation.json under --out
after each run; runs already there are skipped.
"""

from __future__ import annotations

import argparse
import statistics

from common import add_data_arguments, data_config, flwr_run, load, machine, save


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--nodes", type=int, nargs="+", default=[3, 10, 50])
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    out = args.out.resolve()
    report_path = out / "secure_aggregation.json"
    report = load(report_path) or {"machine": machine(), "rounds": args.rounds, "runs": {}}
    for nodes in args.nodes:
        for secure in (False, True):
            name = f"{nodes} nodes, {'SecAgg+' if secure else 'plain'}"
            if report["runs"].get(name, {}).get("status") == "completed":
                continue
            settings = (f"partitioner='iid' validation-fraction=0.0 fraction-evaluate=0.0 "
                        f"local-epochs=1 fraction-train=1.0 min-available-nodes={nodes} "
                        f"num-server-rounds={args.rounds} evaluate-every={args.rounds} "
                        f"seed=42 secure-aggregation={str(secure).lower()}")
            run_root = out / "runs" / "secure_aggregation" / name.replace(", ", "-").replace(
                " ", "-")
            print(f"{name}: starting", flush=True)
            _, run_dir, _ = flwr_run(f"{data_config(args, run_root)} {settings}",
                                     f"num-supernodes={nodes} client-resources-num-cpus=1")
            results = load(run_dir / "results.json")
            entries = results["entries"]
            round_s = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(entries, entries[1:])]
            report["runs"][name] = {
                "nodes": nodes, "secure": secure, "status": results["status"],
                "run_dir": str(run_dir), "round_s": round_s,
                "median_round_s": statistics.median(round_s[1:]),
                "final_accuracy": entries[-1].get("test_accuracy"),
                "train_replies": [e.get("train_replies") for e in entries[1:]]}
            save(report_path, report)
            print(f"{name}: {report['runs'][name]['median_round_s']:.2f} s/round", flush=True)
    print(f"\n{'nodes':>6}{'plain s/round':>15}{'SecAgg+ s/round':>17}{'cost':>9}")
    for nodes in args.nodes:
        plain = report["runs"].get(f"{nodes} nodes, plain", {}).get("median_round_s")
        secure = report["runs"].get(f"{nodes} nodes, SecAgg+", {}).get("median_round_s")
        if plain and secure:
            print(f"{nodes:>6}{plain:>15.2f}{secure:>17.2f}{secure / plain:>8.2f}x")


if __name__ == "__main__":
    main()

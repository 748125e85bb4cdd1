"""Scale: 10, 100 and 1,000 virtual clients in simulation.

    python benchmarks/scale.py --dataset /abs/path/to/cifar10 [--clients 10 100 1000]

Each size runs ``flwr run .`` with Dirichlet(0.3) label skew, 10 % of the clients
training (one local epoch) and 5 % evaluating per round, for --rounds rounds, and
reports seconds per round (median over rounds after the first), seconds per client
update, the cost per client task beyond its compute (round time less the clients'
own timing of their training, spread over the cores, and less the server's
test-set evaluation, divided by the round's train and evaluate tasks), and the peak
RSS of the whole process tree (SuperLink, simulation, Ray and its workers). flwr-datasets' Dirichlet
partitioner needs a smaller minimum partition size than its default 10 to split
50,000 images 1,000 ways at alpha 0.3: this uses 5. Results are saved after each
size to scale.json under --out, and sizes already there are skipped.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

from common import PeakRss, add_data_arguments, data_config, flwr_run, load, machine, save

from fedcifar_app.ops.local_simulation import managed_superlink_pids

TRAIN_FRACTION = 0.1
EVALUATE_FRACTION = 0.05
# One CPU per ClientApp (client-resources-num-cpus=1): one client per core at a time.
CONCURRENT_CLIENTS = os.cpu_count() or 1


def run_size(clients: int, args: argparse.Namespace, out: Path) -> dict:
    run_config = (f"{data_config(args, out / 'runs')} num-server-rounds={args.rounds} "
                  "partitioner='dirichlet' dirichlet-alpha=0.3 dirichlet-min-partition-size=5 "
                  f"fraction-train={TRAIN_FRACTION} fraction-evaluate={EVALUATE_FRACTION} "
                  f"local-epochs=1 min-available-nodes={clients}")
    with PeakRss(managed_superlink_pids) as rss:
        wall, run_dir, _ = flwr_run(
            run_config, f"num-supernodes={clients} client-resources-num-cpus=1")
    entries = load(run_dir / "results.json")["entries"]
    round_s = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(entries, entries[1:])]
    steady = statistics.median(round_s[1:])
    train_tasks = statistics.median(e["train_replies"] + e["train_failures"]
                                    for e in entries[1:])
    evaluate_tasks = statistics.median(e.get("evaluate_replies", 0)
                                       + e.get("evaluate_failures", 0) for e in entries[1:])
    samples_per_round = statistics.median(
        b["samples_trained"] - a.get("samples_trained", 0) for a, b in zip(entries, entries[1:]))
    # The clients time their own training; CONCURRENT_CLIENTS of them run at once.
    compute_s = statistics.median(e["client_train_seconds"] for e in entries[1:]) \
        / CONCURRENT_CLIENTS
    # Server-side evaluation of the test split happens once per round, not per task.
    server_eval_s = statistics.median(e.get("test_seconds", 0.0) for e in entries[1:])
    tasks = train_tasks + evaluate_tasks
    return {"clients": clients, "rounds": args.rounds, "wall_s": wall, "round_s": round_s,
            "steady_round_s": steady, "train_tasks_per_round": train_tasks,
            "evaluate_tasks_per_round": evaluate_tasks,
            "samples_per_round": samples_per_round,
            "s_per_client_update": steady / train_tasks,
            "compute_s_per_round": compute_s, "server_eval_s_per_round": server_eval_s,
            "overhead_ms_per_task": 1000 * (steady - compute_s - server_eval_s) / tasks,
            "peak_rss_gib": rss.peak / 2**30, "run_dir": str(run_dir)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    out = args.out.resolve()
    report = load(out / "scale.json") or {"machine": machine(), "command": " ".join(sys.argv),
                                          "sizes": {}}
    for clients in args.clients:
        if str(clients) in report["sizes"]:
            print(f"{clients} clients: done before, kept")
            continue
        print(f"{clients} clients ...", flush=True)
        report["sizes"][str(clients)] = run_size(clients, args, out)
        save(out / "scale.json", report)
    print(f"\n{'clients':>7} {'s/round':>8} {'tasks':>6} {'s/update':>9} "
          f"{'overhead ms/task':>17} {'peak RSS GiB':>13}")
    for size in report["sizes"].values():
        tasks = size["train_tasks_per_round"] + size["evaluate_tasks_per_round"]
        print(f"{size['clients']:>7} {size['steady_round_s']:>8.2f} {tasks:>6.0f} "
              f"{size['s_per_client_update']:>9.3f} {size['overhead_ms_per_task']:>17.1f} "
              f"{size['peak_rss_gib']:>13.2f}")
    print(f"written to {out / 'scale.json'}")


if __name__ == "__main__":
    main()

"""Time to accuracy of the default ``flwr run .``, over seeds.

    python benchmarks/time_to_accuracy.py --dataset /abs/path/to/cifar10 [--seeds 42 43 44]

Wall seconds from starting ``flwr run`` until the server-side test accuracy first
reaches 50, 55, 58 and 60 %, one run per seed. A round's time is when its
server-side evaluation was written (results.json ``elapsed_s``) plus the start-up
before the ServerApp's clock started. Each run is appended to
time_to_accuracy.json under --out; the summary gives, per level, the mean and
sample standard deviation over the runs that reached it (and how many did).
"""

from __future__ import annotations

import argparse
import statistics
import sys

from common import add_data_arguments, data_config, flwr_run, load, machine, save

THRESHOLDS = (0.50, 0.55, 0.58, 0.60)


def spread(values: list[float], unit: str) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.1f}{unit}"
    return f"{statistics.fmean(values):.1f} ± {statistics.stdev(values):.1f}{unit}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44],
                        help="one run per seed")
    parser.add_argument("--run-config", default="", help="extra --run-config overrides")
    args = parser.parse_args()
    out = args.out.resolve()
    report = load(out / "time_to_accuracy.json") or {
        "machine": machine(), "command": " ".join(sys.argv), "runs": []}
    for seed in args.seeds:
        wall, run_dir, _ = flwr_run(
            f"{data_config(args, out / 'runs')} {args.run_config} seed={seed}")
        results = load(run_dir / "results.json")
        startup = wall - results["elapsed_s"]
        reached = {}
        for threshold in THRESHOLDS:
            first = next((e for e in results["entries"]
                          if e.get("test_accuracy", 0) >= threshold), None)
            reached[f"{threshold:.0%}"] = (None if first is None else
                                           {"round": first["round"],
                                            "wall_s": round(startup + first["elapsed_s"], 1)})
        report["runs"].append({"seed": seed, "wall_s": wall, "run_dir": str(run_dir),
                               "reached": reached, "best_accuracy": results["best"],
                               "final_accuracy": results["entries"][-1]["test_accuracy"]})
        save(out / "time_to_accuracy.json", report)
    runs = report["runs"]
    print(f"{'level':>6} {'reached':>8} {'wall s':>16} {'round':>12}")
    for level in runs[0]["reached"]:
        hits = [run["reached"][level] for run in runs if run["reached"][level]]
        print(f"{level:>6} {len(hits):>4}/{len(runs):<3} "
              f"{spread([h['wall_s'] for h in hits], ' s'):>16} "
              f"{spread([h['round'] for h in hits], ''):>12}")
    print(f"total wall {spread([run['wall_s'] for run in runs], ' s')}, final accuracy "
          f"{spread([100 * run['final_accuracy'] for run in runs], ' %')}")


if __name__ == "__main__":
    main()

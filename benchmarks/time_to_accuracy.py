"""Time to accuracy of the default ``flwr run .``.

    python benchmarks/time_to_accuracy.py --dataset /abs/path/to/cifar10 [--repeats 2]

Wall seconds from starting ``flwr run`` until the server-side test accuracy first
reaches 50, 55, 58 and 60 %. A round's time is when its server-side evaluation was
written (results.json ``elapsed_s``) plus the start-up before the ServerApp's
clock started. Appends each repeat to time_to_accuracy.json under --out.
"""

from __future__ import annotations

import argparse
import sys

from common import add_data_arguments, data_config, flwr_run, load, machine, save

THRESHOLDS = (0.50, 0.55, 0.58, 0.60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--run-config", default="", help="extra --run-config overrides")
    args = parser.parse_args()
    out = args.out.resolve()
    report = load(out / "time_to_accuracy.json") or {
        "machine": machine(), "command": " ".join(sys.argv), "runs": []}
    for _ in range(args.repeats):
        wall, run_dir, _ = flwr_run(f"{data_config(args, out / 'runs')} {args.run_config}")
        results = load(run_dir / "results.json")
        startup = wall - results["elapsed_s"]
        reached = {}
        for threshold in THRESHOLDS:
            first = next((e for e in results["entries"]
                          if e.get("test_accuracy", 0) >= threshold), None)
            reached[f"{threshold:.0%}"] = (None if first is None else
                                           {"round": first["round"],
                                            "wall_s": round(startup + first["elapsed_s"], 1)})
        report["runs"].append({"wall_s": wall, "run_dir": str(run_dir), "reached": reached,
                               "final_accuracy": results["entries"][-1]["test_accuracy"]})
        save(out / "time_to_accuracy.json", report)
    print(f"{'run':>4} " + " ".join(f"{label:>14}" for label in report["runs"][0]["reached"])
          + f" {'wall s':>8}")
    for i, run in enumerate(report["runs"], 1):
        cells = [f"{r['wall_s']:>6.1f} s (r{r['round']:>2})" if r else f"{'not reached':>14}"
                 for r in run["reached"].values()]
        print(f"{i:>4} " + " ".join(cells) + f" {run['wall_s']:>8.1f}")


if __name__ == "__main__":
    main()

"""Compare runs: ``python -m fedcifar_app.compare RUN [RUN ...] [-o compare.png]``.

Each RUN is a run folder or its results.json, federated or centralized. Prints
a table (best and final test accuracy, wall time) and plots, on one figure, test
accuracy against training samples seen, in CIFAR-10 epochs (50,000 samples), so that
rounds and epochs line up by the amount of data each run trained on, and against
time (simulated seconds for runs on a simulated clock).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from fedcifar_app.results import load_results, plot_runs


def describe(run: dict) -> str:
    config = run["run_config"]
    if run["kind"] == "centralized":
        return "centralized"
    split = config["partitioner"]
    if split == "dirichlet":
        split += f"({config['dirichlet-alpha']})"
    elif split == "pathological":
        split += f"({config['classes-per-partition']} classes)"
    return f"{config['strategy']} {split}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcifar_app.compare",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or results.json")
    parser.add_argument("-o", "--output", type=Path, default=Path("compare.png"),
                        help="PNG to write (default compare.png)")
    args = parser.parse_args(argv)
    try:
        runs = [load_results(path) for path in args.runs]
    except (OSError, ValueError) as err:
        parser.error(f"cannot read results: {err}")
    labels = [describe(run) for run in runs]
    print(f"{'run':<32} {'best acc':>9} {'final acc':>9} {'wall s':>8}  folder")
    for path, run, label in zip(args.runs, runs, labels):
        accuracies = [e["test_accuracy"] for e in run["entries"] if "test_accuracy" in e]
        best = max(accuracies, default=float("nan"))
        final = accuracies[-1] if accuracies else float("nan")
        print(f"{label:<32} {100 * best:>8.2f}% {100 * final:>8.2f}% "
              f"{run['elapsed_s']:>8.1f}  {path}")
    plot_runs(runs, args.output.resolve(), labels=labels)
    print(f"plot written to {args.output.resolve()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

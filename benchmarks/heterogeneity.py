"""Stragglers on the simulated clock: synchronous FedAvg, over-selection and FedBuff.

    python benchmarks/heterogeneity.py --dataset /abs/path/to/cifar10
        [--seeds 42 43 44] [--splits iid dirichlet] [--methods sync over-selection fedbuff]

100 simulated clients of 500 CIFAR-10 training images each (no validation hold-out, no
client-side evaluation), a quarter of them stragglers computing 5-10x slower
(``devices='drawn' straggler-fraction=0.25``: compute and links log-normal, sigma 0.5,
around 2 ms per sample, a phone-class device, and 20 Mbit/s, so that a round's compute,
2 s for 2 epochs of 500 images, outweighs the 0.2 s the model takes down and up, and a
straggler's round is 5-10x longer), split IID or Dirichlet(0.5) over labels.
Every method aggregates 10 updates at a time (``--clients`` and ``--rounds`` change the
federation's size and every method's aggregations, for trials):

* ``sync``: FedAvg, 10 clients per round, each round waiting for all 10; 150 rounds;
* ``over-selection``: 13 clients sampled, the first 10 updates to arrive kept; 300
  rounds;
* ``fedbuff``: 20 clients training at once, a server step every 10 updates
  (staleness weight 1/sqrt(1 + tau), server learning rate 1); 300 steps.

The synchronous rounds wait for stragglers, so 150 of them take more simulated time
than 300 aggregations of either of the others (which reach 60 % after more than 150).

Per (method, split, seed) one run, appended to heterogeneity.json under --out as it
finishes; a run cut off resumes from its last round or step (``resume-from``), so the
script can be restarted until every run is done. The summary gives, per method and
split, the mean ± sample std over seeds of the simulated seconds, the real seconds and
the client updates until the server's test accuracy first reached 55 and 60 %, and the
final accuracy; ``benchmarks/figures.py`` draws accuracy against simulated time and
against updates (docs/figures/heterogeneity.png).
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from common import (add_data_arguments, data_config, load, machine, run_resumable, save,
                    superlink_of_this_checkout)

CLIENTS = 100
STRAGGLER_FRACTION = 0.25
COMMON = ("local-epochs=2 fraction-evaluate=0.0 validation-fraction=0.0 devices='drawn' "
          f"device-seconds-per-sample=0.002 straggler-fraction={STRAGGLER_FRACTION} "
          "straggler-slowdown-min=5.0 straggler-slowdown-max=10.0")
METHODS = {
    "sync": "strategy='fedavg' fraction-train=0.1",
    "over-selection": "strategy='fedavg' fraction-train=0.13 over-selection-keep=10",
    "fedbuff": "strategy='fedbuff' fedbuff-concurrency=20 fedbuff-buffer-size=10",
}
AGGREGATIONS = {"sync": 150, "over-selection": 300, "fedbuff": 300}
SPLITS = {"iid": "partitioner='iid'",
          "dirichlet": "partitioner='dirichlet' dirichlet-alpha=0.5"}
THRESHOLDS = (0.55, 0.60)


def curve(results: dict) -> list[dict]:
    """Per evaluated round or step: simulated and real seconds, updates so far, accuracy."""
    points, updates = [], 0
    for entry in results["entries"]:
        updates += entry.get("train_replies", 0)
        if entry.get("test_accuracy") is not None:
            points.append({"aggregations": entry["round"], "updates": updates,
                           "simulated_s": entry.get("simulated_seconds", 0.0),
                           "real_s": entry["elapsed_s"], "accuracy": entry["test_accuracy"]})
    return points


def stragglers(seed: int, clients: int) -> set[int]:
    """The straggling clients of ``seed``'s draw: the same draw without the spread
    leaves only their slowdown."""
    from fedcifar_app.extensions.heterogeneity.devices import drawn_devices

    devices = drawn_devices(clients, seed, 1.0, 1.0, 0.0, STRAGGLER_FRACTION, (5.0, 10.0))
    return {client for client, device in enumerate(devices) if device.seconds_per_sample > 1}


def straggler_share(results: dict, seed: int) -> float:
    """The stragglers' share of the updates a run aggregated (a quarter of the clients)."""
    used = [job["client"] for entry in results["entries"] for job in entry.get("jobs", ())
            if job["outcome"] == "used"]
    slow = stragglers(seed, results["run_config"]["min-available-nodes"])
    return sum(client in slow for client in used) / len(used)


def reached(points: list[dict], threshold: float) -> dict | None:
    return next((p for p in points if p["accuracy"] >= threshold), None)


def spread(values: list[float], digits: int = 0) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.fmean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def summary(report: dict) -> list[str]:
    lines = ["| recipe | split | method | runs | " + " | ".join(
        f"sim. s to {t:.0%} | real s to {t:.0%} | updates to {t:.0%}" for t in THRESHOLDS)
        + " | best acc. % | final acc. % | stragglers' share of updates |",
        "|" + "---|" * (7 + 3 * len(THRESHOLDS))]
    for augment in (False, True):
        for split in SPLITS:
            for method in METHODS:
                runs = [r for r in report["runs"].values()
                        if (r.get("augment", False), r["split"], r["method"], r["status"])
                        == (augment, split, method, "completed")]
                if runs:
                    lines.append(f"| {'augmented' if augment else 'default'} | {split} | "
                                 f"{method} | {len(runs)} | " + " | ".join(row(runs)) + " |")
    return lines


def row(runs: list[dict]) -> list[str]:
    """The summary's cells for one method's runs (mean ± std over seeds)."""
    cells = []
    for threshold in THRESHOLDS:
        hits = [p for r in runs if (p := reached(r["curve"], threshold))]
        suffix = f" ({len(hits)}/{len(runs)})" if len(hits) < len(runs) else ""
        cells += [spread([p["simulated_s"] for p in hits]) + suffix,
                  spread([p["real_s"] for p in hits]), spread([p["updates"] for p in hits])]
    cells.append(spread([100 * max(p["accuracy"] for p in r["curve"]) for r in runs], 2))
    cells.append(spread([100 * r["curve"][-1]["accuracy"] for r in runs], 2))
    cells.append(spread([100 * r["straggler_share"] for r in runs if "straggler_share" in r],
                        1) + " %")
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--splits", nargs="+", choices=list(SPLITS), default=list(SPLITS))
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--clients", type=int, default=CLIENTS)
    parser.add_argument("--rounds", type=int, default=0,
                        help="aggregations of every method (default: "
                        + ", ".join(f"{m} {n}" for m, n in AGGREGATIONS.items()) + ")")
    parser.add_argument("--augment", action="store_true",
                        help="clients train with random crops and flips (runs named aug-...)")
    args = parser.parse_args()
    out = args.out.resolve()
    path = out / "heterogeneity.json"
    report = load(path) or {"machine": machine(), "command": " ".join(sys.argv), "runs": {}}
    for run in report["runs"].values():  # runs recorded before the share was
        if run["status"] == "completed" and "straggler_share" not in run:
            run["straggler_share"] = straggler_share(
                load(Path(run["run_dir"]) / "results.json"), run["seed"])
    superlink_of_this_checkout()
    # Seed by seed, so that an interrupted benchmark has every method of a split to compare.
    for seed in args.seeds:
        for split in args.splits:
            for method in args.methods:
                name = f"{'aug-' if args.augment else ''}{split}-{method}-{seed}"
                if report["runs"].get(name, {}).get("status") == "completed":
                    continue
                run_config = (f"{COMMON} {SPLITS[split]} {METHODS[method]} seed={seed} "
                              f"num-server-rounds={args.rounds or AGGREGATIONS[method]} "
                              f"min-available-nodes={args.clients} "
                              f"augment={str(args.augment).lower()} "
                              f"{data_config(args, out / 'heterogeneity' / name)}")
                run_dir, wall = run_resumable(run_config, out / "heterogeneity" / name, name,
                                              f"num-supernodes={args.clients} "
                                              "client-resources-num-cpus=1")
                results = load(run_dir / "results.json")
                earlier = report["runs"].get(name, {}).get("wall_s", 0.0)
                report["runs"][name] = {
                    "split": split, "method": method, "seed": seed, "augment": args.augment,
                    "run_dir": str(run_dir),
                    "status": results["status"], "wall_s": earlier + wall,
                    "curve": curve(results),
                    "straggler_share": straggler_share(results, seed)}
                save(path, report)
                print(f"{name}: {wall:.0f} s, final accuracy "
                      f"{results['entries'][-1].get('test_accuracy')}", flush=True)
    print("\n".join(summary(report)))


if __name__ == "__main__":
    main()

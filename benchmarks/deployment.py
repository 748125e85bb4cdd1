"""Deployment against simulation: the same run config, side by side in one run.

    python benchmarks/deployment.py --dataset /abs/path/to/cifar10 [--nodes 3] [--rounds 5]
        [--run-config "evaluate-in-train=true"] [--deployments cold-stock warm-stock warm-fast]
        [--node-data partitions|folders]

Runs the default config for --rounds rounds (plus --run-config) as a real loopback
deployment (``fedcifar_app.ops.federation up --nodes N --tls --auth``: one SuperLink, N
SuperNodes with one torch thread each), each right after a simulation of the same config
with --nodes virtual SuperNodes (one CPU each), in up to three ways:
``cold-stock``, as Flower runs it (a fresh flwr-clientapp process per message and
``flower-supernode`` with its 3 s pause after an empty pull: ``--cold-clientapps
--stock-supernodes``); ``warm-stock``, with ClientApps forked from the warm server;
``warm-fast``, with warm ClientApps and ``fedcifar_app.ops.fast_supernode`` (the
launcher's default). With ``--node-data partitions`` (the default) the nodes serve the
simulation's partitions (``partition-id``/``num-partitions``), so a deployment samples
and trains the same partitions in the same order as the simulation and their
accuracies can be compared directly; with ``folders`` each node holds its own split of
the data set (``--data``), as real sites do. No round pays for decoding: the
simulation decodes the partitions first, and the folders are decoded before their run.
Reports the steady seconds per round (median of rounds 2 on) of each, each deployment's
ratio to the simulation run just before it (this machine's speed drifts over minutes),
test accuracy after the last round, and (with cold-stock) where a round of Flower's
defaults goes: the clients' training, the server's test-set evaluation, the start of a
ClientApp process per phase (Python, flwr-clientapp and app imports, measured here), and
the rest (messaging, the SuperNode's pauses).
Results go to deployment.json under --out.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import ROOT, add_data_arguments, data_config, flwr_run, load, machine, save

from fedcifar_app.ops import federation
from fedcifar_app.config import RunConfig
from fedcifar_app.data import load_node_data


def round_times(run_dir: Path) -> dict:
    results = load(run_dir / "results.json")
    entries = results["entries"]
    round_s = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(entries, entries[1:])]
    return {"round_s": round_s, "steady_round_s": statistics.median(round_s[1:]),
            "final_accuracy": entries[-1]["test_accuracy"],
            "client_train_s": statistics.median(e["client_train_seconds"]
                                                for e in entries[1:]),
            "server_eval_s": statistics.median(e["test_seconds"] for e in entries[1:]
                                               if "test_seconds" in e),
            "status": results["status"], "run_dir": str(run_dir)}


def clientapp_start_s(repeats: int = 3) -> float:
    """Seconds for a fresh Python process to import flwr-clientapp and the app."""
    command = [sys.executable, "-c",
               "import flwr.supernode.cli.flwr_clientapp, fedcifar_app.client_app"]
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=ROOT)
        times.append(time.perf_counter() - started)
    return statistics.median(times)


# --deployments choice: (warm ClientApps, fast SuperNodes)
DEPLOYMENTS = {"cold-stock": (False, False), "warm-stock": (True, False),
               "warm-fast": (True, True)}
COLD = "cold-stock"


def deployment_name(choice: str) -> str:
    return f"deployment ({choice.replace('-', ', ')})"


def run_deployment(args: argparse.Namespace, run_config: str, warm: bool, fast: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="fedcifar-bench-flwr-") as home:
        # The launcher and flwr read it; the simulations before and after use the caller's.
        callers_home = os.environ.get("FLWR_HOME")
        os.environ["FLWR_HOME"] = home
        folders = Path(args.dataset).resolve() if args.node_data == "folders" else None
        started = federation.up(args.nodes, tls=True, auth=True, data=folders,
                                warm_clientapps=warm, fast_supernodes=fast)
        try:
            config = RunConfig.from_mapping({})
            for folder in started.node_data:  # decode now, not inside a round
                load_node_data(folder, Path(args.cache_dir).expanduser().resolve(),
                               config.validation_fraction, config.seed)
            wall, run_dir, _ = flwr_run(run_config, connection=started.name)
        finally:
            federation.down(started.name)
            if callers_home is None:
                del os.environ["FLWR_HOME"]
            else:
                os.environ["FLWR_HOME"] = callers_home
    return {"wall_s": wall, **round_times(run_dir)}


def breakdown(cold: dict) -> dict[str, float]:
    """Where a deployment round of Flower's defaults goes, in seconds (medians)."""
    config = RunConfig.from_mapping(load(Path(cold["run_dir"]) / "results.json")["run_config"])
    phases = 1 if config.evaluate_in_train or config.fraction_evaluate == 0 else 2
    start_s = phases * clientapp_start_s()
    return {"client training": cold["client_train_s"],
            "server test-set evaluation": cold["server_eval_s"],
            f"ClientApp process start and imports ({phases} per round)": start_s,
            "messaging and polling (the rest)": cold["steady_round_s"]
            - cold["client_train_s"] - cold["server_eval_s"] - start_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_data_arguments(parser)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--deployments", nargs="+", choices=list(DEPLOYMENTS),
                        default=list(DEPLOYMENTS), help="which deployments to run "
                        "(default all; the breakdown needs cold-stock)")
    parser.add_argument("--node-data", choices=["partitions", "folders"], default="partitions",
                        help="nodes serve the simulation's partitions (default) or hold "
                        "their own data folders")
    parser.add_argument("--run-config", default="",
                        help="extra run-config overrides for both runs")
    args = parser.parse_args()
    out = args.out.resolve()
    run_config = (f"{data_config(args, out / 'runs')} num-server-rounds={args.rounds} "
                  f"min-available-nodes={args.nodes} {args.run_config}").strip()

    # This machine's speed drifts by tens of percent over minutes: each deployment is
    # compared with a simulation run just before it, not with one at the start.
    runs, ratio = {}, {}
    for choice in args.deployments:
        print(f"simulation (before {choice}) ...", flush=True)
        wall, run_dir, _ = flwr_run(
            run_config, f"num-supernodes={args.nodes} client-resources-num-cpus=1")
        simulation = runs[f"simulation (before {choice})"] = {"wall_s": wall,
                                                            **round_times(run_dir)}
        name, (warm, fast) = deployment_name(choice), DEPLOYMENTS[choice]
        print(f"{name} ...", flush=True)
        deployment = runs[name] = run_deployment(args, run_config, warm, fast)
        ratio[name] = deployment["steady_round_s"] / simulation["steady_round_s"]
    report = {"machine": machine(), "command": " ".join(sys.argv), "run_config": run_config,
              "node_data": args.node_data, "runs": runs, "ratio": ratio}
    if COLD in args.deployments:
        report["cold_deployment_breakdown_s"] = breakdown(runs[deployment_name(COLD)])
    save(out / "deployment.json", report)
    for name, run in runs.items():
        print(f"{name:>36}: {run['steady_round_s']:.2f} s/round (rounds "
              f"{', '.join(f'{s:.1f}' for s in run['round_s'])}), "
              f"accuracy {100 * run['final_accuracy']:.2f} %, wall {run['wall_s']:.1f} s")
    for name, deployment_ratio in ratio.items():
        print(f"ratio {name} / the simulation before it: {deployment_ratio:.2f}")
    if "cold_deployment_breakdown_s" in report:
        print("a cold deployment round:")
        for part, seconds in report["cold_deployment_breakdown_s"].items():
            print(f"  {part}: {seconds:.2f} s")
    print(f"written to {out / 'deployment.json'}")


if __name__ == "__main__":
    main()

"""Stragglers in a real deployment: synchronous FedAvg against FedBuff, in wall-clock time.

    sudo python benchmarks/heterogeneity_deployment.py --dataset /abs/path/to/cifar10
        [--nodes 5] [--rate 256kbit] [--node-cpus 0.35] [--weak-cpus 0.15]
        [--pause-seconds 120]

docs/deployment.md's federation in network namespaces (fedcifar_app/ops/netns.py):
a SuperLink behind the Fleet-only proxy and ``--nodes`` SuperNodes, each holding its own
IID share of CIFAR-10's training split. Each SuperNode, with every ClientApp it starts,
is held to a CPU quota (cgroups, fedcifar_app/ops/cpu_quota.py) so that it computes at a
speed of its own, as a device on its own would, instead of taking what the others leave
of the machine's cores: ``--node-cpus`` each, and node 0 is a weak device, with
``--weak-cpus`` and its uplink throttled with a tc token bucket (``--rate``). Node 1 is
SIGSTOPped as soon as it trains in each run and resumed ``--pause-seconds`` later. The
SuperLink and the ServerApp (which tests the model) are not held. On that federation,
one after the other:

* ``sync``: FedAvg, every node sampled each round, SYNC_ROUNDS rounds (a round waits for
  the paused node until it resumes, or is seen offline: ``round-timeout`` is 300 s);
* ``fedbuff``: every node training at once, a server step every FEDBUFF_BUFFER updates,
  as many steps as give the same number of updates as the synchronous rounds at most.

Each run's curve (wall seconds since its ServerApp started, updates so far, test
accuracy) goes to heterogeneity_deployment.json under --out as it finishes. Needs root
and the tools fedcifar_app/ops/netns.py lists.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import machine, save
from heterogeneity import curve, reached

from fedcifar_app.ops import netns
from fedcifar_app.ops.cpu_quota import CpuQuota
from fedcifar_app.ops.federation import split_node_data
from fedcifar_app.ops.local_simulation import signal_process_tree
from fedcifar_app.results import load_results

SYNC_ROUNDS = 6
FEDBUFF_BUFFER = 3
# A job (a ClientApp's start, 10,000 images for 5 nodes on 2 cores, the upload) takes
# about a minute here; a node keeps working on a timed-out job, so a timeout much
# shorter than that cascades into the next round.
COMMON = ("local-epochs=1 fraction-evaluate=0.0 validation-fraction=0.0 "
          "min-available-nodes=3 round-retries=0 round-timeout=300.0")
THRESHOLDS = (0.40, 0.45, 0.50)


def methods(nodes: int) -> dict[str, str]:
    steps = SYNC_ROUNDS * nodes // FEDBUFF_BUFFER
    return {
        "sync": f"strategy='fedavg' fraction-train=1.0 num-server-rounds={SYNC_ROUNDS}",
        "fedbuff": (f"strategy='fedbuff' fedbuff-concurrency={nodes} "
                    f"fedbuff-buffer-size={FEDBUFF_BUFFER} num-server-rounds={steps}"),
    }


def pause_while_training(network: netns.Network, out: Path, pid: int, seconds: float,
                         done: threading.Event) -> None:
    """SIGSTOP node 1's SuperNode once it trains (a ClientApp runs after the run's first
    evaluation: before, it may be answering the server's question about its data);
    SIGCONT it ``seconds`` later."""
    while not done.is_set() and not (list(out.glob("flwr-run-*/results.json"))
                                     and network.training_on("node1")):
        time.sleep(0.5)
    if done.is_set():
        return
    signal_process_tree(pid, signal.SIGSTOP)
    print(f"node 1 paused for {seconds:g} s", flush=True)
    done.wait(seconds)
    signal_process_tree(pid, signal.SIGCONT)


def run_method(federation: netns.Federation, network: netns.Network, run_config: str,
               out: Path, pause_seconds: float) -> tuple[Path, float]:
    started = time.monotonic()
    run = federation.run(f"{run_config} output-dir='{out}'")
    done = threading.Event()
    pauser = threading.Thread(target=pause_while_training, args=(
        network, out, federation.supernode_pids[1], pause_seconds, done), daemon=True)
    pauser.start()
    try:
        output, _ = run.communicate(timeout=3600)
    finally:
        done.set()
        pauser.join()
        run.kill()
    wall = time.monotonic() - started
    (run_dir,) = out.glob("flwr-run-*")
    if load_results(run_dir)["status"] != "completed":
        raise RuntimeError(f"the run did not complete:\n{output[-3000:]}")
    return run_dir, wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--nodes", type=int, default=5)
    parser.add_argument("--rate", default="256kbit", help="node 0's uplink (tc tbf rate)")
    parser.add_argument("--node-cpus", type=float, default=0.35,
                        help="every other node's CPU quota (cgroups), in CPUs")
    parser.add_argument("--weak-cpus", type=float, default=0.15,
                        help="node 0's CPU quota (cgroups), in CPUs")
    parser.add_argument("--pause-seconds", type=float, default=120.0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args()
    if not netns.can_run_here():
        sys.exit(1)
    # A stop (kill, timeout) unwinds the `with` below, which removes every namespace and
    # process the benchmark made.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    data = args.dataset.resolve()
    out = args.out.resolve()
    report = {"machine": machine(), "command": " ".join(sys.argv),
              "settings": {"nodes": args.nodes, "rate": args.rate, "node_cpus": args.node_cpus,
                           "weak_cpus": args.weak_cpus, "pause_seconds": args.pause_seconds},
              "runs": {}}
    with tempfile.TemporaryDirectory(prefix="fedcifar-stragglers-") as tmp, \
            netns.Network(netns.topology(args.nodes)) as network, \
            contextlib.ExitStack() as quotas:
        folders = split_node_data(data, Path(tmp) / "data", args.nodes, seed=42)
        federation = netns.Federation(network, Path(tmp) / "hosts", folders)
        federation.start()
        network.limit_uplink("node0", rate=args.rate)
        for node, pid in enumerate(federation.supernode_pids):
            cpus = args.weak_cpus if node == 0 else args.node_cpus
            quotas.enter_context(CpuQuota(f"node{node}", cpus)).add(pid)
        for method, settings in methods(args.nodes).items():
            netns.wait_for(lambda: federation.online_nodes() == args.nodes, 300,
                           "every SuperNode online")
            run_config = f"dataset='{data}' {COMMON} {settings}"
            run_dir, wall = run_method(federation, network, run_config,
                                       out / "heterogeneity_deployment" / method,
                                       args.pause_seconds)
            results = load_results(run_dir)
            points = curve(results)
            report["runs"][method] = {"run_config": run_config, "wall_s": wall,
                                      "run_dir": str(run_dir), "curve": points}
            save(out / "heterogeneity_deployment.json", report)
            levels = ", ".join(
                f"{t:.0%} at {p['real_s']:.0f} s" if (p := reached(points, t)) else
                f"{t:.0%} not reached" for t in THRESHOLDS)
            print(f"{method}: {wall:.0f} s, {points[-1]['updates']} updates, final "
                  f"{100 * points[-1]['accuracy']:.2f} %; {levels}", flush=True)


if __name__ == "__main__":
    main()

"""Simulation across machines: a Ray cluster runs the ClientApps, on one machine.

    sudo python -m fedcifar_app.ops.ray_cluster --data /abs/path/to/cifar10 [--rounds 2]

Flower's simulation calls ``ray.init()``, which attaches to a Ray cluster that
``ray start`` started on the same machine. docs/simulation.md's "Simulation across
machines" recipe (``DOCUMENTED_COMMANDS``; the tests check that the page holds each
line verbatim) starts a Ray head where the SuperLink runs and a Ray worker on a
second machine; this builds the two machines as network namespaces on a bridge
(10.0.0.5 and 10.0.0.6, see ``netns.Network``), follows the recipe, runs a
simulation from the head and prints on which Ray node each update was trained
(results.json ``train_workers``). Ray's files go to a temporary ``RAY_TMPDIR``
so that simulations elsewhere on this machine do not attach to this cluster;
every namespace and process is removed at the end, also on failure or Ctrl-C.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from fedcifar_app.ops.netns import Network, can_run_here, demo_parser

HEAD_ADDRESS = "10.0.0.5"
WORKER_ADDRESS = "10.0.0.6"
SIMULATED_NODES = 4
ROOT = Path(__file__).resolve().parents[2]

# docs/simulation.md's recipe, as this module runs it (tests/ops/test_ray_cluster.py
# checks that the page holds each line verbatim).
DOCUMENTED_COMMANDS = {
    "head": [
        "ray start --head --node-ip-address 10.0.0.5 --port 6379 --disable-usage-stats",
        "python -m fedcifar_app.ops.local_simulation --num-supernodes 4 --cpus-per-client 1",
    ],
    "worker": [
        "ray start --address 10.0.0.5:6379 --node-ip-address 10.0.0.6 --disable-usage-stats",
    ],
}


def script(step: str) -> str:
    return "\n".join(DOCUMENTED_COMMANDS[step])


class RayCluster:
    """The recipe in two namespaces; ``flwr`` runs on the head."""

    def __init__(self, network: Network, directory: Path) -> None:
        self.network = network
        self.directory = directory
        ray_dir = directory / "ray"  # short: Ray's socket paths must fit in 107 bytes
        ray_dir.mkdir(parents=True, exist_ok=True)
        from fedcifar_app.ops.federation import free_port

        self.env = {"RAY_TMPDIR": str(ray_dir), "FLWR_HOME": str(directory / "flwr-home"),
                    "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
                    "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}

    def start(self) -> None:
        """Ray head (and the managed SuperLink) on 'head', then the Ray worker."""
        head_ray, head_superlink = DOCUMENTED_COMMANDS["head"]
        self.network.run("head", head_ray, ROOT, env=self.env, timeout=180)
        self.network.run("worker", script("worker"), ROOT, env=self.env, timeout=180)
        self.network.run("head", head_superlink, ROOT, env=self.env, timeout=180)

    def flwr_run(self, run_config: str, timeout: float = 600) -> subprocess.CompletedProcess:
        return subprocess.run(
            self.network.command("head", ["flwr", "run", ".", "--stream", "--run-config",
                                          run_config]),
            cwd=ROOT, capture_output=True, text=True, timeout=timeout,
            env={**os.environ, **self.env})


def topology() -> dict[str, str]:
    return {"head": HEAD_ADDRESS, "worker": WORKER_ADDRESS}


def main(argv: Sequence[str] | None = None) -> int:
    args = demo_parser("python -m fedcifar_app.ops.ray_cluster", __doc__.split("\n\n")[0],
                       rounds=2).parse_args(argv)
    if not can_run_here():
        return 1
    from fedcifar_app.results import load_results

    with tempfile.TemporaryDirectory(prefix="fcray-") as tmp, Network(topology()) as network:
        cluster = RayCluster(network, Path(tmp))
        cluster.start()
        out = Path(tmp) / "out"
        done = cluster.flwr_run(f"dataset='{args.data.resolve()}' output-dir='{out}' "
                                f"num-server-rounds={args.rounds} fraction-train=1.0 "
                                f"min-available-nodes={SIMULATED_NODES}")
        print(done.stdout[-3000:], done.stderr[-2000:])
        for run_dir in out.glob("flwr-run-*"):
            for entry in load_results(run_dir)["entries"]:
                ips = [w.get("ray-node-ip") for w in entry.get("train_workers", [])]
                if ips:
                    print(f"round {entry['round']}: updates trained on {', '.join(ips)}")
        return done.returncode


if __name__ == "__main__":
    sys.exit(main())

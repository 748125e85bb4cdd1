"""Simulation across machines: docs/simulation.md's Ray cluster recipe, with the head and the
worker in network namespaces of their own (fedcifar_app/ops/ray_cluster.py). Needs root
and `ip netns`; skipped, saying why, where that is not permitted."""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

import pytest

from fedcifar_app.ops import netns, ray_cluster
from fedcifar_app.ops.local_simulation import managed_superlink_pids
from fedcifar_app.results import load_results

# Minutes, not seconds (a Ray cluster): `pytest -m "not slow"` skips it.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_the_readme_holds_the_ray_cluster_recipe() -> None:
    readme = (ROOT / "docs" / "simulation.md").read_text()
    for step, lines in ray_cluster.DOCUMENTED_COMMANDS.items():
        for line in lines:
            assert line in readme, f"docs/simulation.md lacks the {step} line: {line}"


def test_a_simulation_runs_its_clientapps_on_both_ray_nodes(tiny_dataset: Path) -> None:
    try:
        netns.check_available()
    except netns.NetnsUnavailable as err:
        pytest.skip(f"no multi-host test here: {err}")
    # /tmp, not pytest's deeper tmp_path: Ray's socket paths must fit in 107 bytes.
    with tempfile.TemporaryDirectory(prefix="fcray-") as tmp, \
            netns.Network(ray_cluster.topology()) as network:
        cluster = ray_cluster.RayCluster(network, Path(tmp))
        cluster.start()
        out = Path(tmp) / "out"
        done = cluster.flwr_run(
            f"dataset='{tiny_dataset}' cache-dir='{Path(tmp) / 'cache'}' output-dir='{out}' "
            "num-server-rounds=2 fraction-train=1.0 fraction-evaluate=0.0 local-epochs=1 "
            f"min-available-nodes={ray_cluster.SIMULATED_NODES}")
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        (run_dir,) = out.glob("flwr-run-*")
        results = load_results(run_dir)
        assert results["status"] == "completed"
        workers = [w for e in results["entries"] for w in e.get("train_workers", [])]
        assert len(workers) == 2 * ray_cluster.SIMULATED_NODES
        # 4 ClientApps at once need both nodes' 2 CPUs: updates came from both machines.
        assert {w["ray-node-ip"] for w in workers} == {ray_cluster.HEAD_ADDRESS,
                                                       ray_cluster.WORKER_ADDRESS}
        assert len({w["ray-node"] for w in workers}) == 2
    assert managed_superlink_pids(cluster.env) == []
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert network.tag not in leftover
    ray_processes = subprocess.run(["pgrep", "-f", tmp], capture_output=True, text=True)
    assert ray_processes.stdout == ""

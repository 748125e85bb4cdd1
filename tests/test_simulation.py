"""A whole federated run through `flwr run .`, as users start it.

Each test module gets its own FLWR_HOME and free ports for the managed local
SuperLink, which is stopped by PID (with everything it started) at the end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from fedcifar_app import task
from fedcifar_app.data import PartitionScheme, load_partition
from fedcifar_app.local_simulation import (installs_dependencies, managed_superlink_pids,
                                           stop_process_tree)
from fedcifar_app.results import FINAL_MODEL_FILE, PLOT_FILE, RESULTS_FILE

ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT = 420


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def flower_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("flwr-home")
    env = {**os.environ, "FLWR_HOME": str(home),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)
    try:
        yield env
    finally:
        for pid in managed_superlink_pids(env):
            stop_process_tree(pid)
        assert managed_superlink_pids(env) == []


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def flwr_run(env: dict[str, str], run_config: str) -> tuple[subprocess.CompletedProcess, dict]:
    done = run(["flwr", "run", ".", "--run-config", run_config, "--stream",
                "--format", "default"], env)
    runs = json.loads(run(["flwr", "ls", "--format", "json"], env).stdout)["runs"]
    return done, runs[0] if len(runs) == 1 else max(runs, key=lambda r: r["pending-at"])


@pytest.fixture(scope="module")
def local_simulation(flower_env: dict[str, str]) -> dict[str, str]:
    done = run([sys.executable, "-m", "fedcifar_app.local_simulation", "--num-supernodes", "3"],
               flower_env)
    assert done.returncode == 0, done.stdout + done.stderr
    (pid,) = managed_superlink_pids(flower_env)
    assert not installs_dependencies(pid)
    return flower_env


def test_flwr_run_completes_and_writes_results(local_simulation: dict[str, str],
                                               tiny_dataset: Path, tmp_path: Path) -> None:
    run_config = (f"dataset='{tiny_dataset}' cache-dir='{tmp_path / 'cache'}' "
                  f"output-dir='{tmp_path / 'out'}' num-server-rounds=2 "
                  "fraction-train=1.0 fraction-evaluate=1.0 min-available-nodes=3 "
                  "partitioner='dirichlet' dirichlet-alpha=0.3")
    done, status = flwr_run(local_simulation, run_config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert status["status"] == "finished:completed", done.stdout
    run_dir = tmp_path / "out" / f"flwr-run-{status['run-id']}"
    assert str(run_dir) in done.stdout
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    assert results["status"] == "completed" and results["kind"] == "federated"
    assert results["run_config"]["partitioner"] == "dirichlet"
    assert [e["round"] for e in results["entries"]] == [0, 1, 2]
    for entry in results["entries"][1:]:
        assert entry["train_replies"] == 3 and entry["train_failures"] == 0
        assert entry["evaluate_replies"] == 3
        assert 0 <= entry["test_accuracy"] <= 1 and "eval-accuracy" in entry["evaluate"]
    scheme = PartitionScheme("dirichlet", 3, 0.3, 2, 0.1, 42)
    partition_sizes = [len(load_partition(str(tiny_dataset), tmp_path / "cache", scheme, i)[0])
                       for i in range(3)]
    assert results["entries"][2]["samples_trained"] == 2 * sum(partition_sizes)
    net = task.Net()
    net.load_state_dict(torch.load(run_dir / FINAL_MODEL_FILE, weights_only=True))
    assert (run_dir / PLOT_FILE).exists()


def test_flwr_run_with_a_bad_config_fails_and_says_why(local_simulation: dict[str, str],
                                                       tmp_path: Path) -> None:
    run_config = f"num-server-rounds='two' output-dir='{tmp_path / 'out'}'"
    done, status = flwr_run(local_simulation, run_config)
    assert status["status"] == "finished:failed"
    assert "'num-server-rounds' expects an integer, got 'two' (str)" in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()  # failed before anything was written

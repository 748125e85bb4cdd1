"""The one-time local simulation setup replaces a SuperLink that installs dependencies."""

from __future__ import annotations

import json
import sys

import torch

from fedcifar_app.local_simulation import installs_dependencies, managed_superlink_pids
from tests.conftest import run


def test_a_superlink_that_installs_dependencies_is_replaced(flower_env: dict[str, str]) -> None:
    # flower_env has no FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION, so the SuperLink
    # that this flwr command starts would uv-sync the app for every run.
    done = run(["flwr", "federation", "simulation-config", "--num-supernodes", "2"], flower_env)
    assert done.returncode == 0, done.stdout + done.stderr
    (installing,) = managed_superlink_pids(flower_env)
    assert installs_dependencies(installing)

    done = run([sys.executable, "-m", "fedcifar_app.local_simulation", "--num-supernodes", "3"],
               flower_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Stopping the local SuperLink (PID {installing})" in done.stdout
    (replacement,) = managed_superlink_pids(flower_env)
    assert replacement != installing and not installs_dependencies(replacement)


def test_gpus_per_client_is_stored_or_refused_without_a_gpu(flower_env: dict[str, str]) -> None:
    command = [sys.executable, "-m", "fedcifar_app.local_simulation", "--num-supernodes", "4",
               "--gpus-per-client", "0.25"]
    done = run(command, flower_env)
    if torch.cuda.device_count() == 0:
        assert done.returncode == 2
        assert "--gpus-per-client 0.25: this machine has no CUDA GPU" in done.stderr
        return
    assert done.returncode == 0, done.stdout + done.stderr
    shown = run(["flwr", "federation", "list", "--federation", "@none/default", "--format",
                 "json"], flower_env)
    stored = json.loads(shown.stdout)["federation"]["simulation-config"]
    assert (stored["num_supernodes"], stored["client_resources_num_gpus"]) == (4, 0.25)

"""The one-time local simulation setup replaces a SuperLink that installs dependencies."""

from __future__ import annotations

import sys

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

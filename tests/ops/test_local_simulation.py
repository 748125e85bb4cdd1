"""The one-time local simulation setup: a SuperLink of this user's and FLWR_HOME's own,
never another's, and never one that installs dependencies."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
import torch

from fedcifar_app.ops.federation import free_port
from fedcifar_app.ops.local_simulation import (PORT_BASE, PORT_PAIRS, flwr_home,
                                           installs_dependencies, listener_on, local_ports,
                                           managed_superlink_pids, stop_process_tree)
from tests.conftest import run

# Minutes, not seconds (SuperLinks started and stopped): `pytest -m "not slow"` skips it.
pytestmark = pytest.mark.slow

SETUP = [sys.executable, "-m", "fedcifar_app.ops.local_simulation", "--num-supernodes", "2"]


def test_a_superlink_that_installs_dependencies_is_replaced(flower_env: dict[str, str]) -> None:
    # flower_env has no FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION, so the SuperLink
    # that this flwr command starts would uv-sync the app for every run.
    done = run(["flwr", "federation", "simulation-config", "--num-supernodes", "2"], flower_env)
    assert done.returncode == 0, done.stdout + done.stderr
    (installing,) = managed_superlink_pids(flower_env)
    assert installs_dependencies(installing)

    done = run([sys.executable, "-m", "fedcifar_app.ops.local_simulation", "--num-supernodes", "3"],
               flower_env)
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"Stopping the local SuperLink (PID {installing})" in done.stdout
    (replacement,) = managed_superlink_pids(flower_env)
    assert replacement != installing and not installs_dependencies(replacement)


def test_gpus_per_client_is_stored_or_refused_without_a_gpu(flower_env: dict[str, str]) -> None:
    command = [sys.executable, "-m", "fedcifar_app.ops.local_simulation", "--num-supernodes", "4",
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


def test_each_user_and_flwr_home_gets_its_own_ports(tmp_path: Path) -> None:
    first, second = (local_ports({"FLWR_HOME": str(tmp_path / name)}) for name in "ab")
    assert first != second
    for http, control in (first, second):
        assert PORT_BASE <= http < PORT_BASE + 2 * PORT_PAIRS and control == http + 1
    chosen = {"FLWR_HOME": str(tmp_path / "a"), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "5000",
              "FLWR_LOCAL_CONTROL_API_PORT": "5002"}
    assert local_ports(chosen) == (5000, 5002)


def test_flwr_finds_the_setups_superlink_through_its_config(flower_env: dict[str, str]) -> None:
    done = run(SETUP, flower_env)
    assert done.returncode == 0, done.stdout + done.stderr
    config = tomllib.loads((flwr_home(flower_env) / "config.toml").read_text())
    http_port = flower_env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"]
    assert config["superlink"]["local"] == {"address": f"127.0.0.1:{http_port}",
                                            "insecure": True}
    assert run(["flwr", "ls"], flower_env).returncode == 0


def test_a_superlink_of_another_flwr_home_is_named_and_not_used(
        flower_env: dict[str, str], tmp_path: Path) -> None:
    """Another environment's SuperLink on the ports this one would use: the setup
    refuses, naming its PID and FLWR_HOME, and points this FLWR_HOME at nothing."""
    done = run(SETUP, flower_env)
    assert done.returncode == 0, done.stdout + done.stderr
    (theirs,) = managed_superlink_pids(flower_env)
    other = {**flower_env, "FLWR_HOME": str(tmp_path / "other-home")}
    refused = run(SETUP, other)
    assert refused.returncode == 1
    assert f"PID {theirs}, FLWR_HOME {flwr_home(flower_env)}" in refused.stderr
    assert "Your runs will not go to it" in refused.stderr
    assert not (tmp_path / "other-home" / "config.toml").exists()
    assert managed_superlink_pids(flower_env) == [theirs]


LISTEN = ("import socket, sys, time; s = socket.socket(); s.bind(('127.0.0.1', int(sys.argv[1])));"
          " s.listen(); time.sleep(120)")


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                    reason="acting as another user needs root and setpriv")
def test_a_port_held_by_another_user_is_refused(tmp_path: Path) -> None:
    """As root: user nobody listens on the port this FLWR_HOME would use; the setup
    names that user and starts nothing there."""
    http_port, control_port = free_port(), free_port()
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(http_port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(control_port)}
    squatter = subprocess.Popen(["setpriv", "--reuid", "nobody", "--regid", "nogroup",
                                 "--clear-groups", "/usr/bin/python3", "-c", LISTEN,
                                 str(http_port)])
    try:
        deadline = time.monotonic() + 10
        while listener_on(http_port) is None and time.monotonic() < deadline:
            time.sleep(0.1)
        held = listener_on(http_port)
        assert held is not None and held.pid == squatter.pid
        refused = run(SETUP, env)
        assert refused.returncode == 1
        assert f"port {http_port} is held by user nobody, PID {squatter.pid}" in refused.stderr
        assert managed_superlink_pids(env) == []
        assert not (tmp_path / "home" / "config.toml").exists()
    finally:
        stop_process_tree(squatter.pid)
        squatter.wait()


FLWR_DEFAULT_PORTS = {"FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": "39091",
                      "FLWR_LOCAL_CONTROL_API_PORT": "39093"}


def test_the_readme_commands_never_run_in_another_environments_superlink(
        flower_env: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    """Another environment started flwr's own managed SuperLink (on flwr's fixed ports,
    as any `flwr run .` there does); a new user (another FLWR_HOME, no port variables)
    runs the README's commands: the run lands in a SuperLink of their own, and the other
    one never sees it (without the setup, flwr would have sent it there)."""
    if any(listener_on(int(port)) for port in FLWR_DEFAULT_PORTS.values()):
        pytest.skip("flwr's default local SuperLink ports (39091, 39093) are taken here")
    theirs = {**flower_env, **FLWR_DEFAULT_PORTS, "FLWR_HOME": str(tmp_path / "their-home"),
              "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
    mine = {key: value for key, value in flower_env.items() if key not in FLWR_DEFAULT_PORTS}
    mine["FLWR_HOME"] = str(tmp_path / "new-user-flwr-home")
    try:
        done = run(["flwr", "federation", "simulation-config", "--num-supernodes", "2"], theirs)
        assert done.returncode == 0, done.stdout + done.stderr
        done = run(SETUP, mine)
        assert done.returncode == 0, done.stdout + done.stderr
        done = run(["flwr", "run", ".", "--stream", "--run-config",
                    f"dataset='{tiny_dataset}' cache-dir='{tmp_path / 'cache'}' "
                    f"output-dir='{tmp_path / 'out'}' num-server-rounds=1 local-epochs=1"],
                   mine)
        assert done.returncode == 0, done.stdout + done.stderr
        assert len(list((tmp_path / "out").glob("flwr-run-*/results.json"))) == 1
        runs_of = {name: json.loads(run(["flwr", "ls", "--format", "json"], env).stdout)["runs"]
                   for name, env in (("mine", mine), ("theirs", theirs))}
        assert len(runs_of["mine"]) == 1 and runs_of["theirs"] == []
    finally:
        for pid in managed_superlink_pids(mine) + managed_superlink_pids(theirs):
            stop_process_tree(pid)

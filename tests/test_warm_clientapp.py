"""The warm flwr-clientapp server and its shim, without a SuperNode: Flower's own
flwr-clientapp entry point answers --help and rejects unknown flags."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcifar_app import warm_clientapp
from fedcifar_app.local_simulation import stop_process_tree


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    socket_path = Path(f"/tmp/fedcifar-test-{os.getpid()}.sock")
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", warm_clientapp.MODULE, "serve",
                                    "--socket", str(socket_path)], stdout=out,
                                   stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while not socket_path.exists():
            assert process.poll() is None, log.read_text()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.1)
        yield socket_path, log
    finally:
        stop_process_tree(process.pid)
        process.wait()
        socket_path.unlink(missing_ok=True)


def shim_run(shim: Path, *args: str, socket_path: Path | None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PATH": f"{shim.parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop(warm_clientapp.SOCKET_ENV, None)
    if socket_path is not None:
        env[warm_clientapp.SOCKET_ENV] = str(socket_path)
    return subprocess.run([warm_clientapp.COMMAND, *args], env=env, capture_output=True,
                          text=True, timeout=120)


def test_the_shim_runs_flwr_clientapp_forked_from_the_server(
        server: tuple[Path, Path], tmp_path: Path) -> None:
    socket_path, log = server
    shim = warm_clientapp.write_shim(tmp_path / "shim")
    done = shim_run(shim, "--help", socket_path=socket_path)
    # The child wrote to the shim's own standard output, and its exit code came back.
    assert done.returncode == 0, done.stderr
    assert "Run a Flower ClientApp" in done.stdout
    rejected = shim_run(shim, "--no-such-flag", socket_path=socket_path)
    assert rejected.returncode == 2 and "flwr-clientapp: error:" in rejected.stderr
    assert log.read_text().count("forked flwr-clientapp as PID") == 2


def test_without_a_server_the_shim_runs_the_real_flwr_clientapp(tmp_path: Path) -> None:
    shim = warm_clientapp.write_shim(tmp_path / "shim")
    done = shim_run(shim, "--help", socket_path=tmp_path / "nobody-listens.sock")
    assert done.returncode == 0 and "Run a Flower ClientApp" in done.stdout

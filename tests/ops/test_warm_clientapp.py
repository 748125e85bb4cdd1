"""The warm flwr-clientapp server and its shim, without a SuperNode: Flower's own
flwr-clientapp entry point answers --help and rejects unknown flags; only the user who
owns the server can connect, and the shim talks only to its own user's server."""

from __future__ import annotations

import os
import shutil
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedcifar_app.ops import warm_clientapp
from fedcifar_app.ops.local_simulation import descendants, stop_process_tree


def start_server(socket_path: Path, log: Path) -> subprocess.Popen:
    with open(log, "wb") as out:
        return subprocess.Popen([sys.executable, "-m", warm_clientapp.MODULE, "serve",
                                 "--socket", str(socket_path)], stdout=out,
                                stderr=subprocess.STDOUT)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    socket_path = warm_clientapp.private_socket_path(str(tmp_path))
    log = tmp_path / "server.log"
    process = start_server(socket_path, log)
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


AS_NOBODY = ["setpriv", "--reuid", "nobody", "--regid", "nogroup", "--clear-groups",
             "/usr/bin/python3", "-c"]
CONNECT = """
import socket, sys
connection = socket.socket(socket.AF_UNIX)
try:
    connection.connect(sys.argv[1])
except OSError as err:
    print(type(err).__name__)
    sys.exit(0)
try:
    connection.sendall(b"x")
    print("closed" if connection.recv(64) == b"" else "answered")
except OSError:
    print("closed")
"""
as_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                             reason="acting as another user needs root and setpriv")


def test_the_socket_is_private_to_its_owner(server: tuple[Path, Path]) -> None:
    socket_path, _ = server
    assert stat.S_IMODE(socket_path.stat().st_mode) == 0o600
    assert stat.S_IMODE(socket_path.parent.stat().st_mode) == 0o700
    assert socket_path.parent.stat().st_uid == os.getuid()


@as_root
def test_another_user_cannot_connect(server: tuple[Path, Path]) -> None:
    socket_path, log = server
    done = subprocess.run([*AS_NOBODY, CONNECT, str(socket_path)], capture_output=True,
                          text=True, timeout=30)
    assert done.stdout.strip() == "PermissionError", done.stdout + done.stderr
    assert "forked" not in log.read_text()


@as_root
def test_the_server_serves_only_its_own_user_even_on_an_open_socket(
        server: tuple[Path, Path]) -> None:
    """Were the directory and socket opened to all (a mistaken chmod), the peer check
    still turns another user away: nothing is forked, the connection is closed."""
    socket_path, log = server
    socket_path.parent.chmod(0o755)
    socket_path.chmod(0o777)
    try:
        done = subprocess.run([*AS_NOBODY, CONNECT, str(socket_path)], capture_output=True,
                              text=True, timeout=30)
    finally:
        socket_path.parent.chmod(0o700)
    assert done.stdout.strip() == "closed", done.stdout + done.stderr
    deadline = time.monotonic() + 10
    while "refused a connection from uid" not in log.read_text():
        assert time.monotonic() < deadline, log.read_text()
        time.sleep(0.1)
    assert "forked" not in log.read_text()


@as_root
def test_a_squatted_socket_directory_or_path_makes_the_server_refuse(tmp_path: Path) -> None:
    """Another user created the directory the socket goes in, or (in a shared, sticky
    directory) the socket's path itself: the server refuses to start, saying why."""
    squatted_directory = tmp_path / "runtime" / "fedcifar-0"
    squatted_directory.mkdir(parents=True)
    shutil.chown(squatted_directory, "nobody")
    refused = start_server(squatted_directory / "warm.sock", tmp_path / "a.log")
    assert refused.wait(timeout=120) != 0
    assert "must be a directory of uid 0 with mode 0700" in (tmp_path / "a.log").read_text()

    shared = tmp_path / "shared"
    shared.mkdir(mode=0o1777)
    shared.chmod(0o1777)
    refused = start_server(shared / "warm.sock", tmp_path / "b.log")
    assert refused.wait(timeout=120) != 0
    assert "refusing" in (tmp_path / "b.log").read_text()


@as_root
def test_the_shim_does_not_talk_to_another_users_socket(tmp_path: Path) -> None:
    """A socket another user owns would receive the ClientApp's token: the shim does
    not connect to it, and says so."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    socket_path = shared / "theirs.sock"
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(socket_path))
    listener.listen(1)
    try:
        os.chown(socket_path, 65534, 65534)  # nobody
        assert warm_clientapp._connect(str(socket_path)) is None
    finally:
        listener.close()


def test_concurrent_messages_are_bounded(server: tuple[Path, Path]) -> None:
    """More connections than MAX_HANDLERS at once: no more handlers than that are
    forked; the others wait their turn."""
    socket_path, _ = server
    if shutil.which("fuser") is None:
        pytest.skip("needs fuser (psmisc) to find the server's PID")
    (server_pid,) = map(int, subprocess.run(["fuser", str(socket_path)], capture_output=True,
                                            text=True).stdout.split())
    connections = []
    try:
        for _ in range(warm_clientapp.MAX_HANDLERS + 8):
            connection = socket.socket(socket.AF_UNIX)
            connection.connect(str(socket_path))
            connections.append(connection)
        time.sleep(2)
        assert len(descendants(server_pid)) == warm_clientapp.MAX_HANDLERS
    finally:
        for connection in connections:
            connection.close()

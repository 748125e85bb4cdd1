"""Prepare this machine's managed local SuperLink for fedcifar simulations.

    python -m fedcifar_app.ops.local_simulation [--num-supernodes 10] [--cpus-per-client 1]
                                            [--gpus-per-client 0.25]

``flwr run .`` submits to a local SuperLink that flwr starts on first use and
that keeps running. Two of its defaults do not suit this app, and Flower 1.42
reads neither from pyproject.toml:

* simulation size: 2 SuperNodes with 2 CPUs each. This sets the size once, with
  ``flwr federation simulation-config``; the SuperLink stores it in its state
  database under $FLWR_HOME, so every later ``flwr run .`` uses it. The size
  includes the share of a GPU each ClientApp reserves (Ray's ``num_gpus``):
  with 0.25, four ClientApps share one GPU.
* runtime dependency installation: for every run the SuperLink would ``uv sync``
  the app's dependencies into a fresh environment (several GB of torch, and a
  failure offline). The SuperLink reads FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION
  when it starts, so this (re)starts it with that set, and the app uses the
  packages ``pip install -e .`` installed.

flwr's managed SuperLink is one per machine on fixed loopback ports (39091), without
authentication: whoever's ``flwr run .`` reaches it runs as the user who started it,
writing into that user's home. So this gives each user and FLWR_HOME a SuperLink of
its own, on two ports derived from both (``local_ports``; flwr's variables
FLWR_LOCAL_SUPERLINK_HTTP_API_PORT and FLWR_LOCAL_CONTROL_API_PORT choose others),
refuses to go on when another user's or FLWR_HOME's process holds them (naming it),
and points the ``local`` connection of $FLWR_HOME/config.toml at that SuperLink's
address, which is how a plain ``flwr run .`` finds it afterwards.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pwd
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from fedcifar_app import compat
from fedcifar_app.results import atomic_write

DISABLE_INSTALL_ENV = compat.DISABLE_INSTALL_ENV
DISABLE_INSTALL_FLAG = "--disable-runtime-dependency-installation"
# The variables flwr reads for its managed SuperLink's ports.
HTTP_PORT_ENV = compat.LOCAL_HTTP_PORT_ENV
CONTROL_PORT_ENV = compat.LOCAL_CONTROL_PORT_ENV
# Derived ports lie below Linux's ephemeral range (32768-60999), where outgoing
# connections would otherwise take them at random.
PORT_BASE, PORT_PAIRS = 21000, 5000
CONNECTION = "local"  # the connection config.toml's [superlink] default names


def flwr_home(environ: Mapping[str, str] = os.environ) -> Path:
    return Path(environ.get("FLWR_HOME", "~/.flwr")).expanduser().resolve()


def local_ports(environ: Mapping[str, str] = os.environ) -> tuple[int, int]:
    """(HTTP API, Control API) port of this user's and FLWR_HOME's SuperLink: flwr's
    variables where set, else a pair derived from the uid and FLWR_HOME."""
    digest = hashlib.sha256(f"{os.getuid()}:{flwr_home(environ)}".encode()).digest()
    http = PORT_BASE + 2 * (int.from_bytes(digest[:4], "big") % PORT_PAIRS)
    return (int(environ.get(HTTP_PORT_ENV, http)),
            int(environ.get(CONTROL_PORT_ENV, http + 1)))


def control_api_address(environ: Mapping[str, str] = os.environ) -> str:
    return f"127.0.0.1:{local_ports(environ)[1]}"


@dataclass(frozen=True)
class Listener:
    """Who holds a loopback TCP port: always the user; the process and its FLWR_HOME
    where /proc lets this user see them."""

    port: int
    uid: int
    pid: int | None
    flwr_home: Path | None

    def describe(self) -> str:
        try:
            user = pwd.getpwuid(self.uid).pw_name
        except KeyError:
            user = f"uid {self.uid}"
        who = f"user {user}"
        if self.pid is not None:
            who += f", PID {self.pid}"
        if self.flwr_home is not None:
            who += f", FLWR_HOME {self.flwr_home}"
        return f"port {self.port} is held by {who}"


def listener_on(port: int) -> Listener | None:
    """The process listening on TCP ``port`` (any local address), if one is."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            fields = row.split()
            local_port = int(fields[1].rsplit(":", 1)[1], 16)
            if local_port == port and fields[3] == "0A":  # 0A: LISTEN
                pid = _socket_owner(fields[9])
                return Listener(port, int(fields[7]), pid,
                                None if pid is None else _superlink_home(pid))
    return None


def _socket_owner(inode: str) -> int | None:
    target = f"socket:[{inode}]"
    for pid in _pids():
        try:
            if any(os.readlink(fd) == target for fd in Path(f"/proc/{pid}/fd").iterdir()):
                return pid
        except OSError:  # gone, or not ours to read
            continue
    return None


def _superlink_home(pid: int) -> Path | None:
    """The FLWR_HOME of a managed SuperLink: its state database lies in
    FLWR_HOME/local-superlink (its command line, which any user may read)."""
    args = _read_proc(pid, "cmdline").decode(errors="replace").split("\0")
    for flag in ("--database", "--log-file"):
        if flag in args[:-1]:
            return Path(args[args.index(flag) + 1]).parent.parent
    return None


def foreign_listeners(environ: Mapping[str, str] = os.environ) -> list[Listener]:
    """Processes on this SuperLink's ports that are not this user's and FLWR_HOME's."""
    listeners = [listener_on(port) for port in local_ports(environ)]
    return [listener for listener in listeners if listener is not None and (
        listener.uid != os.getuid() or listener.flwr_home != flwr_home(environ))]


def point_connection_at(address: str, environ: Mapping[str, str] = os.environ) -> Path:
    """Set the ``local`` connection of $FLWR_HOME/config.toml to ``address`` (flwr's
    ``:local:`` lets flwr start its managed SuperLink; an explicit address is used as
    it is)."""
    return set_connection(CONNECTION, {"address": address} if address == ":local:"
                          else {"address": address, "insecure": True}, environ)


def set_connection(name: str, connection: dict[str, object],
                   environ: Mapping[str, str] = os.environ) -> Path:
    """Add or replace [superlink.<name>] in $FLWR_HOME/config.toml, keeping the rest of
    the file (a missing file gets flwr's default connection, ``local``); written whole
    or not at all."""
    path = flwr_home(environ) / "config.toml"
    config = tomllib.loads(path.read_text()) if path.exists() else {
        "superlink": {"default": CONNECTION, CONNECTION: {"address": ":local:"}}}
    superlink = config.setdefault("superlink", {})
    superlink.setdefault("default", CONNECTION)
    superlink[name] = connection
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: tmp.write_text(tomli_w.dumps(config)))
    return path


def _read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # The process ended, or it is not ours to read.
        return b""


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def managed_superlink_pids(environ: Mapping[str, str] = os.environ) -> list[int]:
    """PIDs of the managed local SuperLink whose control API ``environ`` selects."""
    address = control_api_address(environ).encode()
    found = []
    for pid in _pids():
        args = _read_proc(pid, "cmdline").split(b"\0")
        if any(a.endswith(b"flower-superlink") for a in args[:2]) and address in args:
            found.append(pid)
    return found


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (SuperExec, simulation, Ray workers)."""
    children: dict[int, list[int]] = {}
    for other in _pids():
        stat = _read_proc(other, "stat")
        if stat:
            # Field 4 is the parent PID; the name in field 2 may contain spaces.
            parent = int(stat.rsplit(b")", 1)[1].split()[1])
            children.setdefault(parent, []).append(other)
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def signal_process_tree(pid: int, signum: signal.Signals) -> None:
    """Send ``signum`` to ``pid`` and every process below it (SIGSTOP: pause a node
    with its ClientApp; SIGCONT: resume it)."""
    for member in (pid, *descendants(pid)):
        try:
            os.kill(member, signum)
        except ProcessLookupError:
            pass


def stop_process_tree(pid: int, timeout: float = 10.0,
                      first_signal: signal.Signals = signal.SIGTERM) -> None:
    """Send ``first_signal`` to ``pid`` and its descendants, SIGKILL whatever outlives
    ``timeout``, and return once all are gone. SIGKILL first is how a crash looks:
    no goodbye to the SuperLink."""
    tree = [pid, *descendants(pid)]
    for member in tree:
        try:
            os.kill(member, first_signal)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_alive(m) for m in tree):
        time.sleep(0.1)
    for member in tree:
        if is_alive(member):
            os.kill(member, signal.SIGKILL)


def is_alive(pid: int) -> bool:
    stat = _read_proc(pid, "stat")
    # A zombie (state Z) has exited; only its parent's wait() is missing.
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def installs_dependencies(pid: int) -> bool:
    """Whether the SuperLink ``pid`` would uv-sync app dependencies for each run."""
    if DISABLE_INSTALL_FLAG.encode() in _read_proc(pid, "cmdline").split(b"\0"):
        return False
    environment = _read_proc(pid, "environ").split(b"\0")
    return f"{DISABLE_INSTALL_ENV}=1".encode() not in environment


def stop_installing_superlinks(environ: Mapping[str, str] = os.environ) -> None:
    """Stop the managed local SuperLink if it would uv-sync app dependencies per run;
    the next ``flwr`` command started with DISABLE_INSTALL_ENV=1 starts a new one."""
    for pid in managed_superlink_pids(environ):
        if installs_dependencies(pid):
            print(f"Stopping the local SuperLink (PID {pid}): it was started with runtime "
                  "dependency installation on.")
            stop_process_tree(pid)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcifar_app.ops.local_simulation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-supernodes", type=int, default=10,
                        help="Virtual SuperNodes in the simulation (default 10).")
    parser.add_argument("--cpus-per-client", type=int, default=1,
                        help="CPUs per ClientApp; cores / this = clients training at once "
                        "(default 1).")
    parser.add_argument("--gpus-per-client", type=float, default=0.0,
                        help="Share of a GPU each ClientApp reserves, e.g. 0.25: four "
                        "ClientApps per GPU (default 0: CPU only).")
    args = parser.parse_args(argv)
    if args.num_supernodes < 1 or args.cpus_per_client < 1:
        parser.error("--num-supernodes and --cpus-per-client must be >= 1")
    gpus = _visible_gpus()
    if args.gpus_per_client < 0:
        parser.error("--gpus-per-client must be >= 0")
    if args.gpus_per_client > 0 and gpus == 0:
        # Ray would never find a GPU to place a ClientApp on: runs would hang pending.
        parser.error(f"--gpus-per-client {args.gpus_per_client:g}: this machine has no "
                     "CUDA GPU that torch can see")

    http_port, control_port = local_ports()
    foreign = foreign_listeners()
    if foreign:
        print(_refusal(foreign), file=sys.stderr)
        return 1
    environment = {**os.environ, DISABLE_INSTALL_ENV: "1", HTTP_PORT_ENV: str(http_port),
                   CONTROL_PORT_ENV: str(control_port)}
    stop_installing_superlinks(environment)
    # With ':local:', the flwr CLI starts the managed SuperLink if none answers on
    # these ports, with this environment; afterwards the connection names its address.
    point_connection_at(":local:")
    command = ["flwr", "federation", "simulation-config",
               "--num-supernodes", str(args.num_supernodes),
               "--client-resources-num-cpus", str(args.cpus_per_client),
               "--client-resources-num-gpus", str(args.gpus_per_client)]
    completed = subprocess.run(command, env=environment, check=False)
    if completed.returncode != 0:
        print(f"error: `{' '.join(command)}` failed (exit {completed.returncode})",
              file=sys.stderr)
        return completed.returncode
    config_path = point_connection_at(f"127.0.0.1:{http_port}")
    print(f"Your local SuperLink: 127.0.0.1:{http_port} (PID "
          f"{', '.join(map(str, managed_superlink_pids(environment)))}, FLWR_HOME "
          f"{flwr_home()}); `flwr` reaches it through the '{CONNECTION}' connection in "
          f"{config_path}.")
    cores = os.cpu_count() or 1
    at_once = max(cores // args.cpus_per_client, 1)
    resources = f"{cores} cores"
    if args.gpus_per_client > 0:
        at_once = min(at_once, int(gpus / args.gpus_per_client))
        resources += f", {gpus} GPU(s) at {args.gpus_per_client:g} per ClientApp"
    print(f"Local simulation: {args.num_supernodes} SuperNodes, {args.cpus_per_client} CPU "
          f"each ({at_once} training at once on {resources}); runtime dependency "
          "installation off. Now run: flwr run . --stream")
    return 0


def _refusal(foreign: list[Listener]) -> str:
    """Why this user's SuperLink cannot start, and the two ways out."""
    own = [listener.pid for listener in foreign
           if listener.uid == os.getuid() and listener.pid is not None]
    stop = (f"stop it (`kill {' '.join(map(str, sorted(set(own))))}`), or " if own else "")
    return ("error: " + "; ".join(listener.describe() for listener in foreign)
            + f", not by this user and FLWR_HOME ({flwr_home()}): a run there would "
            "execute as its owner, with its files. Your runs will not go to it: "
            f"{stop}choose other ports, e.g. `export {HTTP_PORT_ENV}=<port> "
            f"{CONTROL_PORT_ENV}=<port + 1>` and run this again.")


def _visible_gpus() -> int:
    import torch  # deferred: this module is imported by tests and tools without torch use

    return torch.cuda.device_count()


if __name__ == "__main__":
    sys.exit(main())

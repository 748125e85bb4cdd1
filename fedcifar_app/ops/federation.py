"""A real Flower deployment on this machine: one SuperLink, N SuperNodes, loopback.

    python -m fedcifar_app.ops.federation up --nodes 3 [--tls] [--auth] [--data DIR]
    python -m fedcifar_app.ops.federation down
    flwr run . local-deployment --stream

``up`` starts ``flower-superlink`` and ``flower-supernode`` processes on free
loopback ports, writes the ``[superlink.<name>]`` connection into the Flower
configuration file ($FLWR_HOME/config.toml) and records every PID in the
federation's state folder; ``down`` stops exactly those processes. ``--tls``
makes a CA and a server certificate for localhost/127.0.0.1 and serves TLS with
them, and puts the Fleet-only proxy (``fedcifar_app.ops.fleet_proxy``, nginx) in front
of the SuperLink as a deployment should: SuperNodes connect through it, ``flwr``
to the SuperLink's own port; ``--auth`` makes one key pair per SuperNode, enables SuperNode
authentication and registers the public keys. With ``--data DIR`` each node gets
its own data folder (a split of DIR/train.parquet, as real sites hold their own
data) passed as ``--node-config "data-path='...'"``; without it, nodes get
``partition-id``/``num-partitions`` of the run's ``dataset``. Unless
``--cold-clientapps``, the SuperNodes fork their ClientApps from one warm server
(``fedcifar_app.ops.warm_clientapp``), and unless ``--stock-supernodes`` the SuperNodes
are Flower's with its pauses between pulls cut to 0.25 s (``fedcifar_app.ops.fast_supernode``).
``restart_superlink`` and ``restart_supernode``
stop a process (as a crash would, or gracefully) and start it with the same command.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import tomli_w
from tqdm import tqdm

from fedcifar_app import compat
from fedcifar_app.ops import fast_supernode, fleet_proxy, warm_clientapp
from fedcifar_app.ops.local_simulation import (flwr_home, is_alive, set_connection,
                                           stop_process_tree)
from fedcifar_app.results import atomic_write

DEFAULT_NAME = "local-deployment"
STATE_FILE = "federation.json"
STARTUP_TIMEOUT = 30.0
# The SuperExec that every SuperLink and SuperNode starts looks for new tasks (a
# ServerApp, a ClientApp message) every second by default: every message waits for it.
# A message's objects (one per array) travel two requests at a time by default; 16 at
# a time move a model in one round trip (each request is TLS and, with SuperNode
# authentication, signed).
FAST_ROUNDS_ENV = {compat.SUPEREXEC_POLL_INTERVAL_ENV: "0.25",
                   compat.MAX_CONCURRENT_PULLS_ENV: "16",
                   compat.MAX_CONCURRENT_PUSHES_ENV: "16"}
FAST_SUPERNODE = fast_supernode.__name__
# Flower reports usage events to its servers unless told not to; a launcher's
# processes do not phone home.
TELEMETRY_OFF = {"FLWR_TELEMETRY_ENABLED": "0"}


def state_dir(name: str) -> Path:
    return flwr_home() / "fedcifar-federations" / name


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Federation:
    """What ``up`` started: enough for ``down``, tests and ``flwr run``."""

    name: str
    directory: str
    superlink_port: int
    nodes: int
    superlink_pid: int = 0
    supernode_pids: list[int] = field(default_factory=list)
    # The exact command of each process, so that a node (or the SuperLink) can be
    # restarted as it was: same port, database, key and data.
    superlink_command: list[str] = field(default_factory=list)
    supernode_commands: list[list[str]] = field(default_factory=list)
    node_data: list[str] = field(default_factory=list)
    tls: bool = False
    auth: bool = False
    # One warm flwr-clientapp server (fedcifar_app.ops.warm_clientapp) for all SuperNodes.
    warm_clientapps: bool = True
    warm_server_pid: int = 0
    # flower-supernode with its 3 s pause after an empty pull cut (fedcifar_app.ops.fast_supernode).
    fast_supernodes: bool = True
    # With TLS: nginx forwarding the Fleet API alone (fedcifar_app.ops.fleet_proxy).
    fleet_port: int = 0
    proxy_pid: int = 0

    @property
    def warm_socket(self) -> Path:
        return warm_clientapp.private_socket_path(self.directory)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.superlink_port}"

    @property
    def fleet_address(self) -> str:
        """Where SuperNodes connect: the proxy with TLS, else the SuperLink itself."""
        return f"127.0.0.1:{self.fleet_port}" if self.fleet_port else self.address

    def path(self, *parts: str) -> Path:
        return Path(self.directory, *parts)

    def save(self) -> None:
        text = json.dumps(asdict(self), indent=2)
        atomic_write(self.path(STATE_FILE), lambda tmp: tmp.write_text(text))

    @classmethod
    def load(cls, name: str) -> Federation:
        return cls(**json.loads((state_dir(name) / STATE_FILE).read_text()))


# ---------------------------------------------------------------- certificates, keys

def write_tls_files(directory: Path) -> None:
    """ca.crt, server.pem and server.key for localhost and 127.0.0.1 (one day)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    now = datetime.datetime.now(datetime.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("fedcifar test CA"))
               .issuer_name(name("fedcifar test CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5))
               .not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .sign(ca_key, hashes.SHA256()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    san = x509.SubjectAlternativeName([x509.DNSName("localhost"),
                                       x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
    server_cert = (x509.CertificateBuilder().subject_name(name("localhost"))
                   .issuer_name(ca_cert.subject).public_key(server_key.public_key())
                   .serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(san, critical=False)
                   .sign(ca_key, hashes.SHA256()))
    pem = serialization.Encoding.PEM
    (directory / "ca.crt").write_bytes(ca_cert.public_bytes(pem))
    (directory / "server.pem").write_bytes(server_cert.public_bytes(pem))
    write_private(directory / "server.key", server_key.private_bytes(
        pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))


def write_private(path: Path, content: bytes) -> None:
    """Write ``content`` to a new file that is mode 0600 from its creation (a chmod
    afterwards leaves a moment in which others may open it)."""
    path.unlink(missing_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as private:
        private.write(content)


def write_node_keys(directory: Path, stem: str) -> tuple[Path, Path]:
    """An EC P-384 key pair in OpenSSH format, as flower-supernode expects."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private, public = directory / stem, directory / f"{stem}.pub"
    write_private(private, key.private_bytes(serialization.Encoding.PEM,
                                             serialization.PrivateFormat.OpenSSH,
                                             serialization.NoEncryption()))
    public.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                     serialization.PublicFormat.OpenSSH))
    return private, public


# ---------------------------------------------------------------- data, processes

def split_node_data(source: Path, directory: Path, nodes: int, seed: int) -> list[Path]:
    """Write an IID split of source/train.parquet into one folder per node."""
    import datasets
    from flwr_datasets.partitioner import IidPartitioner

    train = datasets.load_dataset(str(source), split="train").shuffle(seed=seed)
    partitioner = IidPartitioner(num_partitions=nodes)
    partitioner.dataset = train
    folders = []
    for node in range(nodes):
        folder = directory / f"node-{node}"
        folder.mkdir(parents=True, exist_ok=True)
        partitioner.load_partition(node).to_parquet(str(folder / "train.parquet"))
        folders.append(folder)
    return folders


def _start(command: list[str], log_file: Path, env: dict[str, str] | None = None) -> int:
    with open(log_file, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, start_new_session=True,
                                   env=process_env(env))
    return process.pid


def process_env(extra: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of every process the launcher starts."""
    return {**os.environ, **FAST_ROUNDS_ENV, **TELEMETRY_OFF, **(extra or {})}


def _start_warm_server(federation: Federation) -> None:
    """The warm flwr-clientapp server and the shim that SuperNodes find on their PATH."""
    warm_clientapp.write_shim(federation.path("shim"))
    socket_path = federation.warm_socket
    log_file = federation.path("warm-clientapp.log")
    federation.warm_server_pid = _start(
        [sys.executable, "-m", warm_clientapp.MODULE, "serve", "--socket", str(socket_path)],
        log_file)
    federation.save()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while not socket_path.exists():
        if not is_alive(federation.warm_server_pid) or time.monotonic() > deadline:
            raise RuntimeError(f"the warm flwr-clientapp server did not start; see {log_file}")
        time.sleep(0.1)


def _supernode_env(federation: Federation) -> dict[str, str]:
    if not federation.warm_clientapps:
        return {}
    return {"PATH": f"{federation.path('shim')}{os.pathsep}{os.environ.get('PATH', '')}",
            warm_clientapp.SOCKET_ENV: str(federation.warm_socket)}


def _wait_for_port(port: int, pid: int, log_file: Path, what: str = "the SuperLink") -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if not is_alive(pid):
            raise RuntimeError(f"{what} exited during start-up; see {log_file}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not listen on port {port} within "
                       f"{STARTUP_TIMEOUT:g} s; see {log_file}")


def _flwr(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["flwr", *args], capture_output=True, text=True, timeout=120,
                          check=False)


def write_connection(federation: Federation) -> Path:
    """Add or replace [superlink.<name>] in the Flower configuration file."""
    connection: dict[str, object] = {"address": federation.address}
    if federation.tls:
        connection["root-certificates"] = str(federation.path("ca.crt"))
    else:
        connection["insecure"] = True
    return set_connection(federation.name, connection)


def remove_connection(name: str) -> None:
    path = flwr_home() / "config.toml"
    if path.exists():
        config = tomllib.loads(path.read_text())
        if config.get("superlink", {}).pop(name, None) is not None:
            atomic_write(path, lambda tmp: tmp.write_text(tomli_w.dumps(config)))


# ---------------------------------------------------------------- up, down

def up(nodes: int, name: str = DEFAULT_NAME, tls: bool = False, auth: bool = False,
       data: Path | None = None, seed: int = 42, warm_clientapps: bool = True,
       fast_supernodes: bool = True) -> Federation:
    """Start a SuperLink and ``nodes`` SuperNodes; return what was started."""
    directory = state_dir(name)
    if tls:
        fleet_proxy.check_available()
    if (directory / STATE_FILE).exists():
        raise RuntimeError(f"federation '{name}' is already up ({directory}); "
                           f"stop it with: python -m fedcifar_app.ops.federation down --name {name}")
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    directory.chmod(0o700)  # keys, logs and the node data: its owner's alone
    federation = Federation(name=name, directory=str(directory), superlink_port=free_port(),
                            nodes=nodes, tls=tls, auth=auth, warm_clientapps=warm_clientapps,
                            fast_supernodes=fast_supernodes)
    federation.save()  # from here on, `down` can clean up whatever was started

    def start_superlink() -> None:
        _start_superlink(federation)
        write_connection(federation)

    def split_data() -> None:
        federation.node_data = [str(p) for p in split_node_data(
            data, directory / "data", nodes, seed)]

    steps: list[tuple[str, Callable[[], None]]] = [
        ("SuperLink", start_superlink),
        *([("Fleet proxy", lambda: _start_fleet_proxy(federation))] if tls else []),
        *([("warm ClientApps", lambda: _start_warm_server(federation))]
          if warm_clientapps else []),
        *([("node data", split_data)] if data is not None else []),
        *[(f"SuperNode {i + 1}/{nodes}", lambda: add_supernode(federation))
          for i in range(nodes)]]
    # On stderr, so that `up`'s own output (the connection, as JSON with --json) stays clean.
    with tqdm(steps, desc=f"starting '{name}'", unit="step", leave=False) as progress:
        try:
            for step, start in progress:
                progress.set_postfix_str(step)
                start()
        except BaseException:
            down(name)
            raise
    return federation


def _start_superlink(federation: Federation) -> None:
    command = ["flower-superlink", "--host", "127.0.0.1",
               "--port", str(federation.superlink_port),
               "--database", str(federation.path("superlink.db")),
               # Nodes run the app with the packages `pip install -e .` installed.
               "--disable-runtime-dependency-installation"]
    if federation.tls:
        write_tls_files(federation.path())
        command += ["--ssl-ca-certfile", str(federation.path("ca.crt")),
                    "--ssl-certfile", str(federation.path("server.pem")),
                    "--ssl-keyfile", str(federation.path("server.key"))]
    else:
        command.append("--insecure")
    if federation.auth:
        command.append("--enable-supernode-auth")
    federation.superlink_command = command
    _launch_superlink(federation)


def _start_fleet_proxy(federation: Federation) -> None:
    """nginx on a free loopback port, forwarding the Fleet API alone to the SuperLink."""
    federation.fleet_port = free_port()
    fleet_proxy.write_config(federation.path(), f"127.0.0.1:{federation.fleet_port}",
                             federation.address)
    log_file = federation.path("fleet-proxy.log")
    federation.proxy_pid = _start(fleet_proxy.command(federation.path()), log_file)
    federation.save()
    _wait_for_port(federation.fleet_port, federation.proxy_pid, log_file, "the Fleet proxy")


def _launch_superlink(federation: Federation) -> None:
    log_file = federation.path("superlink.log")
    federation.superlink_pid = _start(federation.superlink_command, log_file)
    federation.save()
    _wait_for_port(federation.superlink_port, federation.superlink_pid, log_file)


def restart_superlink(federation: Federation, kill: bool = True) -> int:
    """Stop the SuperLink (SIGKILL by default, as a crash would) and start it again
    with the same command, so on the same port and database; return its new PID.
    SuperNodes keep retrying meanwhile and reconnect by themselves."""
    if _is_ours(federation.superlink_pid):
        stop_process_tree(federation.superlink_pid, first_signal=_stop_signal(kill))
    _launch_superlink(federation)
    return federation.superlink_pid


def _stop_signal(kill: bool) -> signal.Signals:
    return signal.SIGKILL if kill else signal.SIGTERM


def restart_supernode(federation: Federation, node: int, kill: bool = True) -> int:
    """Stop SuperNode ``node`` (SIGKILL by default) and start it again with the same
    command (same key, data and node config); return its new PID.

    After a SIGKILL, flwr 1.42's SuperLink refuses the same key until it has marked
    the old session offline (two missed 30 s heartbeats), and the new SuperNode
    exits with code 305; a graceful stop (``kill=False``) deregisters it first."""
    if _is_ours(federation.supernode_pids[node]):
        stop_process_tree(federation.supernode_pids[node], first_signal=_stop_signal(kill))
    federation.supernode_pids[node] = _start(federation.supernode_commands[node],
                                             federation.path(f"supernode-{node}.log"),
                                             _supernode_env(federation))
    federation.save()
    return federation.supernode_pids[node]


def add_supernode(federation: Federation, register: bool = True) -> int:
    """Start one more SuperNode; return its PID.

    With auth, ``register=False`` leaves its key unregistered, which the SuperLink
    must refuse.
    """
    node = len(federation.supernode_pids)
    num_partitions = federation.nodes
    if federation.node_data:
        node_config = f"data-path='{federation.node_data[node % num_partitions]}'"
    else:
        node_config = f"partition-id={node % num_partitions} num-partitions={num_partitions}"
    threads = max(1, (os.cpu_count() or 1) // num_partitions)
    program = ([sys.executable, "-m", FAST_SUPERNODE] if federation.fast_supernodes
               else ["flower-supernode"])
    command = [*program, "--superlink", federation.fleet_address,
               "--port", str(free_port()),
               "--node-config", f"{node_config} torch-threads={threads}"]
    if federation.tls:
        command += ["--root-certificates", str(federation.path("ca.crt"))]
    else:
        command.append("--insecure")
    if federation.auth:
        private, public = write_node_keys(federation.path(), f"node-{node}-key")
        command += ["--auth-supernode-private-key", str(private)]
        if register:
            registered = _flwr("supernode", "register", str(public), federation.name)
            if registered.returncode != 0:
                raise RuntimeError(f"`flwr supernode register` failed: "
                                   f"{registered.stdout}{registered.stderr}")
    pid = _start(command, federation.path(f"supernode-{node}.log"), _supernode_env(federation))
    federation.supernode_pids.append(pid)
    federation.supernode_commands.append(command)
    federation.save()
    return pid


def down(name: str = DEFAULT_NAME) -> None:
    """Stop the processes ``up`` started for ``name`` and forget the connection."""
    directory = state_dir(name)
    if not (directory / STATE_FILE).exists():
        raise RuntimeError(f"no federation '{name}' is up (nothing in {directory})")
    federation = Federation.load(name)
    for pid in [*federation.supernode_pids, federation.superlink_pid,
                federation.warm_server_pid, federation.proxy_pid]:
        if pid and _is_ours(pid):
            stop_process_tree(pid)
    federation.warm_socket.unlink(missing_ok=True)
    remove_connection(name)
    (directory / STATE_FILE).unlink()


def _is_ours(pid: int) -> bool:
    """Guard against a recycled PID: only stop Flower processes and the warm server."""
    try:
        command = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return any(name.encode() in command
               for name in ("flower-super", FAST_SUPERNODE, warm_clientapp.MODULE,
                            fleet_proxy.CONFIG_FILE))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcifar_app.ops.federation",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    start = commands.add_parser("up", help="start a SuperLink and SuperNodes")
    start.add_argument("--nodes", type=int, default=3, help="SuperNodes (default 3)")
    start.add_argument("--tls", action="store_true", help="serve TLS with a generated CA")
    start.add_argument("--auth", action="store_true",
                       help="SuperNode authentication with generated, registered keys")
    start.add_argument("--data", type=Path,
                       help="folder with train.parquet to split into per-node folders")
    start.add_argument("--seed", type=int, default=42, help="seed of the data split")
    start.add_argument("--cold-clientapps", action="store_true",
                       help="start a fresh flwr-clientapp process per message, as Flower "
                       "does, instead of forking it from a warm server")
    start.add_argument("--stock-supernodes", action="store_true",
                       help="run flower-supernode as it is, with its 3 s pause after an "
                       "empty pull, instead of fedcifar_app.ops.fast_supernode")
    stop = commands.add_parser("down", help="stop what `up` started")
    for sub in (start, stop):
        sub.add_argument("--name", default=DEFAULT_NAME,
                         help=f"connection name in config.toml (default {DEFAULT_NAME})")
    args = parser.parse_args(argv)
    try:
        if args.command == "down":
            down(args.name)
            print(f"Stopped federation '{args.name}'.")
            return 0
        if args.nodes < 1:
            parser.error("--nodes must be >= 1")
        federation = up(args.nodes, args.name, args.tls, args.auth,
                        args.data.resolve() if args.data else None, args.seed,
                        warm_clientapps=not args.cold_clientapps,
                        fast_supernodes=not args.stock_supernodes)
    except RuntimeError as err:  # ProxyUnavailable too
        print(f"error: {err}", file=sys.stderr)
        return 1
    security = ", ".join(s for s, on in (("TLS", args.tls), ("SuperNode auth", args.auth))
                         if on) or "insecure"
    proxy = (f", SuperNodes through the Fleet-only proxy {federation.fleet_address} (PID "
             f"{federation.proxy_pid})" if federation.proxy_pid else "")
    print(f"Federation '{args.name}' is up ({security}): SuperLink {federation.address} "
          f"(PID {federation.superlink_pid}){proxy}, {args.nodes} SuperNodes (PIDs "
          f"{', '.join(map(str, federation.supernode_pids))}).\n"
          f"State and logs: {federation.directory}\n"
          f"Run:  flwr run . {args.name} --stream\n"
          f"Stop: python -m fedcifar_app.ops.federation down --name {args.name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

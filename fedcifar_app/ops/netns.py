"""A multi-host federation on one machine: one network namespace per host.

    sudo python -m fedcifar_app.ops.netns --data /abs/path/to/cifar10 [--rounds 3]

Builds a small network of Linux network namespaces: a switch (a bridge in a
namespace of its own), the SuperLink at 10.0.0.5 (so the documented certificate
recipe, for ``superlink.example.org`` and ``10.0.0.5``, runs unchanged), a
workstation that runs ``flwr``, and N SuperNodes, each on a veth link to the
switch; ``superlink.example.org`` resolves to 10.0.0.5 inside the namespaces
(``/etc/netns/<ns>/hosts``; the machine's own /etc/hosts is not touched). Then
it follows docs/deployment.md's "Across machines, by hand" commands (``DOCUMENTED_COMMANDS``;
the tests check that the page holds each one verbatim): certificates, the
SuperLink on the host's loopback, the Fleet-only proxy (nginx) on port 8000, the
connection entry and a registered key per SuperNode on the SuperLink's host, the
SuperNodes with their own data folders, and ``flwr run`` on the SuperLink's host;
the workstation is an outsider that can reach port 8000 and nothing else. Node 0's
uplink is limited with a ``tc`` token bucket and node 1 drops incoming packets at
random with nftables (``--no-impair`` turns both off). Every namespace, link and
process it made is removed at the end, also on failure, Ctrl-C or SIGTERM. Needs root (or
CAP_NET_ADMIN), ``ip``, ``tc``, ``nft``, ``openssl``, ``ssh-keygen`` and ``nginx``.
The tests use ``Network`` directly to cut links and kill nodes mid-run.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from fedcifar_app.ops.fleet_proxy import NGINX_CONFIG, START_COMMAND
from fedcifar_app.ops.local_simulation import is_alive, stop_process_tree

SUBNET_BITS = 24
SUPERLINK_ADDRESS = "10.0.0.5"
SUPERLINK_NAME = "superlink.example.org"
# The SuperLink's own port, on its host's loopback; SuperNodes use the proxy's, 8000.
SUPERLINK_LOOPBACK = "127.0.0.1:9091"
WORKSTATION_ADDRESS = "10.0.0.2"
CONNECTION = "remote-federation"
# flwr run . and flwr supernode register run from the project folder.
ROOT = Path(__file__).resolve().parents[2]

# docs/deployment.md's by-hand commands, as this module runs them (tests/ops/test_netns.py
# checks that the page holds each line verbatim). {key}, {node} and {data} are filled in.
DOCUMENTED_COMMANDS = {
    "certificates": [
        "openssl ecparam -genkey -name secp384r1 -out ca.key",
        'openssl req -x509 -new -key ca.key -subj "/CN=fedcifar CA" -days 365 -out ca.crt',
        "openssl ecparam -genkey -name secp384r1 -out server.key",
        'openssl req -new -key server.key -subj "/CN=superlink.example.org" -out server.csr',
        "openssl x509 -req -in server.csr -CA ca.crt -CAkey ca.key -CAcreateserial -days 365 \\",
        '  -out server.pem -extfile <(printf "subjectAltName=DNS:superlink.example.org,'
        'IP:10.0.0.5,IP:127.0.0.1,DNS:localhost")',
    ],
    "superlink": [
        "export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.25",
        "flower-superlink --host 127.0.0.1 --port 9091 --database superlink.db \\",
        "  --ssl-ca-certfile ca.crt --ssl-certfile server.pem --ssl-keyfile server.key \\",
        "  --enable-supernode-auth --disable-runtime-dependency-installation",
    ],
    # Braces doubled: script() formats every step.
    "proxy": [
        "cat > fleet-proxy.conf <<'EOF'",
        *NGINX_CONFIG.format(listen="8000", superlink=SUPERLINK_LOOPBACK)
        .replace("{", "{{").replace("}", "}}").splitlines(),
        "EOF",
        START_COMMAND,
    ],
    "connection": [
        "[superlink.remote-federation]",
        f'address = "{SUPERLINK_LOOPBACK}"',
        'root-certificates = "{ca}"',
    ],
    "register": [
        'ssh-keygen -t ecdsa -b 384 -N "" -f {key}.key',
        "flwr supernode register {key}.key.pub remote-federation",
    ],
    "supernode": [
        "export FLWR_SUPEREXEC_TASK_POLL_INTERVAL=0.25",
        "flower-supernode --superlink superlink.example.org:8000 --root-certificates ca.crt \\",
        "  --auth-supernode-private-key {key}.key --port 9094 \\",
        "  --node-config \"data-path='{data}'\"",
    ],
}


class NetnsUnavailable(RuntimeError):
    """This machine does not let us create network namespaces or lacks a tool."""


def check_available() -> None:
    """Raise NetnsUnavailable, saying why, unless namespaces and the tools work here."""
    missing = [tool for tool in ("ip", "tc", "nft", "openssl", "ssh-keygen", "nginx")
               if shutil.which(tool) is None]
    if missing:
        raise NetnsUnavailable(f"missing tools: {', '.join(missing)} (Debian: iproute2, "
                               "nftables, openssl, openssh-client, nginx-light)")
    probe = f"fcprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        raise NetnsUnavailable(f"`ip netns add` is not permitted here: {made.stderr.strip()}")
    subprocess.run(["ip", "netns", "del", probe], check=False)


def can_run_here() -> bool:
    """Whether namespaces and the tools work here; if not, say why on stderr."""
    try:
        check_available()
    except NetnsUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return False
    return True


def demo_parser(prog: str, description: str, rounds: int) -> argparse.ArgumentParser:
    """The options of the one-machine demos (this module's and ray_cluster's)."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("--data", type=Path, required=True,
                        help="folder with train.parquet and test.parquet")
    parser.add_argument("--rounds", type=int, default=rounds)
    return parser


def _ip(*args: str, namespace: str | None = None) -> None:
    prefix = ["ip", "netns", "exec", namespace] if namespace else []
    subprocess.run([*prefix, "ip", *args], check=True, capture_output=True, text=True)


@dataclass
class Network:
    """Namespaces on one bridge; ``with Network(...) as net`` removes them all after."""

    hosts: dict[str, str]  # host name -> IPv4 address
    tag: str = field(default_factory=lambda: f"fc{os.getpid() % 100000}")
    processes: list[int] = field(default_factory=list)

    def namespace(self, host: str) -> str:
        return f"{self.tag}-{host}"

    @property
    def switch(self) -> str:
        return f"{self.tag}-sw"

    def switch_port(self, host: str) -> str:
        # Interface names are at most 15 bytes.
        return f"{self.tag}{list(self.hosts).index(host)}"

    def __enter__(self) -> Network:
        try:
            self._build()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _build(self) -> None:
        _ip("netns", "add", self.switch)
        _ip("link", "add", "br0", "type", "bridge", namespace=self.switch)
        _ip("link", "set", "br0", "up", namespace=self.switch)
        hosts_file = f"{SUPERLINK_ADDRESS} {SUPERLINK_NAME}\n127.0.0.1 localhost\n"
        for host, address in self.hosts.items():
            namespace, port = self.namespace(host), self.switch_port(host)
            _ip("netns", "add", namespace)
            etc = Path("/etc/netns", namespace)
            etc.mkdir(parents=True, exist_ok=True)
            (etc / "hosts").write_text(hosts_file)
            _ip("link", "add", port, "type", "veth", "peer", "name", "eth0",
                "netns", namespace, namespace=self.switch)
            _ip("link", "set", port, "master", "br0", "up", namespace=self.switch)
            _ip("addr", "add", f"{address}/{SUBNET_BITS}", "dev", "eth0", namespace=namespace)
            _ip("link", "set", "eth0", "up", namespace=namespace)
            _ip("link", "set", "lo", "up", namespace=namespace)

    def close(self) -> None:
        """Stop every process in the namespaces, then delete them (and their links)."""
        for pid in self.processes:
            if is_alive(pid):
                stop_process_tree(pid, timeout=5)
        for namespace in [*map(self.namespace, self.hosts), self.switch]:
            pids = subprocess.run(["ip", "netns", "pids", namespace], capture_output=True,
                                  text=True).stdout.split()
            for pid in map(int, pids):
                stop_process_tree(pid, timeout=5, first_signal=signal.SIGKILL)
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True)
            shutil.rmtree(Path("/etc/netns", namespace), ignore_errors=True)
        try:  # /etc/netns itself, once empty
            Path("/etc/netns").rmdir()
        except OSError:
            pass

    def command(self, host: str, command: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.namespace(host), *command]

    def start(self, host: str, script: str, cwd: Path, log: Path,
              env: dict[str, str] | None = None) -> int:
        """Run a bash script in ``host``'s namespace in the background; return its PID."""
        with open(log, "ab") as out:
            process = subprocess.Popen(self.command(host, ["bash", "-c", script]), cwd=cwd,
                                       stdout=out, stderr=subprocess.STDOUT,
                                       stdin=subprocess.DEVNULL, start_new_session=True,
                                       env={**os.environ, **(env or {})})
        self.processes.append(process.pid)
        return process.pid

    def run(self, host: str, script: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
        done = subprocess.run(self.command(host, ["bash", "-c", script]), cwd=cwd,
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **(env or {})})
        if done.returncode != 0:
            raise RuntimeError(f"on {host}: `{script}` failed:\n{done.stdout}{done.stderr}")
        return done

    def training_on(self, host: str) -> bool:
        """Whether a ClientApp process runs in ``host``'s namespace."""
        pids = subprocess.run(["ip", "netns", "pids", self.namespace(host)],
                              capture_output=True, text=True).stdout.split()
        for pid in pids:
            try:
                if b"flwr-clientapp" in Path(f"/proc/{pid}/cmdline").read_bytes():
                    return True
            except OSError:
                continue
        return False

    def limit_uplink(self, host: str, rate: str = "2mbit") -> None:
        """A token bucket on the host's outgoing traffic: a slow uplink."""
        subprocess.run(self.command(host, ["tc", "qdisc", "add", "dev", "eth0", "root", "tbf",
                                           "rate", rate, "burst", "32kbit",
                                           "latency", "400ms"]), check=True)

    def drop_randomly(self, host: str, percent: int = 1) -> None:
        """nftables drops ``percent`` % of the packets the host receives."""
        rules = ("table inet fedcifar_loss {\n chain input {\n"
                 "  type filter hook input priority 0; policy accept;\n"
                 f"  numgen random mod 100 < {percent} drop\n }}\n}}\n")
        subprocess.run(self.command(host, ["nft", "-f", "-"]), input=rules, text=True,
                       check=True)

    def cut(self, host: str) -> None:
        """Take the host's link down at the switch: no goodbye, packets just vanish."""
        _ip("link", "set", self.switch_port(host), "down", namespace=self.switch)

    def restore(self, host: str) -> None:
        _ip("link", "set", self.switch_port(host), "up", namespace=self.switch)


def script(step: str, **values: str) -> str:
    return "\n".join(DOCUMENTED_COMMANDS[step]).format(**values)


@dataclass
class Federation:
    """The documented deployment inside a Network: SuperLink, workstation, SuperNodes."""

    network: Network
    directory: Path
    node_data: list[Path]
    supernode_pids: list[int] = field(default_factory=list)
    superlink_pid: int = 0
    proxy_pid: int = 0

    @property
    def flwr_env(self) -> dict[str, str]:
        """flwr on the SuperLink's host, the one place its Control API answers."""
        return {"FLWR_HOME": str(self.directory / "superlink" / "flwr-home")}

    @staticmethod
    def home(directory: Path) -> dict[str, str]:
        """Each host keeps its Flower state (installed FABs) in its own folder."""
        return {"FLWR_HOME": str(directory / "flwr-home")}

    def host_dir(self, host: str) -> Path:
        path = self.directory / host
        path.mkdir(parents=True, exist_ok=True)
        return path

    def start(self) -> None:
        link = self.host_dir("superlink")
        self.network.run("superlink", script("certificates"), link)
        self.superlink_pid = self.network.start("superlink", script("superlink"), link,
                                                link / "superlink.log", self.home(link))
        self.proxy_pid = self.network.start("superlink", script("proxy"), link,
                                            link / "fleet-proxy.log")
        connection = self.directory / "superlink" / "flwr-home" / "config.toml"
        connection.parent.mkdir(parents=True, exist_ok=True)
        connection.write_text(script("connection", ca=str(link / "ca.crt")) + "\n")
        for node, data in enumerate(self.node_data):
            self.start_supernode(node, data)

    def start_supernode(self, node: int, data: Path) -> None:
        host = f"node{node}"
        directory = self.host_dir(host)
        shutil.copy(self.directory / "superlink" / "ca.crt", directory / "ca.crt")
        key = f"node-{node}"
        # Registering needs the SuperLink; it may still be starting.
        deadline = time.monotonic() + 60
        while True:
            try:
                self.network.run("superlink", script("register", key=str(directory / key)),
                                 ROOT, env=self.flwr_env)
                break
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                (directory / f"{key}.key").unlink(missing_ok=True)
                (directory / f"{key}.key.pub").unlink(missing_ok=True)
                time.sleep(2)
        self.supernode_pids.append(self.network.start(
            host, script("supernode", key=key, data=str(data)), directory,
            directory / "supernode.log", self.home(directory)))

    def flwr(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run(self.network.command("superlink", ["flwr", *args]), cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, **self.flwr_env})

    def flwr_from(self, host: str, *args: str) -> subprocess.CompletedProcess:
        """flwr on another host, whose only way in is the proxy's port (what a SuperNode
        uses): connection ``outside``, superlink.example.org:8000 with the CA."""
        home = self.host_dir(host) / "outsider-flwr-home"
        home.mkdir(exist_ok=True)
        (home / "config.toml").write_text(
            f'[superlink.outside]\naddress = "{SUPERLINK_NAME}:8000"\n'
            f'root-certificates = "{self.directory / "superlink" / "ca.crt"}"\n')
        return subprocess.run(self.network.command(host, ["flwr", *args]), cwd=ROOT,
                              capture_output=True, text=True, timeout=60,
                              env={**os.environ, "FLWR_HOME": str(home)})

    def online_nodes(self) -> int:
        listing = self.flwr("supernode", "ls", CONNECTION, "--format", "json")
        try:
            nodes = json.loads(listing.stdout)["nodes"]
        except (ValueError, KeyError):
            return 0
        return sum(node["status"] == "online" for node in nodes)

    def run(self, run_config: str) -> subprocess.Popen:
        """`flwr run . remote-federation --stream` on the SuperLink's host, in the background."""
        process = subprocess.Popen(
            self.network.command("superlink", ["flwr", "run", ".", CONNECTION, "--stream",
                                                 "--run-config", run_config]),
            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, **self.flwr_env}, start_new_session=True)
        self.network.processes.append(process.pid)
        return process


def topology(nodes: int) -> dict[str, str]:
    return {"superlink": SUPERLINK_ADDRESS, "workstation": WORKSTATION_ADDRESS,
            **{f"node{i}": f"10.0.0.{10 + i}" for i in range(nodes)}}


def wait_for(condition, timeout: float, what: str) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(1)


def main(argv: Sequence[str] | None = None) -> int:
    parser = demo_parser("python -m fedcifar_app.ops.netns", __doc__.split("\n\n")[0], rounds=3)
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--no-impair", action="store_true",
                        help="no slow uplink on node 0, no packet loss on node 1")
    args = parser.parse_args(argv)
    if not can_run_here():
        return 1
    # Stopped with SIGTERM (kill, timeout) as with Ctrl-C: the network is removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    from fedcifar_app.ops.federation import split_node_data

    data = args.data.resolve()
    with tempfile.TemporaryDirectory(prefix="fedcifar-netns-") as tmp, \
            Network(topology(args.nodes)) as network:
        folders = split_node_data(data, Path(tmp) / "data", args.nodes, seed=42)
        federation = Federation(network, Path(tmp), folders)
        federation.start()
        if not args.no_impair:
            network.limit_uplink("node0")
            if args.nodes > 1:
                network.drop_randomly("node1")
        wait_for(lambda: federation.online_nodes() == args.nodes, 120, "the SuperNodes")
        run = federation.run(f"dataset='{data}' num-server-rounds={args.rounds} "
                             f"min-available-nodes={args.nodes}")
        for line in run.stdout:
            print(line, end="")
        run.wait()
        print(federation.flwr("ls", CONNECTION).stdout)
        return run.returncode


if __name__ == "__main__":
    sys.exit(main())

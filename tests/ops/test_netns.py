"""A multi-host federation on one machine (fedcifar_app/ops/netns.py): docs/deployment.md's by-hand
commands in network namespaces, with a slow uplink, a lossy link, a link cut while
its node trains, a node SIGKILLed mid-round, and FedBuff against a synchronous round
with a throttled node and a paused one. Needs root and `ip netns`; skipped,
saying why, where that is not permitted."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcifar_app.ops import netns
from fedcifar_app.ops.federation import split_node_data
from fedcifar_app.ops.local_simulation import signal_process_tree, stop_process_tree
from fedcifar_app.results import load_results

# Minutes, not seconds (network namespaces and a deployment): `pytest -m "not slow"` skips it.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
# The documented example values for what fedcifar_app/ops/netns.py fills in.
DOCUMENTED_EXAMPLE = {"key": "node-a", "data": "/data/cifar10-site-a", "ca": "/path/to/ca.crt"}


def test_the_readme_holds_every_by_hand_command_the_namespace_setup_runs() -> None:
    readme = (ROOT / "docs" / "deployment.md").read_text()
    for step in netns.DOCUMENTED_COMMANDS:
        for line in netns.script(step, **DOCUMENTED_EXAMPLE).splitlines():
            assert line in readme, f"docs/deployment.md lacks the {step} line: {line}"


@pytest.fixture
def network() -> netns.Network:
    try:
        netns.check_available()
    except netns.NetnsUnavailable as err:
        pytest.skip(f"no multi-host test here: {err}")
    with netns.Network(netns.topology(3)) as built:
        yield built
    leftover = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert built.tag not in leftover
    assert not any(Path("/etc/netns", built.namespace(host)).exists() for host in built.hosts)


def entries(out: Path) -> list[dict]:
    written = list(out.glob("flwr-run-*/results.json"))
    return load_results(written[0].parent)["entries"] if written else []


def test_a_cut_link_and_a_sigkill_mid_round_do_not_stop_the_run(
        network: netns.Network, tiny_dataset: Path, tmp_path: Path) -> None:
    folders = split_node_data(tiny_dataset, tmp_path / "data", 3, seed=42)
    federation = netns.Federation(network, tmp_path / "hosts", folders)
    federation.start()
    network.limit_uplink("node0")  # 2 Mbit/s: a model transfer takes real time
    network.drop_randomly("node1")  # 1 % of incoming packets dropped
    netns.wait_for(lambda: federation.online_nodes() == 3, 120, "3 SuperNodes online")

    out = tmp_path / "out"
    run = federation.run(
        f"dataset='{tiny_dataset}' cache-dir='{tmp_path / 'cache'}' output-dir='{out}' "
        "num-server-rounds=3 fraction-train=1.0 fraction-evaluate=0.0 "
        "min-available-nodes=1 round-timeout=60.0 local-epochs=30")
    started = time.monotonic()
    try:
        # Round 0's evaluation is written once every node has said which partition it
        # holds (a ClientApp per node): a ClientApp after that trains.
        netns.wait_for(lambda: len(entries(out)) >= 1, 120, "the run to start")
        netns.wait_for(lambda: network.training_on("node2"), 120, "node 2 to train")
        network.cut("node2")  # mid-training, no goodbye
        netns.wait_for(lambda: len(entries(out)) >= 2 and "train_nodes" in entries(out)[1],
                       120, "round 1 to complete without node 2")
        network.restore("node2")
        netns.wait_for(lambda: network.training_on("node1"), 120, "node 1 to train again")
        stop_process_tree(federation.supernode_pids[1], first_signal=signal.SIGKILL)
        output, _ = run.communicate(timeout=300)
    finally:
        run.kill()
    elapsed = time.monotonic() - started
    (run_dir,) = out.glob("flwr-run-*")
    results = load_results(run_dir)
    assert results["status"] == "completed", output[-3000:]
    assert elapsed < 360
    rounds = results["entries"]
    assert [e["round"] for e in rounds] == [0, 1, 2, 3]
    ((cut_node, _why),) = rounds[1]["train_failed_nodes"]
    assert rounds[1]["train_replies"] == 2
    # The cut node's link came back: it trains again in a later round.
    assert any(cut_node in e["train_nodes"] for e in rounds[2:])
    # Node 1 was SIGKILLed while training in round 2 (or 3): that round still completed.
    killed_round = next(e for e in rounds[2:] if e["train_failed_nodes"])
    assert killed_round["train_replies"] >= 1
    listing = json.loads(federation.flwr("ls", netns.CONNECTION, "--format", "json").stdout)
    assert listing["runs"][0]["status"] == "finished:completed"


def test_only_supernodes_get_in_through_the_readmes_proxy(
        network: netns.Network, tiny_dataset: Path, tmp_path: Path) -> None:
    """The documented deployment, literally: from a SuperNode's namespace and from the
    workstation, registering a key, listing runs, starting a run and calling the Runtime
    API are refused at the proxy (403), and the SuperLink's own port cannot be reached; the SuperNodes train
    through the proxy and the run, started on the SuperLink's host, completes."""
    folders = split_node_data(tiny_dataset, tmp_path / "data", 3, seed=42)
    federation = netns.Federation(network, tmp_path / "hosts", folders)
    federation.start()
    netns.wait_for(lambda: federation.online_nodes() == 3, 120, "3 SuperNodes online")
    intruder = tmp_path / "intruder"
    subprocess.run(["ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f",
                    str(intruder)], check=True)
    for host in ("node0", "workstation"):
        for attempt in (["supernode", "register", f"{intruder}.pub", "outside"],
                        ["ls", "outside"], ["run", ".", "outside"]):
            done = federation.flwr_from(host, *attempt)
            assert done.returncode != 0, (host, attempt, done.stdout)
            assert "403 Forbidden" in done.stdout + done.stderr, (host, attempt, done.stdout)
        runtime = subprocess.run(network.command(host, [
            "curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST", "--cacert",
            str(tmp_path / "hosts" / "superlink" / "ca.crt"),
            "https://superlink.example.org:8000/v1/runtime/pull-messages"]),
            capture_output=True, text=True)
        assert runtime.stdout == "403", (host, runtime.stdout, runtime.stderr)
        direct = subprocess.run(network.command(host, [
            "python3", "-c", "import socket; socket.create_connection(('10.0.0.5', 9091), 5)"]),
            capture_output=True, text=True)
        assert "ConnectionRefusedError" in direct.stderr
    listing = json.loads(federation.flwr("supernode", "ls", netns.CONNECTION,
                                         "--format", "json").stdout)
    assert len(listing["nodes"]) == 3  # the intruder's key was never registered

    out = tmp_path / "out"
    run = federation.run(
        f"dataset='{tiny_dataset}' cache-dir='{tmp_path / 'cache'}' output-dir='{out}' "
        "num-server-rounds=2 fraction-train=1.0 fraction-evaluate=0.0 "
        "min-available-nodes=3 local-epochs=1")
    try:
        output, _ = run.communicate(timeout=300)
    finally:
        run.kill()
    (run_dir,) = out.glob("flwr-run-*")
    results = load_results(run_dir)
    assert results["status"] == "completed", output[-3000:]
    assert [e["train_replies"] for e in results["entries"][1:]] == [3, 3]


def test_fedbuff_does_not_wait_for_a_throttled_node_or_a_paused_one(
        network: netns.Network, tiny_dataset: Path, tmp_path: Path) -> None:
    """The same deployment, node 0's uplink at 128 kbit/s (the model's way up takes ~16 s)
    and node 1 SIGSTOPped while it trains: FedBuff steps on node 2's updates meanwhile and
    takes node 0's when it comes, stale; a synchronous round waits for both."""
    folders = split_node_data(tiny_dataset, tmp_path / "data", 3, seed=42)
    federation = netns.Federation(network, tmp_path / "hosts", folders)
    federation.start()
    network.limit_uplink("node0", rate="128kbit")
    netns.wait_for(lambda: federation.online_nodes() == 3, 120, "3 SuperNodes online")
    common = (f"dataset='{tiny_dataset}' cache-dir='{tmp_path / 'cache'}' "
              "fraction-evaluate=0.0 local-epochs=1")
    paused = federation.supernode_pids[1]
    try:
        fedbuff_out = tmp_path / "fedbuff"
        run = federation.run(f"{common} output-dir='{fedbuff_out}' strategy='fedbuff' "
                             "fedbuff-concurrency=3 fedbuff-buffer-size=1 num-server-rounds=5 "
                             "min-available-nodes=3 round-timeout=120.0")
        netns.wait_for(lambda: network.training_on("node1"), 120, "node 1 to train")
        signal_process_tree(paused, signal.SIGSTOP)
        started = time.monotonic()
        output, _ = run.communicate(timeout=300)
        fedbuff_s = time.monotonic() - started
        # The same pause in a synchronous round: node 1 back first, then paused as it trains.
        signal_process_tree(paused, signal.SIGCONT)
        netns.wait_for(lambda: federation.online_nodes() == 3, 120, "node 1 back online")
        sync_out = tmp_path / "sync"
        # All 3 sampled; the paused one fails after round-timeout (or once it is seen offline).
        run = federation.run(f"{common} output-dir='{sync_out}' num-server-rounds=1 "
                             "fraction-train=1.0 round-retries=0 min-available-nodes=2 "
                             "round-timeout=30.0")
        netns.wait_for(lambda: len(entries(sync_out)) >= 1, 120, "the sync run to start")
        netns.wait_for(lambda: network.training_on("node1"), 120, "node 1 to train")
        signal_process_tree(paused, signal.SIGSTOP)
        started = time.monotonic()
        sync_output, _ = run.communicate(timeout=300)
        sync_s = time.monotonic() - started
    finally:
        signal_process_tree(paused, signal.SIGCONT)
        run.kill()
    print(f"FedBuff, 5 steps: {fedbuff_s:.0f} s; one synchronous round: {sync_s:.0f} s")
    (fedbuff_dir,) = fedbuff_out.glob("flwr-run-*")
    results = load_results(fedbuff_dir)
    assert results["status"] == "completed", output[-3000:]
    jobs = [job for entry in results["entries"] for job in entry.get("jobs", ())]
    used = [job for job in jobs if job["outcome"] == "used"]
    assert len(used) == 5
    # The throttled node's update came last, stale, after the free node's had stepped.
    stale = [job for job in used if job["staleness"] > 0]
    assert stale and stale[0]["client"] != used[0]["client"]
    assert sum(job["client"] == used[0]["client"] for job in used[:used.index(stale[0])]) >= 2
    # The paused node's job never came back, and no step waited for it.
    clients = {job["client"] for job in used}
    assert len(clients) == 2
    (sync_dir,) = sync_out.glob("flwr-run-*")
    sync = load_results(sync_dir)
    assert sync["status"] == "completed", sync_output[-3000:]
    ((paused_node, why),) = sync["entries"][1]["train_failed_nodes"]
    assert paused_node not in clients and why in ("timed out", "disconnected")
    assert sync["entries"][1]["train_replies"] == 2


def test_a_stopped_demo_removes_its_network(tiny_dataset: Path) -> None:
    """`python -m fedcifar_app.ops.netns` stopped with SIGTERM (kill, a timeout) leaves no
    namespace and no process behind, as with Ctrl-C."""
    try:
        netns.check_available()
    except netns.NetnsUnavailable as err:
        pytest.skip(f"no multi-host test here: {err}")
    demo = subprocess.Popen([sys.executable, "-m", "fedcifar_app.ops.netns", "--data",
                             str(tiny_dataset), "--nodes", "1", "--rounds", "1"], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    tag = f"fc{demo.pid % 100000}-"
    try:
        netns.wait_for(lambda: any(netns_name.startswith(tag + "node0") for netns_name in
                                   subprocess.run(["ip", "netns", "list"], capture_output=True,
                                                  text=True).stdout.split()),
                       60, "the demo's namespaces")
        inside = {pid for host in ("superlink", "node0") for pid in subprocess.run(
            ["ip", "netns", "pids", tag + host], capture_output=True, text=True).stdout.split()}
        demo.send_signal(signal.SIGTERM)
        assert demo.wait(timeout=60) != 0
    finally:
        stop_process_tree(demo.pid, first_signal=signal.SIGKILL)
    assert tag not in subprocess.run(["ip", "netns", "list"], capture_output=True,
                                     text=True).stdout
    assert not [pid for pid in inside if Path(f"/proc/{pid}").exists()]

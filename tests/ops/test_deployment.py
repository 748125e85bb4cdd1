"""Real deployments on loopback: a SuperLink and SuperNodes as separate processes.

Every test gets its own FLWR_HOME and free ports from the launcher, and stops what
it started by PID (``federation.down``), whatever the outcome.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest
import tomli_w

from fedcifar_app.ops import federation as launcher
from fedcifar_app.ops import warm_clientapp
from fedcifar_app.ops.local_simulation import descendants
from fedcifar_app.results import load_results
from fedcifar_app.strategies import CHECKPOINT_FILE, load_checkpoint

# Minutes, not seconds (real SuperLinks and SuperNodes): `pytest -m "not slow"` skips it.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RUN_TIMEOUT = 300


@pytest.fixture
def flwr_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "flwr-home"
    monkeypatch.setenv("FLWR_HOME", str(home))
    return home


@pytest.fixture
def deploy(flwr_home: Path) -> Iterator:
    """Start federations with launcher.up; stop them all at the end, by PID."""
    started: list[launcher.Federation] = []

    def start(nodes: int, **options: object) -> launcher.Federation:
        if options.get("tls") and shutil.which("nginx") is None:
            pytest.skip("the launcher's TLS mode puts nginx in front: install nginx-light")
        started.append(launcher.up(nodes, **options))
        return started[-1]

    yield start
    for federation in started:
        pids = [federation.superlink_pid, *federation.supernode_pids,
                federation.warm_server_pid]
        tree = pids + [p for pid in pids for p in descendants(pid)]
        if (Path(federation.directory) / launcher.STATE_FILE).exists():
            launcher.down(federation.name)
        assert not [pid for pid in tree if launcher._is_ours(pid)]


def run_config(tiny_dataset: Path, tmp_path: Path, **values: object) -> str:
    settings = {"dataset": str(tiny_dataset), "cache-dir": str(tmp_path / "cache"),
                "output-dir": str(tmp_path / "out"), "num-server-rounds": 2,
                "fraction-train": 1.0, "fraction-evaluate": 1.0, "local-epochs": 1,
                **values}
    return " ".join(f"{k}={v!r}" if isinstance(v, str)
                    else f"{k}={str(v).lower()}" if isinstance(v, bool) else f"{k}={v}"
                    for k, v in settings.items())


def flwr(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(["flwr", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def flwr_run(connection: str, config: str) -> tuple[subprocess.CompletedProcess, dict]:
    done = flwr("run", ".", connection, "--stream", "--run-config", config,
                timeout=RUN_TIMEOUT)
    runs = json.loads(flwr("ls", connection, "--format", "json").stdout)["runs"]
    return done, max(runs, key=lambda r: r["pending-at"])


def online_nodes(connection: str) -> int:
    """Online SuperNodes; 0 while the SuperLink cannot answer (e.g. it is restarting, and
    `flwr` prints an error object instead of a listing)."""
    listing = flwr("supernode", "ls", connection, "--format", "json").stdout
    try:
        nodes = json.loads(listing)["nodes"]
    except (ValueError, KeyError):
        return 0
    return sum(node["status"] == "online" for node in nodes)


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.5)


def test_insecure_nodes_with_their_own_data_complete_and_resume(
        deploy, tiny_dataset: Path, tmp_path: Path, flwr_home: Path) -> None:
    federation = deploy(2, data=tiny_dataset)
    config_toml = (flwr_home / "config.toml").read_text()
    assert f'address = "{federation.address}"' in config_toml and "insecure = true" in config_toml
    assert len(federation.node_data) == 2
    wait_for(lambda: online_nodes(federation.name) == 2, 30, "2 SuperNodes online")

    done, status = flwr_run(federation.name, run_config(tiny_dataset, tmp_path))
    assert status["status"] == "finished:completed", done.stdout + done.stderr
    run_dir = tmp_path / "out" / f"flwr-run-{status['run-id']}"
    results = load_results(run_dir)
    assert [e["round"] for e in results["entries"]] == [0, 1, 2]
    # Each node trained on its own folder: 200 images each, 10 % held out.
    assert results["entries"][1]["samples_trained"] == 2 * 180
    assert (run_dir / CHECKPOINT_FILE).exists()

    resume = run_config(tiny_dataset, tmp_path, **{"num-server-rounds": 3,
                                                   "resume-from": str(run_dir)})
    done, status = flwr_run(federation.name, resume)
    assert status["status"] == "finished:completed", done.stdout + done.stderr
    resumed = load_results(tmp_path / "out" / f"flwr-run-{status['run-id']}")
    assert [e["round"] for e in resumed["entries"]] == [0, 1, 2, 3]
    assert resumed["resumed_from"]["round"] == 2
    assert resumed["entries"][:3] == results["entries"]
    assert resumed["best"]["test_accuracy"] == max(e["test_accuracy"]
                                                   for e in resumed["entries"])
    assert resumed["entries"][3]["samples_trained"] == 3 * 360


def test_tls_with_supernode_auth_completes_and_refuses_unknown_keys(
        deploy, tiny_dataset: Path, tmp_path: Path, flwr_home: Path) -> None:
    federation = deploy(2, tls=True, auth=True)
    assert "root-certificates" in (flwr_home / "config.toml").read_text()
    state = Path(federation.directory)
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    node_keys = sorted(state.glob("node-*-key"))
    assert len(node_keys) == 2
    for private in [state / "server.key", *node_keys]:
        assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
    # Only SuperNodes get in: where they connect, the Control API is refused.
    config_path = flwr_home / "config.toml"
    config = tomllib.loads(config_path.read_text())
    config["superlink"]["outside"] = {"address": federation.fleet_address,
                                      "root-certificates": str(state / "ca.crt")}
    config_path.write_text(tomli_w.dumps(config))
    _, intruder_key = launcher.write_node_keys(tmp_path, "intruder")
    for refused in (["ls", "outside"], ["supernode", "register", str(intruder_key), "outside"],
                    ["run", ".", "outside"]):
        done = launcher._flwr(*refused)
        assert done.returncode != 0 and "403 Forbidden" in done.stdout + done.stderr, refused
    wait_for(lambda: online_nodes(federation.name) == 2, 30, "2 SuperNodes online")

    intruder = launcher.add_supernode(federation, register=False)
    log = Path(federation.directory) / "superlink.log"
    wait_for(lambda: "No SuperNode found with the given public key" in log.read_text(), 30,
             "the SuperLink to refuse the unregistered key")
    wait_for(lambda: not launcher._is_ours(intruder), 60, "the refused SuperNode to exit")
    assert online_nodes(federation.name) == 2

    done, status = flwr_run(federation.name, run_config(tiny_dataset, tmp_path))
    assert status["status"] == "finished:completed", done.stdout + done.stderr
    results = load_results(tmp_path / "out" / f"flwr-run-{status['run-id']}")
    assert all(e["train_replies"] == 2 for e in results["entries"][1:])


def clientapps(federation: launcher.Federation) -> dict[int, int]:
    """ClientApps running now: process ID -> index of its SuperNode (a flwr-clientapp
    process below the SuperNode, or the warm server's shim standing in for one)."""
    markers = (b"flwr-clientapp", f"{warm_clientapp.MODULE}\0run".encode())
    running = {}
    for index, pid in enumerate(federation.supernode_pids):
        for child in descendants(pid):
            try:
                command = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if any(marker in command for marker in markers):
                running[child] = index
    return running


def training_node(federation: launcher.Federation) -> int | None:
    """The index of the SuperNode that is running a ClientApp now, if any."""
    return next(iter(clientapps(federation).values()), None)


def wait_for_run_start(tmp_path: Path) -> None:
    wait_for(lambda: any(tmp_path.glob("out/flwr-run-*/results.json")), 120,
             "the run to start")


def wait_for_training(federation: launcher.Federation, tmp_path: Path) -> None:
    """Until a node trains. Round 0's evaluation is written once every node has said
    which partition it holds (a ClientApp per node): a ClientApp after that trains."""
    wait_for_run_start(tmp_path)
    wait_for(lambda: training_node(federation) is not None, 120, "a node to train")


def start_run(federation: launcher.Federation, config: str) -> subprocess.Popen:
    return subprocess.Popen(["flwr", "run", ".", federation.name, "--stream",
                             "--run-config", config], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def finish(run: subprocess.Popen, federation: launcher.Federation) -> tuple[str, dict]:
    try:
        output, _ = run.communicate(timeout=RUN_TIMEOUT)
    finally:
        run.kill()
    runs = json.loads(flwr("ls", federation.name, "--format", "json").stdout)["runs"]
    return output, max(runs, key=lambda r: r["pending-at"])


def test_a_sigkilled_training_node_is_replaced_and_the_run_completes(
        deploy, tiny_dataset: Path, tmp_path: Path) -> None:
    """One node of three trains per round (fraction-train 0.5); it is SIGKILLed while
    training, so it sends no goodbye: the round gives its instruction to another node."""
    federation = deploy(3)
    wait_for(lambda: online_nodes(federation.name) == 3, 30, "3 SuperNodes online")
    config = run_config(tiny_dataset, tmp_path, **{
        "num-server-rounds": 2, "fraction-train": 0.5, "fraction-evaluate": 0.5,
        "min-available-nodes": 2, "round-timeout": 40.0,
        # Long enough local training that the kill lands inside round 1.
        "local-epochs": 200})
    run = start_run(federation, config)
    try:
        wait_for_training(federation, tmp_path)
        victim = training_node(federation)
        launcher.stop_process_tree(federation.supernode_pids[victim],
                                   first_signal=signal.SIGKILL)
        killed_at = time.monotonic()
    finally:
        output, status = finish(run, federation)
    assert status["status"] == "finished:completed", output
    # Bounded: detected by round-timeout (40 s) or the SuperLink's heartbeat check.
    assert time.monotonic() - killed_at < 150
    (run_dir,) = (tmp_path / "out").glob("flwr-run-*")
    results = load_results(run_dir)
    assert [e["round"] for e in results["entries"]] == [0, 1, 2]
    round_one = results["entries"][1]
    assert round_one["train_failures"] == 1 and round_one["train_replacements"] == 1
    assert round_one["train_replies"] == 1 and len(round_one["train_failed_nodes"]) == 1
    assert results["entries"][2]["train_replies"] == 1
    assert results["status"] == "completed"


def test_a_restarted_node_is_sampled_again(deploy, tiny_dataset: Path,
                                           tmp_path: Path) -> None:
    """With SuperNode auth a node keeps its identity (its key) across a restart. The
    restart is graceful: after a crash, flwr 1.42 refuses the same key until the
    SuperLink has marked the old session offline (docs/failures.md, "When nodes fail")."""
    federation = deploy(2, tls=True, auth=True)
    wait_for(lambda: online_nodes(federation.name) == 2, 30, "2 SuperNodes online")
    config = run_config(tiny_dataset, tmp_path, **{
        "num-server-rounds": 4, "min-available-nodes": 1, "round-timeout": 40.0,
        "local-epochs": 100})
    run = start_run(federation, config)
    try:
        wait_for_training(federation, tmp_path)
        launcher.restart_supernode(federation, 0, kill=False)
    finally:
        output, status = finish(run, federation)
    assert status["status"] == "finished:completed", output
    (run_dir,) = (tmp_path / "out").glob("flwr-run-*")
    entries = load_results(run_dir)["entries"]

    def nodes_sent_to(entry: dict) -> set[int]:
        return set(entry["train_nodes"]) | {node for node, _ in entry["train_failed_nodes"]}

    assert len(nodes_sent_to(entries[1])) == 2
    # The restarted node, with its old node ID, trains again in the last round.
    assert set(entries[-1]["train_nodes"]) == nodes_sent_to(entries[1])


def test_a_crashed_superlink_restarts_and_the_run_resumes_from_its_checkpoint(
        deploy, tiny_dataset: Path, tmp_path: Path) -> None:
    federation = deploy(2)
    wait_for(lambda: online_nodes(federation.name) == 2, 30, "2 SuperNodes online")
    config = run_config(tiny_dataset, tmp_path, **{"num-server-rounds": 4,
                                                   "local-epochs": 100})
    run = start_run(federation, config)
    out = tmp_path / "out"
    try:
        wait_for(lambda: any(out.glob(f"flwr-run-*/{CHECKPOINT_FILE}")), 180,
                 "round 1's checkpoint")
        launcher.restart_superlink(federation)  # SIGKILL, then the same command
    finally:
        run.kill()
        run.communicate()
    (crashed,) = out.glob("flwr-run-*")
    done_rounds = load_checkpoint(str(crashed)).round
    assert 1 <= done_rounds < 4
    wait_for(lambda: online_nodes(federation.name) == 2, 60, "the nodes to reconnect")

    done, status = flwr_run(federation.name, run_config(
        tiny_dataset, tmp_path, **{"num-server-rounds": 4, "resume-from": str(crashed)}))
    assert status["status"] == "finished:completed", done.stdout + done.stderr
    resumed = load_results(out / f"flwr-run-{status['run-id']}")
    assert [e["round"] for e in resumed["entries"]] == list(range(5))
    assert resumed["resumed_from"]["round"] == done_rounds


def test_too_few_nodes_fail_within_the_wait(deploy, tiny_dataset: Path,
                                            tmp_path: Path) -> None:
    federation = deploy(1)
    wait_for(lambda: online_nodes(federation.name) == 1, 30, "1 SuperNode online")
    started = time.monotonic()
    done, status = flwr_run(federation.name, run_config(
        tiny_dataset, tmp_path, **{"min-available-nodes": 2, "node-wait-timeout": 5.0}))
    assert status["status"] == "finished:failed"
    assert "only 1 of the 2 nodes the run needs (min-available-nodes) connected within 5 s" \
        in done.stdout + done.stderr
    assert time.monotonic() - started < 60
    (run_dir,) = (tmp_path / "out").glob("flwr-run-*")
    assert load_results(run_dir)["status"] == "failed"


def test_secure_aggregation_completes_when_a_node_drops_after_the_key_exchange(
        deploy, tiny_dataset: Path, tmp_path: Path) -> None:
    """SecAgg+ across 3 SuperNodes (separate processes, own data) with 3 shares and a
    reconstruction threshold of 2: one node is SIGKILLed while it trains, after the
    key exchange. Its neighbours' shares remove its masks, and the round releases the
    other two nodes' mean."""
    federation = deploy(3)
    wait_for(lambda: online_nodes(federation.name) == 3, 30, "3 SuperNodes online")
    config = run_config(tiny_dataset, tmp_path, **{
        "secure-aggregation": True, "secagg-max-weight": 200.0, "num-server-rounds": 1,
        "fraction-evaluate": 0.0, "min-available-nodes": 2, "round-timeout": 120.0,
        # Local training of tens of seconds; the key exchange's ClientApps take ~1 s.
        "local-epochs": 1500})
    run = start_run(federation, config)
    try:
        wait_for_run_start(tmp_path)

        def training_for_a_while() -> bool:  # the same ClientApp still there 8 s later
            before = clientapps(federation)
            time.sleep(8)
            return bool(set(before) & set(clientapps(federation)))

        wait_for(training_for_a_while, 120, "a node to train (after the key exchange)")
        victim = next(index for pid, index in clientapps(federation).items())
        launcher.stop_process_tree(federation.supernode_pids[victim],
                                   first_signal=signal.SIGKILL)
    finally:
        output, status = finish(run, federation)
    assert status["status"] == "finished:completed", output
    (run_dir,) = (tmp_path / "out").glob("flwr-run-*")
    rounds = load_results(run_dir)["entries"][1:]
    assert [(e["train_replies"], e["train_failures"]) for e in rounds] == [(2, 1)]
    assert rounds[0]["test_accuracy"] > 0


def test_the_launchers_processes_send_no_telemetry(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLWR_TELEMETRY_ENABLED", "1")
    assert launcher.process_env({"EXTRA": "x"})["FLWR_TELEMETRY_ENABLED"] == "0"


def test_private_keys_are_never_readable_by_others() -> None:
    """Whatever the umask, server.key and node keys are created 0600, not chmodded
    after: user nobody cannot read them, in a folder anyone may enter."""
    folder = Path(tempfile.mkdtemp(prefix="fedcifar-keys-"))
    folder.chmod(0o755)
    umask = os.umask(0)
    try:
        launcher.write_tls_files(folder)
        private, public = launcher.write_node_keys(folder, "node")
        for key in (folder / "server.key", private):
            assert stat.S_IMODE(key.stat().st_mode) == 0o600, key
        assert stat.S_IMODE(public.stat().st_mode) == 0o666  # the public half may be read
        if os.geteuid() == 0 and shutil.which("setpriv"):
            for path, readable in ((folder / "server.key", False), (private, False),
                                   (public, True)):
                read = subprocess.run(["setpriv", "--reuid", "nobody", "--regid", "nogroup",
                                       "--clear-groups", "cat", str(path)],
                                      capture_output=True, text=True)
                assert (read.returncode == 0) == readable, (path, read.stderr)
    finally:
        os.umask(umask)
        shutil.rmtree(folder)

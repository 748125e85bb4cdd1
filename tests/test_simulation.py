"""A whole federated run through `flwr run .`, as users start it.

Each test module gets its own FLWR_HOME and free ports for the managed local
SuperLink, which is stopped by PID (with everything it started) at the end.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fedcifar_app import task
from fedcifar_app.data import PartitionScheme, load_partition
from fedcifar_app.results import (FINAL_MODEL_FILE, LOSS_PLOT_FILE, PARTITIONS_PLOT_FILE,
                                  PLOT_FILE, TIMELINE_FILE, load_results)
from tests.conftest import completed_run_and_output, flwr_run, mlflow_api, mlflow_server
from tests.test_tracking import tensorboard_series, wandb_series

# Minutes, not seconds (whole flwr run . simulations): `pytest -m "not slow"` skips it.
pytestmark = pytest.mark.slow


def completed_run(env: dict[str, str], tiny_dataset: Path, tmp_path: Path, settings: str,
                  out: str = "out", federation_config: str | None = None) -> Path:
    """`flwr run .` on the tiny data with ``settings``; assert it completed; its run folder."""
    return completed_run_and_output(env, tiny_dataset, tmp_path, settings, out,
                                    federation_config)[0]


def test_flwr_run_completes_and_writes_results(local_simulation: dict[str, str],
                                               tiny_dataset: Path, tmp_path: Path) -> None:
    run_config = (f"dataset='{tiny_dataset}' cache-dir='{tmp_path / 'cache'}' "
                  f"output-dir='{tmp_path / 'out'}' num-server-rounds=2 "
                  "fraction-train=1.0 fraction-evaluate=1.0 min-available-nodes=3 "
                  "partitioner='dirichlet' dirichlet-alpha=0.3 local-epochs=1 "
                  # SCAFFOLD needs each node's state to survive from one round to the next.
                  "strategy='scaffold'")
    done, status = flwr_run(local_simulation, run_config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert status["status"] == "finished:completed", done.stdout
    run_dir = tmp_path / "out" / f"flwr-run-{status['run-id']}"
    assert str(run_dir) in done.stdout
    # The engine runs in the ServerApp's process, which replaced its 0.1 s poll in time.
    assert "the simulation engine is woken by each message" in done.stdout
    results = load_results(run_dir)
    assert results["status"] == "completed" and results["kind"] == "federated"
    assert results["run_config"]["partitioner"] == "dirichlet"
    assert results["run_config"]["strategy"] == "scaffold"
    assert [e["round"] for e in results["entries"]] == [0, 1, 2]
    for entry in results["entries"][1:]:
        assert entry["train_replies"] == 3 and entry["train_failures"] == 0
        assert entry["evaluate_replies"] == 3
        assert 0 <= entry["test_accuracy"] <= 1 and "eval-accuracy" in entry["evaluate"]
    scheme = PartitionScheme("dirichlet", 3, 0.3, 2, 0.1, 42)
    partition_sizes = [len(load_partition(str(tiny_dataset), tmp_path / "cache", scheme, i)[0])
                       for i in range(3)]
    assert results["entries"][2]["samples_trained"] == 2 * sum(partition_sizes)
    net = task.Net()
    net.load_state_dict(torch.load(run_dir / FINAL_MODEL_FILE, weights_only=True))
    assert (run_dir / PLOT_FILE).exists()


def test_flwr_run_with_a_bad_config_fails_and_says_why(local_simulation: dict[str, str],
                                                       tmp_path: Path) -> None:
    run_config = f"num-server-rounds='two' output-dir='{tmp_path / 'out'}'"
    done, status = flwr_run(local_simulation, run_config)
    assert status["status"] == "finished:failed"
    assert "'num-server-rounds' expects an integer, got 'two' (str)" in done.stdout + done.stderr
    assert not (tmp_path / "out").exists()  # failed before anything was written
    if not torch.cuda.is_available():
        done, status = flwr_run(local_simulation, f"device='cuda' output-dir='{tmp_path}'")
        assert status["status"] == "finished:failed"
        assert "device 'cuda' is not available on this machine; available: cpu" \
            in done.stdout + done.stderr


def test_evaluation_every_k_rounds_and_folded_into_training(
        local_simulation: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    run_dir = completed_run(local_simulation, tiny_dataset, tmp_path,
                            "num-server-rounds=3 fraction-train=1.0 min-available-nodes=3 "
                            "local-epochs=1 evaluate-every=2 evaluate-in-train=true")
    entries = load_results(run_dir)["entries"]
    # The starting model, every 2nd round and the final model are tested on the server.
    assert [e["evaluated"] for e in entries] == [True, False, True, True]
    assert ["test_accuracy" in e for e in entries] == [True, False, True, True]
    # Each round's training replies carried the nodes' evaluation of the model they
    # received: rounds 0-2's global models; round 3's was never sent to a node.
    assert ["evaluate" in e for e in entries] == [True, True, True, False]
    assert all(e["evaluate_replies"] == 3 for e in entries[:3])
    assert entries[0]["evaluate"]["eval-accuracy"] == pytest.approx(0.1, abs=0.15)


def test_the_same_seed_gives_the_same_run(local_simulation: dict[str, str],
                                          tiny_dataset: Path, tmp_path: Path) -> None:
    """Two of the three simulated nodes train each round; which two, the order their
    updates are summed in and every random stream follow the seed, not the node IDs
    the simulation draws afresh for every run."""
    def history(seed: int) -> list[tuple]:
        run_dir = completed_run(
            local_simulation, tiny_dataset, tmp_path,
            f"num-server-rounds=3 seed={seed} fraction-train=0.67 fraction-evaluate=0.67 "
            "min-available-nodes=3 local-epochs=1 augment=true partitioner='dirichlet'")
        entries = load_results(run_dir)["entries"]
        assert all(e.get("train_replies", 2) == 2 for e in entries)
        return [(e["test_loss"], e["test_accuracy"], e.get("evaluate")) for e in entries]

    first = history(seed=3)
    assert history(seed=3) == first
    assert history(seed=4) != first


def test_a_run_with_the_strong_model(local_simulation: dict[str, str], tiny_dataset: Path,
                                     tmp_path: Path) -> None:
    run_dir = completed_run(local_simulation, tiny_dataset, tmp_path,
                            "num-server-rounds=1 model='resnet9-gn' fraction-train=1.0 "
                            "min-available-nodes=3 local-epochs=1 device='cpu'")
    results = load_results(run_dir)
    assert results["run_config"]["model"] == "resnet9-gn"
    assert results["entries"][1]["train_replies"] == 3
    net = task.build_model("resnet9-gn")
    net.load_state_dict(torch.load(run_dir / FINAL_MODEL_FILE, weights_only=True))


def test_sign_flipping_attackers_wreck_fedavg_and_robust_aggregators_hold(
        local_simulation: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    """One node of five flips and boosts its update; the same run, seed and attacker
    under FedAvg, FedMedian and Krum."""
    def final_accuracy(strategy: str) -> float:
        run_dir = completed_run(
            local_simulation, tiny_dataset, tmp_path,
            "num-server-rounds=5 local-epochs=3 batch-size=16 fraction-train=1.0 "
            "fraction-evaluate=0.0 min-available-nodes=5 attack='sign-flip' "
            f"malicious-fraction=0.2 strategy='{strategy}' num-malicious-nodes=1",
            out=strategy, federation_config="num-supernodes=5")
        return load_results(run_dir)["entries"][-1]["test_accuracy"]

    fedavg, median, krum = map(final_accuracy, ("fedavg", "fedmedian", "krum"))
    # Measured: 0.1 (one class everywhere), 0.8 and 0.8 after 5 rounds.
    finals = f"fedavg {fedavg}, fedmedian {median}, krum {krum}"
    assert fedavg <= 0.3, finals  # chance is 0.1
    assert median >= fedavg + 0.4 and krum >= fedavg + 0.4, finals


def test_a_multiplexed_run_serves_virtual_clients_and_resumes(
        local_simulation: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    """Ten virtual clients on the three SuperNodes: each round five train and three
    evaluate, counted per client; a run resumed from its checkpoint goes on."""
    settings = ("virtual-clients=10 fraction-train=0.5 fraction-evaluate=0.3 local-epochs=1 "
                "min-available-nodes=3 strategy='scaffold' seed=1")
    first = completed_run(local_simulation, tiny_dataset, tmp_path,
                          f"num-server-rounds=2 {settings}", out="first")
    entries = load_results(first)["entries"]
    for entry in entries[1:]:
        assert (entry["train_replies"], entry["train_failures"]) == (5, 0)
        assert (entry["evaluate_replies"], entry["evaluate_failures"]) == (3, 0)
        assert all(0 <= client < 10 for client in entry["train_nodes"])
    resumed = completed_run(local_simulation, tiny_dataset, tmp_path,
                            f"num-server-rounds=3 {settings} resume-from='{first}'",
                            out="resumed")
    rounds = [e["round"] for e in load_results(resumed)["entries"]]
    assert rounds == [0, 1, 2, 3]


def test_a_private_run_reports_epsilon_and_stops_at_its_budget(
        local_simulation: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    """DP with a cap between the epsilon of two and of three rounds: rounds 1 and 2
    run and record their epsilon, round 3 does not; the run ends completed, with its
    final model (round 2's) written. Adaptive clipping (whose noised count is part of
    each round's mechanism) moves the clipping norm between the rounds."""
    from fedcifar_app.extensions.privacy.server import PrivacyLedger

    probe = PrivacyLedger(noise_multiplier=1.0, sampling_rate=0.67, delta=1e-3)
    cap = (probe.epsilon(2) + probe.epsilon(3)) / 2
    run_dir = completed_run(
        local_simulation, tiny_dataset, tmp_path,
        f"num-server-rounds=5 dp='server' dp-noise-multiplier=1.0 dp-clipping-norm=0.5 "
        f"dp-delta=0.001 dp-max-epsilon={cap} fraction-train=0.67 min-available-nodes=3 "
        "local-epochs=1 dp-clipping='adaptive' dp-clipped-count-stddev=1.0")
    results = load_results(run_dir)
    assert results["status"] == "completed"
    assert "round 3 would take epsilon" in results["stopped"]
    entries = results["entries"]
    assert [e["round"] for e in entries] == [0, 1, 2]
    assert [e["dp_epsilon"] for e in entries[1:]] == pytest.approx(
        [probe.epsilon(1), probe.epsilon(2)])
    assert results["privacy"]["clipping"] == "server"
    assert results["privacy"]["adaptive_clipping"]["clipped_count_stddev"] == 1.0
    assert entries[1]["dp_clipping_norm"] == 0.5
    assert entries[2]["dp_clipping_norm"] != 0.5
    assert (run_dir / FINAL_MODEL_FILE).exists()


def test_a_secure_aggregation_run_completes(local_simulation: dict[str, str],
                                            tiny_dataset: Path, tmp_path: Path) -> None:
    """SecAgg+ in simulation: each round's key exchange, masked updates and unmasking
    run through the simulation engine (every node in its own Ray worker), with
    federated evaluation answered in the legacy format, and the usual outputs."""
    run_dir = completed_run(
        local_simulation, tiny_dataset, tmp_path,
        "secure-aggregation=true secagg-max-weight=200.0 num-server-rounds=2 "
        "fraction-train=1.0 fraction-evaluate=1.0 min-available-nodes=3 local-epochs=1")
    results = load_results(run_dir)
    assert results["status"] == "completed"
    rounds = [e for e in results["entries"] if e["round"] > 0]
    assert [(e["train_replies"], e["train_failures"], e["evaluate_replies"]) for e in rounds] \
        == [(3, 0, 3), (3, 0, 3)]
    assert rounds[-1]["test_accuracy"] > 0
    assert (run_dir / FINAL_MODEL_FILE).exists()


def test_a_tracked_run_appears_in_mlflow_tensorboard_and_wandb_with_its_pictures(
        local_simulation: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    with mlflow_server(tmp_path / "mlflow") as (url, _):
        run_dir, done = completed_run_and_output(
            local_simulation, tiny_dataset, tmp_path,
            "num-server-rounds=2 fraction-train=1.0 min-available-nodes=3 local-epochs=1 "
            f"tracking='tensorboard,mlflow,wandb' tracking-uri='{url}'")
        experiment = mlflow_api(url, "experiments/get-by-name",
                                experiment_name="fedcifar")["experiment"]
        (run,) = mlflow_api(url, "runs/search",
                            {"experiment_ids": [experiment["experiment_id"]]})["runs"]
        history = mlflow_api(url, "metrics/get-history", run_id=run["info"]["run_id"],
                             metric_key="model/test_accuracy")["metrics"]
        artifacts = mlflow_api(url, "artifacts/list", run_id=run["info"]["run_id"])["files"]
    results = load_results(run_dir)
    accuracy = {e["round"]: e["test_accuracy"] for e in results["entries"]}
    assert run["info"]["run_name"] == run_dir.name and run["info"]["status"] == "FINISHED"
    assert {p["key"]: p["value"] for p in run["data"]["params"]}["num-server-rounds"] == "2"
    assert {point["step"]: point["value"] for point in history} == pytest.approx(accuracy)
    assert {"results.json", "model_final.pt", "accuracy.png"} <= {f["path"] for f in artifacts}
    assert tensorboard_series(run_dir, "model/test_accuracy") == pytest.approx(accuracy)
    assert wandb_series(run_dir, "model/test_accuracy") == pytest.approx(accuracy)
    # Live progress, one line per round, in what `flwr run --stream` shows.
    assert "[fedcifar] round 1/2 | " in done.stdout and "ETA" in done.stdout
    assert "[fedcifar] round 2/2 | " in done.stdout
    for picture in (PLOT_FILE, LOSS_PLOT_FILE, TIMELINE_FILE, PARTITIONS_PLOT_FILE):
        assert (run_dir / picture).stat().st_size > 10_000, picture
    for entry in results["entries"][1:]:  # each node's job on the wall clock
        assert sorted(job["outcome"] for job in entry["jobs"]) == ["used"] * 3
        assert all(0 < job["sent"] <= job["arrived"] <= entry["elapsed_s"]
                   for job in entry["jobs"])

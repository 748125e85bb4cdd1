"""Seconds-long smoke runs of every benchmark script on tiny data.

They check that each script runs end to end and writes its results; the numbers
themselves are measured on real data and reported in BENCHMARKS.md.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, run

# Minutes, not seconds (every benchmark script, end to end): `pytest -m "not slow"` skips it.
pytestmark = pytest.mark.slow


def benchmark(name: str, env: dict[str, str], *args: str) -> str:
    done = run([sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args], env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout


def data_args(tiny_dataset: Path, tmp_path: Path) -> list[str]:
    return ["--dataset", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache"),
            "--out", str(tmp_path / "results")]


def test_throughput(tiny_dataset: Path, tmp_path: Path) -> None:
    output = tmp_path / "throughput.json"
    benchmark("throughput", dict(os.environ), "--dataset", str(tiny_dataset), "--cache-dir",
              str(tmp_path / "cache"), "--repeats", "1", "--output", str(output))
    report = json.loads(output.read_text())
    assert report["samples_per_measurement"] == 400
    assert report["ratio_to_limit"]["bare loop (limit)"] == 1.0
    assert report["samples_per_s"]["fedcifar train"] > 0
    assert (report["model"], report["machine"]["device"]) == ("tutorial-cnn", "cpu")
    benchmark("throughput", dict(os.environ), "--dataset", str(tiny_dataset), "--cache-dir",
              str(tmp_path / "cache"), "--repeats", "1", "--limit", "64", "--model",
              "resnet9-gn", "--device", "cpu", "--output", str(output))
    strong = json.loads(output.read_text())
    assert strong["model"] == "resnet9-gn" and strong["samples_per_measurement"] == 64


def test_speed(local_simulation: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    stdout = benchmark("speed", local_simulation, *data_args(tiny_dataset, tmp_path),
                       "--rounds", "2", "--model", "tutorial-cnn", "--device", "cpu")
    report = json.loads((tmp_path / "results" / "speed.json").read_text())
    assert report["federated"]["rounds"] == 2 and len(report["federated"]["round_s"]) == 2
    assert report["centralized"]["samples"] == 2 * 400
    assert set(report["ratios_to_limit"]) >= {"centralized, end to end",
                                              "federated, steady rounds"}
    assert "federated: start-up" in stdout
    assert report["model"] == "tutorial-cnn" and report["machine"]["device"] == "cpu"


def test_scale(local_simulation: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    benchmark("scale", local_simulation, *data_args(tiny_dataset, tmp_path),
              "--clients", "10", "--rounds", "2")
    size = json.loads((tmp_path / "results" / "scale.json").read_text())["sizes"]["10"]
    assert size["train_tasks_per_round"] == 1  # 10 % of 10 clients
    assert size["peak_rss_gib"] > 0.1  # the SuperLink and Ray were measured
    # A second call keeps what is done instead of measuring again.
    assert "done before, kept" in benchmark("scale", local_simulation,
                                            *data_args(tiny_dataset, tmp_path),
                                            "--clients", "10", "--rounds", "2")
    figures = tmp_path / "figures"
    benchmark("figures", local_simulation, "--results", str(tmp_path / "results"),
              "--out", str(figures), "--federated", size["run_dir"])
    assert (figures / "scale.png").read_bytes()[:4] == b"\x89PNG"
    assert (figures / "centralized_vs_federated.png").exists()


def test_time_to_accuracy(local_simulation: dict[str, str], tiny_dataset: Path,
                          tmp_path: Path) -> None:
    stdout = benchmark("time_to_accuracy", local_simulation, *data_args(tiny_dataset, tmp_path),
                       "--seeds", "1", "2", "--run-config",
                       "num-server-rounds=2 fraction-train=1.0")
    runs = json.loads((tmp_path / "results" / "time_to_accuracy.json").read_text())["runs"]
    assert [run["seed"] for run in runs] == [1, 2]
    assert all(set(run["reached"]) == {"50%", "55%", "58%", "60%"} for run in runs)
    assert runs[0]["final_accuracy"] != runs[1]["final_accuracy"]
    assert " ± " in stdout.splitlines()[-1]  # the spread over the two seeds


def test_niid_bench_runs_and_skips_finished_runs(local_simulation: dict[str, str],
                                                 tiny_dataset: Path, tmp_path: Path) -> None:
    args = [*data_args(tiny_dataset, tmp_path), "--rounds", "1", "--only", "fedavg-iid",
            "--seeds", "1", "2"]
    benchmark("niid_bench", local_simulation, *args)
    report = json.loads((tmp_path / "results" / "niid_bench.json").read_text())
    seeds = report["runs"]["fedavg-iid"]["seeds"]
    assert set(seeds) == {"1", "2"}
    assert all(s["status"] == "completed" and s["best"]["round"] in (0, 1)
               for s in seeds.values())
    assert seeds["1"]["accuracy_by_round"] != seeds["2"]["accuracy_by_round"]
    # A second call keeps finished runs, and reports mean ± std over the two seeds.
    summary_line = next(line for line in benchmark("niid_bench", local_simulation, *args)
                        .splitlines() if line.startswith("fedavg-iid"))
    assert summary_line.split()[1] == "2" and "±" in summary_line
    again = json.loads((tmp_path / "results" / "niid_bench.json").read_text())
    assert again["runs"]["fedavg-iid"]["seeds"]["1"]["run_dir"] == seeds["1"]["run_dir"]
    figures = tmp_path / "figures"
    benchmark("figures", local_simulation, "--results", str(tmp_path / "results"),
              "--out", str(figures))
    assert (figures / "niid_bench.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.skipif(shutil.which("nginx") is None,
                    reason="deployments with TLS put nginx in front: install nginx-light")
def test_deployment_against_simulation(local_simulation: dict[str, str], tiny_dataset: Path,
                                       tmp_path: Path) -> None:
    stdout = benchmark("deployment", local_simulation, *data_args(tiny_dataset, tmp_path),
                       "--nodes", "2", "--rounds", "2", "--run-config", "evaluate-in-train=true",
                       "--deployments", "cold-stock", "warm-fast", "--node-data", "folders")
    report = json.loads((tmp_path / "results" / "deployment.json").read_text())
    assert set(report["runs"]) == {"simulation (before cold-stock)", "deployment (cold, stock)",
                                   "simulation (before warm-fast)", "deployment (warm, fast)"}
    for measured in report["runs"].values():
        assert measured["status"] == "completed" and len(measured["round_s"]) == 2
    assert set(report["ratio"]) == {"deployment (cold, stock)", "deployment (warm, fast)"}
    assert report["node_data"] == "folders"
    assert report["cold_deployment_breakdown_s"][
        "ClientApp process start and imports (1 per round)"] > 0
    assert "ratio deployment (warm, fast) / the simulation before it" in stdout
    # The benchmark's own federation was stopped: no launcher state is left behind.
    assert not list(Path(tempfile.gettempdir()).glob("fedcifar-bench-flwr-*"))


def test_robustness(local_simulation: dict[str, str], tiny_dataset: Path,
                    tmp_path: Path) -> None:
    args = [*data_args(tiny_dataset, tmp_path), "--rounds", "1", "--splits", "iid",
            "--attacks", "sign-flip", "--defences", "fedavg", "bulyan"]
    stdout = benchmark("robustness", local_simulation, *args)
    cells = json.loads((tmp_path / "results" / "robustness.json").read_text())["cells"]
    row = cells["iid"]["sign-flip"]
    assert set(row) == {"fedavg", "bulyan"}
    assert all(cell["status"] == "completed" and len(cell["accuracy_by_round"]) == 2
               for cell in row.values())
    assert "sign-flip" in stdout and "bulyan" in stdout
    # Finished cells are kept on a second call; the figure draws the table.
    again = json.loads((tmp_path / "results" / "robustness.json").read_text())
    benchmark("robustness", local_simulation, *args)
    assert json.loads((tmp_path / "results" / "robustness.json").read_text()) == again
    figures = tmp_path / "figures"
    benchmark("figures", local_simulation, "--results", str(tmp_path / "results"),
              "--out", str(figures))
    assert (figures / "robustness.png").read_bytes()[:4] == b"\x89PNG"
    benchmark("robustness", dict(os.environ), *args, "--costs")
    costs = json.loads((tmp_path / "results" / "robustness_costs.json").read_text())
    assert set(costs["aggregation_seconds"]) == {"fedavg", "bulyan"}
    assert all(seconds > 0 for seconds in costs["aggregation_seconds"].values())


def test_a_cut_off_run_resumes_unless_it_cannot(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import common

    calls = []
    monkeypatch.setattr(common, "flwr_run", lambda config, federation, timeout, label: (
        calls.append(config) or (1.0, tmp_path / "new-run", "")))
    cut = tmp_path / "flwr-run-1"
    cut.mkdir()
    (cut / "checkpoint.pt").write_bytes(b"")
    (cut / "results.json").write_text('{"status": "running"}')
    assert common.run_resumable("seed=1", tmp_path, "row") == (tmp_path / "new-run", 1.0)
    assert calls[-1] == f"seed=1 resume-from='{cut}'"
    common.run_resumable("seed=1", tmp_path, "row", resumable=False)  # e.g. SCAFFOLD
    assert calls[-1] == "seed=1"
    # Cut off after its last round was checkpointed: nothing to resume, it starts over.
    import torch
    torch.save({"round": 3, "model": {}, "samples_trained": 0}, cut / "checkpoint.pt")
    common.run_resumable("num-server-rounds=3", tmp_path, "row")
    assert calls[-1] == "num-server-rounds=3"
    common.run_resumable("num-server-rounds=4", tmp_path, "row")
    assert calls[-1] == f"num-server-rounds=4 resume-from='{cut}'"
    (cut / "results.json").write_text('{"status": "completed"}')
    assert common.run_resumable("seed=1", tmp_path, "row") == (cut, 0.0)
    assert len(calls) == 4


def test_cross_device(local_simulation: dict[str, str], tiny_dataset: Path,
                      tmp_path: Path) -> None:
    """Every part but pfl-research's (see the next test); then a second cycle, which
    runs only the compared parts asked for (what is there is kept); the summary."""
    sizes = ["--users", "8", "--cohort", "4", "--rounds", "3", "--bare-rounds", "1",
             "--training-repeats", "1"]
    benchmark("cross_device", local_simulation, *data_args(tiny_dataset, tmp_path), *sizes,
              "--cycles", "1", "--large-users", "40", "--large-cohort", "8",
              "--large-rounds", "3", "--parts", "training", "bare", "multiplexed",
              "multiplexed-sequential", "per-node", "large")
    benchmark("cross_device", local_simulation, *data_args(tiny_dataset, tmp_path), *sizes,
              "--cycles", "2", "--parts", "training", "bare")
    report = json.loads((tmp_path / "results" / "cross_device.json").read_text())
    runs = report["runs"]
    assert [len(runs[part]) for part in ("training", "bare", "multiplexed",
                                         "multiplexed-sequential", "per-node", "large")] \
        == [1, 2, 1, 1, 1, 1]
    assert [(t["model"], t["threads"]) for t in runs["training"][0]] == [
        ("tutorial-cnn", 1), ("tutorial-cnn", 2), ("resnet9-gn", 1), ("resnet9-gn", 2)]
    assert all(t["speedup"] > 0 for t in runs["training"][0])
    assert [(b["threads"], b["processes"]) for b in runs["bare"][0]] == [(1, 1), (2, 1), (1, 2)]
    assert all(b["samples_per_s"] > 0 for b in runs["bare"][1])
    for name, cohort in (("multiplexed", 4), ("multiplexed-sequential", 4), ("per-node", 4),
                         ("large", 8)):
        assert runs[name][-1]["trained_per_round"] == cohort, name
        assert runs[name][-1]["s_per_round"] > 0 and runs[name][-1]["peak_rss_gib"] > 0
    assert runs["multiplexed"][0]["supernodes"] == os.cpu_count()
    assert runs["per-node"][0]["supernodes"] == 8
    # Evaluated at the start and after the last round (evaluate-every 100).
    assert sorted(runs["multiplexed"][0]["test_accuracy"]) == ["0", "3"]
    # Batched or not, the same model: the same accuracy.
    assert runs["multiplexed"][0]["test_accuracy"] == \
        runs["multiplexed-sequential"][0]["test_accuracy"]
    summary = report["summary"]
    assert summary["multiplexed"]["cycles"] == 1 and summary["bare 2x1"]["cycles"] == 2
    assert summary["multiplexed"]["ratio_to_pfl_best"] is None  # pfl did not run


def test_pfl_research_runs_the_same_workload(tiny_dataset: Path, tmp_path: Path) -> None:
    """benchmarks/peers/pfl_cross_device.py, where pfl[pytorch] is installed (the
    'pfl' extra; CI does not install it)."""
    pytest.importorskip("pfl")
    out = tmp_path / "pfl.json"
    done = run([sys.executable, str(ROOT / "benchmarks" / "peers" / "pfl_cross_device.py"),
                "--dataset", str(tiny_dataset), "--cache-dir", str(tmp_path / "cache"),
                "--out", str(out), "--users", "8", "--cohort", "4", "--rounds", "4",
                "--evaluate-every", "2"], dict(os.environ))
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["processes"] == 1 and result["s_per_round"] > 0
    assert sorted(result["test_accuracy"]) == ["2", "4"]


def test_privacy(local_simulation: dict[str, str], tiny_dataset: Path, tmp_path: Path) -> None:
    benchmark("privacy", local_simulation, *data_args(tiny_dataset, tmp_path),
              "--users", "8", "--rounds", "2", "--epsilons", "20", "--delta", "0.01")
    runs = json.loads((tmp_path / "results" / "privacy.json").read_text())["runs"]
    assert set(runs) == {"no DP", "epsilon 20"}
    assert all(run["status"] == "completed" and run["rounds"] == 2 for run in runs.values())
    private = runs["epsilon 20"]
    assert private["epsilon"] <= 20 and private["noise_multiplier"] > 0
    figures = tmp_path / "figures"
    benchmark("figures", local_simulation, "--results", str(tmp_path / "results"),
              "--out", str(figures))
    assert (figures / "privacy.png").read_bytes()[:4] == b"\x89PNG"


def test_secure_aggregation(local_simulation: dict[str, str], tiny_dataset: Path,
                            tmp_path: Path) -> None:
    stdout = benchmark("secure_aggregation", local_simulation,
                       *data_args(tiny_dataset, tmp_path), "--nodes", "3", "--rounds", "2",
                       "--repeats", "1")
    runs = json.loads((tmp_path / "results" / "secure_aggregation.json").read_text())["runs"]
    assert set(runs) == {"3 nodes, plain, repeat 1", "3 nodes, SecAgg+, repeat 1"}
    for run_report in runs.values():
        assert run_report["status"] == "completed" and run_report["train_replies"] == [3, 3]
        assert run_report["median_round_s"] > 0
    assert "SecAgg+ s/round" in stdout


def test_heterogeneity(local_simulation: dict[str, str], tiny_dataset: Path,
                       tmp_path: Path) -> None:
    stdout = benchmark("heterogeneity", local_simulation, *data_args(tiny_dataset, tmp_path),
                       "--clients", "6", "--rounds", "2", "--seeds", "1", "--splits", "iid")
    report = json.loads((tmp_path / "results" / "heterogeneity.json").read_text())
    assert set(report["runs"]) == {"iid-sync-1", "iid-over-selection-1", "iid-fedbuff-1"}
    for measured in report["runs"].values():
        assert measured["status"] == "completed"
        assert [p["aggregations"] for p in measured["curve"]] == [0, 1, 2]
        assert measured["curve"][-1]["simulated_s"] > 0
        assert 0 <= measured["straggler_share"] <= 1
    assert "| default | iid | fedbuff | 1 |" in stdout
    figures = tmp_path / "figures"
    benchmark("figures", local_simulation, "--results", str(tmp_path / "results"),
              "--out", str(figures))
    assert (figures / "heterogeneity.png").read_bytes()[:4] == b"\x89PNG"


def test_same_results_compares_exactly_or_within_a_tolerance(tmp_path: Path, monkeypatch,
                                                           capsys) -> None:
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import same_results

    entries = [{"round": 1, "test_accuracy": 0.5, "train_seconds": 3.0, "train_nodes": [4]}]
    moved = [{"round": 1, "test_accuracy": 0.5 * (1 + 1e-6), "train_seconds": 9.0,
              "train_nodes": [4]}]
    for folder, runs in (("before", entries), ("after", moved)):
        for name in same_results.CONFIGS:
            (tmp_path / folder / name).mkdir(parents=True)
            (tmp_path / folder / name / "results.json").write_text(
                json.dumps({"entries": runs}))
    # Times are left out; a number that moved by 1e-6 differs, unless within rtol.
    assert same_results.compare(tmp_path / "before", tmp_path / "after") == \
        len(same_results.CONFIGS) - 1  # the DP run compares its accounting only
    assert same_results.compare(tmp_path / "before", tmp_path / "after", rtol=1e-5) == 0
    assert "largest relative difference 1e-06" in capsys.readouterr().out
    assert same_results.largest_difference([{"a": 1}], [{"a": 1}, {"a": 1}]) == float("inf")
    assert same_results.largest_difference({"a": "x"}, {"a": "y"}) == float("inf")

"""The centralized entry point, end to end on tiny data, and the compare command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from fedcifar_app import task
from fedcifar_app.results import BEST_MODEL_FILE, FINAL_MODEL_FILE, PLOT_FILE, RESULTS_FILE


def centralized(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedcifar_app.centralized", *args],
                          capture_output=True, text=True, timeout=300)


def trained_on_tiny_data(tiny_dataset: Path, tmp_path: Path,
                         *args: str) -> tuple[subprocess.CompletedProcess, Path]:
    """A centralized run on the tiny data that must succeed; its output and run folder."""
    done = centralized(*args, "--dataset", str(tiny_dataset), "--output-dir",
                       str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 0, done.stderr
    (run_dir,) = (tmp_path / "out").iterdir()
    return done, run_dir


def test_centralized_trains_and_writes_results(tiny_dataset: Path, tmp_path: Path) -> None:
    done, run_dir = trained_on_tiny_data(tiny_dataset, tmp_path, "--epochs", "5",
                                         "--batch-size", "16", "--learning-rate", "0.01")
    assert "epoch 5/5" in done.stdout
    # No terminal here: progress comes as a line every tenth of an epoch (25 batches).
    assert "epoch 5/5: 24/25 batches (96%" in done.stdout
    assert run_dir.name.startswith("centralized-") and str(run_dir) in done.stdout
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    assert results["kind"] == "centralized" and results["status"] == "completed"
    assert [e["epoch"] for e in results["entries"]] == [0, 1, 2, 3, 4, 5]
    assert results["entries"][5]["samples_trained"] == 5 * 400
    assert all(e["train_seconds"] > 0 for e in results["entries"][1:])
    assert results["run_config"]["batch-size"] == 16 and results["run_config"]["epochs"] == 5
    final_accuracy = results["entries"][-1]["test_accuracy"]
    assert final_accuracy > 0.5  # ten colours are easy to tell apart; chance is 0.1
    assert results["best"]["test_accuracy"] == max(
        e["test_accuracy"] for e in results["entries"][1:])
    net = task.Net()
    net.load_state_dict(torch.load(run_dir / FINAL_MODEL_FILE, weights_only=True))
    net.load_state_dict(torch.load(run_dir / BEST_MODEL_FILE, weights_only=True))
    assert (run_dir / PLOT_FILE).read_bytes()[:4] == b"\x89PNG"

    compared = subprocess.run(
        [sys.executable, "-m", "fedcifar_app.compare", str(run_dir), str(run_dir),
         "-o", str(tmp_path / "compare.png")], capture_output=True, text=True, timeout=120)
    assert compared.returncode == 0, compared.stderr
    assert f"{100 * final_accuracy:.2f}%" in compared.stdout
    assert (tmp_path / "compare.png").read_bytes()[:4] == b"\x89PNG"


def test_centralized_rejects_bad_flags(tmp_path: Path) -> None:
    done = centralized("--epochs", "0")
    assert done.returncode == 2 and "--epochs must be >= 1" in done.stderr
    done = centralized("--batch-size", "0")
    assert done.returncode == 2 and "'batch-size' must be >= 1" in done.stderr
    done = centralized("--momentum", "fast")
    assert done.returncode == 2 and "--momentum: invalid float value" in done.stderr
    done = centralized("--dataset", str(tmp_path / "missing"), "--output-dir",
                       str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"))
    assert done.returncode == 2 and "not found" in done.stderr


def test_centralized_takes_the_model_and_device(tiny_dataset: Path, tmp_path: Path) -> None:
    done, run_dir = trained_on_tiny_data(tiny_dataset, tmp_path, "--epochs", "1",
                                         "--model", "resnet9-gn", "--device", "cpu")
    assert "resnet9-gn on cpu" in done.stdout
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    assert results["run_config"]["model"] == "resnet9-gn"
    net = task.build_model(results["run_config"]["model"])
    net.load_state_dict(torch.load(run_dir / FINAL_MODEL_FILE, weights_only=True))


def test_centralized_on_a_missing_device_fails_before_writing(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        return  # only meaningful where there is no GPU
    done = centralized("--device", "cuda", "--output-dir", str(tmp_path / "out"))
    assert done.returncode == 2
    assert "device 'cuda' is not available on this machine; available: cpu" in done.stderr
    assert not (tmp_path / "out").exists()
    done = centralized("--device", "gpu")
    assert done.returncode == 2 and "'device' must be auto, cpu, cuda, cuda:N or mps" \
        in done.stderr

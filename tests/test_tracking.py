"""Experiment tracking: what TensorBoard, MLflow and W&B hold after a run, read back
with their own readers and servers; trackers that fail; the progress line.

The federated run with all three trackers is in test_simulation (it reuses that
module's local SuperLink).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fedcifar_app.config import RunConfig
from fedcifar_app.ops.federation import free_port
from fedcifar_app.ops.local_simulation import stop_process_tree
from fedcifar_app.results import RESULTS_FILE, RunRecorder, load_results
from fedcifar_app.tracking import Trackers, TrackerUnavailableError, check_installed
from fedcifar_app.tracking.progress import RoundProgress
from tests.conftest import answers, mlflow_api, mlflow_server


class Recording:
    """A tracker that keeps what it is given (or raises, from call ``fail_at`` on)."""

    def __init__(self, name: str = "recording", fail_at: int | None = None) -> None:
        self.name, self.fail_at = name, fail_at
        self.calls: list[tuple[str, Any]] = []

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self._call("log_metrics", (step, dict(metrics)))

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        self._call("finish", summary["status"])

    def _call(self, what: str, argument: Any) -> None:
        if self.fail_at is not None and len(self.calls) >= self.fail_at:
            raise OSError(28, "No space left on device")
        self.calls.append((what, argument))


def test_a_failing_tracker_is_warned_about_once_and_the_others_go_on() -> None:
    broken, healthy, warnings = Recording("broken", fail_at=1), Recording(), []
    trackers = Trackers([broken, healthy], warnings.append)
    for step in range(3):
        trackers.log_metrics(step, {"test_accuracy": 0.1 * step})
    trackers.finish({"status": "completed"}, Path("."))
    assert broken.calls == [("log_metrics", (0, {"model/test_accuracy": 0.0}))]
    assert [what for what, _ in healthy.calls] == ["log_metrics"] * 3 + ["finish"]
    assert warnings == ["tracking: broken failed (OSError: [Errno 28] No space left on "
                        "device); the run goes on without it"]


def test_publish_hands_over_new_and_changed_values_once(tmp_path: Path) -> None:
    tracker = Recording()
    recorder = RunRecorder(tmp_path, "federated", "round", {}, tracker=tracker)
    recorder.record(0, test_accuracy=0.1, save=False)
    recorder.publish(0)
    recorder.record(1, test_accuracy=0.3, train={"train-loss": 2.0}, train_nodes=[1, 2],
                    evaluated=True, timed=False, save=False)
    recorder.publish(1)
    # evaluate-in-train: round 1's evaluation arrives while round 2 runs.
    recorder.record(1, evaluate={"eval-accuracy": 0.25}, timed=False, save=False)
    recorder.record(2, test_accuracy=0.3, timed=False, save=False)
    entry = recorder.publish(2)
    assert entry["round"] == 2
    logged = [argument for what, argument in tracker.calls if what == "log_metrics"]
    assert logged[0][0] == 0 and logged[0][1]["test_accuracy"] == 0.1
    assert logged[1][0] == 1 and logged[1][1]["test_accuracy"] == 0.3
    assert logged[1][1]["train/train-loss"] == 2.0 and "train_nodes" not in logged[1][1]
    assert "evaluated" not in logged[1][1]  # a flag, not a series
    assert logged[2] == (1, {"evaluate/eval-accuracy": 0.25})
    assert logged[3][0] == 2 and logged[3][1]["test_accuracy"] == 0.3
    assert len(logged) == 4
    assert json.loads((tmp_path / RESULTS_FILE).read_text())["entries"][2]["round"] == 2


def test_a_tracker_whose_package_is_missing_is_refused_before_training(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib.util
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real_find_spec(name, *a))
    with pytest.raises(TrackerUnavailableError, match=r"tracking wandb: not installed.*"
                       r"pip install -e \"\.\[tracking\]\""):
        check_installed(RunConfig.from_mapping({"tracking": "tensorboard,wandb"}))


def test_the_progress_line_says_where_the_run_is(monkeypatch: pytest.MonkeyPatch) -> None:
    from fedcifar_app.tracking import progress as module

    clock = iter([105.0, 125.0, 135.0])  # when rounds 0, 2 and 3 end
    monkeypatch.setattr(module.time, "monotonic", lambda: next(clock))
    progress = RoundProgress(total=10, unit="round", started=100.0)
    first = progress.line({"round": 0, "test_accuracy": 0.1, "test_loss": 2.3})
    line = progress.line({"round": 2, "test_accuracy": 0.4512, "test_loss": 1.5,
                          "train_replies": 5, "train_failures": 1})
    assert first.startswith("[fedcifar] round 0/10 | 0:05 elapsed | test loss 2.3000")
    # 20 s for rounds 1 and 2: 8 rounds left take 80 s.
    assert line.startswith("[fedcifar] round 2/10 | 0:25 elapsed | ETA 1:20 | ")
    assert line.endswith("accuracy 45.12 % | 5 updates, 1 failed")
    over_selected = progress.line({"round": 3, "train_replies": 10, "train_failures": 4,
                                   "late": [7, 9, 11], "train_replacements": 1})
    assert over_selected.endswith("| 10 updates, 1 failed, 3 late, 1 replaced")


def centralized(tiny_dataset: Path, tmp_path: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fedcifar_app.centralized", "--dataset", str(tiny_dataset),
         "--output-dir", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
         *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finished(process: subprocess.Popen) -> tuple[str, str]:
    stdout, stderr = process.communicate(timeout=300)
    assert process.returncode == 0, stderr
    return stdout, stderr


def test_a_tracking_server_that_is_not_there_does_not_stop_the_run(
        tiny_dataset: Path, tmp_path: Path) -> None:
    stdout, stderr = finished(centralized(
        tiny_dataset, tmp_path, "--epochs", "1", "--tracking", "mlflow",
        "--tracking-uri", f"http://127.0.0.1:{free_port()}"))
    assert "warning: tracking: mlflow could not start" in stderr
    (run_dir,) = (tmp_path / "out").iterdir()
    assert load_results(run_dir)["status"] == "completed"


def test_tensorboard_and_wandb_hold_the_centralized_run(tiny_dataset: Path,
                                                        tmp_path: Path) -> None:
    finished(centralized(tiny_dataset, tmp_path, "--epochs", "2",
                         "--tracking", "tensorboard,wandb"))
    (run_dir,) = (tmp_path / "out").iterdir()
    expected = {e["epoch"]: e["test_accuracy"] for e in load_results(run_dir)["entries"]}
    assert tensorboard_series(run_dir, "model/test_accuracy") == pytest.approx(expected)
    assert wandb_series(run_dir, "model/test_accuracy") == pytest.approx(expected)


def tensorboard_series(run_dir: Path, tag: str) -> dict[int, float]:
    """A tag's values by step, read with TensorBoard's own event reader."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return {event.step: event.value for event in events.Scalars(tag)}


def wandb_series(run_dir: Path, key: str) -> dict[int, float]:
    """A key's values by step in the offline W&B run, read with W&B's own reader of its
    transaction log (``wandb leet inspect --json``: one JSON record per line)."""
    records = subprocess.run(["wandb", "leet", "inspect", "--json", str(run_dir / "wandb")],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    rows = [json.loads(line)["history"]["item"] for line in records.splitlines()
            if '"type":"history"' in line]
    return {row["step"]: row[key] for row in rows if key in row}


@pytest.mark.slow
def test_an_mlflow_server_that_goes_away_mid_run_does_not_stop_it(tiny_dataset: Path,
                                                                   tmp_path: Path) -> None:
    with mlflow_server(tmp_path / "mlflow") as (url, server_pid):
        run = centralized(tiny_dataset, tmp_path, "--epochs", "4", "--tracking", "mlflow",
                          "--tracking-uri", url)
        for line in run.stdout:
            if line.startswith("[fedcifar] epoch 1/4"):
                break
        # Held still (an epoch of the tiny data takes a fraction of a second), so that the
        # server is gone before epoch 2 is logged, however fast this machine is.
        os.kill(run.pid, signal.SIGSTOP)
        experiment = mlflow_api(url, "experiments/get-by-name",
                                experiment_name="fedcifar")["experiment"]
        runs = mlflow_api(url, "runs/search",
                          {"experiment_ids": [experiment["experiment_id"]]})
        (run_id,) = [r["info"]["run_id"] for r in runs["runs"]]
        history = mlflow_api(url, "metrics/get-history", run_id=run_id,
                             metric_key="model/test_accuracy")["metrics"]
        assert sorted(point["step"] for point in history) == [0, 1]  # tracked live
        stop_process_tree(server_pid)  # the tracking server is gone
        os.kill(run.pid, signal.SIGCONT)
        stdout, stderr = finished(run)
    assert "[fedcifar] epoch 4/4" in stdout
    assert "warning: tracking: mlflow failed" in stderr
    (run_dir,) = (tmp_path / "out").iterdir()
    results = load_results(run_dir)
    assert results["status"] == "completed" and len(results["entries"]) == 5


@pytest.mark.slow
def test_tensorboard_shows_the_run_s_accuracy_chart_in_a_browser(tiny_dataset: Path,
                                                                   tmp_path: Path) -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("Chromium is not installed (Debian: apt-get install chromium)")
    finished(centralized(tiny_dataset, tmp_path, "--epochs", "2", "--tracking", "tensorboard"))
    (run_dir,) = (tmp_path / "out").iterdir()
    port = free_port()
    board = subprocess.Popen(["tensorboard", "--logdir", str(tmp_path / "out"), "--host",
                              "127.0.0.1", "--port", str(port)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not answers(f"http://127.0.0.1:{port}/data/runs"):
            assert board.poll() is None and time.monotonic() < deadline
            time.sleep(0.5)
        page = f"http://127.0.0.1:{port}/#timeseries"
        chromium = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--window-size=1300,900", "--virtual-time-budget=20000"]
        dom = subprocess.run([*chromium, "--dump-dom", page], capture_output=True, text=True,
                             timeout=180).stdout
        screenshot = tmp_path / "tensorboard.png"
        subprocess.run([*chromium, f"--screenshot={screenshot}", page], capture_output=True,
                       timeout=180)
    finally:
        stop_process_tree(board.pid)
        board.wait()
    assert f"{run_dir.name}/tensorboard" in dom  # the run, in the runs list
    card = dom[dom.index("model/test_accuracy"):]
    assert "<canvas" in card[:20000] or "<svg" in card[:20000]  # a chart was drawn
    from PIL import Image

    colours = Image.open(screenshot).convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 100  # a page, not a blank frame



@pytest.mark.slow
def test_runs_that_start_together_share_a_new_mlflow_store(tmp_path: Path) -> None:
    # Unserialised, two of three processes failed here creating the store's tables.
    opener = ("import sys; from pathlib import Path; "
              "from fedcifar_app.tracking.mlflow import MlflowTracker; "
              "MlflowTracker(sys.argv[1], 'fedcifar', Path(sys.argv[2]), {'seed': 42})")
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    openers = [subprocess.Popen([sys.executable, "-c", opener, uri, str(tmp_path / f"run{i}")],
                                stderr=subprocess.PIPE, text=True) for i in range(3)]
    failures = [stderr for opened in openers
                if (stderr := opened.communicate(timeout=300)[1]) and opened.returncode != 0]
    assert failures == []
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("fedcifar").experiment_id])
    assert sorted(run.info.run_name for run in runs) == ["run0", "run1", "run2"]

"""Shared fixtures: a tiny CIFAR-10-shaped data set in the Hub's parquet schema."""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedcifar_app.ops.federation import free_port
from fedcifar_app.ops.local_simulation import (installs_dependencies, managed_superlink_pids,
                                           stop_process_tree)

ROOT = Path(__file__).resolve().parents[1]
# Every process the tests start inherits these: no usage events leave the machine, and
# the Hugging Face Hub is unreachable (port 1 on loopback), with or without internet:
# tests make their own data, and the offline case is tested as it is everywhere.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["HF_ENDPOINT"] = "http://127.0.0.1:1"
RUN_TIMEOUT = 420

LABEL_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
               "ship", "truck"]


# Well-separated colours (corners of the RGB cube and two greys), one per class.
PALETTE = np.array([[40, 40, 40], [215, 40, 40], [40, 215, 40], [40, 40, 215],
                    [215, 215, 40], [215, 40, 215], [40, 215, 215], [215, 215, 215],
                    [100, 100, 100], [160, 160, 160]])


def class_colour(label: int) -> np.ndarray:
    """The mean colour of a class, so that a small CNN learns the task fast."""
    return PALETTE[label]


def make_images(labels: np.ndarray, seed: int) -> list[bytes]:
    rng = np.random.default_rng(seed)
    encoded = []
    for label in labels:
        noise = rng.normal(0, 12, size=(32, 32, 3))
        pixels = np.clip(class_colour(int(label)) + noise, 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


def write_split(path: Path, labels: np.ndarray, seed: int) -> None:
    import datasets

    features = datasets.Features({"img": datasets.Image(),
                                  "label": datasets.ClassLabel(names=LABEL_NAMES)})
    images = [{"bytes": b, "path": None} for b in make_images(labels, seed)]
    split = datasets.Dataset.from_dict({"img": images, "label": labels.tolist()},
                                       features=features)
    split.to_parquet(str(path))


def write_dataset(directory: Path, num_train: int = 400, num_test: int = 100,
                  seed: int = 0) -> Path:
    """A directory with train.parquet and test.parquet, balanced over the 10 labels."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    write_split(directory / "train.parquet", rng.permutation(np.arange(num_train) % 10), seed)
    write_split(directory / "test.parquet", rng.permutation(np.arange(num_test) % 10), seed + 1)
    return directory


def resumable_checkpoint(config):  # noqa: ANN001, ANN201 - RunConfig -> Checkpoint | None
    """What the ServerApp resumes from with ``config`` (refusals raise)."""
    from fedcifar_app.extensions import resume_keys
    from fedcifar_app.strategies.checkpoint import checkpoint_to_resume

    return checkpoint_to_resume(config, resume_keys(config))


@pytest.fixture
def server_task_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Flower's runtime sets who is running (here: the ServerApp) before a Message is built."""
    from flwr.supercore.task_identity import TaskIdentity

    for attribute, value in {"_run_id": 1, "_node_id": 0, "_task_id": 1}.items():
        monkeypatch.setattr(TaskIdentity, attribute, value)


@pytest.fixture
def replay_private_draws(monkeypatch: pytest.MonkeyPatch):  # noqa: ANN201 - a restart function
    """A function that restarts DP's private draws from a fixed sequence of seeds: only
    for tests that compare two runs which must draw alike."""
    from fedcifar_app.extensions.privacy import server as privacy

    def restart() -> None:
        seeds = itertools.count()
        monkeypatch.setattr(privacy, "private_generator",
                            lambda: np.random.default_rng(next(seeds)))
    return restart


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data") / "cifar10-tiny")


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def flower_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    home = tmp_path_factory.mktemp("flwr-home")
    env = {**os.environ, "FLWR_HOME": str(home),
           "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    env.pop("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", None)
    try:
        yield env
    finally:
        for pid in managed_superlink_pids(env):
            stop_process_tree(pid)
        assert managed_superlink_pids(env) == []


def run(command: list[str], env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=RUN_TIMEOUT)


def flwr_run(env: dict[str, str], run_config: str,
             federation_config: str | None = None) -> tuple[subprocess.CompletedProcess, dict]:
    extra = ["--federation-config", federation_config] if federation_config else []
    done = run(["flwr", "run", ".", "--run-config", run_config, "--stream",
                "--format", "default", *extra], env)
    runs = json.loads(run(["flwr", "ls", "--format", "json"], env).stdout)["runs"]
    return done, runs[0] if len(runs) == 1 else max(runs, key=lambda r: r["pending-at"])


def completed_run_and_output(env: dict[str, str], tiny_dataset: Path, tmp_path: Path,
                             settings: str, out: str = "out",
                             federation_config: str | None = None
                             ) -> tuple[Path, subprocess.CompletedProcess]:
    """`flwr run .` on the tiny data with ``settings``; assert it completed; (its run
    folder, what `flwr run --stream` printed)."""
    run_config = (f"dataset='{tiny_dataset}' cache-dir='{tmp_path / 'cache'}' "
                  f"output-dir='{tmp_path / out}' {settings}")
    done, status = flwr_run(env, run_config, federation_config)
    assert status["status"] == "finished:completed", done.stdout + done.stderr
    return tmp_path / out / f"flwr-run-{status['run-id']}", done


@pytest.fixture(scope="module")
def local_simulation(flower_env: dict[str, str]) -> dict[str, str]:
    done = run([sys.executable, "-m", "fedcifar_app.ops.local_simulation", "--num-supernodes", "3"],
               flower_env)
    assert done.returncode == 0, done.stdout + done.stderr
    (pid,) = managed_superlink_pids(flower_env)
    assert not installs_dependencies(pid)
    return flower_env


# A real MLflow tracking server takes 10-45 s to start here (it imports its web app).
MLFLOW_START_TIMEOUT = 240


@contextlib.contextmanager
def mlflow_server(directory: Path) -> Iterator[tuple[str, int]]:
    """``mlflow server`` on a free loopback port with a SQLite store in ``directory``:
    (its URL, its PID); stopped, with its workers, by PID."""
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    with open(directory / "server.log", "wb") as log:
        server = subprocess.Popen(
            ["mlflow", "server", "--backend-store-uri", f"sqlite:///{directory / 'mlflow.db'}",
             "--artifacts-destination", str(directory / "artifacts"), "--host", "127.0.0.1",
             "--port", str(port), "--workers", "1"], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + MLFLOW_START_TIMEOUT
        while not answers(f"{url}/health"):
            assert server.poll() is None and time.monotonic() < deadline, \
                (directory / "server.log").read_text()
            time.sleep(0.5)
        yield url, server.pid
    finally:
        stop_process_tree(server.pid)
        server.wait()


def answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status == 200
    except OSError:
        return False


def mlflow_api(url: str, endpoint: str, body: dict | None = None, **query: str) -> dict:
    """Call an MLflow REST endpoint (``/api/2.0/mlflow/<endpoint>``): GET with ``query``,
    or POST ``body`` as JSON (the search endpoints)."""
    address = f"{url}/api/2.0/mlflow/{endpoint}?{urllib.parse.urlencode(query)}"
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(address, data=data,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())

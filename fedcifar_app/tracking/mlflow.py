"""MLflow: a run in experiment 'fedcifar' of the tracking URI (a server, or a SQLite
file), with the run config as parameters, the series as metrics, and the run folder's
results.json, models and pictures as artifacts when it ends."""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from mlflow import MlflowClient
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException

# MLflow's REST client retries a failed request 7 times with exponential backoff (about
# two minutes): a tracking server that is gone would stall every round. Fewer, shorter.
HTTP_SETTINGS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
# MLflow's limits per log_batch request.
MAX_PARAMS_PER_BATCH = 100
MAX_METRICS_PER_BATCH = 1000
ARTIFACT_SUFFIXES = (".json", ".pt", ".png")
STATUSES = {"completed": "FINISHED", "failed": "FAILED"}


class MlflowTracker:
    name = "mlflow"

    def __init__(self, tracking_uri: str, experiment: str, run_dir: Path,
                 run_config: dict[str, Any]) -> None:
        for variable, value in HTTP_SETTINGS.items():
            os.environ.setdefault(variable, value)
        with _store_lock(tracking_uri):
            self.client = MlflowClient(tracking_uri=tracking_uri)
            experiment_id = self._experiment_id(experiment, tracking_uri)
        run = self.client.create_run(experiment_id, run_name=run_dir.name,
                                     tags={"fedcifar.run_dir": str(run_dir)})
        self.run_id = run.info.run_id
        params = [Param(key, str(value)) for key, value in sorted(run_config.items())]
        for start in range(0, len(params), MAX_PARAMS_PER_BATCH):
            self.client.log_batch(self.run_id,
                                  params=params[start:start + MAX_PARAMS_PER_BATCH])

    def _experiment_id(self, name: str, tracking_uri: str) -> str:
        found = self.client.get_experiment_by_name(name)
        if found is not None:
            return found.experiment_id
        try:
            return self.client.create_experiment(name, _artifact_location(tracking_uri))
        except MlflowException:  # another run created it meanwhile
            found = self.client.get_experiment_by_name(name)
            if found is None:
                raise
            return found.experiment_id

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(_key(name), float(value), now, step) for name, value in metrics.items()]
        for start in range(0, len(batch), MAX_METRICS_PER_BATCH):
            self.client.log_batch(self.run_id,
                                  metrics=batch[start:start + MAX_METRICS_PER_BATCH])

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        for path in sorted(run_dir.iterdir()):
            if path.is_file() and path.suffix in ARTIFACT_SUFFIXES:
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, STATUSES.get(summary["status"], "KILLED"))


@contextlib.contextmanager
def _store_lock(tracking_uri: str):  # noqa: ANN202 - a context manager
    """Runs that start together on a new SQLite store would both create its tables (one
    then fails: 'table ... already exists'): the first use is one process at a time."""
    database = _sqlite_path(tracking_uri)
    if database is None:
        yield
        return
    database.parent.mkdir(parents=True, exist_ok=True)
    with open(database.with_name(database.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        yield


def _sqlite_path(tracking_uri: str) -> Path | None:
    parsed = urlparse(tracking_uri)
    if parsed.scheme != "sqlite":
        return None
    return Path(parsed.path[1:]).resolve()  # sqlite:///relative, sqlite:////absolute


def _artifact_location(tracking_uri: str) -> str | None:
    """Beside a SQLite store (MLflow would otherwise put artifacts under the working
    directory); a server keeps its own."""
    database = _sqlite_path(tracking_uri)
    return None if database is None else (database.parent / "mlflow-artifacts").as_uri()


def _key(name: str) -> str:
    # MLflow keys allow letters, digits, '_', '-', '.', ' ', '/'.
    return "".join(c if c.isalnum() or c in "_-./ " else "_" for c in name)

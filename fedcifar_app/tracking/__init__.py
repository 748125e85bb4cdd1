"""Experiment tracking: a run's series in TensorBoard, MLflow and W&B, by config.

``open_trackers`` opens the backends the ``tracking`` key names (each library imported
only then) and returns one ``Trackers`` that ``RunRecorder`` feeds: every round's (or
epoch's) scalar series as it is published, and the finished run (parameters, status,
models, results.json and pictures as artifacts). A backend that raises, at any point,
is logged as a warning and dropped: tracking never fails a run. The federated ServerApp
and the centralized entry point open the same trackers, so their runs sit side by side
in each UI.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from fedcifar_app.config import TRACKERS, RunConfig
from fedcifar_app.errors import AnticipatedError

EXPERIMENT = "fedcifar"
# The UIs group series by their name's first '/' part and sort the groups (TensorBoard
# opens only the first two): "model" (how the model does) before "run" (the rest).
MODEL_WORDS = ("accuracy", "loss")


class TrackerUnavailableError(AnticipatedError, RuntimeError):
    """A configured tracking backend's package is not installed."""


class Tracker(Protocol):
    name: str

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None: ...

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None: ...


class Trackers:
    """The open trackers, each call guarded: a tracker that raises is warned about
    once and not called again; the others go on."""

    def __init__(self, trackers: list[Tracker], warn: Callable[[str], None]) -> None:
        self.active = list(trackers)
        self.warn = warn

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        named = {grouped(name): value for name, value in metrics.items()}
        self._each(lambda tracker: tracker.log_metrics(step, named))

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        self._each(lambda tracker: tracker.finish(summary, run_dir))
        self.active = []

    def _each(self, call: Callable[[Tracker], None]) -> None:
        for tracker in list(self.active):
            try:
                call(tracker)
            except Exception as err:  # noqa: BLE001 -- tracking must never fail a run
                self.active.remove(tracker)
                self.warn(f"tracking: {tracker.name} failed ({type(err).__name__}: {err}); "
                          "the run goes on without it")


def grouped(series: str) -> str:
    """A results.json series name as the trackers show it: 'model/test_accuracy',
    'model/train/train-loss', 'run/train_replies'."""
    words = series.replace("/", "_").replace("-", "_").split("_")
    return f"{'model' if any(w in MODEL_WORDS for w in words) else 'run'}/{series}"


def check_installed(config: RunConfig) -> None:
    """Refuse, before any training, a backend whose package (of the same name, in the
    'tracking' extra) is missing."""
    missing = [name for name in config.trackers if importlib.util.find_spec(name) is None]
    if missing:
        raise TrackerUnavailableError(
            f"tracking {', '.join(missing)}: not installed here; install the extra with "
            "pip install -e \".[tracking]\" (or drop it from 'tracking')")


def open_trackers(config: RunConfig, run_dir: Path, run_config: dict[str, Any],
                  warn: Callable[[str], None]) -> Trackers:
    """The configured trackers for the run in ``run_dir``; one that cannot open is
    warned about and left out."""
    check_installed(config)
    opened: list[Tracker] = []
    for name in config.trackers:
        try:
            opened.append(_open(name, config, run_dir, run_config))
        except Exception as err:  # noqa: BLE001 -- tracking must never fail a run
            warn(f"tracking: {name} could not start ({type(err).__name__}: {err}); "
                 "the run goes on without it")
    return Trackers(opened, warn)


def _open(name: str, config: RunConfig, run_dir: Path, run_config: dict[str, Any]) -> Tracker:
    if name == "tensorboard":
        from fedcifar_app.tracking.tensorboard import TensorBoardTracker
        return TensorBoardTracker(run_dir, run_config)
    if name == "mlflow":
        from fedcifar_app.tracking.mlflow import MlflowTracker
        return MlflowTracker(config.mlflow_uri, EXPERIMENT, run_dir, run_config)
    from fedcifar_app.tracking.wandb import WandbTracker
    return WandbTracker(EXPERIMENT, run_dir, run_config)


__all__ = ["TRACKERS", "Tracker", "TrackerUnavailableError", "Trackers", "check_installed",
           "open_trackers"]

"""Checkpoints: the global model after a round, and what a resumed run must share.

Every round's global model and round number go to ``checkpoint.pt``, with the
settings a resumed run must share (``resume_problems``) and the extensions' own
state (with DP, the privacy ledger), from which ``resume-from`` continues.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fedcifar_app.config import ConfigError, RunConfig
from fedcifar_app.errors import AnticipatedError, one_line
from fedcifar_app.results import atomic_write, load_results

CHECKPOINT_FILE = "checkpoint.pt"
# What every resumed run must share with the run it continues (run-config keys);
# extensions add theirs (see extensions.resume_keys).
RESUME_KEYS = ("model", "strategy", "seed", "dp")
_CORE_KEYS = {"round", "model", "samples_trained", "model_name", "settings"}


class CheckpointNotFound(AnticipatedError, FileNotFoundError):
    """resume-from names no checkpoint."""


@dataclass(frozen=True)
class Checkpoint:
    """The global model after ``round`` rounds, as ``save_checkpoint`` wrote it."""

    round: int
    model: dict[str, torch.Tensor]
    samples_trained: int
    path: Path
    model_name: str  # the architecture (run-config key 'model') the weights belong to
    settings: dict[str, Any] | None = None  # the resume keys of the run; None: older file
    extension_state: dict[str, Any] = field(default_factory=dict)  # by key, as saved


def save_checkpoint(path: Path, server_round: int, model: dict[str, torch.Tensor],
                    samples_trained: int, model_name: str, settings: dict[str, Any],
                    extension_state: dict[str, Any]) -> None:
    checkpoint = {"round": server_round, "model": model, "samples_trained": samples_trained,
                  "model_name": model_name, "settings": settings, **extension_state}
    atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))


def load_checkpoint(location: str) -> Checkpoint:
    """Read a checkpoint.pt, or the one in the run folder ``location`` names."""
    path = Path(location).expanduser().resolve()
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise CheckpointNotFound(f"resume-from: no checkpoint at {path} (give a run folder "
                                 f"or its {CHECKPOINT_FILE}, as an absolute path)")
    try:
        saved = torch.load(path, weights_only=True)
        if not {"round", "model", "samples_trained"} <= set(saved):
            raise ValueError(f"keys {sorted(saved)}")
    except Exception as err:  # torch raises many types for a truncated or foreign file
        raise ConfigError(f"resume-from: {path} is not a readable fedcifar checkpoint "
                          f"({type(err).__name__}: {one_line(err)[:200]}); give the "
                          f"{CHECKPOINT_FILE} of a run, or start afresh") from err
    # Checkpoints written before the 'model' key existed hold the tutorial CNN.
    return Checkpoint(saved["round"], saved["model"], saved["samples_trained"], path,
                      saved.get("model_name", "tutorial-cnn"), saved.get("settings"),
                      {k: v for k, v in saved.items() if k not in _CORE_KEYS})


def resume_settings(config: RunConfig, keys: tuple[str, ...]) -> dict[str, Any]:
    """The run-config values of ``keys``: what a checkpoint records and a resumed run
    must share (what the model's history and, with DP, the privacy spent depend on)."""
    values = config.to_dict()
    return {key: values[key] for key in keys}


def resume_problems(checkpoint: Checkpoint, wanted: dict[str, Any]) -> list[str]:
    """How the settings ``wanted`` differ from those of the run that wrote
    ``checkpoint`` (empty: none)."""
    if checkpoint.settings is None:
        return ["it records no run settings (written by an older fedcifar): its privacy "
                "spent and strategy cannot be checked, start afresh"]
    keys = sorted(set(wanted) | set(checkpoint.settings))
    return [f"'{key}' was {checkpoint.settings.get(key, '(not set)')!r}, is "
            f"{wanted.get(key, '(not set)')!r}" for key in keys
            if checkpoint.settings.get(key) != wanted.get(key)]


def checkpoint_to_resume(config: RunConfig, keys: tuple[str, ...]) -> Checkpoint | None:
    """The checkpoint ``resume-from`` names, once it is checked to be one this run can
    continue (its round, its model, and its settings of ``keys``); None without one."""
    if not config.resume_from:
        return None
    checkpoint = load_checkpoint(config.resume_from)
    if checkpoint.round >= config.num_server_rounds:
        raise ConfigError(f"'resume-from' {checkpoint.path} is at round {checkpoint.round}, "
                          f"num-server-rounds is {config.num_server_rounds}: nothing to do")
    if checkpoint.model_name != config.model:
        raise ConfigError(f"'resume-from' {checkpoint.path} holds a {checkpoint.model_name} "
                          f"model, 'model' is {config.model}: set model='"
                          f"{checkpoint.model_name}' to resume it")
    problems = resume_problems(checkpoint, resume_settings(config, keys))
    if problems:
        raise ConfigError(f"'resume-from' {checkpoint.path} cannot be continued by this "
                          "run: " + "; ".join(problems) + " (resume with the settings it "
                          "was written with, or start afresh)")
    return checkpoint


def earlier_entries(checkpoint: Checkpoint) -> list[dict]:
    """The resumed run's results up to its checkpoint, so one history covers both."""
    try:
        entries = load_results(checkpoint.path.parent)["entries"]
    except (OSError, ValueError, KeyError):
        return []
    return [entry for entry in entries if entry["round"] <= checkpoint.round]

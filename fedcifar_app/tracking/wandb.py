"""Weights & Biases, offline: the run is written into its folder (``wandb/``) and
never leaves the machine; ``wandb sync <run folder>/wandb/offline-run-*`` uploads it
later, to wandb.ai or a W&B server, where one is reachable."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import wandb

# The series' x axis (W&B's own step must only grow; evaluate-in-train completes the
# previous round's entry after the next round started).
STEP = "step"


class WandbTracker:
    name = "wandb"

    def __init__(self, project: str, run_dir: Path, run_config: dict[str, Any]) -> None:
        self.run = wandb.init(
            project=project, name=run_dir.name, dir=str(run_dir), config=run_config,
            mode="offline", reinit="create_new",
            # No stdout capture, system sampling or git probing inside a ServerApp.
            settings=wandb.Settings(console="off", quiet=True, x_disable_stats=True,
                                    disable_git=True, save_code=False))
        self.run.define_metric(STEP)
        self.run.define_metric("*", step_metric=STEP)

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log({STEP: step, **metrics})

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        self.run.summary["status"] = summary["status"]
        if summary["best"] is not None:
            self.run.summary["best_test_accuracy"] = summary["best"]["test_accuracy"]
        self.run.finish(exit_code=0 if summary["status"] == "completed" else 1)

"""TensorBoard: the run's series as event files in its folder (``tensorboard/``), so
``tensorboard --logdir <output-dir>`` shows every run, federated and centralized."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch.utils.tensorboard import SummaryWriter

LOG_DIR = "tensorboard"


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_dir: Path, run_config: dict[str, Any]) -> None:
        self.writer = SummaryWriter(log_dir=str(run_dir / LOG_DIR))
        self.writer.add_text("run_config", _as_code(run_config))

    def log_metrics(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, global_step=step)
        self.writer.flush()  # a run watched live shows each round as it ends

    def finish(self, summary: dict[str, Any], run_dir: Path) -> None:
        self.writer.add_text("status", f"{summary['status']}; best: {summary['best']}")
        self.writer.close()


def _as_code(values: dict[str, Any]) -> str:
    # TensorBoard renders text as Markdown: indented, the JSON keeps its layout.
    return "\n".join("    " + line for line in json.dumps(values, indent=1).splitlines())

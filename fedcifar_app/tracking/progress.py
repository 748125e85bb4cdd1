"""One line per finished round (or epoch, or FedBuff server step): where the run is,
how long it has taken and will take, how the model does, what the round went through."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class RoundProgress:
    total: int  # the run's last round/epoch/step
    unit: str  # the entries' index key: "round" or "epoch"
    label: str = ""  # what the line calls one (default: the unit)
    first: tuple[int, float] | None = None  # (index, time) of the first line
    started: float = field(default_factory=time.monotonic)

    def line(self, entry: dict[str, Any]) -> str:
        index, now = entry[self.unit], time.monotonic()
        if self.first is None:
            self.first = (index, now)
        parts = [f"{self.label or self.unit} {index}/{self.total}",
                 f"{_clock(now - self.started)} elapsed"]
        first_index, first_time = self.first
        if first_index < index < self.total:
            per_index = (now - first_time) / (index - first_index)
            parts.append(f"ETA {_clock(per_index * (self.total - index))}")
        if "simulated_seconds" in entry:
            parts.append(f"simulated {_clock(entry['simulated_seconds'])}")
        if "train_loss" in entry:
            parts.append(f"train loss {entry['train_loss']:.4f}")
        if entry.get("test_accuracy") is not None:
            parts.append(f"test loss {entry['test_loss']:.4f}, "
                         f"accuracy {100 * entry['test_accuracy']:.2f} %")
        if "train_replies" in entry:
            parts.append(_replies(entry))
        return "[fedcifar] " + " | ".join(parts)


def _replies(entry: dict[str, Any]) -> str:
    # On a simulated clock, updates dropped as late (over-selection) count as failures.
    late = len(entry.get("late", ()))
    numbers = {"updates": entry["train_replies"],
               "failed": entry.get("train_failures", 0) - late, "late": late,
               "rejected": entry.get("train_rejected", 0),
               "replaced": entry.get("train_replacements", 0)}
    return ", ".join(f"{count} {word}" for word, count in numbers.items()
                     if count or word == "updates")


def _clock(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"

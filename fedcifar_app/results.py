"""Run outputs shared by the federated and centralized entry points (no Flower).

Each run writes into its own folder:
  results.json      run config, one entry per round/epoch, best round, timings
  model_final.pt    torch.save(state_dict) of the final model (on the CPU; the model
                    that results.json's run_config names, task.build_model, loads it)
  model_best.pt     the state_dict with the best test accuracy so far
  accuracy.png      test accuracy against round/epoch and against time
  loss.png          test loss (and training loss) against round/epoch and against time
  timeline.png      federated: who trained when, on the run's clock (wall or simulated),
                    and which updates were used, stale, late, rejected or failed
  partitions.png    federated, where the server can read the training split: the label
                    distribution of the partitions (drawn by the ServerApp)
results.json is rewritten after every round or epoch, so an interrupted run keeps its
history (each entry on one line: only the entries that changed are encoded again);
``publish`` hands each finished round's series to the run's trackers (see tracking).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

RESULTS_FILE = "results.json"
FINAL_MODEL_FILE = "model_final.pt"
BEST_MODEL_FILE = "model_best.pt"
PLOT_FILE = "accuracy.png"
LOSS_PLOT_FILE = "loss.png"
TIMELINE_FILE = "timeline.png"
PARTITIONS_PLOT_FILE = "partitions.png"
# How a job ended (results.json 'jobs'), and its colour on the timeline; "used, stale":
# a FedBuff update used with staleness > 0 (so weighted down).
JOB_COLOURS = {"used": "tab:blue", "used, stale": "lightskyblue", "stale": "tab:orange",
               "late": "tab:orange", "rejected": "tab:purple", "failed": "tab:red",
               "offline": "tab:red", "timed out": "darkred", "disconnected": "darkred",
               "unavailable": "tab:gray"}
# Comparison plots count training samples in CIFAR-10 epochs.
SAMPLES_PER_EPOCH = 50_000


def atomic_write(path: Path, write: Any) -> None:
    """Call write(tmp) on a temporary sibling, flush it to disk, then rename it over
    ``path``: a crash at any point leaves the old file or the new one, whole."""
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb+") as written:
        os.fsync(written.fileno())
    os.replace(tmp, path)


@dataclass
class RunRecorder:
    """Collects per-round (or per-epoch) results and keeps the run folder current."""

    run_dir: Path
    kind: str  # "federated" or "centralized"
    unit: str  # "round" or "epoch"
    run_config: dict[str, Any]
    extra: dict[str, Any] = field(default_factory=dict)
    entries: list[dict[str, Any]] = field(default_factory=list)
    best_accuracy: float = float("-inf")
    best_index: int | None = None
    started: float = field(default_factory=time.monotonic)
    started_at: str = field(
        default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))
    status: str = "running"
    # tracking.Trackers, or anything with log_metrics(step, metrics) and finish(summary,
    # run_dir): fed by ``publish`` and ``finish``.
    tracker: Any = None
    published: dict[int, dict[str, float]] = field(default_factory=dict)
    # Each entry's JSON, by round/epoch, until the entry may change (record, entry):
    # re-encoding a long run's whole history every round slowed its later rounds
    # (BENCHMARKS.md, section 9).
    encoded: dict[int, str] = field(default_factory=dict, repr=False)
    # The rounds/epochs whose entries may hold values the tracker has not had.
    unpublished: set[int] = field(default_factory=set, repr=False)

    def __post_init__(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def record(self, index: int, state_dict: dict[str, torch.Tensor] | None = None,
               timed: bool = True, save: bool = True, **values: Any) -> dict[str, Any]:
        """Add or update the entry of round/epoch ``index``; save the best model.

        ``elapsed_s`` becomes the time of this call, unless ``timed`` is False (values
        that arrive after their round ended, which must not move its end). With
        ``save`` False results.json is written by the next call that saves, by
        ``write`` or by ``finish``: a round records several times, and rewriting a long
        run's whole history each time cost a multiplexed round 10 % of its time."""
        entry = self.entry(index)
        if not entry:
            entry = {self.unit: index}
            self.entries.append(entry)
            self.entries.sort(key=lambda e: e[self.unit])
        entry.update(values)
        if timed or "elapsed_s" not in entry:
            entry["elapsed_s"] = round(self.elapsed, 3)
        accuracy = values.get("test_accuracy")
        if accuracy is not None and state_dict is not None and accuracy > self.best_accuracy:
            self.best_accuracy, self.best_index = accuracy, index
            atomic_write(self.run_dir / BEST_MODEL_FILE,
                         lambda tmp: torch.save(state_dict, tmp))
        if save:
            self.write()
        return entry

    def entry(self, index: int) -> dict[str, Any]:
        """The entry of round/epoch ``index`` ({} if there is none yet), to read or
        change (entries change only through this and ``record``)."""
        self.encoded.pop(index, None)
        self.unpublished.add(index)
        return self._find(index)

    def _find(self, index: int) -> dict[str, Any]:
        return next((e for e in self.entries if e[self.unit] == index), {})

    def publish(self, index: int) -> dict[str, Any]:
        """Round/epoch ``index`` is over: write results.json, and hand the tracker every
        series value of it, and of earlier entries, not handed over before (with
        evaluate-in-train, round k's evaluation arrives during round k + 1)."""
        self.write()
        for step in sorted(step for step in self.unpublished if step <= index):
            self.unpublished.discard(step)
            if self.tracker is None:
                continue
            sent = self.published.setdefault(step, {})
            fresh = {name: value for name, value in
                     scalar_series(self._find(step), self.unit).items()
                     if sent.get(name) != value}
            if fresh:
                sent.update(fresh)
                self.tracker.log_metrics(step, fresh)
        return self._find(index)

    def restore(self, entries: list[dict[str, Any]]) -> None:
        """Start from an earlier run's entries (resume); its best model stays there."""
        self.entries = [dict(entry) for entry in entries]
        self.encoded.clear()
        self.unpublished.update(entry[self.unit] for entry in self.entries)
        scored = [e for e in self.entries if e.get("test_accuracy") is not None]
        if scored:
            best = max(scored, key=lambda e: e["test_accuracy"])
            self.best_accuracy, self.best_index = best["test_accuracy"], best[self.unit]

    def finish(self, final_state_dict: dict[str, torch.Tensor] | None,
               status: str = "completed") -> None:
        self.status = status
        if final_state_dict is not None:
            atomic_write(self.run_dir / FINAL_MODEL_FILE,
                         lambda tmp: torch.save(final_state_dict, tmp))
        self.write()
        summary = self.summary()
        plot_series(summary, "test_accuracy", self.run_dir / PLOT_FILE)
        plot_series(summary, "test_loss", self.run_dir / LOSS_PLOT_FILE)
        if any(entry.get("jobs") for entry in self.entries):
            plot_timeline(summary, self.run_dir / TIMELINE_FILE)
        if self.tracker is not None:
            self.tracker.finish(summary, self.run_dir)

    def summary(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "unit": self.unit,
            "status": self.status,
            "started_at": self.started_at,
            "elapsed_s": round(self.elapsed, 3),
            "run_config": self.run_config,
            **self.extra,
            "best": None if self.best_index is None else {
                self.unit: self.best_index, "test_accuracy": self.best_accuracy},
            "entries": self.entries,
        }

    def write(self) -> None:
        summary = self.summary()
        entries = [self._encoded(entry) for entry in summary.pop("entries")]
        head = json.dumps(summary, indent=2).removesuffix("\n}")
        text = (head + ',\n  "entries": [' + ",".join(f"\n    {e}" for e in entries)
                + ("\n  " if entries else "") + "]\n}")
        atomic_write(self.run_dir / RESULTS_FILE, lambda tmp: tmp.write_text(text))

    def _encoded(self, entry: dict[str, Any]) -> str:
        index = entry[self.unit]
        if index not in self.encoded:
            self.encoded[index] = json.dumps(entry)
        return self.encoded[index]


def scalar_series(entry: dict[str, Any], unit: str) -> dict[str, float]:
    """The numbers of an entry, as series names: top-level ones by key, those of nested
    metric dicts (train, evaluate) as 'key/name'; lists and flags left out."""
    series: dict[str, float] = {}
    for key, value in entry.items():
        if key == unit:
            continue
        if isinstance(value, dict):
            series.update({f"{key}/{name}": float(number) for name, number in value.items()
                           if _is_number(number)})
        elif _is_number(value):
            series[key] = float(value)
    return series


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def load_results(path: Path) -> dict[str, Any]:
    path = Path(path)
    return json.loads((path / RESULTS_FILE if path.is_dir() else path).read_text())


SERIES_LABELS = {"test_accuracy": "test accuracy (%)", "test_loss": "loss"}


def plot_series(run: dict[str, Any], series: str, path: Path) -> None:
    """One run's ``series`` against its rounds/epochs and against time (a run folder's
    accuracy.png and loss.png); the loss plot adds the training loss."""
    plot_runs([run], path, series=series, x_axes=("unit", "time"), labels=[_describe(run)])


def plot_runs(runs: list[dict[str, Any]], path: Path, labels: list[str] | None = None,
              series: str = "test_accuracy", x_axes: tuple[str, ...] = ("data", "time")
              ) -> None:
    """``series`` of one or more runs, one panel per x axis, as a PNG. The x axes: "unit"
    (the runs' rounds or epochs, integer ticks), "time" (simulated seconds where a
    simulated clock ran, else seconds since the run started), "data" (training samples
    seen, in CIFAR-10 epochs, so rounds and epochs line up by the data trained on)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(x_axes), figsize=(5.5 * len(x_axes), 4.2), squeeze=False)
    for ax, x_axis in zip(axes[0], x_axes):
        for i, run in enumerate(runs):
            label = labels[i] if labels else _describe(run)
            for name, values in _curves(run, series):
                points = [(x, y) for x, y in ((_x(run, e, x_axis), y) for e, y in values)
                          if x is not None]
                ax.plot([x for x, _ in points], [y for _, y in points], marker="o",
                        markersize=3, label=f"{label}: {name}" if name else label)
        ax.set_xlabel(_x_label(runs[0], x_axis))
        if x_axis == "unit":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(SERIES_LABELS.get(series, series))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def _curves(run: dict[str, Any], series: str
            ) -> list[tuple[str, list[tuple[dict[str, Any], float]]]]:
    """(name, [(entry, y)]) per curve: the series (accuracy in %), and for the loss
    the training loss too (federated: the clients' mean; centralized: the epoch's)."""
    scale = 100 if series == "test_accuracy" else 1
    curves = [("" if series == "test_accuracy" else "test",
               [(e, scale * e[series]) for e in run["entries"] if e.get(series) is not None])]
    if series == "test_loss":
        train = [(e, e["train_loss"] if "train_loss" in e else e["train"]["train-loss"])
                 for e in run["entries"]
                 if "train_loss" in e or "train-loss" in e.get("train", {})]
        curves.append(("train", train))
    return [(name, values) for name, values in curves if values]


def _x(run: dict[str, Any], entry: dict[str, Any], x_axis: str) -> float | None:
    if x_axis == "unit":
        return entry[run["unit"]]
    if x_axis == "data":
        return entry.get("samples_trained", 0) / SAMPLES_PER_EPOCH
    return entry.get("simulated_seconds" if _simulated(run) else "elapsed_s")


def _simulated(run: dict[str, Any]) -> bool:
    return any("simulated_seconds" in entry for entry in run["entries"])


def _x_label(run: dict[str, Any], x_axis: str) -> str:
    if x_axis == "unit":
        return run["unit"]
    if x_axis == "data":
        return f"training samples seen (CIFAR-10 epochs of {SAMPLES_PER_EPOCH:,})"
    return "simulated seconds" if _simulated(run) else "seconds since the run started"


def _describe(run: dict[str, Any]) -> str:
    if run["kind"] == "centralized":
        return "centralized"
    config = run["run_config"]
    return f"{config.get('strategy', 'fedavg')} ({config.get('partitioner', 'iid')})"


def plot_timeline(run: dict[str, Any], path: Path) -> None:
    """Each job of a run on its clock (see ``draw_timeline``), as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    clients = {job["client"] for entry in run["entries"] for job in entry.get("jobs", ())}
    fig, ax = plt.subplots(figsize=(9, max(3.0, min(12.0, 0.12 * len(clients) + 1.5))))
    draw_timeline(ax, run)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def draw_timeline(ax: Any, run: dict[str, Any], until: float | None = None) -> None:
    """A bar per job from sent to arrived, in the row of its client, coloured by how it
    ended; a dotted line where each round or server step ended. ``until``: only the
    jobs sent before that many clock seconds."""
    jobs = [job for entry in run["entries"] for job in entry.get("jobs", ())
            if until is None or job["sent"] < until]
    kind = {id(job): "used, stale" if job["outcome"] == "used" and job.get("staleness")
            else job["outcome"] for job in jobs}
    clients = sorted({job["client"] for job in jobs})
    row = {client: i for i, client in enumerate(clients)}
    for outcome, colour in JOB_COLOURS.items():
        ended = [job for job in jobs if kind[id(job)] == outcome]
        if not ended:
            continue
        ax.barh([row[job["client"]] for job in ended],
                [max(job["arrived"] - job["sent"], 0.0) for job in ended],
                left=[job["sent"] for job in ended], height=0.7, color=colour,
                edgecolor="white", linewidth=0.5, label=f"{outcome} ({len(ended)})")
        ax.scatter([job["arrived"] for job in ended], [row[job["client"]] for job in ended],
                   s=6, color=colour, zorder=3)
    simulated = _simulated(run)
    clock = "simulated_seconds" if simulated else "elapsed_s"
    for entry in run["entries"]:
        if entry.get("jobs") and clock in entry and (until is None or entry[clock] <= until):
            ax.axvline(entry[clock], color="black", linewidth=0.4, linestyle=":")
    if until is not None:
        ax.set_xlim(0, until)
    ax.set_yticks(range(len(clients)), [str(c) for c in clients],
                  fontsize=6 if len(clients) > 30 else 8)
    ax.set_ylabel("client (partition id)")
    ax.set_xlabel("simulated seconds" if simulated else "seconds since the ServerApp started")
    strategy = run["run_config"].get("strategy", "")
    ax.set_title(f"{strategy}: jobs per client; dotted: "
                 f"{'server steps' if strategy == 'fedbuff' else run['unit'] + 's'}",
                 fontsize=10)
    ax.legend(fontsize=8, loc="upper right")

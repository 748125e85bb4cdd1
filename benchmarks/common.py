"""Helpers shared by the benchmark scripts: machine facts, running flwr, RSS sampling."""

from __future__ import annotations

import json
import os
import platform
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

ROOT = Path(__file__).resolve().parents[1]
# The ServerApp's line per finished round (fedcifar_app.tracking.progress).
ROUND_LINE = re.compile(r"\[fedcifar\] (?:round|step) (\d+)/(\d+)")


def machine() -> dict[str, Any]:
    import flwr
    import torch

    memory_kb = int(next(line.split()[1] for line in open("/proc/meminfo")
                         if line.startswith("MemTotal")))
    return {"cores": os.cpu_count(), "memory_gib": round(memory_kb / 2**20, 1),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "flwr": flwr.__version__}


def process_tree_rss(root_pids: list[int]) -> int:
    """Summed resident memory (bytes) of ``root_pids`` and all their descendants."""
    from fedcifar_app.ops.local_simulation import descendants

    total = 0
    for pid in {p for root in root_pids for p in (root, *descendants(root))}:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


class PeakRss:
    """Samples the RSS of a process tree every ``interval`` seconds in a thread."""

    def __init__(self, root_pids_fn, interval: float = 0.5) -> None:
        self.root_pids_fn, self.interval, self.peak = root_pids_fn, interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, process_tree_rss(self.root_pids_fn()))
            self._stop.wait(self.interval)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def flwr_run(run_config: str, federation_config: str | None = None,
             timeout: float = 3600, connection: str | None = None,
             label: str = "flwr run") -> tuple[float, Path, str]:
    """``flwr run . [connection]``, its log streamed, through ``fedcifar_app.ops.runs start``
    (which exits non-zero unless the run completed), with a progress bar of its rounds;
    return (wall seconds, run folder, output).

    Never on a managed SuperLink that would ``uv sync`` the app's dependencies into a
    fresh environment for the run (minutes and gigabytes, and a different torch):
    such a one is stopped, and ``flwr`` starts the next without installation."""
    from fedcifar_app.ops.local_simulation import DISABLE_INSTALL_ENV, stop_installing_superlinks

    stop_installing_superlinks()
    command = [sys.executable, "-m", "fedcifar_app.ops.runs", "start",
               *([connection] if connection else []), "--run-config", run_config]
    if federation_config:
        command += ["--federation-config", federation_config]
    start = time.perf_counter()
    returncode, output = _streamed(command, {**os.environ, DISABLE_INSTALL_ENV: "1"}, timeout,
                                   label)
    wall = time.perf_counter() - start
    marker = "outputs of this run: "
    lines = [line for line in output.splitlines() if marker in line]
    if returncode != 0 or not lines:
        raise RuntimeError(f"flwr run failed:\n{output[-6000:]}")
    return wall, Path(lines[-1].split(marker, 1)[1].strip()), output


def _streamed(command: list[str], env: dict[str, str], timeout: float,
              label: str) -> tuple[int, str]:
    """Run ``command``, a bar advancing with each round line it prints (on a terminal;
    in a log file, a line every 30 s); (exit code, everything it printed). Killed,
    with exit code -9, after ``timeout`` seconds."""
    process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    watchdog = threading.Timer(timeout, process.kill)
    watchdog.start()
    output = []
    with tqdm(desc=label, unit="round", mininterval=0.1 if sys.stderr.isatty() else 30,
              leave=False) as bar:
        for line in process.stdout:
            output.append(line)
            match = ROUND_LINE.search(line)
            if match:
                bar.total = int(match[2])
                bar.update(int(match[1]) - bar.n)
    watchdog.cancel()
    return process.wait(), "".join(output)


def run_resumable(run_config: str, run_root: Path, label: str,
                  federation_config: str | None = None, timeout: float = 6 * 3600,
                  resumable: bool = True) -> tuple[Path, float]:
    """One benchmark run whose output folder is ``run_root``; return (run folder, wall
    seconds spent now). A run that completed before is returned as it is (0 s); one
    that was cut off (a checkpoint, no "completed" status) resumes from its last round
    with ``resume-from``, so a benchmark can be restarted across work periods, unless
    ``resumable`` is False (state beyond the checkpoint, e.g. SCAFFOLD's controls,
    would restart at zero) or the checkpoint is of the last round: then it starts
    over."""
    checkpoints = sorted(run_root.glob("flwr-run-*/checkpoint.pt"),
                         key=lambda p: p.stat().st_mtime)
    if checkpoints and load(checkpoints[-1].parent / "results.json").get(
            "status") == "completed":
        return checkpoints[-1].parent, 0.0
    if checkpoints and resumable and not _at_last_round(checkpoints[-1], run_config):
        run_config += f" resume-from='{checkpoints[-1].parent}'"
        print(f"{label}: resuming from {checkpoints[-1].parent}", flush=True)
    else:
        print(f"{label}: starting" + (" over (not resumable)" if checkpoints else ""),
              flush=True)
    wall, run_dir, _ = flwr_run(run_config, federation_config, timeout=timeout, label=label)
    return run_dir, wall


def _at_last_round(checkpoint: Path, run_config: str) -> bool:
    """Whether ``checkpoint`` holds the run's last round (cut off while finishing:
    there is nothing left to resume, so it starts over)."""
    from fedcifar_app import compat
    from fedcifar_app.strategies import load_checkpoint

    rounds = compat.parse_run_config(run_config).get("num-server-rounds")
    return rounds is not None and load_checkpoint(str(checkpoint)).round >= int(rounds)


def add_data_arguments(parser) -> None:
    """--dataset, --cache-dir and --out, which every benchmark takes."""
    parser.add_argument("--dataset", required=True,
                        help="Hub id, or a folder with train.parquet and test.parquet")
    parser.add_argument("--cache-dir", default="~/.cache/fedcifar",
                        help="decoded-image cache (default ~/.cache/fedcifar)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results",
                        help="where results and run folders go (default benchmarks/results)")


def data_config(args, output_dir: Path) -> str:
    """The run-config overrides that point a run at the benchmark's data and folders."""
    dataset = Path(args.dataset)
    source = str(dataset.resolve()) if dataset.exists() else args.dataset
    cache = Path(args.cache_dir).expanduser().resolve()
    return f"dataset='{source}' cache-dir='{cache}' output-dir='{output_dir}'"


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)


def finished_seeds(row: dict[str, Any]) -> list[dict[str, Any]]:
    """A benchmark row's seeds that count in its mean ± std: finished runs, and runs
    measured earlier whose figures were kept."""
    return [seed for seed in row["seeds"].values()
            if seed.get("status") in ("completed", "earlier")]


def superlink_of_this_checkout() -> None:
    """Stop this user's local SuperLink and start it again from this checkout: the
    simulation's Ray workers import fedcifar_app by name, from wherever the SuperLink
    that started them found it, so a SuperLink left from another checkout would run that
    one."""
    from fedcifar_app.ops.local_simulation import managed_superlink_pids, stop_process_tree

    os.environ["PYTHONPATH"] = str(ROOT)
    for pid in managed_superlink_pids():
        stop_process_tree(pid)
    subprocess.run([sys.executable, "-m", "fedcifar_app.ops.local_simulation"], cwd=ROOT,
                   check=True)

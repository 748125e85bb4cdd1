"""Prepare this machine's managed local SuperLink for fedcifar simulations.

    python -m fedcifar_app.local_simulation [--num-supernodes 10] [--cpus-per-client 1]
                                            [--gpus-per-client 0.25]

``flwr run .`` submits to a local SuperLink that flwr starts on first use and
that keeps running. Two of its defaults do not suit this app, and Flower 1.42
reads neither from pyproject.toml:

* simulation size: 2 SuperNodes with 2 CPUs each. This sets the size once, with
  ``flwr federation simulation-config``; the SuperLink stores it in its state
  database under $FLWR_HOME, so every later ``flwr run .`` uses it. The size
  includes the share of a GPU each ClientApp reserves (Ray's ``num_gpus``):
  with 0.25, four ClientApps share one GPU.
* runtime dependency installation: for every run the SuperLink would ``uv sync``
  the app's dependencies into a fresh environment (several GB of torch, and a
  failure offline). The SuperLink reads FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION
  when it starts, so this (re)starts it with that set, and the app uses the
  packages ``pip install -e .`` installed.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

DISABLE_INSTALL_ENV = "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"
DISABLE_INSTALL_FLAG = "--disable-runtime-dependency-installation"


def control_api_address(environ: Mapping[str, str] = os.environ) -> str:
    # flwr reads the same variable, so tests and users can move the managed SuperLink.
    return f"127.0.0.1:{environ.get('FLWR_LOCAL_CONTROL_API_PORT', '39093')}"


def _read_proc(pid: int, name: str) -> bytes:
    try:
        return Path(f"/proc/{pid}/{name}").read_bytes()
    except OSError:  # The process ended, or it is not ours to read.
        return b""


def _pids() -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir() if p.name.isdigit()]


def managed_superlink_pids(environ: Mapping[str, str] = os.environ) -> list[int]:
    """PIDs of the managed local SuperLink whose control API ``environ`` selects."""
    address = control_api_address(environ).encode()
    found = []
    for pid in _pids():
        args = _read_proc(pid, "cmdline").split(b"\0")
        if any(a.endswith(b"flower-superlink") for a in args[:2]) and address in args:
            found.append(pid)
    return found


def descendants(pid: int) -> list[int]:
    """All processes below ``pid`` (SuperExec, simulation, Ray workers)."""
    children: dict[int, list[int]] = {}
    for other in _pids():
        stat = _read_proc(other, "stat")
        if stat:
            # Field 4 is the parent PID; the name in field 2 may contain spaces.
            parent = int(stat.rsplit(b")", 1)[1].split()[1])
            children.setdefault(parent, []).append(other)
    found, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child)
    return found


def stop_process_tree(pid: int, timeout: float = 10.0,
                      first_signal: signal.Signals = signal.SIGTERM) -> None:
    """Send ``first_signal`` to ``pid`` and its descendants, SIGKILL whatever outlives
    ``timeout``, and return once all are gone. SIGKILL first is how a crash looks:
    no goodbye to the SuperLink."""
    tree = [pid, *descendants(pid)]
    for member in tree:
        try:
            os.kill(member, first_signal)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and any(is_alive(m) for m in tree):
        time.sleep(0.1)
    for member in tree:
        if is_alive(member):
            os.kill(member, signal.SIGKILL)


def is_alive(pid: int) -> bool:
    stat = _read_proc(pid, "stat")
    # A zombie (state Z) has exited; only its parent's wait() is missing.
    return bool(stat) and stat.rsplit(b")", 1)[1].split()[0] != b"Z"


def installs_dependencies(pid: int) -> bool:
    """Whether the SuperLink ``pid`` would uv-sync app dependencies for each run."""
    if DISABLE_INSTALL_FLAG.encode() in _read_proc(pid, "cmdline").split(b"\0"):
        return False
    environment = _read_proc(pid, "environ").split(b"\0")
    return f"{DISABLE_INSTALL_ENV}=1".encode() not in environment


def stop_installing_superlinks(environ: Mapping[str, str] = os.environ) -> None:
    """Stop the managed local SuperLink if it would uv-sync app dependencies per run;
    the next ``flwr`` command started with DISABLE_INSTALL_ENV=1 starts a new one."""
    for pid in managed_superlink_pids(environ):
        if installs_dependencies(pid):
            print(f"Stopping the local SuperLink (PID {pid}): it was started with runtime "
                  "dependency installation on.")
            stop_process_tree(pid)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcifar_app.local_simulation",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--num-supernodes", type=int, default=10,
                        help="Virtual SuperNodes in the simulation (default 10).")
    parser.add_argument("--cpus-per-client", type=int, default=1,
                        help="CPUs per ClientApp; cores / this = clients training at once "
                        "(default 1).")
    parser.add_argument("--gpus-per-client", type=float, default=0.0,
                        help="Share of a GPU each ClientApp reserves, e.g. 0.25: four "
                        "ClientApps per GPU (default 0: CPU only).")
    args = parser.parse_args(argv)
    if args.num_supernodes < 1 or args.cpus_per_client < 1:
        parser.error("--num-supernodes and --cpus-per-client must be >= 1")
    gpus = _visible_gpus()
    if args.gpus_per_client < 0:
        parser.error("--gpus-per-client must be >= 0")
    if args.gpus_per_client > 0 and gpus == 0:
        # Ray would never find a GPU to place a ClientApp on: runs would hang pending.
        parser.error(f"--gpus-per-client {args.gpus_per_client:g}: this machine has no "
                     "CUDA GPU that torch can see")

    stop_installing_superlinks()
    environment = {**os.environ, DISABLE_INSTALL_ENV: "1"}
    # The flwr CLI starts the managed SuperLink if none runs, with this environment.
    command = ["flwr", "federation", "simulation-config",
               "--num-supernodes", str(args.num_supernodes),
               "--client-resources-num-cpus", str(args.cpus_per_client),
               "--client-resources-num-gpus", str(args.gpus_per_client)]
    completed = subprocess.run(command, env=environment, check=False)
    if completed.returncode != 0:
        print(f"error: `{' '.join(command)}` failed (exit {completed.returncode})",
              file=sys.stderr)
        return completed.returncode
    cores = os.cpu_count() or 1
    at_once = max(cores // args.cpus_per_client, 1)
    resources = f"{cores} cores"
    if args.gpus_per_client > 0:
        at_once = min(at_once, int(gpus / args.gpus_per_client))
        resources += f", {gpus} GPU(s) at {args.gpus_per_client:g} per ClientApp"
    print(f"Local simulation: {args.num_supernodes} SuperNodes, {args.cpus_per_client} CPU "
          f"each ({at_once} training at once on {resources}); runtime dependency "
          "installation off. Now run: flwr run . --stream")
    return 0


def _visible_gpus() -> int:
    import torch  # deferred: this module is imported by tests and tools without torch use

    return torch.cuda.device_count()


if __name__ == "__main__":
    sys.exit(main())

"""A run's outcome as an exit status, for scripts, CI and the benchmarks.

    python -m fedcifar_app.ops.runs start [SUPERLINK] [FLWR RUN OPTIONS...]  # flwr run ., wait
    python -m fedcifar_app.ops.runs wait RUN_ID [SUPERLINK] [--quiet]  # stream its log, outcome

``flwr run . --stream`` exits 0 whether the run completed or failed (flwr 1.42). These
stream the run's log as ``--stream`` does, then print one line with the outcome and
exit 0 if the run completed, 1 if it failed or was stopped, 2 if it cannot be asked.
SUPERLINK names a connection of ``$FLWR_HOME/config.toml``, as for ``flwr run``
(default: the file's default one).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Sequence

COMPLETED = "finished:completed"
POLL_INTERVAL = 1.0


class CannotAsk(RuntimeError):
    """flwr could not submit the run or say how it stands."""


def _flwr_json(command: list[str]) -> dict:
    done = subprocess.run(["flwr", *command, "--format", "json"], capture_output=True,
                          text=True)
    try:
        answer = json.loads(done.stdout)
    except json.JSONDecodeError:
        answer = {"success": False, "error-message": done.stdout + done.stderr}
    if done.returncode != 0 or not answer.get("success"):
        raise CannotAsk(f"`flwr {' '.join(command)}` failed: "
                        f"{answer.get('error-message', '').strip()}")
    return answer


def run_status(run_id: int, superlink: list[str]) -> tuple[str, str]:
    """(status, details) of a run, as ``flwr ls`` reports them."""
    (run,) = _flwr_json(["ls", *superlink, "--run-id", str(run_id)])["runs"]
    return run["status"], run["status-details"]


def wait(run_id: int, superlink: list[str], stream: bool = True) -> int:
    """Stream the run's log until it ends (unless not ``stream``), wait for its final
    status, print the outcome on one line; 0 if it completed, else 1."""
    if stream:
        subprocess.run(["flwr", "log", str(run_id), *superlink, "--stream"], check=False)
    status, details = run_status(run_id, superlink)
    while not status.startswith("finished"):
        time.sleep(POLL_INTERVAL)
        status, details = run_status(run_id, superlink)
    if status == COMPLETED:
        print(f"[fedcifar] run {run_id} completed")
        return 0
    first_line = details.strip().splitlines()[0] if details.strip() else "no details"
    print(f"[fedcifar] run {run_id} {status}: {first_line} (`flwr log {run_id}` has the "
          "whole log)", file=sys.stderr)
    return 1


def start(flwr_run_arguments: Sequence[str]) -> int:
    """Submit ``flwr run . [SUPERLINK] OPTIONS`` and wait for it there."""
    arguments = list(flwr_run_arguments)
    superlink = arguments[:1] if arguments and not arguments[0].startswith("-") else []
    submitted = _flwr_json(["run", ".", *arguments])
    run_id = int(submitted["run-id"])
    print(f"[fedcifar] submitted run {run_id}", flush=True)
    return wait(run_id, superlink)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedcifar_app.ops.runs",
                                     description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("start", add_help=False,
                        help="flwr run . OPTIONS, then wait for it (OPTIONS go to flwr run)")
    waiting = commands.add_parser("wait", help="stream a run's log and exit with its outcome")
    waiting.add_argument("run_id", type=int)
    waiting.add_argument("superlink", nargs="?", help="connection name (default: flwr's)")
    waiting.add_argument("--quiet", action="store_true", help="do not stream the log")
    # Everything after 'start' is flwr run's, including its --options.
    args, flwr_run_options = parser.parse_known_args(argv)
    if flwr_run_options and args.command != "start":
        parser.error(f"unrecognized arguments: {' '.join(flwr_run_options)}")
    try:
        if args.command == "start":
            return start(flwr_run_options)
        return wait(args.run_id, [args.superlink] if args.superlink else [],
                    stream=not args.quiet)
    except CannotAsk as err:
        print(f"[fedcifar] ERROR {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

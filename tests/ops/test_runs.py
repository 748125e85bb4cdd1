"""A failed run says why in one line, and `python -m fedcifar_app.ops.runs` gives its outcome
as an exit status (flwr run . --stream exits 0 either way)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import run

# Minutes, not seconds (whole flwr run . simulations): `pytest -m "not slow"` skips it.
pytestmark = pytest.mark.slow

RUNS = [sys.executable, "-m", "fedcifar_app.ops.runs"]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "[fedcifar] ERROR" in line]


def test_the_first_command_offline_ends_in_one_line_naming_cause_and_fix(
        local_simulation: dict[str, str], tmp_path: Path) -> None:
    """The README's first run with the default data set (a Hub id) and no Hub (tests
    point HF_ENDPOINT at a closed port): one line, no traceback, no retries."""
    done = run([*RUNS, "start", "--run-config", f"output-dir='{tmp_path / 'out'}' "
                f"cache-dir='{tmp_path / 'cache'}'"], local_simulation)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    (line,) = error_lines(output)
    assert "the Hugging Face Hub (http://127.0.0.1:1) cannot be reached" in line
    assert "set `dataset` to a directory holding train.parquet" in line
    for noise in ("Traceback", "Retrying", "Exit Code: 700", "unhandled exception"):
        assert noise not in output
    assert output.strip().splitlines()[-1].startswith("[fedcifar] run ")
    assert "finished:failed" in output.strip().splitlines()[-1]


def test_a_bad_config_fails_in_one_line_and_the_wait_exits_non_zero(
        local_simulation: dict[str, str], tmp_path: Path) -> None:
    done = run([*RUNS, "start", "--run-config", "num-server-rounds=0 learning-rate=inf"],
               local_simulation)
    output = done.stdout + done.stderr
    assert done.returncode == 1, output
    (line,) = error_lines(output)
    assert ("invalid run config: 'num-server-rounds' must be >= 1, got 0; 'learning-rate' "
            "must be a finite number, got inf") in line
    assert "Traceback" not in output


def test_the_wait_exits_zero_for_a_completed_run(local_simulation: dict[str, str],
                                                 tiny_dataset: Path, tmp_path: Path) -> None:
    done = run([*RUNS, "start", "--run-config",
                f"dataset='{tiny_dataset}' cache-dir='{tmp_path / 'cache'}' "
                f"output-dir='{tmp_path / 'out'}' num-server-rounds=1 local-epochs=1"],
               local_simulation)
    assert done.returncode == 0, done.stdout + done.stderr
    run_id = done.stdout.split("[fedcifar] submitted run ", 1)[1].split()[0]
    assert f"[fedcifar] run {run_id} completed" in done.stdout
    assert (tmp_path / "out" / f"flwr-run-{run_id}" / "results.json").exists()
    again = run([*RUNS, "wait", run_id, "--quiet"], local_simulation)
    assert again.returncode == 0 and "completed" in again.stdout
    unknown = run([*RUNS, "wait", "12345", "--quiet"], local_simulation)
    assert unknown.returncode == 2 and "Run ID not found" in unknown.stderr

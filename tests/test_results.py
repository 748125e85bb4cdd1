"""Files the project rewrites survive a crash mid-write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

KILLED_MID_WRITE = """
import os, signal, sys
from pathlib import Path
from fedcifar_app.results import atomic_write

def half_then_killed(tmp):
    with open(tmp, "w") as f:
        f.write('{"half": ')
        f.flush()
        os.kill(os.getpid(), signal.SIGKILL)

atomic_write(Path(sys.argv[1]), half_then_killed)
"""


def test_a_kill_during_a_write_leaves_the_old_file_whole(tmp_path: Path) -> None:
    target = tmp_path / "results.json"
    target.write_text('{"round": 3}')
    killed = subprocess.run([sys.executable, "-c", KILLED_MID_WRITE, str(target)])
    assert killed.returncode == -9
    assert target.read_text() == '{"round": 3}'


def test_a_completed_write_replaces_the_file(tmp_path: Path) -> None:
    from fedcifar_app.results import atomic_write

    target = tmp_path / "results.json"
    target.write_text("old")
    atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_a_run_with_jobs_on_a_clock_draws_its_timeline(tmp_path: Path) -> None:
    import matplotlib.image

    from fedcifar_app.results import TIMELINE_FILE, RunRecorder

    recorder = RunRecorder(tmp_path, kind="federated", unit="round",
                           run_config={"strategy": "fedbuff"})
    recorder.record(1, simulated_seconds=3.0, jobs=[
        {"client": 0, "sent": 0.0, "arrived": 3.0, "outcome": "used"},
        {"client": 4, "sent": 0.0, "arrived": 2.0, "outcome": "failed"}])
    recorder.record(2, simulated_seconds=12.0, jobs=[
        {"client": 1, "sent": 0.0, "arrived": 12.0, "outcome": "stale"}])
    recorder.finish(None)
    picture = matplotlib.image.imread(tmp_path / TIMELINE_FILE)
    assert picture.shape[0] > 200 and picture.shape[1] > 500
    plain = RunRecorder(tmp_path / "plain", kind="federated", unit="round", run_config={})
    plain.record(1, test_accuracy=0.5)
    plain.finish(None)
    assert not (tmp_path / "plain" / TIMELINE_FILE).exists()


def test_results_json_holds_every_change_to_an_entry_however_it_was_made(
        tmp_path: Path) -> None:
    import json

    from fedcifar_app.results import RunRecorder, load_results

    recorder = RunRecorder(tmp_path, kind="federated", unit="round", run_config={"seed": 1})
    recorder.write()
    assert load_results(tmp_path)["entries"] == []
    for server_round in range(3):
        recorder.record(server_round, train={"train-loss": 2.0 - server_round},
                        jobs=[{"node": 7, "outcome": "used"}])
    recorder.record(1, timed=False, save=False, evaluate={"eval-accuracy": 0.5})
    recorder.entry(2)["jobs"][0]["outcome"] = "rejected"  # changed in place
    recorder.publish(2)
    written = load_results(tmp_path)
    assert written["entries"] == json.loads(json.dumps(recorder.entries))
    assert written["run_config"] == {"seed": 1} and written["status"] == "running"
    assert written["entries"][1]["evaluate"] == {"eval-accuracy": 0.5}
    assert written["entries"][2]["jobs"][0]["outcome"] == "rejected"
    recorder.restore(written["entries"][:1])
    recorder.write()
    assert [e["round"] for e in load_results(tmp_path)["entries"]] == [0]

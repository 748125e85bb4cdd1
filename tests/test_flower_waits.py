"""Flower's waits, shortened: fedcifar_app.flower_waits and fedcifar_app.fast_supernode."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest
from flwr.supercore.inflatable import inflatable_utils
from flwr.supercore.inflatable.inflatable_utils import ObjectUnavailableError, pull_objects
from flwr.supernode import start_client_internal

from fedcifar_app import fast_supernode, flower_waits


@pytest.fixture
def restore_flower():
    functions = (inflatable_utils.pull_objects,
                 inflatable_utils.pull_and_inflate_object_from_tree)
    saved = [dict(f.__kwdefaults__) for f in functions]
    yield
    start_client_internal.time = time
    for function, defaults in zip(functions, saved, strict=True):
        function.__kwdefaults__.clear()
        function.__kwdefaults__.update(defaults)


def test_the_supernode_loop_sleeps_at_most_the_pause(monkeypatch, restore_flower):
    slept: list[float] = []
    monkeypatch.setattr(time, "sleep", slept.append)
    flower_waits.cap_supernode_pauses(0.25)
    # The three pauses of flwr 1.42's loop: after an empty pull, and waiting for a reply.
    start_client_internal.time.sleep(3)
    start_client_internal.time.sleep(0.5)
    start_client_internal.time.sleep(0.1)
    assert slept == [0.25, flower_waits.BUSY_PAUSE, flower_waits.BUSY_PAUSE]
    assert start_client_internal.time.monotonic is time.monotonic
    assert time.sleep is not start_client_internal.time.sleep  # only Flower's module sees it


def test_a_flwr_without_the_expected_loop_is_refused(monkeypatch, restore_flower):
    monkeypatch.delattr(start_client_internal, "time")
    with pytest.raises(SystemExit, match="run flower-supernode instead"):
        flower_waits.cap_supernode_pauses(0.25)


def _unavailable_then_there(misses: int):
    """A pull function whose object is unavailable ``misses`` times, and the waits it saw."""
    asked: list[float] = []

    def pull(object_id: str) -> bytes:
        asked.append(time.monotonic())
        if len(asked) <= misses:
            raise ObjectUnavailableError(object_id)
        return b"arrays"

    return pull, asked


def test_object_pulls_retry_soon_instead_of_after_a_second(restore_flower):
    pull, asked = _unavailable_then_there(misses=3)
    assert flower_waits.shorten_object_pull_backoff()
    assert pull_objects(["a"], pull) == {"a": b"arrays"}
    gaps = [later - earlier for earlier, later in zip(asked, asked[1:])]
    # Flower's own backoff would have waited 1 + 2 + 4 s; now 0.02 + 0.04 + 0.08 (±20 %).
    assert len(gaps) == 3 and all(gap < 0.8 for gap in gaps)  # Flower: >= 0.8 s each
    for function in (inflatable_utils.pull_objects,
                     inflatable_utils.pull_and_inflate_object_from_tree):
        assert function.__kwdefaults__["initial_backoff"] == flower_waits.PULL_BACKOFF
        assert function.__kwdefaults__["backoff_cap"] == flower_waits.PULL_BACKOFF_CAP
        assert function.__kwdefaults__["max_time"] == 7200  # Flower's give-up time stays


def test_a_flwr_whose_pulls_differ_is_left_alone(monkeypatch, restore_flower):
    monkeypatch.setattr(inflatable_utils.pull_objects, "__kwdefaults__", {"timeout": 1})
    assert not flower_waits.shorten_object_pull_backoff()
    assert inflatable_utils.pull_objects.__kwdefaults__ == {"timeout": 1}


@pytest.mark.parametrize("value", ["0", "-1", "abc", "inf", "nan"])
def test_a_bad_pause_is_refused(monkeypatch, value):
    monkeypatch.setenv(fast_supernode.PAUSE_ENV, value)
    with pytest.raises(SystemExit, match=fast_supernode.PAUSE_ENV):
        fast_supernode.pause_from_env()


def test_the_pause_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(fast_supernode.PAUSE_ENV, raising=False)
    assert fast_supernode.pause_from_env() == fast_supernode.DEFAULT_PAUSE
    monkeypatch.setenv(fast_supernode.PAUSE_ENV, "0.05")
    assert fast_supernode.pause_from_env() == 0.05


def test_it_runs_flowers_own_supernode_command_line():
    shown = subprocess.run([sys.executable, "-m", "fedcifar_app.fast_supernode", "--help"],
                           capture_output=True, text=True, timeout=120, check=True)
    assert "usage: flower-supernode" in shown.stdout
    assert "--auth-supernode-private-key" in shown.stdout

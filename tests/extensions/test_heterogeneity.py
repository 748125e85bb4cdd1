"""Heterogeneous devices (fedcifar_app/extensions/heterogeneity/devices.py): seeded draws,
FedScale's trace formats, simulated durations and availability."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest

from fedcifar_app.config import ConfigError
from fedcifar_app.extensions.heterogeneity.devices import (Device, drawn_devices,
                                                          traced_devices)

DRAW = {"spread": 0.3, "straggler_fraction": 0.25, "straggler_slowdown": (5.0, 10.0),
        "kbps": 20_000.0}


def test_the_same_seed_draws_the_same_devices_and_another_seed_others():
    first = drawn_devices(100, seed=42, **DRAW)
    assert first == drawn_devices(100, seed=42, **DRAW)
    assert first != drawn_devices(100, seed=43, **DRAW)


def test_a_quarter_are_stragglers_five_to_ten_times_slower():
    devices = drawn_devices(100, seed=1, **{**DRAW, "spread": 0.0})
    slowdowns = sorted(d.slowdown for d in devices)
    assert slowdowns[:75] == [1.0] * 75  # no spread: the others run at this machine's speed
    assert all(5.0 <= s <= 10.0 for s in slowdowns[75:])
    assert {d.kbps for d in devices} == {20_000.0}


def test_durations_scale_the_measured_compute_and_count_the_model_both_ways():
    device = Device(kbps=8_000.0, slowdown=4.0)
    assert device.compute_seconds(measured_seconds=2.5, samples=9000) == 10.0
    # 1 MB down and up over 8 Mbit/s: 2 s.
    assert device.transfer_seconds(model_bytes=1_000_000) == pytest.approx(2.0)


def write_trace(path: Path, trace: dict) -> Path:
    path.write_bytes(pickle.dumps(trace))
    return path


def test_fedscale_traces_drive_durations_and_availability(tmp_path: Path):
    capacity = write_trace(tmp_path / "client_device_capacity", {
        1: {"computation": 20.0, "communication": 1_000.0},
        2: {"computation": 80.0, "communication": 4_000.0}})
    behaviour = write_trace(tmp_path / "client_behave_trace", {
        1: {"active": [0, 50], "inactive": [10, 60], "finish_time": 100, "duration": 20,
            "model": "x"},
        2: {"active": [5], "inactive": [95], "finish_time": 100}})
    first, second, third = traced_devices(capacity, behaviour, count=3)
    # FedScale: 3 x samples x ms per sample; the model down and up over the link.
    assert first.compute_seconds(measured_seconds=99.0, samples=1000) == pytest.approx(60.0)
    assert second.compute_seconds(measured_seconds=99.0, samples=1000) == pytest.approx(240.0)
    assert first.transfer_seconds(model_bytes=250_000) == pytest.approx(4.0)
    assert third == first  # client 2 wraps around to the first trace entry
    assert [first.available(t) for t in (0, 10, 11, 49, 55, 150, 161)] == [
        True, True, False, False, True, True, False]
    assert first.available_until(155) == 160 and first.available_until(30) == 30
    assert second.available_until(4) == 4 and second.available_until(105) == 195


def test_without_a_behaviour_trace_a_device_is_always_available(tmp_path: Path):
    capacity = write_trace(tmp_path / "capacity", {"a": {"computation": 1.0,
                                                         "communication": 1.0}})
    (device,) = traced_devices(capacity, None, count=1)
    assert device.available(1e9) and device.available_until(5) == float("inf")


@pytest.mark.parametrize("trace, named", [
    ({}, "non-empty dict"),
    ({1: {"computation": 1.0}}, "lacks computation, communication"),
    ({1: {"computation": 1.0, "communication": 0.0}}, "must be > 0"),
])
def test_a_malformed_capacity_trace_is_refused_naming_the_file(tmp_path: Path, trace: dict,
                                                               named: str):
    path = write_trace(tmp_path / "capacity", trace)
    with pytest.raises(ConfigError, match=named) as refused:
        traced_devices(path, None, count=1)
    assert str(path) in str(refused.value)


def test_a_behaviour_window_that_ends_before_it_starts_is_refused(tmp_path: Path):
    capacity = write_trace(tmp_path / "capacity", {1: {"computation": 1.0,
                                                       "communication": 1.0}})
    behaviour = write_trace(tmp_path / "behaviour", {1: {"active": [10], "inactive": [5],
                                                         "finish_time": 20}})
    with pytest.raises(ConfigError, match="active.i. <= inactive.i."):
        traced_devices(capacity, behaviour, count=1)


class _Payload:
    """What a malicious pickle holds: a call, made when the pickle is loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (os.system, (f"touch {self.marker}",))


def test_a_trace_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path):
    marker = tmp_path / "payload-ran"
    path = tmp_path / "capacity"
    path.write_bytes(pickle.dumps({1: {"computation": _Payload(marker), "communication": 1.0}}))
    pickle.loads(path.read_bytes())  # the payload works: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    with pytest.raises(ConfigError, match="names posix.system"):
        traced_devices(path, None, count=1)
    assert not marker.exists()

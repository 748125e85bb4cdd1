"""Heterogeneous devices (fedcifar_app/extensions/heterogeneity/devices.py): seeded draws,
FedScale's trace formats, simulated durations and availability."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord,
                      RecordDict)

from fedcifar_app import task
from fedcifar_app.config import ConfigError
from fedcifar_app.data import PartitionScheme, load_partition
from fedcifar_app.extensions.heterogeneity.clock import SimulatedClockGrid
from fedcifar_app.extensions.heterogeneity.devices import (Device, drawn_devices,
                                                          traced_devices)
from fedcifar_app.results import RunRecorder, load_results
from fedcifar_app.strategies.sampling import PartitionDirectory
from tests.conftest import flwr_run

DRAW = {"seconds_per_sample": 1e-4, "kbps": 20_000.0, "spread": 0.3,
        "straggler_fraction": 0.25, "straggler_slowdown": (5.0, 10.0)}


def test_the_same_seed_draws_the_same_devices_and_another_seed_others():
    first = drawn_devices(100, seed=42, **DRAW)
    assert first == drawn_devices(100, seed=42, **DRAW)
    assert first != drawn_devices(100, seed=43, **DRAW)


def test_a_quarter_are_stragglers_five_to_ten_times_slower():
    devices = drawn_devices(100, seed=1, **{**DRAW, "spread": 0.0})
    slowdowns = sorted(d.seconds_per_sample / 1e-4 for d in devices)
    assert slowdowns[:75] == pytest.approx([1.0] * 75)  # no spread: the reference device
    assert all(5.0 <= s <= 10.0 for s in slowdowns[75:])
    assert {d.kbps for d in devices} == {20_000.0}


def test_a_round_trains_its_samples_and_sends_the_model_both_ways():
    device = Device(seconds_per_sample=1e-3, kbps=8_000.0)
    # 9,000 samples at 1 ms, and 1 MB down and up over 8 Mbit/s: 9 + 2 s.
    assert device.round_seconds(samples=9000, model_bytes=1_000_000) == pytest.approx(11.0)


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
    assert first.round_seconds(samples=1000, model_bytes=0) == pytest.approx(60.0)
    assert second.round_seconds(samples=1000, model_bytes=0) == pytest.approx(240.0)
    assert first.round_seconds(samples=0, model_bytes=250_000) == pytest.approx(4.0)
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


# --- The simulated clock -------------------------------------------------------------------

class AnsweringGrid:
    """Nodes 1..n (partition i-1) that answer every instruction with 100 examples."""

    def __init__(self) -> None:
        self.sent: list[int] = []

    def send_and_receive(self, messages, *, timeout=None):  # noqa: ANN001, ANN201
        replies = []
        for message in messages:
            self.sent.append(message.metadata.dst_node_id)
            content = RecordDict({"metrics": MetricRecord({"num-examples": 100}),
                                  "arrays": message.content["arrays"]})
            replies.append(Message(content, reply_to=message))
        return replies


def clock_over(devices: list[Device], tmp_path: Path, nodes: int = 3,  # noqa: ANN201
               keep_first: int = 0):
    directory = PartitionDirectory(timeout=1)
    directory.partition_of.update({node: node - 1 for node in range(1, nodes + 1)})
    recorder = RunRecorder(tmp_path, kind="federated", unit="round", run_config={})
    inner = AnsweringGrid()
    grid = SimulatedClockGrid(inner, devices, directory, recorder, local_epochs=2,
                              keep_first=keep_first)
    return grid, inner, recorder


def instructions(server_round: int, nodes: list[int]) -> list[Message]:
    content = RecordDict({"arrays": ArrayRecord({"w": Array(np.zeros(250, np.float32))}),
                          "config": ConfigRecord({"server-round": server_round})})
    return [Message(content, dst_node_id=node, message_type=MessageType.TRAIN)
            for node in nodes]


def test_a_round_lasts_as_long_as_its_slowest_client(tmp_path: Path, server_task_identity):
    # 200 samples (2 epochs x 100) at 0.01 / 0.1 s; 1,000 bytes down and up at 8 kbit/s: 2 s.
    devices = [Device(0.01, 8.0), Device(0.1, 8.0), Device(0.01, 8.0)]
    grid, _, recorder = clock_over(devices, tmp_path)
    replies = grid.send_and_receive(instructions(1, [1, 2, 3]))
    assert not any(r.has_error() for r in replies)
    assert grid.now() == pytest.approx(22.0)  # the straggler: 20 + 2 s
    grid.send_and_receive(instructions(2, [1, 3]))
    assert grid.now() == pytest.approx(26.0)  # without it: 2 + 2 s more
    rounds = {e["round"]: e for e in recorder.entries}
    assert (rounds[1]["simulated_round_seconds"], rounds[2]["simulated_seconds"]) == (22.0, 26.0)


def test_an_unavailable_client_fails_unsent_and_one_going_offline_is_dropped(
        tmp_path: Path, server_task_identity):
    always = Device(0.01, 8.0)
    asleep = Device(0.01, 8.0, active=(50.0,), inactive=(60.0,), period=100.0)
    leaving = Device(0.01, 8.0, active=(0.0,), inactive=(3.0,), period=100.0)  # needs 4 s
    grid, inner, recorder = clock_over([always, asleep, leaving], tmp_path)
    replies = grid.send_and_receive(instructions(1, [1, 2, 3]))
    assert inner.sent == [1, 3]  # the unavailable device was never sent its instruction
    failed = {r.metadata.src_node_id: r.error.reason for r in replies if r.has_error()}
    assert set(failed) == {2, 3}
    assert "unavailable" in failed[2] and "went offline" in failed[3]
    (entry,) = recorder.entries
    assert (entry["unavailable"], entry["offline"]) == ([1], [2])
    assert grid.now() == pytest.approx(4.0)  # the round waited for the client that stayed


def test_over_selection_keeps_the_first_updates_and_drops_the_late_ones(
        tmp_path: Path, server_task_identity):
    # Arrivals (200 samples + 2 s of transfer): 4, 22, 6 and 42 s.
    devices = [Device(0.01, 8.0), Device(0.1, 8.0), Device(0.02, 8.0), Device(0.2, 8.0)]
    grid, _, recorder = clock_over(devices, tmp_path, nodes=4, keep_first=2)
    replies = grid.send_and_receive(instructions(1, [1, 2, 3, 4]))
    used = [r.metadata.src_node_id for r in replies if not r.has_error()]
    late = {r.metadata.src_node_id: r.error.reason for r in replies if r.has_error()}
    assert sorted(used) == [1, 3] and sorted(late) == [2, 4]
    assert "dropped as late" in late[2]
    assert grid.now() == pytest.approx(6.0)  # the round ends with the second arrival
    assert recorder.entries[0]["late"] == [1, 3]


def test_evaluation_is_off_the_clock(tmp_path: Path, server_task_identity):
    grid, _, _ = clock_over([Device(1.0, 1.0)], tmp_path, nodes=1)
    evaluate = [Message(m.content, dst_node_id=1, message_type=MessageType.EVALUATE)
                for m in instructions(1, [1])]
    assert not grid.send_and_receive(evaluate)[0].has_error() and grid.now() == 0.0


# --- Whole simulations (flwr run .) ----------------------------------------------------------

def clocked_run(env: dict[str, str], tiny_dataset: Path, tmp_path: Path, out: str,
                settings: str) -> list[dict]:
    """A 2-round simulation on the tiny data with ``settings``; its rounds' entries."""
    run_config = (f"dataset='{tiny_dataset}' cache-dir='{tmp_path / 'cache'}' "
                  f"output-dir='{tmp_path / out}' num-server-rounds=2 local-epochs=1 "
                  f"fraction-train=1.0 fraction-evaluate=0.0 min-available-nodes=3 "
                  f"round-retries=0 {settings}")
    done, status = flwr_run(env, run_config)
    assert status["status"] == "finished:completed", done.stdout + done.stderr
    return load_results(tmp_path / out / f"flwr-run-{status['run-id']}")["entries"][1:]


@pytest.mark.slow
def test_the_same_seed_gives_the_same_simulated_run(local_simulation: dict[str, str],
                                                    tiny_dataset: Path, tmp_path: Path):
    drawn = "devices='drawn' straggler-fraction=0.34 device-kbps=100.0"
    first, second = (clocked_run(local_simulation, tiny_dataset, tmp_path, out, drawn)
                     for out in ("first", "second"))
    clock = [(e["simulated_round_seconds"], e["simulated_seconds"]) for e in first]
    assert clock == [(e["simulated_round_seconds"], e["simulated_seconds"]) for e in second]
    assert [e["test_accuracy"] for e in first] == [e["test_accuracy"] for e in second]
    # Each round lasts as long as its slowest client: partition i on device i.
    devices = drawn_devices(3, 42, 0.000125, 100.0, 0.5, 0.34, (5.0, 10.0))
    scheme = PartitionScheme("iid", 3, 0.5, 2, 0.1, 42)
    sizes = [len(load_partition(str(tiny_dataset), tmp_path / "cache", scheme, i)[0])
             for i in range(3)]
    model_bytes = sum(t.numel() * t.element_size() for t in task.Net().state_dict().values())
    slowest = max(d.round_seconds(n, model_bytes) for d, n in zip(devices, sizes, strict=True))
    assert clock[0][0] == pytest.approx(slowest, abs=1e-3)
    assert clock[1][1] == pytest.approx(2 * slowest, abs=2e-3)


def traces_with_a_sleeper(directory: Path) -> str:
    """FedScale traces of 3 clients (10, 20, 30 ms per sample), the third asleep for the
    first 1,000 s of every 10,000; the run-config settings that read them."""
    capacity = write_trace(directory / "client_device_capacity", {
        f"c{i}": {"computation": 10.0 * (i + 1), "communication": 1_000.0} for i in range(3)})
    behaviour = write_trace(directory / "client_behave_trace", {
        "c0": {"active": [0], "inactive": [10_000], "finish_time": 10_000},
        "c1": {"active": [0], "inactive": [10_000], "finish_time": 10_000},
        "c2": {"active": [1_000], "inactive": [10_000], "finish_time": 10_000}})
    return (f"devices='fedscale' device-trace='{capacity}' "
            f"behaviour-trace='{behaviour}'")


@pytest.mark.slow
def test_a_fedscale_trace_drives_a_run(local_simulation: dict[str, str], tiny_dataset: Path,
                                       tmp_path: Path):
    entries = clocked_run(local_simulation, tiny_dataset, tmp_path, "traced",
                          traces_with_a_sleeper(tmp_path))
    assert entries[0]["unavailable"] == [2] and entries[0]["train_failures"] == 1
    assert entries[0]["train_replies"] == 2
    # The slower of the two that trained: 3 x 20 ms x its samples, plus the model twice.
    assert 0 < entries[0]["simulated_round_seconds"] == pytest.approx(
        entries[0]["simulated_seconds"])
    assert entries[1]["simulated_seconds"] > entries[0]["simulated_seconds"]


@pytest.mark.parametrize("settings, named", [
    ({"over-selection-keep": 3}, "'over-selection-keep' keeps the first updates"),
    ({"devices": "drawn", "virtual-clients": 10}, "'devices': multiplexed mode"),
    ({"devices": "drawn", "secure-aggregation": True}, "'devices': 'secure-aggregation'"),
    ({"devices": "fedscale"}, "needs 'device-trace'"),
    ({"devices": "drawn", "device-trace": "/x"}, "read with devices='fedscale'"),
    ({"devices": "drawn", "straggler-slowdown-min": 11.0}, "must not exceed"),
])
def test_what_the_clock_cannot_honour_is_refused_by_name(settings: dict, named: str):
    from fedcifar_app.config import RunConfig

    with pytest.raises(ConfigError, match=named):
        RunConfig.from_mapping(settings)

"""A CPU quota slows a process tree down, children started later included, and leaves
nothing behind. Needs root and a cgroup cpu controller; skipped, saying so, without."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fedcifar_app.ops.cpu_quota import CpuQuota, CpuQuotaUnavailable
from fedcifar_app.ops.local_simulation import descendants, stop_process_tree

# The parent starts its busy child only after it was put under the quota.
PARENT = ("import subprocess, sys, time; time.sleep(1); "
          "subprocess.run([sys.executable, '-c', 'while True: pass'])")


def throttled_periods(group: Path) -> int:
    stat = dict(line.split() for line in (group / "cpu.stat").read_text().splitlines())
    return int(stat.get("nr_throttled", 0))


def cpu_group_of(pid: int) -> str:
    for line in open(f"/proc/{pid}/cgroup").read().splitlines():
        _, controllers, path = line.split(":", 2)
        if "cpu" in controllers.split(",") or controllers == "":
            return path
    raise AssertionError(f"no cpu cgroup for {pid}")


def test_a_quota_throttles_a_process_tree_and_is_removed_afterwards() -> None:
    try:
        quota = CpuQuota("test", cpus=0.1)
    except CpuQuotaUnavailable as error:
        pytest.skip(str(error))
    if os.geteuid() != 0:
        pytest.skip("cgroups need root")
    parent = subprocess.Popen([sys.executable, "-c", PARENT])
    try:
        with quota:
            quota.add(parent.pid)
            deadline = time.monotonic() + 30
            while not descendants(parent.pid) and time.monotonic() < deadline:
                time.sleep(0.1)
            (busy,) = descendants(parent.pid)
            assert set(quota.members()) == {parent.pid, busy}
            deadline = time.monotonic() + 30
            while throttled_periods(quota.group) == 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            assert throttled_periods(quota.group) > 0, "the busy child ran unthrottled"
        assert not quota.group.exists()
        assert cpu_group_of(busy) == "/"
    finally:
        stop_process_tree(parent.pid)
        parent.wait()


def test_a_quota_must_be_positive() -> None:
    with pytest.raises(ValueError, match="positive"):
        CpuQuota("test", cpus=0)

"""A slow device on a fast machine: a CPU quota on a process tree (Linux cgroups).

Network namespaces give a node a slow link (``tc`` tbf); a CPU quota gives it slow
compute, so that the nodes of a deployment on one machine really differ in speed, as
phones and servers do, instead of sharing the same cores evenly. Handles cgroup v1's cpu
controller (``cpu.cfs_quota_us``) and cgroup v2 (``cpu.max``). Needs root.
"""

from __future__ import annotations

import os
from pathlib import Path

from fedcifar_app.ops.local_simulation import descendants

CGROUP_V1_CPU = Path("/sys/fs/cgroup/cpu")
CGROUP_V2 = Path("/sys/fs/cgroup")
PERIOD_US = 100_000


class CpuQuotaUnavailable(RuntimeError):
    pass


def _hierarchy() -> Path:
    if (CGROUP_V1_CPU / "cpu.cfs_quota_us").exists():
        return CGROUP_V1_CPU
    controllers = CGROUP_V2 / "cgroup.controllers"
    if controllers.exists() and "cpu" in controllers.read_text().split():
        return CGROUP_V2
    raise CpuQuotaUnavailable("no cgroup cpu controller is mounted under /sys/fs/cgroup")


class CpuQuota:
    """``with CpuQuota("node0", cpus=0.2) as quota: quota.add(pid)``: the process, its
    descendants and every process they start later share at most ``cpus`` CPUs. On
    exit the processes still alive go back to the root group and the group is removed."""

    def __init__(self, name: str, cpus: float) -> None:
        if not cpus > 0:
            raise ValueError(f"a CPU quota must be positive, not {cpus!r}")
        self.root = _hierarchy()
        self.group = self.root / f"fedcifar-{name}-{os.getpid()}"
        self.cpus = cpus

    def __enter__(self) -> CpuQuota:
        quota = round(self.cpus * PERIOD_US)
        self.group.mkdir()
        if self.root == CGROUP_V2:
            (self.root / "cgroup.subtree_control").write_text("+cpu")
            (self.group / "cpu.max").write_text(f"{quota} {PERIOD_US}")
        else:
            (self.group / "cpu.cfs_period_us").write_text(str(PERIOD_US))
            (self.group / "cpu.cfs_quota_us").write_text(str(quota))
        return self

    def add(self, pid: int) -> None:
        for member in (pid, *descendants(pid)):
            _move(member, self.group)

    def members(self) -> list[int]:
        return [int(pid) for pid in (self.group / "cgroup.procs").read_text().split()]

    def __exit__(self, *exc: object) -> None:
        for pid in self.members():
            _move(pid, self.root)
        self.group.rmdir()


def _move(pid: int, group: Path) -> None:
    try:
        (group / "cgroup.procs").write_text(str(pid))
    except ProcessLookupError:
        pass  # it exited meanwhile

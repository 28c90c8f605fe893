"""How many CPUs this process may really use: its affinity, bounded by a cgroup CPU quota."""

from __future__ import annotations

import math
import os
import pathlib


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may use: ``sched_getaffinity``, capped by the cgroup's quota, at least 1.

    A Kubernetes CPU limit is a CFS quota, not an affinity: ``os.cpu_count()`` says 64 on a node
    where the pod may use 2. cgroup v2 says it in ``cpu.max`` ("QUOTA PERIOD" or "max PERIOD"),
    v1 in ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (-1 = none); a fraction rounds up.
    """
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    root = pathlib.Path(cgroup_root)
    quota = period = None
    try:
        fields = (root / "cpu.max").read_text().split()
        if fields and fields[0] != "max":
            quota, period = int(fields[0]), int(fields[1])
    except (OSError, ValueError, IndexError):
        try:
            q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            if q > 0:
                quota, period = q, p
        except (OSError, ValueError):
            pass
    if quota and period and period > 0:
        cpus = min(cpus, math.ceil(quota / period))
    return max(1, cpus)

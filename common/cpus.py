"""How many CPUs this process may use: its affinity mask, lowered by a cgroup CPU quota."""

from __future__ import annotations

import math
import os
from pathlib import Path


def usable_cpus(cgroup_root: str = "/sys/fs/cgroup") -> int:
    """CPUs this process may run on (sched_getaffinity), at most its cgroup's CPU quota rounded up; >= 1.

    The quota is read from cgroup v2 (``cpu.max``: "QUOTA PERIOD" or "max PERIOD") or v1
    (``cpu/cpu.cfs_quota_us`` and ``cpu.cfs_period_us``, -1 = none): a Kubernetes pod with
    ``limits.cpu: 2`` on a 64-core node may use 2 CPUs, not 64.
    """
    cpus = len(os.sched_getaffinity(0))
    root = Path(cgroup_root)
    quota = period = None
    try:
        raw_quota, raw_period = (root / "cpu.max").read_text().split()[:2]
        if raw_quota != "max":
            quota, period = int(raw_quota), int(raw_period)
    except (OSError, ValueError):
        try:
            q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
            p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
            if q > 0:
                quota, period = q, p
        except (OSError, ValueError):
            pass
    if quota is not None and period:
        cpus = min(cpus, math.ceil(quota / period))
    return max(1, cpus)

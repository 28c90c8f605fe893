"""usable_cpus reads the affinity and the cgroup quota; --frontends auto follows it."""

from __future__ import annotations

import os

from featurebank.common.cpus import usable_cpus
from featurebank.server.config import default_frontends


def test_cgroup_v2_quota_caps_the_affinity(tmp_path):
    """cpu.max "150000 100000" (1.5 CPUs) allows 2 CPUs, however many the affinity lists."""
    (tmp_path / "cpu.max").write_text("150000 100000\n")
    assert usable_cpus(str(tmp_path)) == min(2, len(os.sched_getaffinity(0)))


def test_cgroup_v2_without_quota_is_the_affinity(tmp_path):
    """cpu.max "max 100000" (no limit) leaves the affinity."""
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(str(tmp_path)) == len(os.sched_getaffinity(0))


def test_cgroup_v1_quota(tmp_path):
    """cfs_quota_us / cfs_period_us = 0.5 CPU: at least 1."""
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("50000\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert usable_cpus(str(tmp_path)) == 1


def test_auto_frontends_keeps_small_boxes_single_process():
    """Half the CPUs, 1 to 8: a 2-core box gets 1 frontend (today's single process), 64 cores get 8."""
    assert [default_frontends(n) for n in (1, 2, 3, 4, 8, 16, 64)] == [1, 1, 1, 2, 4, 8, 8]

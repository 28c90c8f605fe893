"""Quiet by default: a CPU server's log has no CUDA errors and no warnings about its planned warm-up traces."""

from __future__ import annotations

from featurebank.client import FeatureBank
from support import random_images


def test_cpu_server_log_has_no_cuda_errors_or_warmup_retracing_warnings(start_server):
    """Without --gpus, with TensorFlow's log level left unset, warming six batch shapes and serving
    prints no CUDA driver error and no "triggered tf.function retracing" warning."""
    # An empty TF_CPP_MIN_LOG_LEVEL counts as unset (the test harness sets 3 for every other test).
    server = start_server("--backbone", "toy", "--max-batch-size", "32", env={"TF_CPP_MIN_LOG_LEVEL": ""})
    with FeatureBank(server.target, timeout_s=60) as bank:
        assert bank.extract(random_images(3, seed=100), backbone="toy").shape == (3, 16)
    log = server.log()
    assert server.metric("featurebank_worker_traces") == 6  # 1, 2, 4, 8, 16, 32: all planned
    assert "cuInit" not in log and "CUDA" not in log, log
    assert "retracing" not in log and "unplanned" not in log, log

"""The preprocessing process: decodes, resizes and tokenizes chunks of raw inputs for one backbone, no model."""

from __future__ import annotations

import logging
import os
import sys
import time
import traceback

from featurebank.common.framing import frame, unframe
from featurebank.workers.messages import (
    PreprocessChunk,
    PreprocessReady,
    PreprocessResult,
    PreprocessSetup,
    Shutdown,
    WorkerFailed,
    with_bytes,
)
from featurebank.workers.worker import limit_memory, preprocess_one

logger = logging.getLogger(__name__)

# Its name in ps/top and /proc/PID/comm (15 characters at most), so it is told from a model worker.
PROCESS_NAME = "fb-preprocess"


def send(conn, msg) -> None:
    """Write ``msg`` as one frame (common/framing.py: arrays and large bytes beside the pickle)."""
    conn.send_bytes(b"".join(frame(msg)))


def receive(conn):
    """Read one message written by ``send`` (or the engine's LoopChannel); its arrays and large
    bytes are views of the message read."""
    return unframe(conn.recv_bytes())


def _name_process() -> None:
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(PROCESS_NAME)
    except OSError:  # not Linux, or /proc read-only: only the name is lost
        pass


def main(conn, setup: PreprocessSetup) -> None:
    """Entry point of a spawned preprocessing process: answer PreprocessReady or WorkerFailed, then serve chunks.

    The same limits as a model worker: its memory cap (RLIMIT_DATA), and the backbone's own checks
    (accepted image formats, max_image_pixels before decoding), so a hostile input costs this
    process at most what it costs a worker, and fails alone.
    """
    _name_process()
    logging.basicConfig(
        level=os.environ.get("FEATUREBANK_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s preprocess-{setup.backbone}-{setup.process_index} %(levelname)s %(name)s: %(message)s",
    )
    t0 = time.perf_counter()
    try:
        limit_memory(setup.memory_limit_mb)
        from featurebank.workers.backbones import registry

        backbone = registry.create(setup.backbone, **setup.options)
        backbone.load_preprocessing(setup.info)
    except NotImplementedError as e:
        send(conn, PreprocessReady(False, "tensorflow" in sys.modules, time.perf_counter() - t0, str(e)))
        return
    except Exception as e:
        logger.error("could not load the preprocessing of %s: %s", setup.backbone, e)
        send(conn, WorkerFailed(f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"))
        sys.exit(3)
    send(conn, PreprocessReady(True, "tensorflow" in sys.modules, time.perf_counter() - t0))
    serve(conn, backbone, setup.memory_limit_mb)


def serve(conn, backbone, memory_limit_mb: int = 0) -> None:
    """Preprocess chunks, in order, until Shutdown or the frontend goes away."""
    while True:
        try:
            msg = receive(conn)
        except (EOFError, OSError):
            return
        if isinstance(msg, Shutdown):
            return
        assert isinstance(msg, PreprocessChunk), type(msg)
        values, errors, seconds = [], [], []
        for i, item in enumerate(msg.items):
            item = with_bytes(item)
            start = time.perf_counter()
            value, error = preprocess_one(backbone, item, i, memory_limit_mb)
            seconds.append(time.perf_counter() - start)
            values.append(value)
            errors.append(error)
        send(conn, PreprocessResult(msg.chunk_id, values, errors, seconds))

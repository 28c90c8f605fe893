"""The worker process: loads one frozen backbone, warms it up, then computes batches forever."""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import resource
import sys
import threading
import time
import traceback
from typing import Any

from featurebank.common.framing import unframe
from featurebank.workers.messages import (
    PREPROCESSED,
    Batch,
    BatchResult,
    Shutdown,
    WorkerFailed,
    WorkerReady,
    WorkerSetup,
    with_bytes,
)

logger = logging.getLogger(__name__)


def _limit_memory(setup: WorkerSetup) -> None:
    """Cap the worker's data segment (see ``limit_memory``); not with a GPU."""
    if setup.memory_limit_mb > 0 and setup.gpu is not None:  # CUDA's host-side mappings: unmeasured, no cap
        logger.info("worker_memory_limit_mb not applied: this worker uses GPU %s", setup.gpu)
        return
    limit_memory(setup.memory_limit_mb)


def limit_memory(memory_limit_mb: int) -> None:
    """Cap this process's data segment (heap and private writable mappings) at ``memory_limit_mb``.

    RLIMIT_DATA, not RLIMIT_AS: TensorFlow reserves far more address space than it touches
    (thread stacks, allocator arenas, CUDA's unified address space), so an address-space cap low
    enough to matter breaks it, while the data limit tracks what the process can actually fill.
    An allocation past the cap fails (MemoryError in Python and Pillow) instead of growing the
    process until the pod's OOM killer takes everything down.
    """
    if memory_limit_mb <= 0:
        return
    limit_bytes = memory_limit_mb * 2**20
    _, hard = resource.getrlimit(resource.RLIMIT_DATA)
    if hard != resource.RLIM_INFINITY:
        limit_bytes = min(limit_bytes, hard)
    resource.setrlimit(resource.RLIMIT_DATA, (limit_bytes, hard))


def _configure_tensorflow(setup: WorkerSetup) -> None:
    """Pin to one GPU (growing its memory) or set CPU thread counts, before TF initialises.

    A CPU worker hides every GPU and TensorFlow's C++ error log before TF is imported: otherwise
    each worker prints CUDA driver errors ("failed call to cuInit") about GPUs nobody asked for.
    A non-empty TF_CPP_MIN_LOG_LEVEL in the environment wins.
    """
    if setup.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = setup.gpu
    else:
        os.environ["CUDA_VISIBLE_DEVICES"] = "-1"
    if not os.environ.get("TF_CPP_MIN_LOG_LEVEL"):  # C++ errors stay visible only where a GPU is used
        os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2" if setup.gpu is not None else "3"
    import tensorflow as tf

    for gpu in tf.config.list_physical_devices("GPU"):
        tf.config.experimental.set_memory_growth(gpu, True)
    if setup.intra_op_threads:
        tf.config.threading.set_intra_op_parallelism_threads(setup.intra_op_threads)
    if setup.inter_op_threads:
        tf.config.threading.set_inter_op_parallelism_threads(setup.inter_op_threads)


def preprocess_one(backbone, item, index: int, memory_limit_mb: int = 0) -> tuple[Any, tuple[str, str] | None]:
    """One item as model input, or its error (code name, message): a bad item never fails its neighbours."""
    from featurebank.workers.backbones.base import InvalidInputError

    try:
        return backbone.preprocess(item), None
    except InvalidInputError as e:
        return None, ("INVALID_ARGUMENT", str(e))
    except MemoryError:  # the memory cap stopped it: this input alone, the process lives on
        logger.warning("preprocessing item %d hit the worker's memory limit", index)
        return None, (
            "INVALID_ARGUMENT",
            f"input needs more memory than a worker may use (worker_memory_limit_mb={memory_limit_mb})",
        )
    except Exception as e:  # a bug or an exotic input: this item only
        logger.exception("preprocessing item %d failed", index)
        return None, ("INTERNAL", f"preprocessing failed: {type(e).__name__}: {e}")


def compute(backbone, batch: Batch, memory_limit_mb: int = 0) -> BatchResult:
    """Preprocess each item unless a preprocessing process did (a bad one fails alone), run the good ones
    as one batch, pick layers."""
    start = time.perf_counter()
    n = len(batch.items)
    features: list = [None] * n
    errors: list = [None] * n
    ready: list = []
    index: list[int] = []
    for i, item in enumerate(batch.items):
        if item.kind == PREPROCESSED:
            value, error = item.payload, None
        else:
            value, error = preprocess_one(backbone, with_bytes(item), i, memory_limit_mb)
        if error is None:
            ready.append(value)
            index.append(i)
        else:
            errors[i] = error
    if ready:
        try:
            outputs = backbone.forward(ready)
            for j, i in enumerate(index):
                features[i] = outputs[batch.layers[i]][j].copy()
        except Exception as e:
            logger.exception("forward pass failed for a batch of %d", len(ready))
            for i in index:
                errors[i] = ("INTERNAL", f"forward pass failed: {type(e).__name__}: {e}")
    return BatchResult(batch.batch_id, features, errors, time.perf_counter() - start, backbone.trace_count)


def main(conn, setup: WorkerSetup) -> None:
    """Entry point of a spawned worker: answer WorkerReady or WorkerFailed, then serve batches."""
    logging.basicConfig(
        level=os.environ.get("FEATUREBANK_LOG_LEVEL", "INFO"),
        format=f"%(asctime)s worker-{setup.backbone}-{setup.worker_index} %(levelname)s %(name)s: %(message)s",
    )
    t0 = time.perf_counter()
    try:
        _limit_memory(setup)
        _configure_tensorflow(setup)
        from featurebank.workers.backbones import registry

        backbone = registry.create(setup.backbone, **setup.options)
        backbone.load()
        if setup.warmup:
            backbone.warmup()
        info = backbone.info()
    except Exception as e:
        logger.error("could not load backbone %s: %s", setup.backbone, e)
        conn.send(WorkerFailed(f"{type(e).__name__}: {e}\n{traceback.format_exc(limit=5)}"))
        sys.exit(3)
    conn.send(WorkerReady(info, backbone.trace_count, time.perf_counter() - t0))
    logger.info("ready in %.1fs (%d traces)", time.perf_counter() - t0, backbone.trace_count)
    serve(conn, backbone, setup.memory_limit_mb)


def serve(conn, backbone, memory_limit_mb: int = 0) -> None:
    """Compute batches until Shutdown or the frontend goes away.

    A reader thread receives (reads and unpickles, but never decodes) the next batch while this
    thread computes the current one, so with two batches in flight the pipe transfer overlaps
    the forward pass. Batches are still computed strictly in order, one at a time, so a crash is
    always the batch the frontend sent first (``WorkerPool`` blames only that one).
    """
    inbox: queue.Queue = queue.Queue(maxsize=1)  # one batch read ahead, at most

    def reader() -> None:
        while True:
            try:
                conn.poll(None)
                readable = time.perf_counter()
                msg = unframe(conn.recv_bytes())  # arrays and large bytes: views of what was read
            except (EOFError, OSError):
                inbox.put(None)  # the frontend went away
                return
            inbox.put((msg, time.perf_counter() - readable))
            if isinstance(msg, Shutdown):
                return

    threading.Thread(target=reader, name="batch-reader", daemon=True).start()
    while True:
        idle_since = time.perf_counter()
        item = inbox.get()
        if item is None or isinstance(item[0], Shutdown):
            return
        msg, read_seconds = item
        idle = time.perf_counter() - idle_since
        result = compute(backbone, msg, memory_limit_mb)
        conn.send(dataclasses.replace(result, idle_seconds=idle, read_seconds=read_seconds))

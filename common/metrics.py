"""Every Prometheus metric the server exports, declared in one place (prefix featurebank_).

With ``--frontends N`` every process (engine, frontends) writes its values to files under
PROMETHEUS_MULTIPROC_DIR and the supervisor's /metrics sums them (MultiProcessCollector):
counters and histograms add up; each gauge says how (``multiprocess_mode``, ignored by a single
process): ``livesum`` sums the processes alive now (a dead one's value leaves), ``all`` keeps one
series per process (a ``pid`` label).
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets from 0.5 ms (a cache hit on loopback) to 30 s (a big batch on a busy CPU).
LATENCY_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    """The server's metrics on their own registry, so several servers can live in one process."""

    def __init__(self, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "featurebank_requests",
            "RPCs handled, by method, status code and tenant (empty without tokens).",
            ["method", "code", "tenant"],
            registry=r,
        )
        self.tenant_inflight = Gauge(
            "featurebank_tenant_inflight_items",
            "Items of a tenant's RPCs being worked on (tenants with a limit).",
            ["tenant"],
            registry=r,
            multiprocess_mode="livesum",  # each frontend gates its own RPCs: the pod's total
        )
        self.tenant_limited = Counter(
            "featurebank_tenant_limited",
            "RPCs refused because a tenant was over a limit (rate or inflight_items).",
            ["tenant", "limit"],
            registry=r,
        )
        self.items = Counter(
            "featurebank_items",
            "Input items answered, by result: hit, miss (computed) or error.",
            ["backbone", "layer", "result"],
            registry=r,
        )
        # Lookup's hits are counted in featurebank_items_total (an item answered from the cache);
        # its misses are not: the client then sends those inputs to Extract, which counts them.
        self.lookup_not_found = Counter(
            "featurebank_lookup_not_found",
            "Content keys Lookup did not find (the client sends those inputs to Extract).",
            ["backbone", "layer"],
            registry=r,
        )
        self.request_duration = Histogram(
            "featurebank_request_duration_seconds",
            "RPC latency as seen by the server.",
            ["method"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.batch_size = Histogram(
            "featurebank_batch_size",
            "Items per batch sent to a worker.",
            ["backbone"],
            buckets=BATCH_SIZE_BUCKETS,
            registry=r,
        )
        self.queue_delay = Histogram(
            "featurebank_queue_delay_seconds",
            "Time an item waited in the batcher before a worker took it.",
            ["backbone"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.inference_duration = Histogram(
            "featurebank_inference_duration_seconds",
            "Worker time per batch: decode, preprocess and forward pass.",
            ["backbone"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.worker_idle = Counter(
            "featurebank_worker_idle_seconds",
            "Seconds workers waited with no batch to compute.",
            ["backbone"],
            registry=r,
        )
        self.worker_read = Counter(
            "featurebank_worker_read_seconds",
            "Seconds workers spent reading and unpickling batches (in a reader thread, beside the compute).",
            ["backbone"],
            registry=r,
        )
        # Set by the engine alone: livesum is its value while it lives (and 0 once it died).
        self.queue_depth = Gauge(
            "featurebank_queue_depth",
            "Items waiting in the batcher.",
            ["backbone"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.workers_ready = Gauge(
            "featurebank_workers_ready",
            "Worker processes ready to take batches.",
            ["backbone"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.worker_restarts = Counter(
            "featurebank_worker_restarts", "Worker processes restarted after dying.", ["backbone"], registry=r
        )
        self.watchdog_kills = Counter(
            "featurebank_worker_watchdog_kills",
            "Workers killed because a batch ran far past the slowest seen (stuck).",
            ["backbone"],
            registry=r,
        )
        self.input_crashes = Counter(
            "featurebank_input_crashes",
            "Items in a batch that killed a worker, by the tenant that sent them.",
            ["backbone", "tenant"],
            registry=r,
        )
        self.poison_refused = Counter(
            "featurebank_poison_refused",
            "Items refused without a worker: their input had crashed workers twice.",
            ["backbone", "tenant"],
            registry=r,
        )
        self.preprocess_duration = Histogram(
            "featurebank_preprocess_duration_seconds",
            "Preprocessing time per item (decode + resize, or tokenize) in a preprocessing process.",
            ["backbone"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self.preprocess_ready = Gauge(
            "featurebank_preprocess_processes_ready",
            "Preprocessing processes ready to take items (0 with --preprocess-workers 0).",
            ["backbone"],
            registry=r,
        )
        # Set by the engine alone, like queue_depth.
        self.preprocess_waiting = Gauge(
            "featurebank_preprocess_waiting_items",
            "Items waiting for a preprocessing process (not yet counted in featurebank_queue_depth).",
            ["backbone"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.preprocess_crashes = Counter(
            "featurebank_preprocess_crashes",
            "Preprocessing processes that died (crashed, killed or stuck) and were restarted.",
            ["backbone"],
            registry=r,
        )
        self.cache_errors = Counter(
            "featurebank_cache_errors", "Cache backend operations that failed or timed out.", ["op"], registry=r
        )
        self.cache_corrupt = Counter(
            "featurebank_cache_corrupt_values",
            "Cached values that failed their checksum and were recomputed.",
            registry=r,
        )
        self.singleflight_joins = Counter(
            "featurebank_singleflight_joins",
            "Missed items that joined an identical computation already in flight.",
            ["backbone"],
            registry=r,
        )
        self.rejected_items = Counter(
            "featurebank_rejected_items", "Items refused because the batch queue was full.", ["backbone"], registry=r
        )
        self.dropped_items = Counter(
            "featurebank_dropped_items",
            "Queued items dropped before a worker because their RPC was cancelled or past its deadline.",
            ["backbone", "reason"],
            registry=r,
        )
        self.traces = Gauge(
            "featurebank_worker_traces",
            "tf.function traces per worker since start (constant after warm-up).",
            ["backbone", "worker"],
            registry=r,
            multiprocess_mode="livesum",
        )
        self.frontend_requests = Gauge(
            "featurebank_frontend_requests",
            "RPCs this frontend process answered since it started (with --frontends N: one series per "
            "process, its pid label; sampled every second).",
            registry=r,
            multiprocess_mode="all",
        )
        self.head_predictions = Counter(
            "featurebank_head_predictions", "Items a served head predicted.", ["head", "version"], registry=r
        )
        self.head_duration = Histogram(
            "featurebank_head_predict_duration_seconds",
            "Predict latency per head (features + head).",
            ["head", "version"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )

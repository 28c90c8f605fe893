"""The ports a server listens on: a port already taken is one clear error naming it and its flag."""

from __future__ import annotations

import contextlib
import errno
import socket


class PortInUseError(OSError):
    """A port the server needs is taken (or cannot be bound): which one, and the flag that picks another."""

    def __init__(self, what: str, host: str, port: int, flag: str, reason: str = "already in use"):
        self.what, self.host, self.port, self.flag = what, host, port, flag
        super().__init__(errno.EADDRINUSE, f"{what} port {port} on {host} is {reason}: pick a free one with {flag} "
                                           f"(0 = any free port), or stop what listens there")

    def __str__(self) -> str:
        return self.strerror


def _bind_host(host: str) -> str:
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def check_free(what: str, host: str, port: int, flag: str) -> None:
    """Raise PortInUseError if ``host:port`` cannot be bound now (port 0 always can).

    Checked before workers are spawned, so a taken port costs nothing; the real bind can still
    lose a race, and is wrapped the same way.
    """
    if port <= 0:
        return
    bind_host = _bind_host(host) or "::"
    try:
        infos = socket.getaddrinfo(bind_host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise PortInUseError(what, host, port, flag, f"not bindable ({e.strerror})") from None
    family, kind, proto, _, address = infos[0]
    with contextlib.closing(socket.socket(family, kind, proto)) as s:
        # As gRPC and http.server do: a port left in TIME_WAIT by a stopped server is free.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError as e:
            reason = "already in use" if e.errno == errno.EADDRINUSE else f"not bindable ({e.strerror})"
            raise PortInUseError(what, host, port, flag, reason) from None

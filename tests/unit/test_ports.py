"""The server's port pre-check: a taken port is one clear error; anything else is left to the real bind."""

from __future__ import annotations

import socket

import pytest

from featurebank.server.ports import PortInUseError, check_free


def test_taken_port_names_port_and_flag_free_port_passes():
    """A listening port raises PortInUseError naming it and the flag; once closed, the same port passes."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        with pytest.raises(PortInUseError) as raised:
            check_free("gRPC", "127.0.0.1", port, "--port")
        assert f"port {port}" in str(raised.value) and "--port" in str(raised.value)
    check_free("gRPC", "127.0.0.1", port, "--port")
    check_free("metrics", "0.0.0.0", 0, "--metrics-port")  # 0: any free port


def test_other_bind_problems_are_left_to_the_real_bind():
    """A host that cannot be resolved or an address family the machine lacks never blocks start-up here."""
    check_free("gRPC", "no-such-host.invalid", 50051, "--port")

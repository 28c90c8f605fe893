"""Secure by default: the server listens beyond loopback only with tokens or an explicit --insecure, with bounded admission."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from featurebank.server import config
from featurebank.server.config import ServerConfig

BEYOND_LOOPBACK = ["[::]", "::", "0.0.0.0", "10.1.2.3", "[2001:db8::1]", "featurebank.example.com"]
LOOPBACK = ["localhost", "127.0.0.1", "127.0.0.2", "::1", "[::1]"]


def test_default_config_serves_loopback_without_flags():
    """ServerConfig() (what a bare `featurebank serve` builds) is valid and listens on loopback only."""
    c = ServerConfig()
    assert config.is_loopback(c.host)
    assert not c.tokens_file and not c.insecure


@pytest.mark.parametrize("host", LOOPBACK)
def test_loopback_needs_no_tokens(host):
    """Any loopback address is accepted without --tokens-file."""
    assert ServerConfig(host=host).host == host


@pytest.mark.parametrize("host", BEYOND_LOOPBACK)
def test_beyond_loopback_needs_tokens_or_insecure(host):
    """Beyond loopback the config is refused with one line naming both --tokens-file and --insecure; either one admits it."""
    with pytest.raises(ValueError) as e:
        ServerConfig(host=host)
    message = str(e.value)
    assert "--tokens-file" in message and "--insecure" in message and "\n" not in message
    assert ServerConfig(host=host, tokens_file="/etc/featurebank/tokens.json").host == host
    assert ServerConfig(host=host, insecure=True).host == host


@pytest.mark.parametrize(
    "field,value",
    [
        ("max_concurrent_rpcs", 0),
        ("max_concurrent_streams", 0),
        ("max_text_bytes", 0),
        ("max_text_bytes", 8 * 1024 * 1024),
        ("health_port", -2),
        ("health_port", 65536),
    ],
)
def test_admission_bounds_are_validated(field, value):
    """Out-of-range admission bounds are refused, naming the parameter."""
    with pytest.raises(ValueError, match=f"invalid {field}="):
        ServerConfig(**{field: value})


def test_health_port_must_be_its_own_port():
    """--health-port cannot share the gRPC or metrics port."""
    with pytest.raises(ValueError, match="invalid health_port=50051"):
        ServerConfig(health_port=50051)
    assert ServerConfig(health_port=50052).health_port == 50052


def test_admission_defaults_are_bounded():
    """By default a request message is at most 4 MiB (what the SDK sends), and concurrency and text are bounded."""
    from featurebank.client.sdk import DEFAULT_MAX_REQUEST_BYTES

    c = ServerConfig()
    assert DEFAULT_MAX_REQUEST_BYTES < c.max_message_bytes <= 4 * 1024 * 1024
    assert 1 <= c.max_concurrent_rpcs <= 1024 and 1 <= c.max_concurrent_streams <= c.max_concurrent_rpcs
    assert c.max_text_bytes <= 1024 * 1024


@pytest.mark.parametrize("how", ["flag", "env"])
def test_serve_refuses_a_public_address_without_tokens(how):
    """`featurebank serve --host 0.0.0.0` (or FEATUREBANK_HOST) exits 2 at once with a one-line error naming both flags; nothing starts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATUREBANK_")}
    args = [sys.executable, "-m", "featurebank.server", "--port", "0", "--metrics-port", "-1"]
    if how == "flag":
        args += ["--host", "0.0.0.0"]
    else:
        env["FEATUREBANK_HOST"] = "0.0.0.0"
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "--tokens-file" in lines[0] and "--insecure" in lines[0], done.stderr

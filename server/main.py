"""Runs the server from parsed flags: `featurebank serve` (client/cli.py) and `python -m featurebank.server`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys

from featurebank.server import app, config
from featurebank.server.embedded_cache import EmbeddedCacheError
from featurebank.server.ports import PortInUseError


def run(cfg: config.ServerConfig) -> int:
    """Serve until SIGTERM/SIGINT and the drain; 0, or 1 with one line on stderr when a port is taken or the embedded cache cannot start."""
    logging.basicConfig(level=cfg.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("FEATUREBANK_LOG_LEVEL", cfg.log_level.upper())
    try:
        code = asyncio.run(app.serve(cfg))
    except (PortInUseError, EmbeddedCacheError) as e:
        print(f"featurebank serve: {e}", file=sys.stderr)
        return 1
    return code or 0  # 1 when --frontends N gave up on an engine that kept dying


def main(argv: list[str] | None = None) -> int:
    """`python -m featurebank.server [flags]`: the flags of `featurebank serve`, the same one-line errors."""
    parser = argparse.ArgumentParser(prog="featurebank serve", description="Run the featurebank server.")
    config.add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        cfg = config.from_args(args)
    except ValueError as e:
        print(f"featurebank serve: {e}", file=sys.stderr)
        return 2
    return run(cfg)

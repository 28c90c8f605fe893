"""The floor of the hit path: a grpc.aio server that parses each request and returns canned features.

No hashing, no Redis, no numpy: ``Extract``/``Lookup`` parse the request (as any server must)
and answer with a pre-serialised response holding one ``dim``-float32 result per item. Whatever
this does per second on a machine is the most a single Python grpc.aio process can answer
there, so it tells how much of the hit path's cost is featurebank's and how much is gRPC's.

``python -m benchmarks.floor_server --port 0 --port-file F [--dim 1280]``
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys

import grpc
import numpy as np

from featurebank.v1 import featurebank_pb2 as pb

SERVICE = "featurebank.v1.FeatureBank"


class CannedResponses:
    """Serialised ExtractResponses with n results of ``dim`` float32 features, built once per n."""

    def __init__(self, dim: int):
        self.dim = dim
        self._by_count: dict[int, bytes] = {}

    def get(self, n: int) -> bytes:
        r = self._by_count.get(n)
        if r is None:
            response = pb.ExtractResponse(backbone="floor", layer="pooled", backbone_fingerprint="0" * 32)
            data = np.arange(self.dim, dtype="<f4").tobytes()
            for i in range(n):
                response.results.add(
                    features=pb.Tensor(dtype=pb.FLOAT32, shape=[self.dim], data=data), cache_hit=True, key=f"{i:032x}"
                )
            r = self._by_count[n] = response.SerializeToString()
        return r


async def serve(host: str, port: int, port_file: str, dim: int) -> None:
    canned = CannedResponses(dim)

    async def extract(request: bytes, context) -> bytes:
        return canned.get(len(pb.ExtractRequest.FromString(request).inputs))

    async def lookup(request: bytes, context) -> bytes:
        return canned.get(len(pb.LookupRequest.FromString(request).keys))

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Extract": grpc.unary_unary_rpc_method_handler(extract),
            "Lookup": grpc.unary_unary_rpc_method_handler(lookup),
        },
    )
    server = grpc.aio.server(
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
    )
    server.add_generic_rpc_handlers((handler,))
    bound = server.add_insecure_port(f"{host}:{port}")
    await server.start()
    if port_file:
        with open(port_file + ".tmp", "w") as f:
            json.dump({"port": bound, "metrics_port": -1, "pid": os.getpid(), "ready": True}, f)
        os.replace(port_file + ".tmp", port_file)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop(1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", default="")
    parser.add_argument("--dim", type=int, default=1280)
    args = parser.parse_args(argv)
    asyncio.run(serve(args.host, args.port, args.port_file, args.dim))
    return 0


if __name__ == "__main__":
    sys.exit(main())

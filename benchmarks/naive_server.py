"""The baseline a team writes by hand: a plain gRPC server that decodes and runs the model per request.

Same proto (``featurebank.v1`` Extract), same backbone code (decode + resize + the traced
forward pass, warmed up like featurebank's workers), but no cross-request batching, no cache,
no worker processes: ``grpc.server(ThreadPoolExecutor(threads))`` and, in each handler,
``preprocess`` every input and call ``forward`` on that request's items. It is a *fair* naive
server: it uses the same fixed-shape tf.function (no retracing), so the comparison measures the
serving architecture, not tracing mistakes.

``python -m benchmarks.naive_server --backbone efficientnet_lite0 --port 0 --port-file F``
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
from concurrent import futures

import grpc

from featurebank.client import keys as content_keys
from featurebank.client import tensors
from featurebank.v1 import featurebank_pb2 as pb
from featurebank.v1 import featurebank_pb2_grpc as pb_grpc

logger = logging.getLogger("benchmarks.naive_server")

SERVER_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32)  # what featurebank traces for --max-batch-size 32


class NaiveServicer(pb_grpc.FeatureBankServicer):
    """Extract only: decode and infer this request's inputs, in the calling thread."""

    def __init__(self, backbone):
        self.backbone = backbone
        self.info = backbone.info()

    def Extract(self, request: pb.ExtractRequest, context: grpc.ServicerContext) -> pb.ExtractResponse:
        from featurebank.workers.backbones.base import InputItem, InvalidInputError

        response = pb.ExtractResponse(
            backbone=self.info.name,
            layer=request.layer or self.info.default_layer,
            backbone_fingerprint=self.info.fingerprint,
        )
        results = [response.results.add() for _ in request.inputs]
        ready, index = [], []
        for i, item in enumerate(request.inputs):
            kind = item.WhichOneof("payload")
            results[i].key = content_keys.input_key(item)
            try:
                ready.append(self.backbone.preprocess(InputItem(kind, getattr(item, kind))))
                index.append(i)
            except InvalidInputError as e:
                results[i].error.code = grpc.StatusCode.INVALID_ARGUMENT.value[0]
                results[i].error.message = str(e)
        if ready:
            outputs = self.backbone.forward(ready)[response.layer]
            dtype = "<f2" if request.output_dtype == pb.FLOAT16 else "<f4"
            for j, i in enumerate(index):
                tensors.to_proto(outputs[j].astype(dtype), results[i].features)
        return response


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", default="efficientnet_lite0")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--port-file", default="")
    parser.add_argument("--threads", type=int, default=10, help="gRPC handler threads (grpc examples use 10)")
    args = parser.parse_args(argv)
    logging.basicConfig(level="INFO", format="%(asctime)s naive %(levelname)s: %(message)s")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

    from featurebank.workers.backbones import registry

    backbone = registry.create(args.backbone, batch_buckets=SERVER_BATCH_BUCKETS)
    backbone.load()
    backbone.warmup()
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=args.threads),
        options=[("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)],
    )
    pb_grpc.add_FeatureBankServicer_to_server(NaiveServicer(backbone), server)
    port = server.add_insecure_port(f"{args.host}:{args.port}")
    server.start()
    if args.port_file:
        tmp = args.port_file + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"port": port, "metrics_port": -1, "pid": os.getpid(), "ready": True}, f)
        os.replace(tmp, args.port_file)
    logger.info("naive server on %s:%d (%s, %d threads)", args.host, port, args.backbone, args.threads)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop(5).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())

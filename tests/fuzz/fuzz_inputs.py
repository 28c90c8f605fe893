"""atheris fuzz target: request parsing, content keys, tensor and image decoding, the cache codec.

Contract: whatever the bytes, each step either succeeds or raises its own documented error
(DecodeError, ValueError from input_key, TensorError, InvalidInputError, CorruptValueError).
Run: python tests/fuzz/fuzz_inputs.py -max_total_time=30 (tests/unit/test_fuzz.py runs it bounded).
"""

import sys

import atheris

with atheris.instrument_imports():
    import numpy as np
    from google.protobuf.message import DecodeError

    from featurebank.client import tensors
    from featurebank.client.keys import input_key
    from featurebank.common import codec
    from featurebank.v1 import featurebank_pb2 as pb
    from featurebank.workers.backbones.base import InvalidInputError, decode_image, pixels_from_tensor

MAX_PIXELS = 4_000_000


def TestOneInput(data: bytes) -> None:
    try:
        codec.decode(data)
    except codec.CorruptValueError:
        pass
    try:
        request = pb.ExtractRequest.FromString(data)
    except DecodeError:
        request = pb.ExtractRequest(inputs=[pb.Input(image=data)])  # still fuzz the image decoder
    for item in request.inputs:
        try:
            input_key(item)
        except ValueError:
            continue
        kind = item.WhichOneof("payload")
        try:
            if kind == "image":
                decode_image(item.image, MAX_PIXELS)
            elif kind == "tensor":
                a = tensors.from_proto(item.tensor, max_elements=MAX_PIXELS)
                pixels_from_tensor(np.asarray(a))
        except (InvalidInputError, tensors.TensorError):
            pass


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()

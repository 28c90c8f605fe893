"""The atheris fuzz target runs for a bounded time in CI and finds no crash."""

from __future__ import annotations

import io
import pathlib
import subprocess
import sys

import numpy as np
import pytest

FUZZER = pathlib.Path(__file__).resolve().parents[1] / "fuzz" / "fuzz_inputs.py"


@pytest.mark.slow
def test_fuzz_request_parsing_and_decoding_for_a_bounded_time(tmp_path):
    """20 s of coverage-guided fuzzing over request parsing, keys, tensors, images and cache values: no crash."""
    pytest.importorskip("atheris")
    from PIL import Image

    from featurebank.client import tensors
    from featurebank.common import codec
    from featurebank.v1 import featurebank_pb2 as pb

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    png = io.BytesIO()
    Image.fromarray(np.arange(48, dtype=np.uint8).reshape(4, 4, 3)).save(png, format="PNG")
    seeds = {
        "png": png.getvalue(),
        "request": pb.ExtractRequest(
            backbone="toy",
            inputs=[
                pb.Input(image=png.getvalue()),
                pb.Input(text="hi"),
                pb.Input(tensor=tensors.to_proto(np.zeros((2, 2, 3), np.uint8))),
            ],
        ).SerializeToString(),
        "value": codec.encode(np.ones(4, np.float32)),
    }
    for name, data in seeds.items():
        (corpus / name).write_bytes(data)
    run = subprocess.run(
        [
            sys.executable,
            str(FUZZER),
            str(corpus),
            "-max_total_time=20",
            "-seed=7",
            "-max_len=4096",
            f"-artifact_prefix={tmp_path}/",
            "-rss_limit_mb=4096",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-4000:]
    assert "Done" in run.stderr

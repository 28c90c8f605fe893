"""Build-time step of the images: convert and check the offline backbone weights, so pods never need network.

Run with FEATUREBANK_CACHE_DIR set to the directory the image keeps at run time too.
EfficientNet-Lite0's PyTorch weights are converted to a Keras .weights.h5 there (the file name
carries the source hash, so it can never be stale); MiniLM reads its safetensors straight from its
package, so loading it here only proves the --no-deps install is complete. Either failing fails
the image build rather than the first pod.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from featurebank.workers.backbones.efficientnet_lite import EfficientNetLite0
from featurebank.workers.backbones.minilm import MiniLM


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cache_dir = os.environ.get("FEATUREBANK_CACHE_DIR")
    if not cache_dir:
        print("FEATUREBANK_CACHE_DIR must be set to the image's weights directory", file=sys.stderr)
        return 2
    image = EfficientNetLite0()
    image.load()
    converted = image.cache_path()
    if not converted.is_file() or converted.parent != Path(cache_dir):
        print(f"converted weights missing: expected {converted} under {cache_dir}", file=sys.stderr)
        return 1
    # A second load must take the cached path; otherwise every pod would convert again at start.
    again = EfficientNetLite0()
    again.load()
    if not again.loaded_from_cache:
        print(f"{converted} exists but does not load; pods would convert at start", file=sys.stderr)
        return 1
    text = MiniLM()
    text.load()
    print(f"efficientnet_lite0 {image.info().fingerprint[:12]} -> {converted}")
    print(f"minilm {text.info().fingerprint[:12]} (weights from its package)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

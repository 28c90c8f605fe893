"""The featurebank client SDK: fetch features from a featurebank server.

import pathlib
from featurebank.client import FeatureBank
with FeatureBank("localhost:50051") as bank:
    feats = bank.extract([pathlib.Path("cat.jpg")], backbone="efficientnet_lite0")  # (1, 1280)
"""

from featurebank.client.errors import FeatureBankError
from featurebank.client.keys import content_key
from featurebank.client.results import HeadInfo, ItemOutcome, Prediction
from featurebank.client.sdk import AsyncFeatureBank, FeatureBank
from featurebank.v1.featurebank_pb2 import BYPASS, FLOAT16, FLOAT32, REFRESH, USE

__all__ = [
    "FeatureBank",
    "AsyncFeatureBank",
    "FeatureBankError",
    "ItemOutcome",
    "Prediction",
    "HeadInfo",
    "content_key",
    "USE",
    "BYPASS",
    "REFRESH",
    "FLOAT32",
    "FLOAT16",
]

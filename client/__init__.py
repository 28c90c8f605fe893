"""The featurebank client SDK: fetch features from a featurebank server.

    from featurebank.client import FeatureBank
    with FeatureBank("localhost:50051") as bank:
        feats = bank.extract([pathlib.Path("cat.jpg")], backbone="efficientnet_lite0")
"""

from featurebank.client.errors import FeatureBankError
from featurebank.client.keys import content_key
from featurebank.client.sdk import AsyncFeatureBank, FeatureBank, ItemOutcome
from featurebank.v1.featurebank_pb2 import BYPASS, FLOAT16, FLOAT32, REFRESH, USE

__all__ = ["FeatureBank", "AsyncFeatureBank", "FeatureBankError", "ItemOutcome", "content_key",
           "USE", "BYPASS", "REFRESH", "FLOAT32", "FLOAT16"]

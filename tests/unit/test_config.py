"""The server config (featurebank.server.config): valid defaults, named validation errors, flags > env > defaults."""

from __future__ import annotations

import argparse
import dataclasses

import pytest

from featurebank.server import config
from featurebank.server.config import ServerConfig
from featurebank.workers.backbones.registry import DEFAULT_BACKBONES


def parse(argv: list[str], environ: dict[str, str] | None = None) -> ServerConfig:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    return config.from_args(parser.parse_args(argv), environ={} if environ is None else environ)


def test_defaults_are_valid():
    """ServerConfig() validates, serves the default backbones without weight overrides, and runs one CPU worker."""
    c = ServerConfig()
    assert c.backbone == list(DEFAULT_BACKBONES)
    assert c.backbone_specs == [(name, {}) for name in DEFAULT_BACKBONES]
    assert c.num_workers == 1
    assert c.gpu_list == []
    assert c.max_queue_size >= c.max_batch_size


def test_default_lists_are_not_shared():
    """Each ServerConfig gets its own backbone list (mutating one does not change the default of the next)."""
    a = ServerConfig()
    a.backbone.append("toy")
    assert ServerConfig().backbone == list(DEFAULT_BACKBONES)


@pytest.mark.parametrize(
    "field,value",
    [
        ("port", -1),
        ("port", 65536),
        ("metrics_port", -2),
        ("metrics_port", 70000),
        ("backbone", []),
        ("backbone", [" , "]),
        ("workers", -1),
        ("workers", 65),
        ("intra_op_threads", -1),
        ("inter_op_threads", -1),
        ("redis_timeout_ms", 0.0),
        ("redis_timeout_ms", 60_001.0),
        ("cache_ttl_seconds", 0),
        ("cache_dtype", "float64"),
        ("cache_dtype", "bfloat16"),
        ("lru_max_bytes", -2),
        ("cache_max_bytes", -1),
        ("cache_max_bytes", 8 * 1024 * 1024 - 1),  # below what the embedded cache (the default) can hold
        ("cache", "disk"),
        ("cache_snapshot_interval_s", -1),
        ("max_batch_size", -1),
        ("max_batch_size", 1025),
        ("pipeline_depth", 0),
        ("pipeline_depth", 9),
        ("max_batch_delay_ms", -0.5),
        ("max_batch_delay_ms", 10_001.0),
        ("max_queue_size", 7),  # below the CPU default max_batch_size of 8
        ("max_items_per_request", 0),
        ("max_message_bytes", (1 << 20) - 1),
        ("max_message_bytes", 2**31),
        ("max_image_pixels", 0),
        ("grace_period_s", -1.0),
    ],
)
def test_invalid_value_names_the_parameter(field, value):
    """An out-of-range value raises ValueError naming the field and the value it got."""
    with pytest.raises(ValueError, match=rf"invalid {field}="):
        ServerConfig(**{field: value})


@pytest.mark.parametrize(
    "field,value",
    [
        ("port", 0),
        ("port", 65535),
        ("metrics_port", -1),
        ("workers", 64),
        ("redis_timeout_ms", 60_000.0),
        ("cache_dtype", "float16"),
        ("cache_max_bytes", 8 * 1024 * 1024),
        ("cache_snapshot_interval_s", 0),
        ("max_batch_size", 1),
        ("max_batch_delay_ms", 0.0),
        ("max_queue_size", 32),
        ("max_message_bytes", 1 << 20),
        ("max_message_bytes", 2**31 - 1),
        ("grace_period_s", 0.0),
    ],
)
def test_boundary_values_are_valid(field, value):
    """The documented range ends are accepted."""
    assert getattr(ServerConfig(**{field: value}), field) == value


def test_cache_selection_is_redis_with_a_url_else_the_cache_flag():
    """--redis-url selects Redis whatever --cache says; without it --cache picks embedded (the default) or memory."""
    assert ServerConfig().cache_kind == "embedded"
    assert ServerConfig(cache="memory").cache_kind == "memory"
    assert ServerConfig(redis_url="redis://h:6379/0", cache="memory").cache_kind == "redis"
    assert parse(["--cache", "memory", "--cache-max-bytes", "0"]).cache_kind == "memory"
    assert parse([], {"FEATUREBANK_CACHE": "memory"}).cache_kind == "memory"


def test_old_lru_max_bytes_flag_still_sets_the_bound():
    """--lru-max-bytes (and FEATUREBANK_LRU_MAX_BYTES) still set the cache's byte bound; given with a different --cache-max-bytes it is refused."""
    assert parse(["--cache", "memory", "--lru-max-bytes", "0"]).cache_max_bytes == 0
    assert parse([], {"FEATUREBANK_LRU_MAX_BYTES": str(64 << 20)}).cache_max_bytes == 64 << 20
    assert parse(["--lru-max-bytes", str(64 << 20), "--cache-max-bytes", str(64 << 20)]).cache_max_bytes == 64 << 20
    with pytest.raises(ValueError, match="invalid lru_max_bytes=.*old name of --cache-max-bytes"):
        parse(["--lru-max-bytes", str(64 << 20), "--cache-max-bytes", str(32 << 20)])


def test_data_dir_defaults_to_the_xdg_cache_dir(monkeypatch, tmp_path):
    """Without --data-dir the embedded cache lives in $XDG_CACHE_HOME/featurebank/features; a relative --data-dir is made absolute."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert ServerConfig().data_path == str(tmp_path / "featurebank" / "features")
    monkeypatch.chdir(tmp_path)
    assert ServerConfig(data_dir="fb-data").data_path == str(tmp_path / "fb-data")


def test_zero_workers_needs_gpus():
    """workers=0 is an error on CPU and means one worker per GPU with --gpus."""
    with pytest.raises(ValueError, match="invalid workers=0"):
        ServerConfig(workers=0)
    c = ServerConfig(workers=0, gpus="0, 1,")
    assert c.gpu_list == ["0", "1"]
    assert c.num_workers == 2


def test_every_field_has_a_flag():
    """add_arguments registers one --flag per ServerConfig field, and no flags at all gives the defaults."""
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert dests == {f.name for f in dataclasses.fields(ServerConfig)}
    assert parse([]) == ServerConfig()


def test_env_vars_fill_fields():
    """FEATUREBANK_* env vars set fields of every type (int, float, str, bool, list) when no flag is given."""
    c = parse(
        [],
        {
            "FEATUREBANK_PORT": "1234",
            "FEATUREBANK_MAX_BATCH_DELAY_MS": "2.5",
            "FEATUREBANK_REDIS_URL": "redis://cache:6379/1",
            "FEATUREBANK_WARMUP": "false",
            "FEATUREBANK_BACKBONE": "toy,minilm=/weights/minilm.safetensors",
            "FEATUREBANK_CACHE_DTYPE": "float16",
            "UNRELATED": "ignored",
        },
    )
    assert c.port == 1234
    assert c.max_batch_delay_ms == 2.5
    assert c.redis_url == "redis://cache:6379/1"
    assert c.warmup is False
    assert c.cache_dtype == "float16"
    assert c.backbone_specs == [("toy", {}), ("minilm", {"weights": "/weights/minilm.safetensors"})]


@pytest.mark.parametrize(
    "raw,expected",
    [
        ("1", True),
        ("true", True),
        ("YES", True),
        (" on ", True),
        ("0", False),
        ("false", False),
        ("no", False),
        ("off", False),
    ],
)
def test_bool_env_values(raw, expected):
    """Boolean env vars accept 1/true/yes/on (any case) as true and others as false."""
    assert parse([], {"FEATUREBANK_WARMUP": raw}).warmup is expected


def test_flags_win_over_env():
    """A flag given on the command line overrides the same field's FEATUREBANK_* env var."""
    env = {
        "FEATUREBANK_PORT": "1234",
        "FEATUREBANK_WARMUP": "true",
        "FEATUREBANK_BACKBONE": "minilm",
        "FEATUREBANK_MAX_BATCH_SIZE": "8",
    }
    c = parse(["--port", "4321", "--no-warmup", "--backbone", "toy"], env)
    assert c.port == 4321
    assert c.warmup is False
    assert c.backbone == ["toy"]
    assert c.max_batch_size == 8  # no flag: the env var still applies


def test_explicit_environ_replaces_os_environ(monkeypatch):
    """from_args(environ=...) reads only the given mapping, not the process environment."""
    monkeypatch.setenv("FEATUREBANK_PORT", "7777")
    assert parse([], {}).port == ServerConfig().port
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    assert config.from_args(parser.parse_args([])).port == 7777  # default: os.environ


def test_unparseable_env_value_names_the_variable():
    """A FEATUREBANK_* value of the wrong type raises ValueError naming the env var and the expected type."""
    with pytest.raises(ValueError, match=r"FEATUREBANK_PORT='http'.*int"):
        parse([], {"FEATUREBANK_PORT": "http"})
    with pytest.raises(ValueError, match=r"FEATUREBANK_MAX_BATCH_DELAY_MS='soon'.*float"):
        parse([], {"FEATUREBANK_MAX_BATCH_DELAY_MS": "soon"})


def test_invalid_env_value_is_validated_like_a_flag():
    """An env var that parses but is out of range fails validation naming the field."""
    with pytest.raises(ValueError, match="invalid max_batch_size=-3"):
        parse([], {"FEATUREBANK_MAX_BATCH_SIZE": "-3"})


def test_max_batch_size_defaults_to_the_device():
    """Unset (0), the batch size is 8 on CPU and 32 with GPUs; an explicit value always wins."""
    assert parse([], {}).max_batch_size == 8
    assert parse(["--gpus", "0,1"], {}).max_batch_size == 32
    assert parse(["--gpus", "0", "--max-batch-size", "64"], {}).max_batch_size == 64
    assert parse(["--max-batch-size", "32"], {}).max_batch_size == 32


def test_backbone_specs_from_repeated_and_comma_separated_flags():
    """--backbone is repeatable and comma-separated; NAME=PATH sets the weights file and blanks are ignored."""
    c = parse(
        ["--backbone", "efficientnet_lite0, toy", "--backbone", "minilm=/w/m.safetensors,", "--backbone", "my.mod:Cls"]
    )
    assert c.backbone == ["efficientnet_lite0", "toy", "minilm=/w/m.safetensors", "my.mod:Cls"]
    assert c.backbone_specs == [
        ("efficientnet_lite0", {}),
        ("toy", {}),
        ("minilm", {"weights": "/w/m.safetensors"}),
        ("my.mod:Cls", {}),
    ]


def test_backbone_string_is_split_too():
    """ServerConfig(backbone="a,b=PATH") (a plain string) is split like the flag."""
    c = ServerConfig(backbone="toy,minilm=C:/weights=v2.safetensors")
    assert c.backbone_specs == [("toy", {}), ("minilm", {"weights": "C:/weights=v2.safetensors"})]


def test_flag_types_follow_field_types():
    """Numeric flags are parsed to the field's type (int stays int, float stays float)."""
    c = parse(["--max-batch-size", "16", "--max-queue-size", "64", "--max-batch-delay-ms", "1", "--gpus", "0"])
    assert c.max_batch_size == 16 and isinstance(c.max_batch_size, int)
    assert c.max_batch_delay_ms == 1.0 and isinstance(c.max_batch_delay_ms, float)
    assert c.gpu_list == ["0"]
    with pytest.raises(SystemExit):
        parse(["--max-batch-size", "lots"])


def test_head_parameters_limit_fits_one_request():
    """The head-size limit PutHead applies never exceeds what one request under --max-message-bytes
    carries (a 2.2 M-parameter head used to pass the head check and fail with gRPC's bare "larger than max")."""
    assert ServerConfig().head_parameters_limit == 1_000_000  # the defaults agree
    assert ServerConfig(max_head_parameters=2_000_000).head_parameters_limit == (4 * 1024 * 1024 - 65536) // 4
    assert ServerConfig(max_message_bytes=1 << 20).head_parameters_limit == ((1 << 20) - 65536) // 4
    big = ServerConfig(max_head_parameters=2_000_000, max_message_bytes=16 * 1024 * 1024)
    assert big.head_parameters_limit == 2_000_000

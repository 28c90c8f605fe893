"""Heads belong to a tenant: namespaces, grants, write-once versions and a bounded ListHeads, on real Redis."""

from __future__ import annotations

import concurrent.futures
import json

import grpc
import numpy as np
import pytest
from head_protos import Stub, dense_head

from featurebank.v1 import featurebank_pb2 as pb
from support import ServerProcess, random_images

TOKEN_A = "tenant-a-token-0123456789"
TOKEN_B = "tenant-b-token-0123456789"
TOKEN_C = "tenant-c-token-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_redis):
    """Tenants a (no heads list), b (an empty one) and c (own heads c-*, and a's shared-* heads to run)."""
    d = tmp_path_factory.mktemp("tenants")
    (d / "tokens.json").write_text(
        json.dumps(
            {
                "tenants": {
                    "a": {"tokens": [TOKEN_A]},
                    "b": {"tokens": [TOKEN_B], "heads": []},
                    "c": {"tokens": [TOKEN_C], "heads": ["c-*", "a/shared-*"]},
                }
            }
        )
    )
    s = ServerProcess(
        "--backbone", "toy", "--redis-url", shared_redis.url, "--tokens-file", str(d / "tokens.json")
    ).start()
    yield s
    assert s.terminate() == 0


@pytest.fixture(scope="module")
def stubs(server):
    made = {name: Stub(server.target, token) for name, token in (("a", TOKEN_A), ("b", TOKEN_B), ("c", TOKEN_C))}
    yield made
    for s in made.values():
        s.close()


def _code(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as e:
        call()
    return e.value.code()


def _probabilities(stub: Stub, head: str, images: list[bytes]) -> np.ndarray:
    response = stub.Predict(pb.PredictRequest(head=head, inputs=[pb.Input(image=i) for i in images]))
    return np.stack([np.frombuffer(p.probabilities.data, np.float32) for p in response.predictions])


def test_another_tenant_cannot_list_delete_or_replace_a_head(stubs):
    """Tenant b neither sees, deletes nor overwrites a's head `clf`; a `clf` b puts is b's own, and each runs its own weights."""
    a, b = stubs["a"], stubs["b"]
    fingerprint = a.fingerprint()
    images = random_images(3, seed=31)
    assert a.PutHead(pb.PutHeadRequest(head=dense_head("clf", fingerprint, seed=1))).version == 1
    before = _probabilities(a, "clf", images)

    assert "clf" not in {h.name for h in b.ListHeads(pb.ListHeadsRequest()).heads}
    assert list(b.ListHeads(pb.ListHeadsRequest(name="clf")).heads) == []
    assert _code(lambda: b.DeleteHead(pb.DeleteHeadRequest(name="clf"))) == grpc.StatusCode.NOT_FOUND
    assert (
        _code(lambda: b.Predict(pb.PredictRequest(head="clf", inputs=[pb.Input(image=images[0])])))
        == grpc.StatusCode.NOT_FOUND
    )
    assert b.PutHead(pb.PutHeadRequest(head=dense_head("clf", fingerprint, seed=2))).version == 1  # b's first clf

    assert [(h.name, h.version) for h in a.ListHeads(pb.ListHeadsRequest(name="clf")).heads] == [("clf", 1)]
    np.testing.assert_array_equal(_probabilities(a, "clf", images), before)
    assert not np.allclose(_probabilities(b, "clf", images), before)  # b runs its own weights
    assert b.DeleteHead(pb.DeleteHeadRequest(name="clf")).deleted == 1
    np.testing.assert_array_equal(_probabilities(a, "clf", images), before)


def test_concurrent_puts_get_distinct_write_once_versions(stubs):
    """20 concurrent PutHead calls of one name get 20 distinct versions, each holding the head it was given; a taken or deleted version is never written again."""
    a = stubs["a"]
    fingerprint = a.fingerprint()
    heads = [dense_head("racy", fingerprint, seed=100 + i) for i in range(20)]
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        versions = list(pool.map(lambda h: a.PutHead(pb.PutHeadRequest(head=h)).version, heads))
    assert sorted(versions) == list(range(1, 21)), versions
    images = random_images(2, seed=32)
    for seed, version in zip(range(100, 120), versions):  # each version is the head its caller sent
        expected = dense_head("racy", fingerprint, seed=seed)
        response = a.Predict(
            pb.PredictRequest(head="racy", version=version, inputs=[pb.Input(image=i) for i in images])
        )
        assert response.version == version
        features = np.stack(
            [
                np.frombuffer(r.features.data, np.float32)
                for r in a.Extract(
                    pb.ExtractRequest(backbone="toy", inputs=[pb.Input(image=i) for i in images])
                ).results
            ]
        )
        kernel = np.frombuffer(expected.layers[0].kernel.data, np.float32).reshape(16, 2)
        logits = features @ kernel + np.frombuffer(expected.layers[0].bias.data, np.float32)
        want = np.exp(logits - logits.max(1, keepdims=True))
        want /= want.sum(1, keepdims=True)
        got = np.stack([np.frombuffer(p.probabilities.data, np.float32) for p in response.predictions])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)

    taken = dense_head("racy", fingerprint, seed=0, version=7)
    assert _code(lambda: a.PutHead(pb.PutHeadRequest(head=taken))) == grpc.StatusCode.ALREADY_EXISTS
    assert a.DeleteHead(pb.DeleteHeadRequest(name="racy", version=20)).deleted == 1
    assert (
        _code(lambda: a.PutHead(pb.PutHeadRequest(head=dense_head("racy", fingerprint, version=20))))
        == grpc.StatusCode.ALREADY_EXISTS
    )  # a deleted version is never reused either
    assert a.PutHead(pb.PutHeadRequest(head=dense_head("racy", fingerprint))).version == 21


def test_list_heads_validates_the_name_and_never_scans_the_keyspace(stubs, shared_redis):
    """ListHeads refuses a malformed name with INVALID_ARGUMENT, and listing every head costs no SCAN or KEYS of Redis."""
    a = stubs["a"]
    for bad in ("bad name!", "../etc", "x" * 65, "a/b/c"):
        assert _code(lambda bad=bad: a.ListHeads(pb.ListHeadsRequest(name=bad))) == grpc.StatusCode.INVALID_ARGUMENT, (
            bad
        )
    redis = shared_redis.client()
    for i in range(50):  # other keys in the same Redis must cost a listing nothing
        redis.set(f"unrelated:{i}", b"x")
    a.PutHead(pb.PutHeadRequest(head=dense_head("listed", a.fingerprint())))
    redis.config_resetstat()
    names = {h.name for h in a.ListHeads(pb.ListHeadsRequest()).heads}
    assert "listed" in names
    commands = redis.info("commandstats")
    assert not {"cmdstat_scan", "cmdstat_keys"} & set(commands), sorted(commands)


def test_a_grant_lets_a_tenant_run_but_never_change_another_tenants_heads(stubs):
    """c's `a/shared-*` pattern lets it run and list a's shared heads, never a's others, and never put or delete any of a's; its own names stay within `c-*`."""
    a, b, c = stubs["a"], stubs["b"], stubs["c"]
    fingerprint = a.fingerprint()
    image = [pb.Input(image=random_images(1, seed=33)[0])]
    a.PutHead(pb.PutHeadRequest(head=dense_head("shared-model", fingerprint, seed=5)))
    a.PutHead(pb.PutHeadRequest(head=dense_head("private", fingerprint, seed=6)))

    assert c.Predict(pb.PredictRequest(head="a/shared-model", inputs=image)).head == "a/shared-model"
    np.testing.assert_array_equal(
        _probabilities(c, "a/shared-model", random_images(2, seed=34)),
        _probabilities(a, "shared-model", random_images(2, seed=34)),
    )
    assert [h.name for h in c.ListHeads(pb.ListHeadsRequest(name="a/shared-model")).heads] == ["a/shared-model"]
    denied = grpc.StatusCode.PERMISSION_DENIED
    assert _code(lambda: c.Predict(pb.PredictRequest(head="a/private", inputs=image))) == denied
    assert _code(lambda: c.PutHead(pb.PutHeadRequest(head=dense_head("a/shared-model", fingerprint)))) == denied
    assert _code(lambda: c.DeleteHead(pb.DeleteHeadRequest(name="a/shared-model"))) == denied
    assert _code(lambda: c.PutHead(pb.PutHeadRequest(head=dense_head("not-c", fingerprint)))) == denied
    assert _code(lambda: b.Predict(pb.PredictRequest(head="a/shared-model", inputs=image))) == denied  # no grant
    assert c.PutHead(pb.PutHeadRequest(head=dense_head("c-own", fingerprint))).name == "c-own"

    listed = {h.name for h in c.ListHeads(pb.ListHeadsRequest()).heads}
    assert listed == {"c-own", "a/shared-model"}, listed
    assert [h.version for h in a.ListHeads(pb.ListHeadsRequest(name="shared-model")).heads] == [1]


def test_tenant_references_need_tenants(start_server, tmp_path):
    """Without --tokens-file there is one namespace: a TENANT/NAME reference is INVALID_ARGUMENT, a plain name works."""
    server = start_server("--backbone", "toy", "--heads-dir", str(tmp_path / "heads"))
    stub = Stub(server.target)
    try:
        assert stub.PutHead(pb.PutHeadRequest(head=dense_head("plain", stub.fingerprint()))).version == 1
        assert _code(lambda: stub.ListHeads(pb.ListHeadsRequest(name="a/plain"))) == grpc.StatusCode.INVALID_ARGUMENT
        assert [h.name for h in stub.ListHeads(pb.ListHeadsRequest()).heads] == ["plain"]
    finally:
        stub.close()

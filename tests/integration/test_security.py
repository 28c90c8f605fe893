"""TLS, mutual TLS, bearer tokens and tenant isolation of the cache, against real servers."""

from __future__ import annotations

import datetime
import json
import os
import time

import grpc
import pytest

from featurebank.client import FeatureBank, FeatureBankError, content_key
from support import TESTS_DIR, ServerProcess, random_images, wait_until

TOKEN_A = "tenant-a-token-0123456789"
TOKEN_B = "tenant-b-token-0123456789"


def _make_pki(d):
    """A CA, a server certificate for 127.0.0.1/localhost and a client certificate, written as PEM files."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(name, key, issuer_name, issuer_key, ca=False, san=None):
        b = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if san:
            b = b.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return b.sign(issuer_key, hashes.SHA256())

    def write(path, obj):
        data = (
            obj.public_bytes(serialization.Encoding.PEM)
            if hasattr(obj, "public_bytes") and not hasattr(obj, "private_bytes")
            else obj.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
            )
        )
        path.write_bytes(data)
        return str(path)

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "featurebank test CA")])
    ca = cert("featurebank test CA", ca_key, ca_name, ca_key, ca=True)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = cert(
        "localhost",
        server_key,
        ca_name,
        ca_key,
        san=[x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))],
    )
    client_key = ec.generate_private_key(ec.SECP256R1())
    client = cert("a client", client_key, ca_name, ca_key)
    return {
        "ca": write(d / "ca.pem", ca),
        "server_cert": write(d / "server.pem", server),
        "server_key": write(d / "server.key", server_key),
        "client_cert": write(d / "client.pem", client),
        "client_key": write(d / "client.key", client_key),
    }


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return _make_pki(tmp_path_factory.mktemp("pki"))


SHARED = "tests_shared_toy:SharedToy"
TOKEN_C = "tenant-c-token-0123456789"


@pytest.fixture(scope="module")
def tenants_server(tmp_path_factory, shared_redis):
    """Tenants a (everything), b (toy, heads b-*), c (the shared-pool backbone only)."""
    d = tmp_path_factory.mktemp("tenants")
    (d / "tokens.json").write_text(
        json.dumps(
            {
                "tenants": {
                    "a": {"tokens": [TOKEN_A], "secret": "secret-of-a"},
                    "b": {"tokens": [TOKEN_B], "secret": "secret-of-b", "backbones": ["toy"], "heads": ["b-*"]},
                    "c": {"tokens": [TOKEN_C], "backbones": ["tests_shared_toy:*"]},
                }
            }
        )
    )
    # The same toy model under a second name, whose cache is one pool for every tenant.
    (d / "tests_shared_toy.py").write_text(
        "from featurebank.workers.backbones.toy import ToyBackbone\n\n\nclass SharedToy(ToyBackbone):\n    pass\n"
    )
    s = ServerProcess(
        "--backbone",
        "toy",
        "--backbone",
        SHARED,
        "--redis-url",
        shared_redis.url,
        "--tokens-file",
        str(d / "tokens.json"),
        "--shared-cache-backbones",
        SHARED,
        env={"PYTHONPATH": f"{d}:{TESTS_DIR}"},
    ).start()
    yield s
    assert s.terminate() == 0


@pytest.mark.slow
def test_tls_and_mutual_tls(pki):
    """With TLS only a client trusting the CA connects; with mTLS only a client with a certificate does."""
    tls = ServerProcess("--backbone", "toy", "--tls-cert-file", pki["server_cert"], "--tls-key-file", pki["server_key"])
    mtls = ServerProcess(
        "--backbone",
        "toy",
        "--tls-cert-file",
        pki["server_cert"],
        "--tls-key-file",
        pki["server_key"],
        "--tls-client-ca-file",
        pki["ca"],
    )
    img = random_images(1, seed=1)
    for s in (tls, mtls):
        s.spawn().wait_port()
    try:
        for s in (tls, mtls):  # the health probe in support speaks plaintext: wait on the port file instead
            wait_until(lambda s=s: s._ports(ready=True), 180, "TLS server ready")
        with FeatureBank(tls.target, tls_ca_file=pki["ca"], timeout_s=30) as bank:
            assert bank.extract(img, backbone="toy").shape == (1, 16)
        with FeatureBank(tls.target, timeout_s=5) as plaintext, pytest.raises(FeatureBankError) as e:
            plaintext.extract(img, backbone="toy")
        assert e.value.code == grpc.StatusCode.UNAVAILABLE
        with FeatureBank(mtls.target, tls_ca_file=pki["ca"], timeout_s=5) as no_cert, pytest.raises(FeatureBankError):
            no_cert.extract(img, backbone="toy")
        with FeatureBank(
            mtls.target,
            tls_ca_file=pki["ca"],
            tls_cert_file=pki["client_cert"],
            tls_key_file=pki["client_key"],
            timeout_s=30,
        ) as with_cert:
            assert with_cert.extract(img, backbone="toy").shape == (1, 16)
    finally:
        assert tls.terminate() == 0 and mtls.terminate() == 0


def test_probes_work_on_the_health_port_when_grpc_is_tls(pki):
    """With TLS on the gRPC port, the plaintext --health-port answers grpc.health.v1 (SERVING, for the server and the
    FeatureBank service) and nothing else; a server beyond loopback starts with --insecure in place of tokens."""

    s = (
        ServerProcess(
            "--backbone",
            "toy",
            "--tls-cert-file",
            pki["server_cert"],
            "--tls-key-file",
            pki["server_key"],
            "--health-port",
            "0",
            "--host",
            "0.0.0.0",
            "--insecure",
        )
        .spawn()
        .wait_port()
    )
    try:
        health_port = json.loads(open(s.port_file).read())["health_port"]
        assert health_port not in (0, s.port)
        probe = ServerProcess()
        probe.ports = {"port": health_port}  # support's health check speaks plaintext, as the kubelet's does
        wait_until(lambda: probe.health() == "SERVING", 180, "SERVING on the plaintext health port")
        assert probe.health("featurebank.v1.FeatureBank") == "SERVING"
        assert s.health() == "UNAVAILABLE", "the gRPC port itself speaks only TLS"
        with grpc.insecure_channel(probe.target) as ch, pytest.raises(grpc.RpcError) as e:
            ch.unary_unary("/featurebank.v1.FeatureBank/ListBackbones")(b"", timeout=10)
        assert e.value.code() == grpc.StatusCode.UNIMPLEMENTED, "the health port serves health alone"
        with FeatureBank(s.target, tls_ca_file=pki["ca"], timeout_s=30) as bank:
            assert bank.extract(random_images(1, seed=7), backbone="toy").shape == (1, 16)
    finally:
        assert s.terminate() == 0


def test_tokens_are_required_but_probes_stay_open(tenants_server):
    """No or wrong token: UNAUTHENTICATED; health needs none; a backbone outside a tenant's list: PERMISSION_DENIED."""
    img = random_images(1, seed=2)
    assert tenants_server.health() == "SERVING"
    for token in ("", "not-a-valid-token-at-all"):
        with (
            FeatureBank(tenants_server.target, token=token, timeout_s=10) as bank,
            pytest.raises(FeatureBankError) as e,
        ):
            bank.extract(img, backbone="toy")
        assert e.value.code == grpc.StatusCode.UNAUTHENTICATED
    with FeatureBank(tenants_server.target, token=TOKEN_B, timeout_s=30) as b:
        assert b.extract(img, backbone="toy").shape == (1, 16)
        with pytest.raises(FeatureBankError) as e:
            b.extract(img, backbone=SHARED)
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(FeatureBankError) as e:
            b.predict("a-head", img)
        assert e.value.code == grpc.StatusCode.PERMISSION_DENIED
    assert tenants_server.metric("featurebank_requests_total", code="UNAUTHENTICATED") >= 2


def test_tenants_cannot_see_each_others_cache(tenants_server):
    """B can neither Lookup nor hit what A computed (salted keys); a shared-pool backbone is one cache."""
    img = random_images(1, seed=3)
    with (
        FeatureBank(tenants_server.target, token=TOKEN_A, timeout_s=30) as a,
        FeatureBank(tenants_server.target, token=TOKEN_B, timeout_s=30) as b,
    ):
        assert not a.extract_items(img, backbone="toy")[0].cache_hit
        assert a.lookup([content_key(img[0])], backbone="toy")[0].cache_hit
        looked_up = b.lookup([content_key(img[0])], backbone="toy")[0]
        assert looked_up.error is not None and looked_up.error.code == grpc.StatusCode.NOT_FOUND
        assert not b.extract_items(img, backbone="toy")[0].cache_hit  # B computes its own copy

    other = random_images(1, seed=4)
    with (
        FeatureBank(tenants_server.target, token=TOKEN_A, timeout_s=30) as a,
        FeatureBank(tenants_server.target, token=TOKEN_C, timeout_s=30) as c,
    ):
        assert not a.extract_items(other, backbone=SHARED)[0].cache_hit
        assert c.extract_items(other, backbone=SHARED)[0].cache_hit


TOKEN_E = "tenant-e-token-0123456789"
TOKEN_F = "tenant-f-token-0123456789"
TOKEN_G = "tenant-g-token-0123456789"


def test_tenant_limits_refuse_that_tenant_only(start_server, tmp_path):
    """Per-tenant limits: over its items in flight (unary) or its request rate a tenant gets
    RESOURCE_EXHAUSTED at once while other tenants are served; a stream waits for room instead of
    failing; a request larger than the bound runs alone; all counted per tenant."""
    import concurrent.futures

    from featurebank.v1 import featurebank_pb2 as pb

    faulty = "fixture_backbones:FaultyToy"
    gate = tmp_path / "hold-preprocessing"  # while it exists, e's first items stay in flight
    (tmp_path / "tokens.json").write_text(
        json.dumps(
            {
                "tenants": {
                    "e": {"tokens": [TOKEN_E], "max_inflight_items": 4},
                    "f": {"tokens": [TOKEN_F]},
                    "g": {"tokens": [TOKEN_G], "requests_per_s": 1, "burst": 2},
                }
            }
        )
    )
    server = start_server(
        "--backbone",
        faulty,
        "--tokens-file",
        str(tmp_path / "tokens.json"),
        "--max-batch-delay-ms",
        "1",
        env={"FB_TEST_FORWARD_DELAY_MS": "600", "FB_TEST_ITEM_GATE_FILE": str(gate)},
    )
    images = random_images(24, seed=880)
    with (
        FeatureBank(server.target, token=TOKEN_E, timeout_s=60) as e,
        FeatureBank(server.target, token=TOKEN_F, timeout_s=60) as f,
        FeatureBank(server.target, token=TOKEN_G, timeout_s=60) as g,
        concurrent.futures.ThreadPoolExecutor(2) as ex,
    ):
        gate.touch()
        busy = ex.submit(e.extract, images[:3], backbone=faulty)
        wait_until(lambda: os.path.exists(f"{gate}.entered"), 60, "e's items held in preprocessing")
        wait_until(
            lambda: server.metric("featurebank_tenant_inflight_items", tenant="e") == 3, 20, "3 items of e in flight"
        )
        with pytest.raises(FeatureBankError) as over:
            e.extract(images[3:5], backbone=faulty)  # 3 + 2 > 4
        assert over.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_inflight_items=4" in over.value.message
        gate.unlink()
        assert f.extract(images[5:13], backbone=faulty).shape == (8, 16)  # another tenant: unaffected
        assert e.extract(images[13:14], backbone=faulty).shape == (1, 16)  # 3 + 1 fits
        assert busy.result().shape == (3, 16)
        assert e.extract(images[14:20], backbone=faulty).shape == (6, 16)  # over the bound, but alone
        # A stream of 2-item messages, window 4: messages wait for room; nothing fails.
        e.max_items_per_request = 2
        streamed = list(e.extract_stream(images[:12], backbone=faulty, cache_policy=pb.BYPASS))
        assert [o.error for o in streamed] == [None] * 12
        wait_until(lambda: server.metric("featurebank_tenant_inflight_items", tenant="e") == 0, 10, "e to drain")
        # Rate: a burst of 2, then refused at once, until the bucket refills (1 a second).
        g.backbones()
        g.backbones()
        with pytest.raises(FeatureBankError) as fast:
            g.backbones()
        assert fast.value.code == grpc.StatusCode.RESOURCE_EXHAUSTED and "1 requests/s" in fast.value.message
        f.backbones()  # not g's bucket
        time.sleep(1.1)
        g.backbones()
    assert server.metric("featurebank_tenant_limited_total", tenant="e", limit="inflight_items") == 1
    assert server.metric("featurebank_tenant_limited_total", tenant="g", limit="rate") == 1
    assert server.metric("featurebank_requests_total", tenant="e", code="RESOURCE_EXHAUSTED") == 1
    assert server.metric("featurebank_requests_total", tenant="f", code="OK") >= 2
    assert server.metric("featurebank_tenant_limited_total", tenant="f") == 0


def test_bad_limits_in_the_tokens_file_are_refused():
    """Negative or non-numeric limits fail at start-up, naming the tenant."""
    from featurebank.server.auth import TokenAuthenticator

    for bad in ({"max_inflight_items": -1}, {"requests_per_s": "fast"}):
        with pytest.raises(ValueError, match="limits of tenant 'x'"):
            TokenAuthenticator.from_dict({"tenants": {"x": {"tokens": [TOKEN_E], **bad}}})

"""Tenants: bearer tokens mapped to tenants, what each may use, and the salt of their cache keys."""

from __future__ import annotations

import contextvars
import dataclasses
import fnmatch
import hashlib
import hmac
import json
import os

import grpc

from featurebank.common.errors import FeatureBankError
from featurebank.server.limits import Limits


class UnauthenticatedError(FeatureBankError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDeniedError(FeatureBankError):
    code = grpc.StatusCode.PERMISSION_DENIED


@dataclasses.dataclass(frozen=True)
class Tenant:
    """A caller: its name, what it may use (glob patterns), and its cache-key salt."""

    name: str
    secret: str
    backbones: tuple[str, ...] = ("*",)
    heads: tuple[str, ...] = ("*",)
    limits: Limits = Limits()

    @property
    def namespace(self) -> str:
        """The salt of this tenant's cache keys: without the secret nobody can compute them."""
        return hmac.new(
            self.secret.encode(), b"featurebank-cache-namespace:" + self.name.encode(), hashlib.sha256
        ).hexdigest()[:32]

    def check_backbone(self, backbone: str) -> None:
        if not any(fnmatch.fnmatchcase(backbone, p) for p in self.backbones):
            raise PermissionDeniedError(f"tenant {self.name!r} may not use backbone {backbone!r}")

    def may_use_head(self, owner: str, name: str, *, write: bool = False) -> bool:
        """Heads belong to a tenant. In ``heads``, patterns without '/' limit the names of this
        tenant's own heads (none, as with an omitted or empty list: any name); ``TENANT/NAME``
        patterns let it run and list, never put or delete, heads of the tenants they match."""
        if owner == self.name:
            own = [p for p in self.heads if "/" not in p]
            return not own or any(fnmatch.fnmatchcase(name, p) for p in own)
        return not write and any(fnmatch.fnmatchcase(f"{owner}/{name}", p) for p in self.heads if "/" in p)

    def check_head(self, owner: str, name: str, *, write: bool = False) -> None:
        if not self.may_use_head(owner, name, write=write):
            what = name if owner == self.name else f"{owner}/{name}"
            raise PermissionDeniedError(
                f"tenant {self.name!r} may not {'change' if write else 'use'} head {what!r}"
                + (": only a head's own tenant writes it" if write and owner != self.name else "")
            )

    @property
    def head_grants(self) -> tuple[str, ...]:
        """The TENANT/NAME patterns: other tenants' heads this tenant may run."""
        return tuple(p for p in self.heads if "/" in p)


# The tenant of the RPC being handled (None when the server runs without tokens).
current_tenant: contextvars.ContextVar[Tenant | None] = contextvars.ContextVar("featurebank_tenant", default=None)


class TokenAuthenticator:
    """Maps ``authorization: Bearer <token>`` metadata to a Tenant.

    The tokens file (JSON) looks like::

        {"tenants": {"search": {"tokens": ["..."], "secret": "...", "backbones": ["*"], "heads": ["search-*"]},
                     "ads":    {"tokens": ["..."], "secret": "...", "backbones": ["minilm"],
                                "max_inflight_items": 2048, "requests_per_s": 200, "burst": 400}}}

    ``secret`` salts the tenant's cache keys (default: derived from the tokens, so rotating every
    token of a tenant also starts a fresh key space unless a secret is set). The optional limits
    (``server/limits.py``) answer RESOURCE_EXHAUSTED to that tenant alone.
    """

    def __init__(self, tenants: dict[str, Tenant], tokens: dict[str, str]):
        self.tenants = tenants
        self._tokens = {hashlib.sha256(t.encode()).digest(): name for t, name in tokens.items()}

    @classmethod
    def from_file(cls, path: str) -> TokenAuthenticator:
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f), source=path)

    @classmethod
    def from_dict(cls, data: dict, source: str = "tokens") -> TokenAuthenticator:
        tenants: dict[str, Tenant] = {}
        tokens: dict[str, str] = {}
        for name, spec in (data.get("tenants") or {}).items():
            toks = list(spec.get("tokens") or [])
            if not toks:
                raise ValueError(f"{source}: tenant {name!r} has no tokens")
            for t in toks:
                if len(t) < 16:
                    raise ValueError(f"{source}: a token of tenant {name!r} is shorter than 16 characters")
                if t in tokens:
                    raise ValueError(f"{source}: a token is listed for both {tokens[t]!r} and {name!r}")
                tokens[t] = name
            secret = spec.get("secret") or hashlib.sha256("\0".join(sorted(toks)).encode()).hexdigest()
            try:
                limits = Limits.from_dict(spec)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{source}: limits of tenant {name!r}: {e}") from None
            tenants[name] = Tenant(
                name, secret, tuple(spec.get("backbones") or ("*",)), tuple(spec.get("heads") or ("*",)), limits
            )
        if not tenants:
            raise ValueError(f"{source}: no tenants")
        return cls(tenants, tokens)

    def authenticate(self, metadata) -> Tenant:
        """The tenant of a call's metadata; raises UnauthenticatedError."""
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode()
                break
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise UnauthenticatedError("missing bearer token: send metadata 'authorization: Bearer <token>'")
        # Looked up by SHA-256 digest: timing can at most reveal a digest prefix, not a token.
        name = self._tokens.get(hashlib.sha256(token.strip().encode()).digest())
        if name is None:
            raise UnauthenticatedError("unknown bearer token")
        return self.tenants[name]


def server_credentials(cert_file: str, key_file: str, client_ca_file: str = "") -> grpc.ServerCredentials:
    """TLS (or mutual TLS when a client CA is given: clients must present a certificate it signed)."""

    def read(p: str) -> bytes:
        if not os.path.exists(p):
            raise FileNotFoundError(f"TLS file {p!r} does not exist")
        with open(p, "rb") as f:
            return f.read()

    ca = read(client_ca_file) if client_ca_file else None
    return grpc.ssl_server_credentials(
        [(read(key_file), read(cert_file))], root_certificates=ca, require_client_auth=ca is not None
    )

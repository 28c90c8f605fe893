"""The one place callers are admitted (token, rate) before their request is read, RPC errors become statuses, and every RPC is counted and timed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import grpc

from featurebank.common.errors import FeatureBankError, InvalidArgumentError
from featurebank.common.metrics import Metrics
from featurebank.server.auth import TokenAuthenticator, current_tenant
from featurebank.server.limits import PodLimits, SharedCounters, TenantGate, burst_of, current_gate
from featurebank.server.wire import passing_bytes

logger = logging.getLogger(__name__)

SERVICE_PREFIX = "/featurebank.v1."


class _Unparsable:
    """Stands in for a request message protobuf could not parse (e.g. text that is not UTF-8)."""

    def __init__(self, error: Exception):
        self.error = error


def _lenient(deserializer):
    """Parse failures become a value the handler turns into INVALID_ARGUMENT (gRPC would say UNKNOWN)."""
    if deserializer is None:
        return None

    def parse(data: bytes):
        try:
            return deserializer(data)
        except Exception as e:
            return _Unparsable(e)

    return parse


def _checked(request):
    if isinstance(request, _Unparsable):
        raise InvalidArgumentError(f"request message cannot be parsed: {request.error}")
    return request


class StatusInterceptor(grpc.aio.ServerInterceptor):
    """Authenticates the caller (when tokens are configured) and applies its request rate before
    anything of the call is read, maps FeatureBankError to its status code (anything else to
    INTERNAL) and records ``featurebank_requests_total{method,code,tenant}`` and
    ``featurebank_request_duration_seconds``."""

    def __init__(
        self, metrics: Metrics, authenticator: TokenAuthenticator | None = None, pod_limits: PodLimits | None = None
    ):
        """``pod_limits``: this is one frontend of several (--frontends N); the tenants' limits are
        then counted for the whole pod, in counters all its frontends share."""
        self.metrics = metrics
        self.authenticator = authenticator
        limited = {
            t.name: t.limits
            for t in (authenticator.tenants.values() if authenticator is not None else ())
            if t.limits.max_inflight_items or t.limits.requests_per_s
        }
        self.shared_counters = (
            SharedCounters(pod_limits, limited, {name: burst_of(lim) for name, lim in limited.items()})
            if pod_limits is not None and limited
            else None
        )
        # One gate per tenant that has limits (rate, items in flight).
        self._gates: dict[str, TenantGate] = {
            name: TenantGate(
                name,
                limits,
                on_limited=lambda tenant, limit: metrics.tenant_limited.labels(tenant, limit).inc(),
                on_inflight=lambda tenant, n: metrics.tenant_inflight.labels(tenant).set(n),
                shared=self.shared_counters,
            )
            for name, limits in limited.items()
        }
        # Full method name -> its wrapped handler. A method's handler is registered once and never
        # changes, and nothing per call is baked into the wrapper, so it is built once per method
        # rather than once per RPC (closures, a handler tuple, a continuation call each time).
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._request_counters: dict[tuple[str, str, str], object] = {}

    async def intercept_service(self, continuation, details):
        if details.method.startswith(SERVICE_PREFIX):  # health and reflection stay open: probes need no token
            refused = self._admit(details.invocation_metadata)
            if refused is not None:
                return self._refusal(details.method.rsplit("/", 1)[-1], refused)
        wrapped = self._handlers.get(details.method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(details)
        if handler is None or not details.method.startswith(SERVICE_PREFIX):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        kw = dict(
            request_deserializer=_lenient(handler.request_deserializer),
            # Extract and Lookup answer with wire bytes they wrote themselves (server/wire.py).
            response_serializer=passing_bytes(handler.response_serializer),
        )
        if handler.unary_unary is not None:
            wrapped = grpc.unary_unary_rpc_method_handler(self._wrap_unary(method, handler.unary_unary), **kw)
        elif handler.stream_stream is not None:
            wrapped = grpc.stream_stream_rpc_method_handler(self._wrap_stream(method, handler.stream_stream), **kw)
        else:
            return handler
        self._handlers[details.method] = wrapped
        return wrapped

    def _admit(self, metadata) -> FeatureBankError | None:
        """The caller's tenant and gate for this call (context variables), or why it is refused.

        Runs in the RPC's own task before gRPC reads the request (grpc.aio finds the handler, and
        so runs interceptors, before receiving a message), so the handler sees these variables.
        """
        current_tenant.set(None)
        current_gate.set(None)
        if self.authenticator is None:
            return None
        try:
            tenant = self.authenticator.authenticate(metadata)
        except FeatureBankError as e:
            return e
        current_tenant.set(tenant)
        gate = self._gates.get(tenant.name)
        current_gate.set(gate)
        if gate is not None:
            try:
                gate.admit()  # the rate; items in flight are counted where they are worked on
            except FeatureBankError as e:
                return e
        return None

    def _refusal(self, method: str, error: FeatureBankError) -> grpc.RpcMethodHandler:
        """A handler that answers ``error`` without reading the request.

        For a unary method grpc.aio receives and parses the whole message before calling its
        handler; a streaming handler reads only when it iterates, so a refused call is answered as
        a stream (the same bytes on the wire) whose request is never read: an unauthenticated
        caller cannot make the server hold or parse its message.
        """

        async def refuse(_unread_requests, context: grpc.aio.ServicerContext) -> None:
            async with self._status(method, context):
                raise error

        return grpc.stream_stream_rpc_method_handler(refuse)

    def _wrap_unary(self, method: str, inner):
        # The unary path is the hit path: a plain try, not the ``_status`` context manager (an async
        # generator and two more awaits per call), with the method's metric children looked up once.
        duration = self.metrics.request_duration.labels(method)

        async def behavior(request, context: grpc.aio.ServicerContext):
            start = time.perf_counter()
            tenant = current_tenant.get()
            code = "OK"
            try:
                return await inner(_checked(request), context)
            except BaseException as e:
                code = self._code_of(e, context)
                await self._abort(method, context, e)
                raise
            finally:
                self._requests_child(method, code, tenant.name if tenant is not None else "").inc()
                duration.observe(time.perf_counter() - start)

        return behavior

    def _wrap_stream(self, method: str, inner):
        async def behavior(request_iterator, context: grpc.aio.ServicerContext):
            async def checked():
                async for request in request_iterator:
                    yield _checked(request)

            async with self._status(method, context):
                async for response in inner(checked(), context):
                    yield response

        return behavior

    def _requests_child(self, method: str, code: str, tenant: str):
        """The ``featurebank_requests_total`` child of these labels (``.labels()`` takes a lock and
        builds a tuple on every call; the children are kept instead, a few per method and tenant)."""
        key = (method, code, tenant)
        child = self._request_counters.get(key)
        if child is None:
            child = self._request_counters[key] = self.metrics.requests.labels(method, code, tenant)
        return child

    @staticmethod
    def _code_of(error: BaseException, context: grpc.aio.ServicerContext) -> str:
        """The status code name an RPC ending with ``error`` is counted under."""
        if isinstance(error, FeatureBankError):
            return error.code.name
        if isinstance(error, asyncio.CancelledError):
            return "CANCELLED"
        if not isinstance(error, Exception):
            return "OK"  # as _status counts it: only exceptions of the RPC's own end it otherwise
        if isinstance(error, grpc.aio.AbortError) or type(error).__name__ == "AbortError":
            return (context.code() or grpc.StatusCode.UNKNOWN).name
        return "INTERNAL"

    @staticmethod
    async def _abort(method: str, context: grpc.aio.ServicerContext, error: BaseException) -> None:
        """End the RPC with the status of ``error`` (context.abort raises); an abort already made,
        a cancellation or a non-Exception is left to propagate as it is."""
        if isinstance(error, FeatureBankError):
            await context.abort(error.code, error.message)
        elif isinstance(error, Exception) and not (
            isinstance(error, grpc.aio.AbortError) or type(error).__name__ == "AbortError"
        ):
            logger.error("%s failed", method, exc_info=error)
            await context.abort(
                grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(error).__name__}: {error}"
            )

    @contextlib.asynccontextmanager
    async def _status(self, method: str, context: grpc.aio.ServicerContext):
        """Turn exceptions into statuses; count and time the RPC."""
        start = time.perf_counter()
        code = grpc.StatusCode.OK
        tenant = current_tenant.get()
        try:
            yield
        except FeatureBankError as e:
            code = e.code
            await context.abort(e.code, e.message)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        except Exception as e:
            if isinstance(e, grpc.aio.AbortError) or type(e).__name__ == "AbortError":
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            code = grpc.StatusCode.INTERNAL
            logger.exception("%s failed", method)
            await context.abort(grpc.StatusCode.INTERNAL, f"internal error in {method}: {type(e).__name__}: {e}")
        finally:
            self._requests_child(method, code.name, tenant.name if tenant is not None else "").inc()
            self.metrics.request_duration.labels(method).observe(time.perf_counter() - start)

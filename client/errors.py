"""The SDK's exception: a status code, a message, and which input it was about."""

from __future__ import annotations

import grpc


class FeatureBankError(Exception):
    """An RPC or one of its items failed.

    Attributes:
        code: the ``grpc.StatusCode``.
        message: the server's explanation.
        index: the position of the failing input in the caller's list, or None for the request.
    """

    def __init__(self, code: grpc.StatusCode, message: str, index: int | None = None):
        self.code = code
        self.message = message
        self.index = index
        where = f"input {index}: " if index is not None else ""
        super().__init__(f"{where}{code.name}: {message}")

    @classmethod
    def from_rpc_error(cls, err: grpc.RpcError) -> FeatureBankError:
        code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
        details = err.details() if hasattr(err, "details") else str(err)
        return cls(code, details or "")


_CODES = {c.value[0]: c for c in grpc.StatusCode}


def status_code(value: int) -> grpc.StatusCode:
    """The grpc.StatusCode for an Error.code integer."""
    return _CODES.get(value, grpc.StatusCode.UNKNOWN)

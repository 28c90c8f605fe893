"""Domain exceptions and their gRPC status codes, mapped to statuses in one place."""

from __future__ import annotations

import grpc


class FeatureBankError(Exception):
    """An error with a gRPC status code; raised anywhere, turned into a status by the interceptor."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: grpc.StatusCode | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class InvalidArgumentError(FeatureBankError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class NotFoundError(FeatureBankError):
    code = grpc.StatusCode.NOT_FOUND


class QueueFullError(FeatureBankError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class UnavailableError(FeatureBankError):
    code = grpc.StatusCode.UNAVAILABLE


class FailedPreconditionError(FeatureBankError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class DeadlineExceededError(FeatureBankError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class WorkerCrashError(FeatureBankError):
    """An item whose batch killed a worker on every try: it gets this error, workers live on."""

    code = grpc.StatusCode.INTERNAL


def status_code_of(err: BaseException) -> grpc.StatusCode:
    """The status code a (possibly foreign) exception maps to."""
    if isinstance(err, FeatureBankError):
        return err.code
    return grpc.StatusCode.INTERNAL

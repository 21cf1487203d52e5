"""Errors of the secretgate client: one exception class per gRPC status code.

Every failed call raises a subclass of :class:`SecretgateError` named after the status the
gateway answered with (``PermissionDenied``, ``NotFound``, ``FailedPrecondition``, ...), so
callers can catch exactly what they handle::

    try:
        client.put("/apps/app/token", b"...", expected_version=3)
    except secretgate.FailedPrecondition:
        ...  # someone else wrote first: read again and decide

The message is the gateway's (it never carries a secret value); ``request_id`` is the id the
gateway wrote in its audit record, to quote when asking an operator.
"""

from __future__ import annotations

from typing import Optional

import grpc


class SecretgateError(Exception):
    """A call the gateway (or the transport) refused."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, message: str, request_id: Optional[str] = None):
        super().__init__(message)
        self.message = message
        self.request_id = request_id

    def __str__(self) -> str:
        text = f"{self.code.name}: {self.message}"
        if self.request_id:
            text += f" (request id {self.request_id})"
        return text


class Cancelled(SecretgateError):
    code = grpc.StatusCode.CANCELLED


class Unknown(SecretgateError):
    code = grpc.StatusCode.UNKNOWN


class InvalidArgument(SecretgateError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class DeadlineExceeded(SecretgateError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class NotFound(SecretgateError):
    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(SecretgateError):
    code = grpc.StatusCode.ALREADY_EXISTS


class PermissionDenied(SecretgateError):
    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(SecretgateError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class FailedPrecondition(SecretgateError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(SecretgateError):
    code = grpc.StatusCode.ABORTED


class OutOfRange(SecretgateError):
    code = grpc.StatusCode.OUT_OF_RANGE


class Unimplemented(SecretgateError):
    code = grpc.StatusCode.UNIMPLEMENTED


class Internal(SecretgateError):
    code = grpc.StatusCode.INTERNAL


class Unavailable(SecretgateError):
    code = grpc.StatusCode.UNAVAILABLE


class DataLoss(SecretgateError):
    code = grpc.StatusCode.DATA_LOSS


class Unauthenticated(SecretgateError):
    code = grpc.StatusCode.UNAUTHENTICATED


_BY_CODE = {
    cls.code: cls
    for cls in (
        Cancelled, Unknown, InvalidArgument, DeadlineExceeded, NotFound, AlreadyExists,
        PermissionDenied, ResourceExhausted, FailedPrecondition, Aborted, OutOfRange,
        Unimplemented, Internal, Unavailable, DataLoss, Unauthenticated,
    )
}


def from_rpc_error(error: grpc.RpcError) -> SecretgateError:
    """The exception for a failed call: the class of its status code, its message and the
    request id from the response's trailing metadata."""
    code = error.code() if hasattr(error, "code") else grpc.StatusCode.UNKNOWN
    details = (error.details() if hasattr(error, "details") else None) or str(code)
    request_id = None
    if hasattr(error, "trailing_metadata"):
        for key, value in error.trailing_metadata() or ():
            if key == "x-request-id":
                request_id = value
    return _BY_CODE.get(code, Unknown)(details, request_id)

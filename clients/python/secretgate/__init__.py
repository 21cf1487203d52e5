"""Python client for secretgate, the mTLS gRPC secrets gateway.

    import secretgate

    with secretgate.Client() as client:          # SECRETGATE_ADDR, _CA, _CERT, _KEY
        client.put("/apps/app/db-password", b"hunter2")
        secret = client.get("/apps/app/db-password")
        print(secret.version, secret.value)
        for change in client.watch("/apps/app"):   # changes as they happen, never values
            print(change.revision, change.kind, change.path, change.version)

Every failed call raises a :class:`SecretgateError` subclass named after its gRPC status.
"""

from .client import Change, Client, Identity, Secret, Version, Versions, Watch, Written
from .errors import (
    Aborted,
    AlreadyExists,
    Cancelled,
    DataLoss,
    DeadlineExceeded,
    FailedPrecondition,
    Internal,
    InvalidArgument,
    NotFound,
    OutOfRange,
    PermissionDenied,
    ResourceExhausted,
    SecretgateError,
    Unauthenticated,
    Unavailable,
    Unimplemented,
    Unknown,
)

__all__ = [
    "Change", "Client", "Identity", "Secret", "Version", "Versions", "Watch", "Written",
    "SecretgateError", "Aborted", "AlreadyExists", "Cancelled", "DataLoss",
    "DeadlineExceeded", "FailedPrecondition", "Internal", "InvalidArgument", "NotFound",
    "OutOfRange", "PermissionDenied", "ResourceExhausted", "Unauthenticated", "Unavailable",
    "Unimplemented", "Unknown",
]

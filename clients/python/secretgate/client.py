"""The secretgate client: one mTLS gRPC channel to a gateway, and the Secrets calls."""

from __future__ import annotations

import datetime
import os
import time
from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Union

import grpc

from . import errors

try:
    from .v1 import secrets_pb2, secrets_pb2_grpc
except ImportError as e:  # pragma: no cover - a checkout without generated stubs
    raise ImportError(
        "secretgate's gRPC stubs are missing: run `make python-client` in the checkout "
        "(they are generated from proto/ by grpcio-tools)"
    ) from e

DEFAULT_ADDR = "https://127.0.0.1:7443"
DEFAULT_CA = "certs-dev/ca.pem"
DEFAULT_CERT = "certs-dev/admin.pem"
DEFAULT_KEY = "certs-dev/admin-key.pem"


def _time(ts) -> Optional[datetime.datetime]:
    if ts is None or (ts.seconds == 0 and ts.nanos == 0):
        return None
    return ts.ToDatetime(tzinfo=datetime.timezone.utc)


@dataclass(frozen=True)
class Secret:
    """A secret version as read. ``value`` is left out of ``repr`` so it never lands in a log."""

    path: str
    version: int
    current_version: int
    created: Optional[datetime.datetime]
    value: bytes = field(repr=False)


@dataclass(frozen=True)
class Written:
    """The version a Put created (or a Delete deleted) and when."""

    version: int
    time: Optional[datetime.datetime]


@dataclass(frozen=True)
class Version:
    """One kept version of a secret; ``deleted`` is set once it was soft-deleted,
    ``destroyed`` once its value was removed for good."""

    version: int
    created: Optional[datetime.datetime]
    deleted: Optional[datetime.datetime]
    destroyed: Optional[datetime.datetime] = None


@dataclass(frozen=True)
class Versions:
    """A secret's history: its current version (0 if never written) and the kept versions,
    newest first."""

    current_version: int
    versions: List[Version]


@dataclass(frozen=True)
class Identity:
    """Who the gateway says the caller is (WhoAmI)."""

    principal: str
    roles: List[str]
    certificate_fingerprint: str
    certificate_serial: str
    policy_version: str


@dataclass(frozen=True)
class Change:
    """One change from :meth:`Client.watch`: which version of which secret was
    ``written``, ``deleted``, ``undeleted`` or ``destroyed``, at which store revision and
    when. Never a value: call :meth:`Client.get` for it."""

    path: str
    version: int
    kind: str
    revision: int
    time: Optional[datetime.datetime]


_KINDS = {1: "written", 2: "deleted", 3: "undeleted", 4: "destroyed"}

# Stream endings worth resuming from the last revision: the gateway restarted or is
# unreachable, or it cut off a watcher that read too slowly.
_RESUMABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.RESOURCE_EXHAUSTED)


class Watch:
    """An open Watch stream: iterate over it for :class:`Change` objects, as they happen.

    ``revision`` is where it got to: pass it as ``from_revision`` to a later
    :meth:`Client.watch` to resume with exactly the changes after it. With ``resume`` (the
    default) the stream reopens itself from there when the gateway restarts, is unreachable
    for a while, or cut the watcher off for reading too slowly. A refusal (no ``read`` grant
    under the prefix: :class:`~secretgate.PermissionDenied`; history gone:
    :class:`~secretgate.OutOfRange`, list and watch from 0) is raised. :meth:`close` ends it.
    """

    def __init__(self, stub, prefix: str, from_revision: int, resume: bool):
        self._stub = stub
        self._prefix = prefix
        self._resume = resume
        self._closed = False
        self._pending: List[Change] = []
        self._message_revision = from_revision
        self.revision = from_revision
        self._open()

    def _open(self) -> None:
        req = secrets_pb2.WatchRequest(prefix=self._prefix, from_revision=self.revision)
        self._call = self._stub.Watch(req)
        # The gateway answers with headers once the stream is open (its starting point
        # set), or with the refusal: either way, changes made after this return are seen.
        self._call.initial_metadata()

    def __iter__(self) -> "Watch":
        return self

    def __next__(self) -> Change:
        backoff = 0.2
        while not self._pending:
            self.revision = max(self.revision, self._message_revision)
            try:
                message = next(self._call)
            except StopIteration:
                raise errors.Unavailable("the gateway ended the watch without a status") from None
            except grpc.RpcError as e:
                if self._closed:
                    raise StopIteration from None
                if not (self._resume and e.code() in _RESUMABLE):
                    raise errors.from_rpc_error(e) from None
                time.sleep(backoff)  # a retry's backoff, not synchronization
                backoff = min(backoff * 2, 5.0)
                self._open()
                continue
            self._pending = [
                Change(e.path, e.version, _KINDS.get(e.kind, "unknown"), e.revision,
                       _time(e.time))
                for e in message.events
            ]
            self._message_revision = message.revision
        change = self._pending.pop(0)
        self.revision = change.revision
        return change

    def close(self) -> None:
        """Ends the stream."""
        self._closed = True
        self._call.cancel()

    def __enter__(self) -> "Watch":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _read(path: str, what: str, variable: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise FileNotFoundError(
            f"cannot read the {what} {path!r} (set {variable} or pass it): {e.strerror}"
        ) from None


def _target(addr: str) -> str:
    if addr.startswith("http://"):
        raise ValueError(
            f"{addr!r}: secretgate speaks only mutual TLS; use an https:// address or host:port"
        )
    return addr[len("https://"):] if addr.startswith("https://") else addr


class Client:
    """A connection to a secretgate gateway over mutual TLS.

    Arguments default to the same environment variables and files as the ``secretgate``
    CLI: ``SECRETGATE_ADDR`` (``https://127.0.0.1:7443``), ``SECRETGATE_CA``
    (``certs-dev/ca.pem``), ``SECRETGATE_CERT`` (``certs-dev/admin.pem``) and
    ``SECRETGATE_KEY`` (``certs-dev/admin-key.pem``). ``timeout`` is each call's deadline in
    seconds. Use it as a context manager, or call :meth:`close`.
    """

    def __init__(
        self,
        addr: Optional[str] = None,
        ca: Optional[str] = None,
        cert: Optional[str] = None,
        key: Optional[str] = None,
        timeout: float = 30.0,
    ):
        addr = addr or os.environ.get("SECRETGATE_ADDR") or DEFAULT_ADDR
        ca = ca or os.environ.get("SECRETGATE_CA") or DEFAULT_CA
        cert = cert or os.environ.get("SECRETGATE_CERT") or DEFAULT_CERT
        key = key or os.environ.get("SECRETGATE_KEY") or DEFAULT_KEY
        credentials = grpc.ssl_channel_credentials(
            root_certificates=_read(ca, "CA bundle", "SECRETGATE_CA"),
            private_key=_read(key, "client key", "SECRETGATE_KEY"),
            certificate_chain=_read(cert, "client certificate", "SECRETGATE_CERT"),
        )
        self._channel = grpc.secure_channel(_target(addr), credentials)
        self._secrets = secrets_pb2_grpc.SecretsStub(self._channel)
        self._timeout = timeout

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Closes the channel."""
        self._channel.close()

    def _call(self, method, request):
        try:
            return method(request, timeout=self._timeout)
        except grpc.RpcError as e:
            raise errors.from_rpc_error(e) from None

    def get(self, path: str, version: Optional[int] = None) -> Secret:
        """Reads the current version of ``path``, or ``version``. Needs ``read``."""
        req = secrets_pb2.GetRequest(path=path)
        if version:
            req.version = version
        r = self._call(self._secrets.Get, req)
        return Secret(r.path, r.version, r.current_version, _time(r.created_time), r.value)

    def put(
        self,
        path: str,
        value: Union[bytes, str],
        expected_version: Optional[int] = None,
    ) -> Written:
        """Writes a new version of ``path``. With ``expected_version`` it is written only if
        that is the current version (0: only if the secret does not exist yet); otherwise
        :class:`~secretgate.FailedPrecondition`. Needs ``write``."""
        if isinstance(value, str):
            value = value.encode("utf-8")
        req = secrets_pb2.PutRequest(path=path, value=value)
        if expected_version is not None:
            req.expected_version = expected_version
        r = self._call(self._secrets.Put, req)
        return Written(r.version, _time(r.created_time))

    def delete(self, path: str) -> Written:
        """Soft-deletes the current version of ``path``. Needs ``delete``."""
        r = self._call(self._secrets.Delete, secrets_pb2.DeleteRequest(path=path))
        return Written(r.version, _time(r.deleted_time))

    def undelete(self, path: str, version: int) -> int:
        """Restores soft-deleted ``version`` of ``path``. Needs ``delete``."""
        req = secrets_pb2.UndeleteRequest(path=path, version=version)
        return self._call(self._secrets.Undelete, req).version

    def destroy(self, path: str, version: int) -> Written:
        """Removes ``version`` of ``path`` for good (it cannot be undeleted). Needs
        ``destroy``."""
        req = secrets_pb2.DestroyRequest(path=path, version=version)
        r = self._call(self._secrets.Destroy, req)
        return Written(r.version, _time(r.destroyed_time))

    def list(self, prefix: str = "/", page_size: int = 0) -> Iterator[str]:
        """Every live secret at or below ``prefix`` the caller may list or read, page by
        page as it goes (``page_size`` 0: the gateway's default)."""
        token = ""
        while True:
            req = secrets_pb2.ListRequest(prefix=prefix, page_size=page_size, page_token=token)
            r = self._call(self._secrets.List, req)
            yield from r.paths
            token = r.next_page_token
            if not token:
                return

    def versions(self, path: str) -> Versions:
        """The history of ``path``, deleted versions included. Needs ``read``."""
        r = self._call(self._secrets.Versions, secrets_pb2.VersionsRequest(path=path))
        kept = [
            Version(
                v.version,
                _time(v.created_time),
                _time(v.deleted_time) if v.HasField("deleted_time") else None,
                _time(v.destroyed_time) if v.HasField("destroyed_time") else None,
            )
            for v in r.versions
        ]
        return Versions(r.current_version, kept)

    def watch(self, prefix: str = "/", from_revision: int = 0, resume: bool = True) -> Watch:
        """Changes to the secrets at or below ``prefix`` that the caller may ``read``, from
        now on, or after ``from_revision`` (see :class:`Watch`). No deadline applies."""
        return Watch(self._secrets, prefix, from_revision, resume)

    def whoami(self) -> Identity:
        """The caller's principal and roles as the gateway sees them."""
        r = self._call(self._secrets.WhoAmI, secrets_pb2.WhoAmIRequest())
        return Identity(
            r.principal,
            list(r.roles),
            r.certificate_fingerprint,
            r.certificate_serial,
            r.policy_version,
        )

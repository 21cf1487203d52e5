"""The Python client against a real gateway (`secretgate dev`): every call, a denied path, a
compare-and-set conflict, errors named after their status, and standard gRPC reflection."""

import uuid

import grpc
import pytest

import secretgate


def client(gateway, who="admin", **kw):
    pki = gateway["pki"]
    kw.setdefault("addr", f"https://{gateway['addr']}")
    return secretgate.Client(
        ca=str(pki / "ca.pem"),
        cert=str(pki / f"{who}.pem"),
        key=str(pki / f"{who}-key.pem"),
        **kw,
    )


def fresh(prefix="/demo/py"):
    return f"{prefix}/{uuid.uuid4().hex[:12]}"


def test_put_get_versions_list_delete(gateway):
    path = fresh()
    with client(gateway) as c:
        first = c.put(path, b"one")
        second = c.put(path, "two")
        assert (first.version, second.version) == (1, 2)
        assert second.time is not None
        secret = c.get(path)
        assert (secret.path, secret.value, secret.version, secret.current_version) == (
            path, b"two", 2, 2)
        assert c.get(path, version=1).value == b"one"
        assert path in list(c.list(path.rsplit("/", 1)[0], page_size=1))
        history = c.versions(path)
        assert history.current_version == 2
        assert [v.version for v in history.versions] == [2, 1]  # newest first
        deleted = c.delete(path)
        assert deleted.version == 2
        with pytest.raises(secretgate.NotFound) as e:
            c.get(path)
        assert e.value.code == grpc.StatusCode.NOT_FOUND
        assert c.versions(path).versions[0].deleted is not None
        assert path not in list(c.list(path.rsplit("/", 1)[0]))


def test_undelete_and_destroy(gateway):
    path = fresh()
    with client(gateway) as c:
        c.put(path, b"one")
        c.put(path, b"two")
        c.delete(path)
        assert c.undelete(path, 2) == 2
        assert c.get(path).value == b"two"
        gone = c.destroy(path, 1)
        assert gone.version == 1 and gone.time is not None
        with pytest.raises(secretgate.NotFound, match="destroyed"):
            c.get(path, version=1)
        assert c.versions(path).versions[1].destroyed == gone.time
    with client(gateway, "app") as app, pytest.raises(secretgate.PermissionDenied):
        app.destroy(path, 2)


def test_a_compare_and_set_conflict_is_failed_precondition(gateway):
    path = fresh()
    with client(gateway) as c:
        assert c.put(path, b"v1", expected_version=0).version == 1
        with pytest.raises(secretgate.FailedPrecondition) as e:
            c.put(path, b"lost race", expected_version=0)
        assert "expected" in e.value.message
        assert e.value.request_id
        assert c.put(path, b"v2", expected_version=1).version == 2
        assert c.get(path).value == b"v2"


def test_a_denied_path_is_permission_denied_and_writes_nothing(gateway):
    path = fresh()
    with client(gateway, "app") as app:
        assert app.whoami().principal == "spiffe://dev.secretgate/app"
        with pytest.raises(secretgate.PermissionDenied) as e:
            app.put(path, b"not mine")
        assert e.value.request_id
        assert str(e.value).startswith("PERMISSION_DENIED: ")
        with pytest.raises(secretgate.PermissionDenied):
            app.get("/apps/payments/prod/db")
    with client(gateway) as admin, pytest.raises(secretgate.NotFound):
        admin.get(path)


def test_bad_input_is_invalid_argument(gateway):
    with client(gateway) as c, pytest.raises(secretgate.InvalidArgument) as e:
        c.get("/demo/../etc")
    assert isinstance(e.value, secretgate.SecretgateError)


def test_the_value_is_not_in_the_repr(gateway):
    path = fresh()
    with client(gateway) as c:
        c.put(path, b"hunter2-do-not-log")
        secret = c.get(path)
    assert "hunter2" not in repr(secret) and "hunter2" not in str(secret)


def test_the_environment_variables_of_the_cli_are_the_defaults(gateway, monkeypatch):
    pki = gateway["pki"]
    monkeypatch.setenv("SECRETGATE_ADDR", f"https://{gateway['addr']}")
    monkeypatch.setenv("SECRETGATE_CA", str(pki / "ca.pem"))
    monkeypatch.setenv("SECRETGATE_CERT", str(pki / "app.pem"))
    monkeypatch.setenv("SECRETGATE_KEY", str(pki / "app-key.pem"))
    with secretgate.Client() as c:
        assert c.whoami().principal == "spiffe://dev.secretgate/app"


def test_plaintext_and_missing_files_are_refused_clearly(gateway, tmp_path):
    with pytest.raises(ValueError, match="only mutual TLS"):
        client(gateway, addr="http://127.0.0.1:1")
    with pytest.raises(FileNotFoundError, match="SECRETGATE_CERT"):
        secretgate.Client(
            addr=gateway["addr"],
            ca=str(gateway["pki"] / "ca.pem"),
            cert=str(tmp_path / "nope.pem"),
            key=str(gateway["pki"] / "admin-key.pem"),
        )


def test_grpcio_reflection_lists_the_services(gateway):
    """What grpcui and older grpcurl use: the v1alpha reflection service."""
    from google.protobuf.descriptor_pool import DescriptorPool
    from grpc_reflection.v1alpha.proto_reflection_descriptor_database import (
        ProtoReflectionDescriptorDatabase,
    )

    pki = gateway["pki"]
    credentials = grpc.ssl_channel_credentials(
        (pki / "ca.pem").read_bytes(),
        (pki / "admin-key.pem").read_bytes(),
        (pki / "admin.pem").read_bytes(),
    )
    with grpc.secure_channel(gateway["addr"], credentials) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"secretgate.v1.Secrets", "secretgate.v1.Admin", "grpc.health.v1.Health"} <= services
        secrets = DescriptorPool(database).FindServiceByName("secretgate.v1.Secrets")
        assert {"Get", "Put", "Delete", "List", "Versions", "WhoAmI"} <= {
            m.name for m in secrets.methods
        }


def test_watch_sees_changes_as_they_happen_and_resumes_from_a_revision(gateway):
    prefix = fresh("/demo/pyw")
    with client(gateway) as writer, client(gateway) as watcher:
        watch = watcher.watch(prefix)
        writer.put(prefix + "/a", b"hunter2")
        writer.delete(prefix + "/a")
        writer.put("/demo/elsewhere-" + prefix.rsplit("/", 1)[1], b"x")  # outside the prefix
        first, second = next(watch), next(watch)
        assert (first.path, first.kind, first.version) == (prefix + "/a", "written", 1)
        assert (second.kind, second.version) == ("deleted", 1)
        assert first.revision < second.revision and first.time is not None
        assert "hunter2" not in repr(first)
        watch.close()
        writer.put(prefix + "/b", b"2")
        with watcher.watch(prefix, from_revision=second.revision) as resumed:
            assert next(resumed).path == prefix + "/b"


def test_watch_without_a_read_grant_is_permission_denied(gateway):
    # The app service may read only /apps/app/** and /demo/**.
    with client(gateway, who="app") as c:
        with pytest.raises(secretgate.PermissionDenied):
            next(c.watch("/apps/payments"))

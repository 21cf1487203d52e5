"""A real gateway for the client tests: `secretgate dev` (development PKI, embedded store,
audit log on) in a fresh directory on a free loopback port, stopped after the session."""

import os
import pathlib
import socket
import subprocess
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def gateway(tmp_path_factory):
    """The gateway's address and the directory of its development PKI (certs-dev/)."""
    binary = os.environ.get("SECRETGATE_BIN", str(ROOT / "target/debug/secretgate"))
    if not os.access(binary, os.X_OK):
        pytest.fail(f"no gateway binary at {binary}: build it (cargo build) or set SECRETGATE_BIN")
    directory = tmp_path_factory.mktemp("gateway")
    addr = f"127.0.0.1:{_free_port()}"
    env = dict(os.environ, SECRETGATE_METRICS_LISTEN="", SECRETGATE_LOG="warn")
    log = open(directory / "gateway.log", "wb")
    child = subprocess.Popen(
        [binary, "dev", "--listen", addr], cwd=directory, env=env, stdout=log, stderr=log
    )
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(addr.split(":"), timeout=1).close()
            break
        except OSError:
            if child.poll() is not None or time.monotonic() > deadline:
                child.kill()
                pytest.fail("the gateway did not start:\n" + (directory / "gateway.log").read_text())
            time.sleep(0.05)
    yield {"addr": addr, "pki": directory / "certs-dev"}
    child.terminate()
    try:
        child.wait(timeout=15)
    except subprocess.TimeoutExpired:
        child.kill()
    log.close()

"""A real S3 API for the tests: moto's server on 127.0.0.1 (loopback only), used through s3fs.

The server is started once per session (``s3_server``); each test gets its own bucket (``bucket``)
and an environment with fake credentials and the loopback endpoint (``s3_env``), which subprocesses
inherit through ``tests.conftest.cli_env``. No request ever leaves the machine: the endpoint is set
before anything builds an S3 client, and the credentials are fake.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator

import pytest

FAKE_KEY_ID = "AKIAAEKTFAKEKEY00001"
FAKE_SECRET = "aekt-fake-secret-for-moto-only-0123456789"
START_TIMEOUT_S = 30


@pytest.fixture(scope="session")
def s3_server() -> Iterator[str]:
    """The endpoint URL of a moto S3 server on a free loopback port, stopped at the end of the session."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one log line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    starter = threading.Thread(target=server.start, daemon=True)  # start() waits without a bound
    starter.start()
    starter.join(START_TIMEOUT_S)
    if starter.is_alive():
        pytest.fail(f"the moto S3 server did not start within {START_TIMEOUT_S} s")
    host, port = server.get_host_and_port()
    assert host == "127.0.0.1"
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_env(s3_server: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Fake credentials and the loopback endpoint in the environment (this process and its children);
    returns the endpoint."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", FAKE_KEY_ID)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", FAKE_SECRET)
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # never probe 169.254.169.254
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()  # clients made under another environment
    return s3_server


@pytest.fixture
def bucket(s3_env: str) -> Iterator[str]:
    """``s3://<a new bucket>`` on the loopback server, for one test."""
    import s3fs

    name = f"aekt-{uuid.uuid4().hex[:16]}"
    fs = s3fs.S3FileSystem()
    fs.mkdir(name)
    yield f"s3://{name}"
    s3fs.S3FileSystem.clear_instance_cache()


def s3_objects(url: str) -> dict[str, bytes]:
    """Every object under ``url`` (a prefix), by key relative to it."""
    import s3fs

    fs = s3fs.S3FileSystem()
    root = url.removeprefix("s3://").rstrip("/")
    fs.invalidate_cache()
    return {key[len(root) + 1:]: fs.cat_file(key) for key in fs.find(root)}

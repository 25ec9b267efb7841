"""Shared fixtures: a real S3 endpoint (moto's server on 127.0.0.1) and a ``remote_store``
location parametrized over a local path, ``memory://`` and ``s3://``."""

from __future__ import annotations

import logging
import socket
import uuid
from pathlib import Path
from typing import Any, Iterator

import pytest

S3_KEYS = {"key": "testing", "secret": "testing"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """``http://127.0.0.1:<port>`` of a moto S3 server shared by the session (stopped at the end)."""
    server_mod = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one INFO line per request otherwise
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3_bucket(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> tuple[str, dict[str, Any]]:
    """A fresh bucket on the moto server: ``(bucket name, storage_options)``. Dummy AWS
    credentials and region are set in the environment so nothing can reach real AWS."""
    for var, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_SESSION_TOKEN": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": moto_endpoint,
    }.items():
        monkeypatch.setenv(var, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    import boto3

    bucket = f"b-{uuid.uuid4().hex[:12]}"
    boto3.client("s3", endpoint_url=moto_endpoint, region_name="us-east-1", **_boto_keys()).create_bucket(Bucket=bucket)
    return bucket, {"endpoint_url": moto_endpoint, **S3_KEYS}


def _boto_keys() -> dict[str, str]:
    return {"aws_access_key_id": "testing", "aws_secret_access_key": "testing"}


@pytest.fixture(params=["local", "memory", "s3"])
def remote_store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, dict[str, Any] | None]]:
    """``(url, storage_options)`` of a location where no store exists yet: a local path, a
    unique ``memory://`` prefix, or ``s3://<fresh bucket>/store`` on the moto server."""
    if request.param == "local":
        yield str(tmp_path / "store"), None
    elif request.param == "memory":
        import fsspec

        prefix = f"tspt-{uuid.uuid4().hex[:12]}"
        yield f"memory://{prefix}/store", {}
        fsspec.filesystem("memory").rm(f"/{prefix}", recursive=True) if fsspec.filesystem("memory").exists(
            f"/{prefix}"
        ) else None
    else:
        bucket, options = request.getfixturevalue("s3_bucket")
        yield f"s3://{bucket}/store", options


@pytest.fixture(autouse=True, scope="session")
def _shard_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Remote stores stream through a node-local shard cache (default: under the system temp
    directory): point it into the session's temporary directory, so tests leave nothing behind."""
    import os

    old = os.environ.get("TSPT_CACHE_DIR")
    os.environ["TSPT_CACHE_DIR"] = str(tmp_path_factory.mktemp("shard-cache"))
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TSPT_CACHE_DIR", None)
        else:
            os.environ["TSPT_CACHE_DIR"] = old


@pytest.fixture
def fixed_token(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every writer draws the same token, so that shard names (and so whole stores) compare
    byte for byte across writes (the parallel-pack identity tests)."""
    from tensorstore_pt import writer as writer_mod

    monkeypatch.setattr(writer_mod, "new_writer_token", lambda: "0123456789ab")

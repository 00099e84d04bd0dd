"""A real S3 API over HTTP on loopback (moto's server) for the tests that write to object storage."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import pyarrow.fs as pafs
import pytest


@contextmanager
def loopback_s3(bucket: str) -> Iterator[str]:
    """Start moto's server, point the AWS_* variables at it, make `bucket`; yields host:port."""
    moto_server = pytest.importorskip("moto.server")
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    try:
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            # pyarrow's S3FileSystem() ignores AWS_ENDPOINT_URL (FileSystem.from_uri, which the
            # store uses, reads it), so the bucket is made with the endpoint given.
            pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", allow_bucket_creation=True).create_dir(
                bucket
            )
            yield f"{host}:{port}"
    finally:
        server.stop()

"""A real S3-compatible server on loopback for tests (moto's threaded server).

Why not mock boto calls: the pipeline talks to S3 through s3fs/aiobotocore (fsspec) and
zarr's ``FsspecStore``; only a real HTTP endpoint exercises that whole stack (listing,
ranged reads of Parquet footers, multipart-free puts of shards, prefix deletes).
moto's server implements the S3 REST API in-process, on 127.0.0.1, with no network access.

Usage in a test module (module- or session-scoped so the server starts once)::

    from s3server import S3Server

    @pytest.fixture(scope="module")
    def s3():
        with S3Server() as server:
            yield server

    def test_x(s3):
        bucket = s3.make_bucket("data")          # -> "s3://data"
        fs = s3.filesystem()                     # a fresh s3fs.S3FileSystem
        Manifest.open("s3://data/m.parquet", storage_options=s3.storage_options)

``storage_options`` can be pickled to Ray actors or spawned processes as is (it carries the
endpoint and the dummy keys explicitly, so no environment is needed on the other side).
The keys are dummies (moto accepts anything); nothing here is a real credential.
"""

from __future__ import annotations

import logging
import os
import socket
import uuid
from typing import Any

__all__ = ["S3Server", "free_port"]

#: Dummy credentials: moto accepts any; botocore refuses to sign without some.
DUMMY_KEY = "testing"
DUMMY_SECRET = "testing"  # noqa: S105 - not a secret, moto's documented dummy
REGION = "us-east-1"


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class S3Server:
    """moto's S3 server on ``127.0.0.1:<free port>``; a context manager.

    On start it sets ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_DEFAULT_REGION`` to
    dummy values in ``os.environ`` (and restores them on stop) so that botocore never looks
    for real credentials or instance metadata, and so code that builds its own s3fs client
    from the environment plus ``endpoint_url`` works too.
    """

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.endpoint_url = f"http://127.0.0.1:{self.port}"
        self._server: Any = None
        self._saved_env: dict[str, str | None] = {}

    # -- lifecycle -------------------------------------------------------------------------
    def start(self) -> S3Server:
        from moto.server import ThreadedMotoServer

        env = {
            "AWS_ACCESS_KEY_ID": DUMMY_KEY,
            "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
            "AWS_DEFAULT_REGION": REGION,
            # Never let botocore wander off to the EC2 metadata endpoint.
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        for name, value in env.items():
            self._saved_env[name] = os.environ.get(name)
            os.environ[name] = value
        # werkzeug logs every request at INFO; keep test output readable.
        logging.getLogger("werkzeug").setLevel(logging.ERROR)
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self._server.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        for name, value in self._saved_env.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        self._saved_env.clear()
        # s3fs caches filesystem instances (and their directory listings) per options;
        # drop them so a later server on another port never sees stale clients.
        try:
            import s3fs

            s3fs.S3FileSystem.clear_instance_cache()
        except ImportError:  # pragma: no cover - s3fs is a dev dependency
            pass

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- helpers ---------------------------------------------------------------------------
    @property
    def storage_options(self) -> dict[str, Any]:
        """fsspec/s3fs options that reach this server (pass to every ``storage_options=``)."""
        return {
            "key": DUMMY_KEY,
            "secret": DUMMY_SECRET,
            "endpoint_url": self.endpoint_url,
        }

    def filesystem(self) -> Any:
        """A fresh (uncached) ``s3fs.S3FileSystem`` talking to this server."""
        import s3fs

        return s3fs.S3FileSystem(skip_instance_cache=True, **self.storage_options)

    def make_bucket(self, name: str | None = None) -> str:
        """Create a bucket (a unique name by default) and return ``"s3://<name>"``."""
        name = name or f"test-{uuid.uuid4().hex[:12]}"
        fs = self.filesystem()
        fs.mkdir(name)
        return f"s3://{name}"

"""A real S3-compatible server for tests and benchmarks: moto's standalone server on a free local port.

Why moto: it is pure PyPI (pip install "moto[server]"), starts in-process in a second, and speaks the S3 REST
protocol over HTTP, so s3fs, zarr and DVC talk to it exactly as to AWS or MinIO; MinIO or LocalStack would
need Docker or a separate binary, and nothing outside PyPI is reachable here.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

# Fake credentials: moto accepts any, and boto refuses to sign requests without some.
S3_ENV = {"AWS_ACCESS_KEY_ID": "dsmd-test", "AWS_SECRET_ACCESS_KEY": "dsmd-test-secret",
          "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def moto_server(cache_home: str | None = None) -> Iterator[str]:
    """Start the server, point the standard AWS variables at it (this process and its children), yield the
    endpoint URL; stop it and restore the environment afterwards."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {**S3_ENV, "AWS_ENDPOINT_URL": endpoint}
    if cache_home:
        env["XDG_CACHE_HOME"] = cache_home  # readers' shard cache goes under the test's temp dir
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    try:
        yield endpoint
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()


def make_bucket(name: str) -> None:
    import s3fs

    s3fs.S3FileSystem(skip_instance_cache=True).mkdir(name)

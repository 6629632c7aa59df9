"""A real S3-compatible server for tests and benchmarks: moto's standalone server on a free local port.

Why moto: it is pure PyPI (pip install "moto[server]"), starts in-process in a second, and speaks the S3 REST
protocol over HTTP, so s3fs, zarr and DVC talk to it exactly as to AWS or MinIO; MinIO or LocalStack would
need Docker or a separate binary, and nothing outside PyPI is reachable here.
"""

from __future__ import annotations

import contextlib
import json
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


@contextlib.contextmanager
def credentials_enforced(endpoint: str) -> Iterator[tuple[str, str]]:
    """Make the running moto server check signatures: yield the key id and secret of an IAM user allowed every S3
    action; any other key, or this key with another secret, is refused as AWS refuses it.

    moto accepts any credentials until told otherwise; its server mode's /moto-api/reset-auth (what moto's own
    set_initial_no_auth_action_count decorator calls against a server) switches checking on. The switch is
    moto's process-wide setting, so it is put back on exit, before any other test talks to a moto server."""
    import boto3
    import requests

    iam = boto3.client("iam", endpoint_url=endpoint)
    user = f"dsmd-{free_port()}"  # moto keeps its IAM users for the whole process: a fresh name each time
    iam.create_user(UserName=user)
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps({
        "Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}))
    key = iam.create_access_key(UserName=user)["AccessKey"]
    answer = requests.post(f"{endpoint}/moto-api/reset-auth", data=b"0", timeout=30)
    answer.raise_for_status()
    before = answer.json()["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
    try:
        yield key["AccessKeyId"], key["SecretAccessKey"]
    finally:
        requests.post(f"{endpoint}/moto-api/reset-auth", data=before.encode(), timeout=30).raise_for_status()

"""A real S3 server for the tests: moto's server in a subprocess on 127.0.0.1.

``from tests.s3server import s3_server`` in a test module gives it the session's server (a pytest
fixture); ``s3_env`` points the ``AWS_*`` variables at it and ``s3_bucket`` makes a fresh bucket.

moto keeps everything in memory: after ``stop()`` and ``start()`` (same port) the server is empty,
with no buckets and no objects.

By default moto accepts any credentials. ``S3Server(auth=True)`` makes it check them (moto's
``INITIAL_NO_AUTH_ACTION_COUNT``): the server then makes an IAM user allowed everything, whose key
``env()`` returns; a wrong secret fails with SignatureDoesNotMatch (PermissionError in s3fs), an
unknown key with InvalidAccessKeyId. Bucket policies (see ``deny_put``) are enforced either way.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid

import pytest

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    """moto's S3 server as a subprocess: ``start()``, ``stop()``, ``endpoint``, ``env()``, ``make_bucket()``."""

    def __init__(self, port: int | None = None, log_path: str | None = None, auth: bool = False):
        self.port = port or free_port()
        self.auth = auth
        self.key, self.secret = CREDENTIALS["AWS_ACCESS_KEY_ID"], CREDENTIALS["AWS_SECRET_ACCESS_KEY"]
        self.log_path = log_path  # the server's request log (stderr), else discarded
        self.process: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """The variables that point boto/s3fs at this server."""
        return {**CREDENTIALS, "AWS_ACCESS_KEY_ID": self.key, "AWS_SECRET_ACCESS_KEY": self.secret,
                "AWS_ENDPOINT_URL": self.endpoint}

    def start(self, timeout: float = 30.0) -> S3Server:
        if self.process is not None and self.process.poll() is None:
            return self
        log = open(self.log_path, "ab") if self.log_path else subprocess.DEVNULL  # noqa: SIM115
        env = {**os.environ, **CREDENTIALS}
        env.pop("INITIAL_NO_AUTH_ACTION_COUNT", None)
        if self.auth:  # the three IAM calls below go unchecked, every later request is checked
            env["INITIAL_NO_AUTH_ACTION_COUNT"] = "3"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log, stderr=log, stdin=subprocess.DEVNULL, env=env, start_new_session=True)
        if log is not subprocess.DEVNULL:
            log.close()
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.process.returncode} on port {self.port}")
            if self.answers():
                if self.auth:
                    self._make_user()
                return self
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not answer on {self.endpoint} within {timeout} s")
            time.sleep(0.05)

    def answers(self) -> bool:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=1)
            conn.request("GET", "/moto-api/data.json")
            ok = conn.getresponse().status == 200
            conn.close()
            return ok
        except OSError:
            return False

    def _make_user(self) -> None:
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, region_name="us-east-1",
                           aws_access_key_id="testing", aws_secret_access_key="testing")
        iam.create_user(UserName="tests")
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        iam.put_user_policy(UserName="tests", PolicyName="everything", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName="tests")["AccessKey"]
        self.key, self.secret = key["AccessKeyId"], key["SecretAccessKey"]

    def stop(self) -> None:
        """Kill the server at once (SIGKILL): the endpoint goes away, with everything it stored."""
        if self.process is None:
            return
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = None

    def reset(self) -> None:
        """Empty the server (every bucket and object) without restarting it."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=10)
        conn.request("POST", "/moto-api/reset")
        conn.getresponse().read()
        conn.close()

    def client(self):
        """A fresh s3fs filesystem on this server (explicit settings, no instance or listings cache)."""
        import s3fs

        return s3fs.S3FileSystem(key=self.key, secret=self.secret, skip_instance_cache=True, use_listings_cache=False,
                                 client_kwargs={"endpoint_url": self.endpoint, "region_name": "us-east-1"})

    def make_bucket(self, name: str | None = None) -> str:
        name = name or f"test-{uuid.uuid4().hex[:16]}"
        # s3fs's mkdir sends the client's region as a LocationConstraint, which S3 refuses for us-east-1.
        self.client().call_s3("create_bucket", Bucket=name)
        return name

    def deny_put(self, bucket: str, prefix: str) -> None:
        """A bucket policy that refuses PutObject under ``prefix`` (PermissionError "Forbidden" in s3fs)."""
        statement = {"Effect": "Deny", "Principal": "*", "Action": "s3:PutObject",
                     "Resource": f"arn:aws:s3:::{bucket}/{prefix}*"}
        policy = {"Version": "2012-10-17", "Statement": [statement]}
        self.client().call_s3("put_bucket_policy", Bucket=bucket, Policy=json.dumps(policy))

    def uploads(self, bucket: str, prefix: str = "") -> list[dict]:
        """The bucket's incomplete multipart uploads (Key, UploadId, ...)."""
        return self.client().call_s3("list_multipart_uploads", Bucket=bucket, Prefix=prefix).get("Uploads", [])

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="session")
def s3_server():
    """The session's moto server (started on first use)."""
    with S3Server() as server:
        yield server


def apply_env(server: S3Server, monkeypatch) -> None:
    """Point the ``AWS_*`` variables at ``server`` (and drop the ones that would override it)."""
    for key in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_REGION"):
        monkeypatch.delenv(key, raising=False)
    for key, value in server.env().items():
        monkeypatch.setenv(key, value)


@pytest.fixture
def s3_env(s3_server, monkeypatch):  # noqa: F811
    """The session's server, with the environment pointing at it for this test."""
    apply_env(s3_server, monkeypatch)
    return s3_server


@pytest.fixture
def s3_bucket(s3_env):
    """A fresh, uniquely named bucket on the session's server; the environment points at the server."""
    return s3_env.make_bucket()

"""The moto test server, through s3fs configured from the environment only."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import fsspec
import pytest
import s3fs
from botocore.exceptions import EndpointConnectionError

from tests.s3server import S3Server, s3_bucket, s3_env, s3_server  # noqa: F401  (fixtures)


def env_fs() -> s3fs.S3FileSystem:
    """s3fs with nothing passed: credentials, region and endpoint come from the AWS_* variables."""
    return fsspec.filesystem("s3", skip_instance_cache=True, use_listings_cache=False)


def test_s3fs_takes_the_endpoint_and_credentials_from_the_environment(s3_bucket, s3_env):  # noqa: F811
    fs = env_fs()
    assert fs.s3.meta.endpoint_url == s3_env.endpoint
    fs.pipe_file(f"{s3_bucket}/dir/a", b"hello")
    assert fs.cat_file(f"{s3_bucket}/dir/a") == b"hello"
    assert fs.cat_file(f"{s3_bucket}/dir/a", start=1, end=3) == b"el"
    assert fs.ls(f"{s3_bucket}/dir") == [f"{s3_bucket}/dir/a"]
    assert fs.isdir(f"{s3_bucket}/dir") and not fs.exists(f"{s3_bucket}/nothing")


def test_each_bucket_is_fresh(s3_bucket, s3_env):  # noqa: F811
    assert env_fs().find(s3_bucket) == []
    assert s3_bucket != s3_env.make_bucket()


def test_a_missing_bucket_is_file_not_found(s3_env):  # noqa: F811
    with pytest.raises(FileNotFoundError, match="The specified bucket does not exist"):
        env_fs().pipe_file("no-such-bucket/x", b"1")


def test_a_bucket_policy_makes_a_put_fail(s3_bucket, s3_env):  # noqa: F811
    s3_env.deny_put(s3_bucket, "denied/")
    fs = env_fs()
    fs.pipe_file(f"{s3_bucket}/allowed/x", b"1")
    with pytest.raises(PermissionError, match="Forbidden"):
        fs.pipe_file(f"{s3_bucket}/denied/x", b"1")
    assert fs.find(s3_bucket) == [f"{s3_bucket}/allowed/x"]


def test_a_killed_writer_leaves_no_object_but_an_incomplete_upload(s3_bucket, s3_env):  # noqa: F811
    code = (f"import os, time, s3fs\nf = s3fs.S3FileSystem().open('{s3_bucket}/part', 'wb', block_size=5 << 20)\n"
            "f.write(os.urandom(11 << 20)); f.flush(); print('flushed', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=os.environ)
    assert child.stdout.readline().strip() == b"flushed"
    child.send_signal(signal.SIGKILL)
    child.wait()
    fs = env_fs()
    assert not fs.exists(f"{s3_bucket}/part")
    (upload,) = s3_env.uploads(s3_bucket)
    assert upload["Key"] == "part"
    fs.call_s3("abort_multipart_upload", Bucket=s3_bucket, Key="part", UploadId=upload["UploadId"])
    assert s3_env.uploads(s3_bucket) == []


def test_stop_and_start_on_the_same_port_gives_an_empty_server():
    with S3Server() as server:
        bucket = server.make_bucket()
        server.stop()
        fs = s3fs.S3FileSystem(key="testing", secret="testing", skip_instance_cache=True,
                               client_kwargs={"endpoint_url": server.endpoint},
                               config_kwargs={"connect_timeout": 1, "retries": {"max_attempts": 1}})
        fs.retries = 1
        # botocore's EndpointConnectionError comes through s3fs as is: it is not an OSError.
        with pytest.raises(EndpointConnectionError, match="Could not connect to the endpoint URL"):
            fs.ls(bucket)
        server.start()
        assert server.client().ls("") == []


def test_auth_checks_the_secret(monkeypatch):
    with S3Server(auth=True) as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        bucket = server.make_bucket()
        env_fs().pipe_file(f"{bucket}/x", b"1")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        with pytest.raises(PermissionError, match="signature we calculated does not match"):
            env_fs().ls(bucket)

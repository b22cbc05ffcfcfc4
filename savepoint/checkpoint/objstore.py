"""Object storage (``s3://bucket/prefix``): the URL type, the one client per process, and its errors.

A checkpoint folder on an object store is a key prefix. :class:`ObjectPath` stands where a local
folder's ``Path`` stands (``/``, ``.name``, ``.parent``, ``str()`` gives the URL back); it has no
``__fspath__``, so handing one to code that expects a local path fails loudly instead of writing
into a local folder named ``s3:``.

The client is s3fs (through fsspec). Credentials, region and endpoint come from the usual
environment: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY`` (and ``AWS_SESSION_TOKEN``),
``AWS_DEFAULT_REGION``, ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``) for a non-AWS endpoint,
or anything else botocore reads (``AWS_PROFILE``, instance roles). Listings are never cached: a
step another rank committed a moment ago is seen at once.

Every failure of the store reaches savepoint's code as :class:`ObjectStoreError`, one line saying
what failed, for which URL, and how to fix it (:func:`store_error`).
"""

from __future__ import annotations

import os
import threading
from typing import Any

from savepoint.errors import CheckpointError
from savepoint.urls import URL_RE, bucket_problem, url_scheme

CONNECT_TIMEOUT = 10  # seconds to wait for a connection before botocore retries
ATTEMPTS = 4  # botocore's attempts per request (its standard retry mode backs off between them)


def attempts() -> int:
    """Attempts per request: ``SAVEPOINT_S3_ATTEMPTS``, else :data:`ATTEMPTS`."""
    value = os.environ.get("SAVEPOINT_S3_ATTEMPTS", "")
    if not value:
        return ATTEMPTS
    if not value.isdigit() or not 1 <= int(value) <= 20:
        raise CheckpointError(f"SAVEPOINT_S3_ATTEMPTS={value!r}: give the attempts per object-store request, a whole "
                              f"number from 1 to 20 (default {ATTEMPTS})")
    return int(value)


def is_url(value: Any) -> bool:
    return isinstance(value, ObjectPath) or url_scheme(value) is not None


class ObjectPath:
    """``s3://bucket/key``: a folder-like key prefix or an object, used like a ``Path``."""

    __slots__ = ("scheme", "key")

    def __init__(self, url: str | ObjectPath):
        if isinstance(url, ObjectPath):
            self.scheme, self.key = url.scheme, url.key
            return
        problem = bucket_problem(url)
        if problem:
            raise CheckpointError(problem)
        scheme, rest = URL_RE.match(url).groups()  # type: ignore[union-attr]
        self.scheme, self.key = scheme, rest.strip("/")

    @property
    def bucket(self) -> str:
        return self.key.split("/", 1)[0]

    @property
    def path(self) -> str:
        """``bucket/key``, as s3fs names it."""
        return self.key

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]

    @property
    def parent(self) -> ObjectPath:
        head = self.key.rsplit("/", 1)[0] if "/" in self.key else self.key
        return ObjectPath(f"{self.scheme}://{head}")

    def __truediv__(self, name: str) -> ObjectPath:
        name = str(name).strip("/")
        return ObjectPath(f"{self.scheme}://{self.key}/{name}") if name else self

    def __str__(self) -> str:
        return f"{self.scheme}://{self.key}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def absolute(self) -> ObjectPath:
        return self


def endpoint() -> str | None:
    """The endpoint from the environment (a non-AWS store), else None (AWS itself)."""
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def where() -> str:
    return endpoint() or "AWS S3"


class ObjectStoreError(CheckpointError):
    """An object-store request failed; the message says what, for which URL, and how to fix it."""


_clients: dict[tuple, Any] = {}
_clients_lock = threading.Lock()
_ENV = ("SAVEPOINT_S3_ATTEMPTS", "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE")


def client() -> Any:
    """This process's s3fs filesystem for the environment's settings (made on first use, again after a
    fork or when the AWS_* variables change), listings uncached."""
    key = (os.getpid(), *(os.environ.get(name) for name in _ENV))
    fs = _clients.get(key)
    if fs is not None:
        return fs
    with _clients_lock:
        fs = _clients.get(key)
        if fs is None:
            try:
                import s3fs
            except ImportError:
                raise ObjectStoreError("s3:// checkpoint folders need s3fs: pip install 's3fs' (or install savepoint "
                                       "with its 's3' extra: pip install -e '.[s3]')") from None
            client_kwargs = {"endpoint_url": endpoint()} if endpoint() else {}
            region = os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
            if region:
                client_kwargs["region_name"] = region
            fs = s3fs.S3FileSystem(
                skip_instance_cache=True, use_listings_cache=False, client_kwargs=client_kwargs,
                config_kwargs={"connect_timeout": CONNECT_TIMEOUT, "read_timeout": 120,
                               "retries": {"max_attempts": attempts(), "mode": "standard"}})
            _clients[key] = fs
    return fs


def _code(error: BaseException) -> str:
    """The S3 error code behind an s3fs/botocore exception ('' when there is none)."""
    for e in (error, error.__cause__, error.__context__):
        response = getattr(e, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    text = str(error)
    for code in ("NoSuchBucket", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "SlowDown",
                 "ServiceUnavailable", "InternalError", "RequestTimeTooSkewed", "ExpiredToken"):
        if code in text:
            return code
    return ""


def _connection_failure(error: BaseException) -> bool:
    names = {type(e).__name__ for e in (error, error.__cause__, error.__context__) if e is not None}
    text = str(error)
    return bool(names & {"EndpointConnectionError", "ConnectTimeoutError", "ClientConnectorError",
                         "ServerDisconnectedError", "ConnectionRefusedError", "ReadTimeoutError",
                         "ConnectionClosedError", "ClientOSError"}) or "Could not connect" in text \
        or "Connect timeout" in text or "Cannot connect" in text


def store_error(error: BaseException, url: Any, doing: str) -> ObjectStoreError:
    """One line for a failed request: ``doing`` (e.g. "writing") ``url``, why, and what to do."""
    if isinstance(error, ObjectStoreError):
        return error
    code = _code(error)
    cause = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    path = ObjectPath(url) if not isinstance(url, ObjectPath) and url_scheme(url) else url
    bucket = path.bucket if isinstance(path, ObjectPath) else "?"
    if type(error).__name__ in ("NoCredentialsError", "PartialCredentialsError"):
        how = ("no credentials for the object store were found: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY "
               "(or AWS_PROFILE), and AWS_ENDPOINT_URL for a store that is not AWS")
    elif code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken", "InvalidToken") or \
            (isinstance(error, PermissionError) and code == ""):
        how = (f"{where()} refused the credentials ({code or cause}): set AWS_ACCESS_KEY_ID and "
               "AWS_SECRET_ACCESS_KEY (and AWS_SESSION_TOKEN for temporary ones) to a key of that store")
    elif code == "AccessDenied" or isinstance(error, PermissionError):
        how = (f"access denied by {where()} ({code or cause}): the credentials in AWS_ACCESS_KEY_ID lack "
               f"permission on bucket {bucket}; grant s3:ListBucket, s3:GetObject, s3:PutObject and s3:DeleteObject")
    elif code == "NoSuchBucket" or (isinstance(error, FileNotFoundError) and "bucket" in cause.lower()):
        how = (f"bucket {bucket} does not exist at {where()}: create it (e.g. `aws s3 mb s3://{bucket}`) or fix "
               "the URL")
    elif _connection_failure(error):
        how = (f"cannot reach the object store at {where()} ({cause}): check AWS_ENDPOINT_URL and that the "
               "store is up and reachable from this host")
    elif code in ("SlowDown", "ServiceUnavailable", "InternalError", "503", "500"):
        how = (f"{where()} kept failing the request ({code}) after {attempts()} attempts: the store is throttling "
               "or unwell; retry later, or allow more attempts with SAVEPOINT_S3_ATTEMPTS")
    else:
        how = f"{type(error).__name__}: {cause}"
    return ObjectStoreError(f"{doing} {url} failed: {how}")

"""One filesystem layer for every URI: local paths, file://, s3:// (any S3-compatible endpoint), other fsspec."""
from __future__ import annotations

import re
import secrets
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import fsspec
from fsspec import AbstractFileSystem

from segmill.pipeline.common import settings

_SECRET_QUERY = re.compile(
    r"(?i)([?&][^=&\s\"']*(?:token|secret|key|signature|password|credential|sig|sas)[^=&\s\"']*=)[^&\s\"']+"
)
_HTTP_URL = re.compile(r"(?i)https?://[^\s\"']+")  # where query strings carry credentials (pre-signed URLs)


def open_fs(uri: str, *, endpoint_url: str | None = None) -> tuple[AbstractFileSystem, str]:
    """Return (filesystem, path inside it) for `uri`; S3 honours `endpoint_url` or $AWS_ENDPOINT_URL."""
    options: dict[str, Any] = {}
    if uri.startswith(("s3://", "s3a://")):
        endpoint = settings.endpoint_url(endpoint_url)
        if endpoint:
            options["endpoint_url"] = endpoint
        # Transient failures (500, 503 SlowDown, throttling, resets) are retried with backoff by botocore itself.
        options["config_kwargs"] = {"retries": {"max_attempts": settings.s3_attempts(), "mode": "standard"}}
    fs, path = fsspec.core.url_to_fs(uri, **options)
    return fs, path


def join_uri(base: str, *parts: str) -> str:
    """Join path parts with '/', keeping the scheme (works for local paths and URIs alike)."""
    joined = base.rstrip("/")
    for part in parts:
        joined += "/" + part.strip("/")
    return joined


def protocol_of(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else "file"


def with_protocol(fs: AbstractFileSystem, path: str) -> str:
    """Turn a path returned by `fs` back into a full URI (fsspec strips the scheme)."""
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if protocol in ("file", "local"):
        return path
    return f"{protocol}://{path}"


def redact(text: str) -> str:
    """Remove credentials from a URI or message: user:password@ in URLs, and secret-looking query values of http(s)
    URLs (pre-signed ones). Local paths and other URIs keep their names whole: `x?sig=1.png` is a file's name."""

    def _strip_userinfo(match: re.Match) -> str:
        parts = urlsplit(match.group(0))
        host = parts.hostname or ""
        if parts.port:
            host += f":{parts.port}"
        return urlunsplit((parts.scheme, host, parts.path, parts.query, parts.fragment))

    text = re.sub(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^/\s@\"']+@[^\s\"']*", _strip_userinfo, text)
    return _HTTP_URL.sub(lambda m: _SECRET_QUERY.sub(r"\1***", m.group(0)), text)


def redact_values(value: Any) -> Any:
    """`redact` applied to every string inside nested dicts and lists (e.g. a job spec before it is recorded)."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: redact_values(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_values(v) for v in value]
    return value


def arrow_filesystem(uri: str, endpoint_url: str | None = None):
    """(pyarrow filesystem, path) for `uri`, wrapping our fsspec filesystem so endpoints and credentials match."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = open_fs(uri, endpoint_url=endpoint_url)
    return PyFileSystem(FSSpecHandler(fs)), path


def first_line(exc: BaseException) -> str:
    """An exception's first line, redacted and cut to 200 characters: enough for a one-sentence error."""
    return redact((str(exc).splitlines() or [""])[0])[:200]


def check_listable(uri: str, what: str, endpoint_url: str | None = None) -> None:
    """`uri` exists and, when it is a folder, can be listed; else one ValueError sentence starting with `what`."""
    try:
        fs, path = open_fs(uri, endpoint_url=endpoint_url)
        if not fs.exists(path):
            raise ValueError(f"{what} {redact(uri)} does not exist.")
        if fs.isdir(path):
            fs.ls(path, detail=False)
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"{what} {redact(uri)} cannot be listed ({type(exc).__name__}: {first_line(exc)}).") from None


def check_writable(uri: str, what: str, endpoint_url: str | None = None) -> None:
    """A probe file can be written under `uri` and removed (a folder made for the probe is removed too); else one
    ValueError sentence starting with `what`. Run before any work, so a job never fails at its first write."""
    try:
        fs, path = open_fs(uri, endpoint_url=endpoint_url)
        existed = fs.exists(path)
        probe = join_uri(path, f".segmill-write-probe-{secrets.token_hex(4)}")
        fs.makedirs(path, exist_ok=True)
        with fs.open(probe, "wb") as f:
            f.write(b"ok")
        fs.rm(probe)
        if not existed and fs.isdir(path) and not fs.ls(path, detail=False):
            fs.rmdir(path)
    except Exception as exc:
        raise ValueError(f"{what} {redact(uri)} cannot be written ({type(exc).__name__}: {first_line(exc)}).") from None

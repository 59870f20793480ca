"""Where things are: local paths, ``file://`` and fsspec URLs (``s3://``, ``gs://``, ...).

One place for the location helpers every layer needs: is a location local, its absolute
form, its parent and joins, the fsspec filesystem behind it, and the redacted form that may
appear in logs, attributes and errors (never user-info or a presigned query string).
"""

from __future__ import annotations

import json
import os
import posixpath
import re
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

__all__ = [
    "SCHEME_RE",
    "is_local",
    "join_location",
    "local_path",
    "normalise_location",
    "parent_location",
    "parse_storage_options",
    "redact_uri",
    "resolve_uri",
    "url_to_fs",
]

#: ``scheme://`` at the start of a URL (group 1: the scheme).
SCHEME_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def redact_uri(uri: str | None) -> str:
    """The URI without user-info or query string, safe for logs, attributes and errors.

    Why: a URL such as ``https://user:pass@host/x.jpg`` or a presigned
    ``...?X-Amz-Signature=...`` must never reach a stored error message.
    """
    if uri is None:
        return "<inline image>"
    if not SCHEME_RE.match(uri):
        return uri
    parts = urlsplit(uri)
    if "@" not in parts.netloc and not parts.query:
        return uri
    netloc = parts.netloc.rsplit("@", 1)[-1]  # drop "user:password@", keep case and port
    query = "<redacted>" if parts.query else ""
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def is_local(uri: str) -> bool:
    """True for plain paths and ``file://`` URLs."""
    m = SCHEME_RE.match(uri)
    return m is None or m.group(1).lower() in ("file", "local")


def local_path(uri: str) -> str:
    """``file:///a/b`` (or ``file://localhost/a/b``) -> ``/a/b``; plain paths: ``~`` expanded."""
    m = SCHEME_RE.match(uri)
    if m is None:
        return os.path.expanduser(uri)
    rest = uri[m.end() :]
    if not rest.startswith("/"):  # file://host/path: the host part is dropped
        rest = "/" + rest.partition("/")[2]
    return rest


def normalise_location(uri: str | os.PathLike[str]) -> str:
    """Absolute local path (``file://`` stripped) or the URL unchanged (minus trailing /)."""
    uri = os.fspath(uri)
    if is_local(uri):
        return os.path.abspath(local_path(uri))
    return uri.rstrip("/")


def url_to_fs(loc: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    """The fsspec filesystem of a (remote) location and the path inside it, no trailing /."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(loc, **(storage_options or {}))
    return fs, root.rstrip("/")


def parent_location(location: str) -> str:
    """The folder holding ``location`` (a local path or a URL)."""
    if is_local(location):
        return os.path.dirname(location)
    m = SCHEME_RE.match(location)
    assert m is not None
    head, rest = location[: m.end()], location[m.end() :]
    return head + posixpath.dirname(rest)


def join_location(base: str, rel: str) -> str:
    """``rel`` relative to directory ``base`` (local dir or URL), normalised."""
    if is_local(base):
        return os.path.normpath(os.path.join(base, rel))
    m = SCHEME_RE.match(base)
    assert m is not None
    head, rest = base[: m.end()], base[m.end() :]
    return head + posixpath.normpath(posixpath.join(rest, rel))


def resolve_uri(uri: str | None, base: str) -> str | None:
    """A stored uri -> what ``read_bytes`` needs: absolute path or full URL."""
    if uri is None:
        return None
    if SCHEME_RE.match(uri):
        return os.path.normpath(local_path(uri)) if is_local(uri) else uri
    if uri.startswith("~"):
        return os.path.expanduser(uri)
    if os.path.isabs(uri):
        return os.path.normpath(uri)
    return join_location(base, uri)


def parse_storage_options(pairs: Sequence[str] | None) -> dict[str, Any] | None:
    """``KEY=VALUE`` strings (``--storage-option``, repeatable) -> fsspec options; values
    that parse as JSON are decoded (``anon=true`` -> ``True``). Raises ``ValueError``."""
    if not pairs:
        return None
    out: dict[str, Any] = {}
    for p in pairs:
        key, sep, value = p.partition("=")
        if not sep or not key:
            raise ValueError(f"--storage-option expects KEY=VALUE, got {p!r}")
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out

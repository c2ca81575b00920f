"""Downloads treated as hostile input: URL scheme checks, size limits, atomic writes, safe bundle extraction.

- `check_url` allows `https://` always and `http://` only to 127.0.0.1 / localhost / ::1 when the caller opts in
  (the local emulator); everything else (`file://`, `gs://`, `ftp://`, remote http) is a ValueError.
- `fetch_url` follows redirects by hand so every hop is checked, streams into a temp file next to `dest`,
  aborts past `max_bytes` or its `Deadline` (checked after every read from the socket, so a body that drips a byte
  at a time is cut as surely as an endless one), checks Content-Length, fsyncs and `os.replace`s. HTTP errors raise
  ProviderError subclasses (403 from an expired signed URL is AuthError); a cut body raises ProviderUnavailable;
  going past a bound raises `DownloadRefused` (a ValueError). Nothing of a refused download is left on disk.
- `extract_jsonl_bundle` turns a plain JSONL, zip, tar(.gz) or gzip file into files under `out_dir`, refusing
  absolute / `..` / link / too deep members, too many members and too many bytes. A plain file is returned untouched.
Messages show URLs without their query string, because signed URLs carry credentials there.
"""

from __future__ import annotations

import gzip
import os
import re
import stat
import tarfile
import uuid
import zipfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import IO
from urllib.parse import urljoin, urlsplit

import requests
import urllib3

from pipeline.providers.errors import ProviderError, ProviderUnavailable, error_for_status
from pipeline.providers.limits import Deadline, DownloadRefused

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
MAX_REDIRECTS = 5
MAX_MEMBER_DEPTH = 8  # path components of a bundle member: result bundles are flat or one folder deep
MAX_MEMBER_NAME = 255  # bytes per path component, the common file-system limit
_CHUNK = 1 << 16
_DRIVE = re.compile(r"^[A-Za-z]:")


def redact_url(url: str) -> str:
    """`scheme://host/path` without query or fragment (signed URLs carry their signature in the query)."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}{parts.path}" if parts.scheme else parts.path


def is_loopback_url(url: str) -> bool:
    return (urlsplit(url).hostname or "").lower() in LOOPBACK_HOSTS


def check_url(url: str, *, allow_loopback_http: bool) -> None:
    """Raise ValueError unless `url` is https, or http to a loopback host with `allow_loopback_http`."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme == "https" and parts.hostname:
        return
    if scheme == "http" and allow_loopback_http and is_loopback_url(url):
        return
    if scheme == "http":
        hint = "" if allow_loopback_http else " (loopback http is not enabled)"
        raise ValueError(f"refusing http URL {redact_url(url)}: only https or loopback http is allowed{hint}")
    raise ValueError(f"refusing URL scheme {scheme + '://' if scheme else '(none)'} in {redact_url(url)!r}: "
                     "only https (or loopback http for the emulator) is allowed")


@contextmanager
def _atomic_writer(dest: Path) -> Iterator[IO[bytes]]:
    """A file handle on a temp file beside `dest`; renamed onto `dest` only if the block finishes."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:12]}.part")
    try:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)


def origin(url: str) -> tuple[str, str]:
    """(scheme, host[:port]) of `url`, lowercased: where credentials given for it may be sent."""
    parts = urlsplit(url)
    return parts.scheme.lower(), parts.netloc.lower()


def _open_following_redirects(http: requests.Session, url: str, *, timeout: tuple[float, float],
                              allow_loopback_http: bool, deadline: Deadline | None,
                              headers: Mapping[str, str] | None = None) -> requests.Response:
    current = url
    for _ in range(MAX_REDIRECTS + 1):
        # Credentials go only to the origin they were given for, never to where a redirect points.
        sent = dict(headers or {}) if origin(current) == origin(url) else {}
        if deadline is not None:
            deadline.check(f"GET {redact_url(current)}")
            # No single wait on the socket may outlast the deadline either.
            timeout = (timeout[0], max(0.05, min(timeout[1], deadline.left())))
        try:
            resp = http.get(current, stream=True, timeout=timeout, allow_redirects=False, headers=sent)
        except requests.RequestException as exc:
            raise ProviderUnavailable(0, None, f"GET {redact_url(current)}: {type(exc).__name__}") from exc
        if not resp.is_redirect:
            return resp
        location = urljoin(current, resp.headers.get("Location", ""))
        resp.close()
        check_url(location, allow_loopback_http=allow_loopback_http)
        current = location
    raise ProviderError(0, None, f"GET {redact_url(url)}: more than {MAX_REDIRECTS} redirects")


def fetch_url(url: str, dest: Path, *, max_bytes: int, timeout: tuple[float, float], allow_loopback_http: bool,
              session: requests.Session | None = None, deadline: Deadline | None = None,
              headers: Mapping[str, str] | None = None) -> int:
    """Download `url` into `dest` atomically; return the number of bytes written.

    `headers` (e.g. an API's auth headers) go only to hops on the origin of `url`, never past a redirect to another
    origin; without them nothing is added (signed URLs carry their own credentials). More than `max_bytes`,
    announced or sent, or a body unfinished at `deadline`, raises DownloadRefused."""
    check_url(url, allow_loopback_http=allow_loopback_http)
    http = session
    if http is None:
        http = requests.Session()
        # Environment proxies must not intercept traffic to the local emulator.
        http.trust_env = not is_loopback_url(url)
    try:
        resp = _open_following_redirects(http, url, timeout=timeout, allow_loopback_http=allow_loopback_http,
                                         deadline=deadline, headers=headers)
        with resp:
            shown = redact_url(resp.url or url)
            if resp.status_code != 200:
                raise error_for_status(resp.status_code, None, f"GET {shown}: download failed ({resp.reason})")
            declared = _content_length(resp)
            if declared is not None and declared > max_bytes:
                raise DownloadRefused(f"GET {shown}: Content-Length {declared} exceeds the limit of {max_bytes} bytes")
            return _stream_to(resp, dest, shown=shown, declared=declared, max_bytes=max_bytes, deadline=deadline)
    finally:
        if session is None:
            http.close()


def _content_length(resp: requests.Response) -> int | None:
    # With a Content-Encoding the header counts compressed bytes, not what iter_content yields.
    if resp.headers.get("Content-Encoding", "identity").lower() != "identity":
        return None
    try:
        return int(resp.headers["Content-Length"])
    except (KeyError, ValueError):
        return None


def _stream_to(resp: requests.Response, dest: Path, *, shown: str, declared: int | None, max_bytes: int,
               deadline: Deadline | None) -> int:
    written = 0
    with _atomic_writer(dest) as fh:
        try:
            # read1 returns what one read from the socket gave, so the bounds are checked between any two reads.
            while chunk := resp.raw.read1(_CHUNK, decode_content=True):
                written += len(chunk)
                if written > max_bytes:
                    raise DownloadRefused(f"GET {shown}: body exceeds the limit of {max_bytes} bytes")
                if deadline is not None:
                    deadline.check(f"GET {shown}: {written:,} bytes received")
                fh.write(chunk)
        except (requests.RequestException, urllib3.exceptions.HTTPError, OSError) as exc:
            if deadline is not None:
                deadline.check(f"GET {shown}: {written:,} bytes received")
            raise ProviderUnavailable(0, None, f"GET {shown}: body cut after {written} bytes "
                                               f"({type(exc).__name__})") from exc
        if declared is not None and written != declared:
            raise ProviderUnavailable(0, None, f"GET {shown}: got {written} bytes, Content-Length said {declared}")
    return written


# ---------------------------------------------------------------------------------------------- bundles


def _sniff(path: Path) -> str:
    with open(path, "rb") as fh:
        head = fh.read(512)
    if head[:4] in (b"PK\x03\x04", b"PK\x05\x06"):
        return "zip"
    if head[:2] == b"\x1f\x8b":
        try:
            with gzip.open(path, "rb") as gz:
                inner = gz.read(512)
        except (OSError, EOFError) as exc:
            raise ValueError(f"{path}: corrupt gzip data ({exc})") from exc
        return "tar" if inner[257:262] == b"ustar" else "gzip"
    if head[257:262] == b"ustar":
        return "tar"
    return "plain"


def _safe_relpath(name: str, bundle: Path) -> PurePosixPath:
    if "\\" in name or _DRIVE.match(name):
        raise ValueError(f"{bundle}: member {name!r} uses a Windows path, refused")
    rel = PurePosixPath(name)
    if rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"{bundle}: member {name!r} is absolute or contains '..', refused")
    parts = [p for p in rel.parts if p not in ("", ".")]
    if not parts:
        raise ValueError(f"{bundle}: member with empty name, refused")
    if any(len(p.encode("utf-8", "surrogateescape")) > MAX_MEMBER_NAME for p in parts):
        raise ValueError(f"{bundle}: member {name[:120]!r}… has a name longer than {MAX_MEMBER_NAME} bytes, refused")
    if len(parts) > MAX_MEMBER_DEPTH:
        raise ValueError(f"{bundle}: member {name[:120]!r} is {len(parts)} folders deep (at most {MAX_MEMBER_DEPTH}), "
                         "refused")
    return PurePosixPath(*parts)


class _Budget:
    """Counts extracted bytes across members so a lying header cannot exceed max_total_bytes."""

    def __init__(self, bundle: Path, max_total_bytes: int) -> None:
        self.bundle = bundle
        self.left = max_total_bytes
        self.limit = max_total_bytes

    def copy(self, src: IO[bytes], dest: Path) -> None:
        with _atomic_writer(dest) as out:
            while chunk := src.read(_CHUNK):
                self.left -= len(chunk)
                if self.left < 0:
                    raise ValueError(f"{self.bundle}: extracted data exceeds {self.limit} bytes, refused")
                out.write(chunk)


def _plan(bundle: Path, out_dir: Path, names: list[str], sizes: list[int], *, max_members: int,
          max_total_bytes: int) -> list[Path]:
    """Check every member before anything is written; return their destination paths."""
    if len(names) > max_members:
        raise ValueError(f"{bundle}: {len(names)} members exceed the limit of {max_members}")
    if sum(sizes) > max_total_bytes:
        raise ValueError(f"{bundle}: members declare {sum(sizes)} bytes, above the limit of {max_total_bytes}")
    targets = [out_dir.joinpath(*_safe_relpath(n, bundle).parts) for n in names]
    if len(set(targets)) != len(targets):
        raise ValueError(f"{bundle}: duplicate member names, refused")
    if bundle.resolve() in {t.resolve() for t in targets}:
        raise ValueError(f"{bundle}: a member would overwrite the bundle itself, refused")
    return targets


def _extract_zip(bundle: Path, out_dir: Path, max_members: int, max_total_bytes: int) -> list[Path]:
    with zipfile.ZipFile(bundle) as zf:
        infos = zf.infolist()
        if len(infos) > max_members:
            raise ValueError(f"{bundle}: {len(infos)} members exceed the limit of {max_members}")
        for info in infos:
            if stat.S_ISLNK(info.external_attr >> 16):
                raise ValueError(f"{bundle}: member {info.filename!r} is a symlink, refused")
        files = [i for i in infos if not i.is_dir()]
        targets = _plan(bundle, out_dir, [i.filename for i in files], [i.file_size for i in files],
                        max_members=max_members, max_total_bytes=max_total_bytes)
        budget = _Budget(bundle, max_total_bytes)
        for info, target in zip(files, targets, strict=True):
            with zf.open(info) as src:
                budget.copy(src, target)
    return targets


def _tar_members(tf: tarfile.TarFile, bundle: Path, max_members: int) -> list[tarfile.TarInfo]:
    members: list[tarfile.TarInfo] = []
    for member in tf:
        members.append(member)
        if len(members) > max_members:
            raise ValueError(f"{bundle}: more than {max_members} members, refused")
        if not (member.isfile() or member.isdir()):
            raise ValueError(f"{bundle}: member {member.name!r} is a link or special file, refused")
    return members


def _extract_tar(bundle: Path, out_dir: Path, max_members: int, max_total_bytes: int) -> list[Path]:
    try:
        with tarfile.open(bundle, "r:*") as tf:
            files = [m for m in _tar_members(tf, bundle, max_members) if m.isfile()]
            targets = _plan(bundle, out_dir, [m.name for m in files], [m.size for m in files],
                            max_members=max_members, max_total_bytes=max_total_bytes)
            budget = _Budget(bundle, max_total_bytes)
            for member, target in zip(files, targets, strict=True):
                src = tf.extractfile(member)
                if src is None:
                    raise ValueError(f"{bundle}: member {member.name!r} has no data")
                with src:
                    budget.copy(src, target)
    except tarfile.TarError as exc:
        raise ValueError(f"{bundle}: corrupt tar archive ({exc})") from exc
    return targets


def _extract_gzip(bundle: Path, out_dir: Path, max_total_bytes: int) -> list[Path]:
    stem = bundle.name[:-3] if bundle.name.endswith(".gz") else bundle.name
    target = out_dir / stem
    if target.resolve() == bundle.resolve():
        target = out_dir / f"{stem}.extracted"
    try:
        with gzip.open(bundle, "rb") as src:
            _Budget(bundle, max_total_bytes).copy(src, target)
    except (OSError, EOFError) as exc:
        raise ValueError(f"{bundle}: corrupt gzip data ({exc})") from exc
    return [target]


def extract_jsonl_bundle(path: Path, out_dir: Path, *, max_members: int = 1000,
                         max_total_bytes: int = 4 * 1024**3) -> list[Path]:
    """The files inside a downloaded result bundle (see module docstring); `[path]` for a plain file."""
    kind = _sniff(path)
    if kind == "plain":
        return [path]
    out_dir.mkdir(parents=True, exist_ok=True)
    if kind == "zip":
        try:
            return _extract_zip(path, out_dir, max_members, max_total_bytes)
        except zipfile.BadZipFile as exc:
            raise ValueError(f"{path}: corrupt zip archive ({exc})") from exc
    if kind == "tar":
        return _extract_tar(path, out_dir, max_members, max_total_bytes)
    return _extract_gzip(path, out_dir, max_total_bytes)


"""Content fingerprints with a stat short-cut.

Checksums decide whether an input changed; size + mtime + inode only decide whether the checksum must be
recomputed (ARCHITECTURE §2), so a no-op resume costs one `stat()` per artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


@dataclass(frozen=True)
class Fingerprint:
    size: int
    mtime_ns: int
    sha256: str

    def as_dict(self) -> dict[str, int | str]:
        return {"size": self.size, "mtime_ns": self.mtime_ns, "sha256": self.sha256}


_cache: dict[str, tuple[tuple[int, int, int], str]] = {}


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fingerprint(path: Path, known: dict | None = None) -> Fingerprint | None:
    """The file's fingerprint, or None when it does not exist.

    `known` is a previously recorded fingerprint dict (`size`, `mtime_ns`, `sha256`); when the stat matches it,
    its checksum is trusted instead of re-reading the file.
    """
    try:
        st = os.stat(path)
    except OSError:
        return None
    key = (st.st_size, st.st_mtime_ns, st.st_ino)
    if known and known.get("size") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns and known.get("sha256"):
        return Fingerprint(st.st_size, st.st_mtime_ns, str(known["sha256"]))
    cached = _cache.get(str(path))
    if cached and cached[0] == key:
        return Fingerprint(st.st_size, st.st_mtime_ns, cached[1])
    sha = sha256_file(path)
    _cache[str(path)] = (key, sha)
    return Fingerprint(st.st_size, st.st_mtime_ns, sha)


def current_sha(path: Path, known: dict | None = None) -> str | None:
    fp = fingerprint(path, known)
    return fp.sha256 if fp else None


def request_checksum(input_sha256: str, model: str, inference_parameters: dict[str, Any]) -> str:
    """sha256 of everything a part's requests send: the request lines' bytes (every message, the system prompt and
    task instructions included, and the custom_ids), the model, and every inference parameter (stop, n included).

    Equal checksums mean byte-identical requests: the only case in which results or remote jobs are reused.
    """
    text = "\x1f".join([input_sha256, model, json.dumps(inference_parameters, sort_keys=True)])
    return hashlib.sha256(text.encode()).hexdigest()

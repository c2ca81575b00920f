"""File bodies the emulator serves on signed download URLs: the stored file, or a hostile variant of it.

A `Payload` announces `size` (the Content-Length) and yields its bytes in chunks; when the chunks add up to
another length than `size`, the HTTP layer closes the connection after them, so the client sees a body cut short
(fewer bytes) or bytes past the announced end (more). `size=None` announces no length: the body goes out with
`Transfer-Encoding: chunked`, possibly without end. `pace_s > 0` makes the HTTP layer wait that long before every
chunk after the first. The large variants (`oversized`, `zip_bomb`, `gzip_bomb`, `endless`, `tar_bomb`) are
generated while streaming and never held in memory whole.
"""

from __future__ import annotations

import functools
import io
import json
import random
import struct
import tarfile
import zipfile
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

CHUNK = 1 << 16
PAD_LINE_BYTES = 1024
GARBAGE_LINE_BYTES = 80
_ZIP_BLOCK = 1 << 20
_DOS_DATE = (0 << 9) | (1 << 5) | 1  # 1980-01-01, the zip epoch
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff"  # deflate, no flags, no mtime, max compression, OS unknown
_TAR_BLOCK = tarfile.BLOCKSIZE
_TAR_RECORD = tarfile.RECORDSIZE
_TAR_NAME_FIELD = 100
_TAR_TEMPLATE = tarfile.TarInfo("x").tobuf(tarfile.GNU_FORMAT)
_TAR_BATCH = 256


@dataclass(frozen=True)
class Payload:
    """`size` bytes announced (None: no length, sent chunked); `chunks` may add up to another length (a lying
    length); `pace_s` seconds pass between chunks."""

    size: int | None
    chunks: Iterable[bytes]
    pace_s: float = 0.0


def file_payload(path: Path) -> Payload:
    def chunks() -> Iterator[bytes]:
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                yield chunk

    return Payload(path.stat().st_size, chunks())


def bytes_payload(data: bytes) -> Payload:
    return Payload(len(data), [data])


def truncated(data: bytes, mode: str) -> Payload:
    """`data` cut inside its middle line. `cut_connection`: the full size is announced and the connection closes
    early; `short_body`: the announced size is the cut length, so only the content shows the damage."""
    lines = data.splitlines(keepends=True)
    cut = 0
    if lines:
        middle = len(lines) // 2
        cut = sum(map(len, lines[:middle])) + max(1, len(lines[middle].rstrip(b"\r\n")) // 2)
    return Payload(len(data) if mode == "cut_connection" else cut, [data[:cut]])


def garbage(rand: random.Random, size: int) -> Payload:
    """`size` random bytes in lines that each start with 0xFF, so no line decodes as UTF-8, let alone JSON."""
    raw = bytearray(rand.randbytes(size).replace(b"\n", b"\xff"))
    raw[0::GARBAGE_LINE_BYTES] = b"\xff" * len(range(0, size, GARBAGE_LINE_BYTES))
    raw[GARBAGE_LINE_BYTES - 1::GARBAGE_LINE_BYTES] = b"\n" * len(range(GARBAGE_LINE_BYTES - 1, size, GARBAGE_LINE_BYTES))
    return bytes_payload(bytes(raw))


def _pad_line(n: int, length: int) -> bytes:
    head = b'{"custom_id":"padding-%012d","response":{"choices":[{"index":0,"message":{"role":"assistant","content":"' % n
    tail = b'"}}]}}\n'
    if length < len(head) + len(tail):
        return b" " * (length - 1) + b"\n"
    return head + b"x" * (length - len(head) - len(tail)) + tail


def oversized(data: bytes, size: int) -> Payload:
    """Exactly `size` bytes: `data` (when it fits) followed by result-shaped JSONL padding lines."""
    head = data if len(data) <= size else b""

    def chunks() -> Iterator[bytes]:
        yield head
        left = size - len(head)
        n = 0
        while left > 0:
            batch = []
            for _ in range(64):
                if left <= 0:
                    break
                line = _pad_line(n, min(PAD_LINE_BYTES, left))
                batch.append(line)
                left -= len(line)
                n += 1
            yield b"".join(batch)

    return Payload(size, chunks())


def _deflate(data: bytes, *, final: bool) -> bytes:
    # A fresh raw-deflate stream per block, ended by a full flush: its output does not refer back to earlier
    # blocks, so copies of one block's output can be concatenated into a valid stream.
    co = zlib.compressobj(9, zlib.DEFLATED, -15)
    return co.compress(data) + co.flush(zlib.Z_FINISH if final else zlib.Z_FULL_FLUSH)


@functools.lru_cache(maxsize=8)
def _zeros_deflated(size: int) -> tuple[bytes, int, bytes, int]:
    """(block, copies, tail, crc32): `block * copies + tail` is the raw deflate stream of `size` zero bytes."""
    copies, rest = divmod(size, _ZIP_BLOCK)
    zeros = bytes(_ZIP_BLOCK)
    crc = 0
    for _ in range(copies):
        crc = zlib.crc32(zeros, crc)
    crc = zlib.crc32(bytes(rest), crc)
    block = _deflate(zeros, final=False) if copies else b""
    return block, copies, _deflate(bytes(rest), final=True), crc


def zip_bomb(size: int, member: str = "BIJOutputSet.jsonl") -> Payload:
    """A zip whose single member inflates to `size` zero bytes (< 4 GiB); about size/1000 bytes on the wire."""
    block, copies, tail, crc = _zeros_deflated(size)
    packed = len(block) * copies + len(tail)
    name = member.encode()
    local = struct.pack("<IHHHHHIIIHH", 0x04034B50, 20, 0, 8, 0, _DOS_DATE, crc, packed, size, len(name), 0) + name
    central = struct.pack("<IHHHHHHIIIHHHHHII", 0x02014B50, 20, 20, 0, 8, 0, _DOS_DATE, crc, packed, size,
                          len(name), 0, 0, 0, 0, 0, 0) + name
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(local) + packed, 0)

    def chunks() -> Iterator[bytes]:
        yield local
        for _ in range(copies):
            yield block
        yield tail + central + end

    return Payload(len(local) + packed + len(central) + len(end), chunks())


def gzip_bomb(size: int) -> Payload:
    """A single gzip stream (magic 1f 8b) that inflates to `size` zero bytes; about size/1000 bytes on the wire.

    The deflate block of 1 MiB of zeros is compressed once and repeated, so nothing large is ever in memory; the
    CRC of the zeros is computed once per size (about 0.7 s per GiB) and cached."""
    block, copies, tail, crc = _zeros_deflated(size)
    trailer = struct.pack("<II", crc, size & 0xFFFFFFFF)  # ISIZE is the length modulo 2**32 (RFC 1952)

    def chunks() -> Iterator[bytes]:
        yield _GZIP_HEADER
        for _ in range(copies):
            yield block
        yield tail + trailer

    return Payload(len(_GZIP_HEADER) + len(block) * copies + len(tail) + len(trailer), chunks())


def endless(data: bytes, chunk_bytes: int) -> Payload:
    """`data`, then result-shaped JSONL padding lines without end, in chunks of `chunk_bytes`; no length announced."""

    def chunks() -> Iterator[bytes]:
        for start in range(0, len(data), chunk_bytes):
            yield data[start:start + chunk_bytes]
        pending = bytearray()
        n = 0
        while True:
            while len(pending) < chunk_bytes:
                pending += _pad_line(n, PAD_LINE_BYTES)
                n += 1
            yield bytes(pending[:chunk_bytes])
            del pending[:chunk_bytes]

    return Payload(None, chunks())


def lying_length(data: bytes, direction: str, extra_bytes: int | None) -> Payload:
    """`data` under a Content-Length that lies by `extra_bytes`.

    `over`: announces `len(data) + extra_bytes` (default: twice the length) and sends `data`, so the connection
    closes before the announced end. `under`: announces half of `data` (less when that ends a row), then
    writes `extra_bytes` more (default: the rest of `data`; past its end, padding lines as in `oversized`) before
    closing."""
    if direction == "over":
        return Payload(len(data) + (max(len(data), 1) if extra_bytes is None else extra_bytes), [data])
    declared = len(data) // 2
    # The announced part always ends inside a line, so what a client believes is the whole body is visibly corrupt.
    # Half of a file of equal-length rows often ended exactly on a line boundary (found by the hostile-download matrix
    # on the Anthropic results), which made the case a different one: a shorter but valid file (`missing_results`).
    # A cut just before a newline is no better (a complete row without its newline), so such a cut moves to the
    # middle of that row.
    if declared > 1 and b"\n" in data[declared - 1:declared + 1]:
        start = data.rfind(b"\n", 0, declared - 1) + 1
        declared = start + max((declared - start) // 2, 1)
    sent = len(data) if extra_bytes is None else declared + extra_bytes
    return Payload(declared, [data[:sent]] if sent <= len(data) else oversized(data, sent).chunks)


def _tar_header(name: bytes, size: int, typeflag: bytes = tarfile.REGTYPE) -> bytes:
    # Patching a prepared header is ~20x faster than TarInfo.tobuf, which matters at 100000 members.
    header = bytearray(_TAR_TEMPLATE)
    header[0:_TAR_NAME_FIELD] = name[:_TAR_NAME_FIELD].ljust(_TAR_NAME_FIELD, b"\0")
    header[124:136] = b"%011o\0" % size
    header[156:157] = typeflag
    header[148:156] = b" " * 8  # the checksum is computed with its own field as spaces
    header[148:156] = b"%06o\0 " % sum(header)
    return bytes(header)


def _tar_padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % _TAR_BLOCK)


def _tar_member(name: bytes, content: bytes) -> bytes:
    """One regular-file member; a name too long for the header goes first in a GNU long-name member (as tarfile)."""
    head = b""
    if len(name) > _TAR_NAME_FIELD:
        head = _tar_header(b"././@LongLink", len(name) + 1, tarfile.GNUTYPE_LONGNAME) + _tar_padded(name + b"\0")
    return head + _tar_header(name, len(content)) + _tar_padded(content)


def tar_bomb(members: int, depth: int, member_bytes: int, *, gzip: bool) -> Payload:
    """A tar (gzip-compressed when `gzip`) of `members` files of `member_bytes` bytes each, named
    `a/` x `depth` + `part-<n>.jsonl`; generated while streaming, sent chunked (its length is only known once
    generated)."""
    prefix = b"a/" * depth

    def raw() -> Iterator[bytes]:
        written = 0
        for start in range(0, members, _TAR_BATCH):
            batch = b"".join(_tar_member(prefix + b"part-%06d.jsonl" % n, _pad_line(n, member_bytes))
                             for n in range(start, min(start + _TAR_BATCH, members)))
            written += len(batch)
            yield batch
        end = 2 * _TAR_BLOCK
        yield bytes(end + -(written + end) % _TAR_RECORD)

    def compressed() -> Iterator[bytes]:
        co = zlib.compressobj(6, zlib.DEFLATED, 31)  # wbits 31: gzip framing
        for piece in raw():
            if out := co.compress(piece):
                yield out
        yield co.flush()

    return Payload(None, compressed() if gzip else raw())


def slow_drip(data: bytes, interval_s: float) -> Payload:
    """`data` one byte per chunk, `interval_s` apart, under its true Content-Length."""
    return Payload(len(data), (data[i:i + 1] for i in range(len(data))), pace_s=interval_s)


def traversal(data: bytes, archive: str, member: str) -> Payload:
    """A tar or zip holding `data` as `BIJOutputSet.jsonl` plus one line under the escaping name `member`."""
    evil = json.dumps({"custom_id": "evil", "response": {"choices": [{"message": {"content": "pwned"}}]}}).encode() + b"\n"
    buf = io.BytesIO()
    if archive == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            zf.writestr("BIJOutputSet.jsonl", data)
            zf.writestr(member, evil)
    else:
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for name, content in (("BIJOutputSet.jsonl", data), (member, evil)):
                info = tarfile.TarInfo(name)
                info.size = len(content)
                tf.addfile(info, io.BytesIO(content))
    return bytes_payload(buf.getvalue())


def _custom_id(line: bytes) -> str | None:
    try:
        row = json.loads(line)
    except ValueError:
        return None
    return row.get("custom_id") if isinstance(row, dict) else None


def custom_ids(data: bytes) -> list[str]:
    """The custom_ids of the JSONL result lines in `data`, in order."""
    return [cid for line in data.splitlines() if (cid := _custom_id(line)) is not None]


def without(data: bytes, ids: set[str]) -> bytes:
    """`data` minus the lines whose custom_id is in `ids`."""
    return b"".join(line for line in data.splitlines(keepends=True) if _custom_id(line) not in ids)


def duplicated(data: bytes, *, identical: bool) -> bytes:
    """`data` followed by a second copy of every line; unless `identical`, each copy's answer ends in "(second copy)"."""
    copies = []
    for line in data.splitlines(keepends=True):
        if not identical:
            row = json.loads(line)
            message = row["response"]["choices"][0]["message"]
            message["content"] = f"{message['content']} (second copy)"
            line = json.dumps(row, ensure_ascii=False).encode() + b"\n"
        copies.append(line)
    return data + b"".join(copies)

"""How much a part's download may write, and for how long: bounds derived from what the part can legitimately hold.

A result line answers one request: at most `n × max_tokens` generated tokens plus a fixed envelope (ids, usage,
finish reason, an error message). `BYTES_PER_TOKEN` bounds one token as JSON text: a few characters on average,
and up to 12 bytes per character once non-ASCII text is escaped (`\\uXXXX`, surrogate pairs). So a part of `r`
requests can legitimately produce `r × (n × max_tokens × BYTES_PER_TOKEN + ENVELOPE_BYTES)` bytes, never less than
`FLOOR_BYTES`; `provider.max_download_bytes` may cap it further. The same budget bounds extraction (zip / tar / gzip)
and the CLI fallback. The deadline, unless configured, allows `MIN_RATE` bytes per second plus a fixed start-up.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass
from pathlib import Path

BYTES_PER_TOKEN = 32
ENVELOPE_BYTES = 4096
FLOOR_BYTES = 1 << 20
MIN_RATE = 512 * 1024  # bytes per second a healthy download keeps up at the least
STARTUP_S = 60.0


class DownloadRefused(ValueError):
    """A download went past its byte or time bound, or cannot fit on disk: the output is refused, nothing kept."""


@dataclass(frozen=True)
class DownloadLimits:
    """`max_bytes`: what one download (all its files) and, separately, its extraction may write.
    `deadline_s`: wall-clock bound of one download, retries included."""

    max_bytes: int
    deadline_s: float

    @classmethod
    def for_part(cls, requests: int, *, max_tokens: int, n: int = 1, cap: int | None = None,
                 deadline_s: float | None = None) -> DownloadLimits:
        """The bounds for a part of `requests` lines, each asking for `n` completions of at most `max_tokens`."""
        derived = max(FLOOR_BYTES, requests * (max(n, 1) * max_tokens * BYTES_PER_TOKEN + ENVELOPE_BYTES))
        max_bytes = min(derived, cap) if cap else derived
        return cls(max_bytes, deadline_s if deadline_s else STARTUP_S + max_bytes / MIN_RATE)

    def describe(self) -> str:
        return f"{self.max_bytes:,} bytes within {self.deadline_s:,.0f} s"


class Deadline:
    """A point in monotonic time; `check` raises DownloadRefused once it has passed."""

    def __init__(self, seconds: float, what: str) -> None:
        self.seconds = seconds
        self.what = what
        self.at = time.monotonic() + seconds

    def left(self) -> float:
        return self.at - time.monotonic()

    def check(self, progress: str = "") -> None:
        if self.left() <= 0:
            raise DownloadRefused(f"{self.what}: not finished within its deadline of {self.seconds:g} s"
                                  f"{' (' + progress + ')' if progress else ''}")


def ensure_free_space(folder: Path, needed: int, what: str) -> None:
    """Refuse to start writing up to `needed` bytes under `folder` when the file system has less free space."""
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if free < needed:
        raise DownloadRefused(f"{what} may write up to {needed:,} bytes but {probe} has {free:,} free: free some space, "
                              "or lower provider.max_download_bytes")

"""Names that end up on disk or on the wire: temperature labels, trial slugs, custom_ids, remote ids.

Every function here is pure and deterministic. Formats follow the original system
(`t0`, `t07`, `t10`; `dataset|id|condition|temp|k|type`) and fix its collisions:
0.2 and 0.25 get distinct labels, and slugs are safe path components.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

CONDITIONS = ("control", "treatment")
TYPES = ("closed", "open")
_SAFE_COMPONENT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,119}$")


def temp_str(temp: float) -> str:
    """The temperature as it appears inside a custom_id: `0.7` (original `.1f`), `0.25` when `.1f` would lose digits."""
    one = f"{temp:.1f}"
    if float(one) == float(temp):
        return one
    return repr(float(temp))


def temp_label(temp: float) -> str:
    """Original-compatible label without the `t`: `0`, `07`, `10`, and `025` for 0.25 (never `02`)."""
    text = temp_str(temp)
    return "0" if text == "0.0" else text.replace(".", "")


def group_key(temp: float, condition: str) -> str:
    return f"t{temp_label(temp)}_{condition}"


def job_key(temp: float, condition: str, part: int) -> str:
    """`t{T}_{cond}_p{NN}`: the per-part directory and breadcrumb prefix under a trial's results dir."""
    return f"{group_key(temp, condition)}_p{part:02d}"


def fmt_param(value: float) -> str:
    """Original slug number format: 1.0 -> `1`, 0.95 -> `095`, 0.9 -> `09`, 0.0 -> `0`."""
    text = f"{value:.2f}".replace(".", "").rstrip("0")
    return text or "0"


def is_safe_component(name: str) -> bool:
    """True when `name` can be used as a single path component (no separators, no dot-dot, no leading dot)."""
    return bool(_SAFE_COMPONENT.match(name)) and ".." not in name


@dataclass(frozen=True)
class CustomId:
    """The fields packed into a request's `custom_id`: `dataset|item_id|condition|temp|sample|type`."""

    dataset: str
    item_id: str
    condition: str
    temp: str
    sample_index: int
    type: str

    def __str__(self) -> str:
        return "|".join([self.dataset, self.item_id, self.condition, self.temp, str(self.sample_index), self.type])

    @property
    def item_key(self) -> str:
        return f"{self.dataset}|{self.item_id}"


def make_custom_id(dataset: str, item_id: str, condition: str, temp: float, sample_index: int, type_: str) -> str:
    for field_name, value in (("dataset", dataset), ("item_id", item_id)):
        if "|" in value:
            raise ValueError(f"{field_name} {value!r} contains '|', which custom_ids use as separator")
    return str(CustomId(dataset, item_id, condition, temp_str(temp), sample_index, type_))


def parse_custom_id(text: str) -> CustomId:
    """Inverse of :func:`make_custom_id`; raises ValueError naming what is wrong."""
    parts = text.split("|")
    if len(parts) != 6:
        raise ValueError(f"custom_id {text!r} has {len(parts)} '|'-separated fields, expected 6")
    dataset, item_id, condition, temp, sample, type_ = parts
    if condition not in CONDITIONS:
        raise ValueError(f"custom_id {text!r}: condition {condition!r} is not one of {CONDITIONS}")
    if type_ not in TYPES:
        raise ValueError(f"custom_id {text!r}: type {type_!r} is not one of {TYPES}")
    try:
        float(temp)
        sample_index = int(sample)
    except ValueError as exc:
        raise ValueError(f"custom_id {text!r}: temp/sample fields are not numbers") from exc
    return CustomId(dataset, item_id, condition, temp, sample_index, type_)


def short_hash(*parts: object, length: int = 8) -> str:
    digest = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()
    return digest[:length]


def remote_id(*parts: str, key: str, suffix: str = "") -> str:
    """A deterministic Fireworks resource id: lowercase `[a-z0-9-]`, at most 63 chars, starts with a letter.

    `parts` make it readable, `key` (hashed) makes it unique; `suffix` (e.g. `in`, `out`) survives truncation.
    """
    readable = "-".join(p for p in parts if p)
    readable = re.sub(r"[^a-z0-9-]+", "-", readable.lower())
    readable = re.sub(r"-{2,}", "-", readable).strip("-")
    tail = "-".join(x for x in (short_hash(key, length=10), suffix) if x)
    room = 63 - len(tail) - 1
    head = readable[:room].rstrip("-") or "ex"
    if not head[0].isalpha():
        head = ("ex-" + head)[:room].rstrip("-")
    return f"{head}-{tail}"


ANTHROPIC_ID_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
"""What the Anthropic Message Batches API accepts as a request's `custom_id`."""


def anthropic_id(custom_id: str, part: str = "") -> str:
    """Our custom_id (which holds `|` and `.`) as an Anthropic `custom_id`: `r` + 32 hex digits of its sha256,
    after `p` + 12 hex digits of the sha256 of `part` (the part generation's client key) and `_` when given.

    Deterministic, so the client and the emulator map alike; 128 bits make a collision within a part practically
    impossible, and the client still refuses one when it builds a part's inverse map. The part tag makes a batch's
    results tell whose they are: two parts asking the same questions (other prompts) never share ids."""
    mapped = "r" + hashlib.sha256(custom_id.encode("utf-8")).hexdigest()[:32]
    return f"p{hashlib.sha256(part.encode('utf-8')).hexdigest()[:12]}_{mapped}" if part else mapped

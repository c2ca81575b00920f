"""Map Fireworks batch-job states to the pipeline's five decisions (light module: stdlib only).

`classify(state)` accepts `JOB_STATE_COMPLETED` or `completed` alike. EARLY_STOPPED is classified as
"expired" because, like EXPIRED, it ends the job with partial output that must be collected and accounted
for. Unknown or future states are "in_progress": the caller's own deadline decides when to give up.
"""

from __future__ import annotations

IN_PROGRESS = "in_progress"
COMPLETED = "completed"
FAILED = "failed"
EXPIRED = "expired"
CANCELLED = "cancelled"

_PREFIX = "JOB_STATE_"
_CLASSES = {
    "COMPLETED": COMPLETED,
    "FAILED": FAILED,
    "EXPIRED": EXPIRED,
    "EARLY_STOPPED": EXPIRED,
    "CANCELLED": CANCELLED,
    "CANCELLING": CANCELLED,
    "DELETING": CANCELLED,
    "DELETING_CLEANING_UP": CANCELLED,
}

TERMINAL = frozenset({COMPLETED, FAILED, EXPIRED, CANCELLED})
"""Classes after which polling stops: `classify(state) in TERMINAL`."""


def normalize(state: str) -> str:
    """`"completed"` / `"JOB_STATE_COMPLETED"` -> `"COMPLETED"` (upper case, prefix removed)."""
    text = (state or "").strip().upper()
    return text[len(_PREFIX):] if text.startswith(_PREFIX) else text


def classify(state: str) -> str:
    """One of in_progress / completed / failed / expired / cancelled for a provider job state."""
    return _CLASSES.get(normalize(state), IN_PROGRESS)

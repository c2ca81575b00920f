"""Synchronous OpenAI-compatible chat completions for the emulator: what a local server (Ollama, llama.cpp server,
vLLM) answers at `POST /v1/chat/completions`, the wire format of `pipeline.providers.local`.

`chat_completion(emu, body, request_id)` takes the parsed body and the `X-Client-Request-Id` header (the client's
custom_id) and returns a `chat.completion` with `usage`. The answer is `model.answer(custom_id, messages, key)`,
with the answer key looked up from the custom_id (`parse_custom_id`: dataset / item); a request without the header,
or whose header is not one of our custom_ids, is answered without a key, seeded by a hash of its body. `n` choices
repeat the one answer; an answer of more than `max_tokens` tokens (as `model.answer` counts them) is cut to
`max_tokens` words and ends with `finish_reason` "length".
Any Bearer key, or none, is accepted, as local servers do. Every answered call is counted under `completions` in
`/emulator/calls`, keyed by its custom_id (or `body-<hash>`), so tests can see which requests were sent and how
often. HTTP faults apply (match the path `/v1/chat/completions`); there are no batches, so job faults do not.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING, Any

from pipeline.emulator.wire import ROLES, invalid

if TYPE_CHECKING:
    from pipeline.emulator.api import Emulator

REQUEST_ID_HEADER = "X-Client-Request-Id"
MAX_REQUEST_ID = 512
MAX_N = 16


def _check(body: Any) -> tuple[str, list[dict[str, Any]], int, int | None]:
    """(model, messages, n, max_tokens) of a valid body; ApiError 400 naming the field otherwise."""
    if not isinstance(body, dict):
        raise invalid("request body must be a JSON object")
    name = body.get("model")
    if not isinstance(name, str) or not name:
        raise invalid("model is required")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("messages must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            raise invalid(f"messages[{i}]: role must be one of {', '.join(ROLES)}")
        if not isinstance(message.get("content"), str | list):
            raise invalid(f"messages[{i}]: content must be a string or a list of parts")
    if body.get("stream"):
        raise invalid("stream is not supported by the emulator")
    n = body.get("n", 1)
    if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_N:
        raise invalid(f"n must be an integer in [1, {MAX_N}]")
    max_tokens = body.get("max_tokens")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
        raise invalid("max_tokens must be a positive integer")
    for field in ("temperature", "top_p"):
        value = body.get(field)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise invalid(f"{field} must be a number")
    return name, messages, n, max_tokens


def chat_completion(emu: Emulator, body: Any, request_id: str | None) -> dict[str, Any]:
    """The chat.completion answering `body`; see the module docstring."""
    name, messages, n, max_tokens = _check(body)
    if request_id is not None and len(request_id) > MAX_REQUEST_ID:
        raise invalid(f"{REQUEST_ID_HEADER} is longer than {MAX_REQUEST_ID} characters")
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode("utf-8")
    custom_id = request_id or f"body-{hashlib.sha256(canonical).hexdigest()[:24]}"
    content, finish_reason, usage = emu.answer(custom_id, messages)
    words = content.split()
    if max_tokens is not None and usage["completion_tokens"] > max_tokens:
        content = " ".join(words[:max_tokens])
        finish_reason = "length"
        usage = {**usage, "completion_tokens": max_tokens, "total_tokens": usage["prompt_tokens"] + max_tokens}
    emu.store.count_call("completions", custom_id)
    digest = hashlib.sha256(f"{custom_id}\n".encode() + canonical).hexdigest()[:32]
    choices = [{"index": i, "message": {"role": "assistant", "content": content}, "finish_reason": finish_reason}
               for i in range(n)]
    if n > 1:
        usage = {**usage, "completion_tokens": n * usage["completion_tokens"],
                 "total_tokens": usage["prompt_tokens"] + n * usage["completion_tokens"]}
    return {"id": f"chatcmpl-{digest}", "object": "chat.completion", "created": emu.clock() // 10**9,
            "model": name, "choices": choices, "usage": usage}

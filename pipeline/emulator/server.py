"""A Fireworks-compatible batch-inference HTTP server for offline runs and tests (stdlib only, loopback).

This module is the HTTP layer and the entry points (`make_server`, `main`); the API semantics are in
`pipeline.emulator.api`, the persisted state in `.store`, the wire format in `.wire`, faults in `.faults`.
Routes: `/v1/accounts/{acct}/datasets[/{id}[:verb]]` and `/v1/accounts/{acct}/batchInferenceJobs[/{id}]`
(any non-empty Bearer key; without one a 403 OpenAI-style envelope), the OpenAI Batch API routes
`/v1/files[/{id}[/content]]` and `/v1/batches[/{id}[/cancel]]` (same auth; semantics and OpenAI error envelopes in
`pipeline.emulator.openai_api`), `/signed/<token>/<path>` (no auth: the local stand-in for cloud storage URLs), the
Anthropic Message Batches routes `/v1/messages/batches[/{id}[/cancel|/results]]` (`x-api-key` and
`anthropic-version` headers; semantics in `pipeline.emulator.anthropic_api`), `POST /v1/chat/completions`
(synchronous OpenAI-compatible chat, any Bearer key or none, as local servers accept: `pipeline.emulator.chat_api`),
and inspection routes without auth that faults never touch: `GET /healthz`,
`GET /emulator/calls`, `POST /emulator/reset-calls`, `GET|POST|DELETE /emulator/faults` (read / replace / clear the
fault plan; POST and DELETE reset the rule counters; a bad plan is a 400 and leaves the current one).

The server binds loopback (127.0.0.1) unless told otherwise, and another address only with `--allow-remote`. The
`/emulator/*` control routes answer 403 to any client that is not on loopback (`is_loopback_client`), whatever the
bind address. The signed-URL routes stay open: their HMAC token is issued by the API, so they are as trusted as it.

HTTP faults are checked on every other request once its body is read (match = URL-decoded path, no query):
- `status`: answer `{"code": <gRPC code>, "message", "details": []}` with HTTP `status`, plus `Retry-After`
  when `retry_after` is set; the request is not processed.
- `drop`: close the connection without any response; not processed.
- `drop_after_commit`: process the request fully (its response is discarded), then close without a response.
- `delay`: wait `seconds`, then process; a server shutdown during the wait closes the connection unprocessed.
A file body that ends before or after its announced Content-Length (`truncated`, `lying_length`) is followed by a
close; a body without a length (`endless`, `tar_bomb`) goes out chunked; a paced one (`slow_drip`) waits between
chunks on the server's stop event, so a shutdown ends it. Every connection has its own thread, so a slow or endless
body holds up no other request.
"""

from __future__ import annotations

import argparse
import io
import ipaddress
import json
import logging
import os
import re
import signal
import socket
import threading
import time
import uuid
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

from pipeline.emulator import anthropic_api, openai_api
from pipeline.emulator.api import Emulator
from pipeline.emulator.chat_api import REQUEST_ID_HEADER, chat_completion
from pipeline.emulator.faults import Rule, load_plan_arg
from pipeline.emulator.payloads import Payload
from pipeline.emulator.store import read_json
from pipeline.emulator.wire import ApiError, check_id, invalid, not_found, parse_multipart_file
from targets.atomic import write_json

log = logging.getLogger(__name__)

MAX_MULTIPART_BYTES = 150 * 1024**2
MAX_BODY_BYTES = 512 * 1024**2
GRPC_CODES = {400: 3, 401: 16, 403: 7, 404: 5, 409: 10, 429: 8, 500: 13, 501: 12, 502: 14, 503: 14, 504: 4}
"""gRPC code of an injected `status` fault per HTTP status (grpc-gateway mapping); others get 2 (UNKNOWN)."""


class EmulatorServer(ThreadingHTTPServer):
    """The HTTP front of an `Emulator`; shuts itself down after `idle_exit_s` without requests."""

    daemon_threads = True

    def __init__(self, address: tuple[str, int], emulator: Emulator, idle_exit_s: float | None) -> None:
        super().__init__(address, _Handler)
        self.emulator = emulator
        self.idle_exit_s = idle_exit_s
        self.last_request = time.monotonic()
        self.stopping = threading.Event()
        """Set by shutdown / close; wakes `delay` faults so they do not hold the server up."""
        host, port = self.server_address[:2]
        shown_host = f"[{host}]" if ":" in str(host) else host
        self.base_url = f"http://{shown_host}:{port}"
        emulator.base_url = self.base_url

    def serve_forever(self, poll_interval: float = 0.5) -> None:
        if self.idle_exit_s is not None:
            threading.Thread(target=self._idle_watch, name="emulator-idle", daemon=True).start()
        super().serve_forever(poll_interval)

    def _idle_watch(self) -> None:
        assert self.idle_exit_s is not None
        step = min(1.0, max(self.idle_exit_s / 4, 0.05))
        while not self.stopping.wait(step):
            if time.monotonic() - self.last_request >= self.idle_exit_s:
                log.info("no requests for %.0f s, shutting down", self.idle_exit_s)
                self.shutdown()
                return

    def shutdown(self) -> None:
        self.stopping.set()
        super().shutdown()

    def server_close(self) -> None:
        self.stopping.set()
        super().server_close()


class _Discard(io.RawIOBase):
    """A write-only sink: the response of a `drop_after_commit` request goes here."""

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        return len(data)


def is_loopback_client(addr: str) -> bool:
    """True for a loopback address: 127.0.0.0/8, ::1, or an IPv4-mapped 127.x (`::ffff:127.0.0.1`); False for any
    other address and for anything that is not an IP address (including "" and host names)."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return (mapped or ip).is_loopback


def _loopback_host(host: str) -> bool:
    """True when binding `host` keeps the server on loopback; "localhost" counts, other names do not (no DNS)."""
    return host == "localhost" or is_loopback_client(host)


def _internal(path: str) -> bool:
    return path == "/healthz" or path.startswith("/emulator/")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: EmulatorServer

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without this, Nagle + delayed ACK add ~40 ms per request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def do_GET(self) -> None:  # noqa: N802 (http.server naming)
        self._dispatch("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch("POST")

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch("PUT")

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch("DELETE")

    def do_PATCH(self) -> None:  # noqa: N802
        self._dispatch("PATCH")

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (signature of the base class)
        log.debug("%s " + format, self.address_string(), *args)

    # ---- plumbing

    def _dispatch(self, method: str) -> None:
        self.server.last_request = time.monotonic()
        path = unquote(urlsplit(self.path).path)
        try:
            body = self._read_body()
            rule = None if _internal(path) else self.server.emulator.http_fault(method, path)
            if rule is None:
                self._handle(method, body)
            else:
                self._inject(rule, method, body)
        except ApiError as exc:
            self._send_error(exc)
        except ConnectionError:
            # The client gave up (its timeout ran out during a `delay` fault, or it stopped reading an endless or
            # slow body); nobody is left to answer.
            log.debug("client of %s %s went away", method, path)
            self.close_connection = True
        except Exception:
            log.exception("internal error on %s %s", method, path)
            self.close_connection = True
            self._send_json(500, {"code": 13, "message": "internal error", "details": []})

    def _handle(self, method: str, body: bytes) -> None:
        try:
            self._route(method, body)
        except ApiError as exc:
            self._send_error(exc)

    def _inject(self, rule: Rule, method: str, body: bytes) -> None:
        if rule.fault == "status":
            status = rule.params["status"]
            code = rule.params["code"] if rule.params["code"] is not None else GRPC_CODES.get(status, 2)
            retry_after = rule.params["retry_after"]
            headers = {} if retry_after is None else {"Retry-After": f"{retry_after:g}"}
            self._send_json(status, {"code": code, "message": rule.params["message"], "details": []}, headers)
        elif rule.fault == "drop":
            self.close_connection = True
        elif rule.fault == "drop_after_commit":
            wfile, self.wfile = self.wfile, _Discard()
            try:
                self._handle(method, body)
            finally:
                self.wfile = wfile
                self.close_connection = True
        elif self.server.stopping.wait(rule.params["seconds"]):
            self.close_connection = True
        else:
            self._handle(method, body)

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            return self._read_chunked()
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            self.close_connection = True
            raise ApiError(413, 8, f"request body of {length} bytes is too large")
        return self.rfile.read(length) if length else b""

    def _read_chunked(self) -> bytes:
        chunks = []
        total = 0
        while True:
            size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while self.rfile.readline().strip():
                    pass
                return b"".join(chunks)
            total += size
            if total > MAX_BODY_BYTES:
                self.close_connection = True
                raise ApiError(413, 8, "request body is too large")
            chunks.append(self.rfile.read(size))
            self.rfile.readline()

    def _send_json(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, exc: ApiError) -> None:
        self._send_json(exc.http_status, {"code": exc.code, "message": exc.message, "details": []})

    def _send_payload(self, payload: Payload) -> None:
        """Send `payload` as a 200: with its Content-Length, or chunked when it has none; close the connection when
        the bytes sent differ from the announced length, or when the server stops mid-body. A client that hangs up
        surfaces as a ConnectionError, which `_dispatch` treats as the end of the request."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        chunked = payload.size is None
        if chunked:
            self.send_header("Transfer-Encoding", "chunked")
        else:
            self.send_header("Content-Length", str(payload.size))
        self.end_headers()
        if isinstance(self.wfile, _Discard):
            # A discarded response (drop_after_commit): an endless or paced body would only burn time.
            return
        sent = 0
        for i, chunk in enumerate(payload.chunks):
            # Waiting on the stop event (not sleeping) lets a shutdown end a paced or endless body at once.
            paced = i > 0 and payload.pace_s > 0
            if self.server.stopping.wait(payload.pace_s) if paced else self.server.stopping.is_set():
                self.close_connection = True
                return
            if chunked and chunk:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            elif not chunked:
                self.wfile.write(chunk)
            sent += len(chunk)
        if chunked:
            self.wfile.write(b"0\r\n\r\n")
        elif sent != payload.size:
            # The client must see the stream end other than announced: a cut body, or bytes past its end.
            self.close_connection = True

    def _json(self, body: bytes) -> Any:
        if not body.strip():
            return {}
        try:
            return json.loads(body)
        except ValueError as exc:
            raise invalid(f"request body is not valid JSON: {exc}") from exc

    def _authorized(self) -> bool:
        scheme, _, key = self.headers.get("Authorization", "").partition(" ")
        if scheme.lower() == "bearer" and key.strip():
            return True
        self._send_json(403, {"error": {"message": "The API key you provided is invalid.", "param": None,
                                        "code": "UNAUTHORIZED", "type": "error"}, "request_id": uuid.uuid4().hex})
        return False

    # ---- routes

    def _route(self, method: str, body: bytes) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        if _internal(path):
            self._route_internal(method, path, body)
        elif path.startswith("/signed/"):
            self._route_signed(method, path, body)
        elif openai_api.handles(path):
            if self._authorized():
                try:
                    reply = openai_api.OpenAIApi(self.server.emulator).route(
                        method, path, query, self.headers.get("Content-Type", ""), body)
                except ApiError as exc:
                    self._send_json(exc.http_status, openai_api.envelope(exc))
                else:
                    if isinstance(reply, Payload):
                        self._send_payload(reply)
                    else:
                        self._send_json(200, reply)
        elif path == anthropic_api.PREFIX or path.startswith(anthropic_api.PREFIX + "/"):
            reply = anthropic_api.handle(self.server.emulator, method, path, query, self.headers, body)
            if isinstance(reply, Payload):
                self._send_payload(reply)
            else:
                self._send_json(*reply)
        elif path == "/v1/chat/completions":
            if method != "POST":
                raise ApiError(405, 12, "Method Not Allowed")
            request_id = self.headers.get(REQUEST_ID_HEADER) or None
            self._send_json(200, chat_completion(self.server.emulator, self._json(body), request_id))
        elif (match := re.fullmatch(r"/v1/accounts/([^/]+)/(datasets|batchInferenceJobs)(?:/([^/:]+)(?::(\w+))?)?",
                                    path)) is None:
            raise not_found(path)
        elif self._authorized():
            acct, collection, rid, verb = match.groups()
            check_id(acct, "account")
            if rid is not None:
                check_id(rid, "resource")
            if collection == "datasets":
                self._route_datasets(method, acct, rid, verb, query, body)
            else:
                self._route_jobs(method, acct, rid, verb, query, body)

    def _route_internal(self, method: str, path: str, body: bytes) -> None:
        emu = self.server.emulator
        key = (method, path)
        client = str(self.client_address[0])
        if path.startswith("/emulator/") and not is_loopback_client(client):
            # These routes rewrite faults and counters: only a local test harness may use them.
            raise ApiError(403, 7, f"{path} is only served to loopback clients, not {client}")
        if key == ("GET", "/healthz"):
            self._send_json(200, {"ok": True, "pid": os.getpid()})
        elif key == ("GET", "/emulator/calls"):
            self._send_json(200, emu.store.calls())
        elif key == ("POST", "/emulator/reset-calls"):
            emu.store.reset_calls()
            self._send_json(200, {})
        elif key == ("GET", "/emulator/faults"):
            self._send_json(200, emu.faults.view())
        elif key in (("POST", "/emulator/faults"), ("DELETE", "/emulator/faults")):
            try:
                self._send_json(200, emu.faults.replace(self._json(body) if method == "POST" else None))
            except ValueError as exc:
                raise invalid(f"invalid fault plan: {exc}") from exc
        else:
            raise not_found(path)

    def _route_signed(self, method: str, path: str, body: bytes) -> None:
        token, _, rest = path[len("/signed/"):].partition("/")
        emu = self.server.emulator
        if method == "GET":
            self._send_payload(emu.signed_file(token, rest))
        elif method == "PUT":
            emu.signed_put(token, rest, self.headers, body)
            self._send_json(200, {})
        else:
            raise ApiError(405, 12, "Method Not Allowed")

    def _route_datasets(self, method: str, acct: str, rid: str | None, verb: str | None,
                        query: dict[str, list[str]], body: bytes) -> None:
        emu = self.server.emulator
        key = (method, rid is not None, verb)
        if key == ("POST", False, None):
            self._send_json(200, emu.create_dataset(acct, self._json(body)))
        elif key == ("GET", False, None):
            self._send_json(200, emu.list_datasets(acct, query))
        elif rid is None:
            raise ApiError(405, 12, "Method Not Allowed")
        elif key == ("GET", True, None):
            self._send_json(200, emu.get_dataset(acct, rid))
        elif key == ("DELETE", True, None):
            self._send_json(200, emu.delete_dataset(acct, rid))
        elif key == ("POST", True, "upload"):
            if len(body) > MAX_MULTIPART_BYTES:
                raise invalid(f"upload of {len(body)} bytes exceeds {MAX_MULTIPART_BYTES}; use getUploadEndpoint")
            filename, data = parse_multipart_file(self.headers.get("Content-Type", ""), body)
            self._send_json(200, emu.upload(acct, rid, filename, data))
        elif key == ("POST", True, "getUploadEndpoint"):
            self._send_json(200, emu.upload_endpoint(acct, rid, self._json(body)))
        elif key == ("POST", True, "validateUpload"):
            self._send_json(200, emu.validate_upload(acct, rid, self._json(body)))
        elif key == ("GET", True, "getDownloadEndpoint"):
            if body or self.headers.get("Transfer-Encoding"):
                raise invalid("GET :getDownloadEndpoint must not have a request body")
            self._send_json(200, emu.download_endpoint(acct, rid))
        elif verb in (None, "upload", "getUploadEndpoint", "validateUpload", "getDownloadEndpoint"):
            raise ApiError(405, 12, "Method Not Allowed")
        else:
            raise not_found(f"verb {verb}")

    def _route_jobs(self, method: str, acct: str, rid: str | None, verb: str | None,
                    query: dict[str, list[str]], body: bytes) -> None:
        emu = self.server.emulator
        if verb is not None:
            raise not_found(f"verb {verb}")
        if method == "POST" and rid is None:
            job_id = (query.get("batchInferenceJobId") or query.get("batch_inference_job_id") or [""])[0]
            self._send_json(200, emu.create_job(acct, job_id or None, self._json(body)))
        elif method == "GET" and rid is None:
            self._send_json(200, emu.list_jobs(acct, query))
        elif method == "GET" and rid is not None:
            self._send_json(200, emu.get_job(acct, rid))
        elif method == "DELETE" and rid is not None:
            self._send_json(200, emu.delete_job(acct, rid))
        else:
            raise ApiError(405, 12, "Method Not Allowed")


# ---------------------------------------------------------------------------------------------- entry points


def make_server(host: str, port: int, state_dir: Path, *, latency_s: float = 1.0, answer_key: Path | None = None,
                idle_exit_s: float | None = None, clock: Callable[[], int] = time.time_ns,
                faults: dict[str, Any] | None = None) -> EmulatorServer:
    """A bound (not yet serving) emulator; `port=0` picks a free port. `clock` returns ns since the epoch.

    `faults` installs a fault plan (ValueError if invalid); the counters persisted in `state_dir` are kept when it
    equals the persisted plan. None keeps whatever plan `state_dir` holds.
    """
    emulator = Emulator(Path(state_dir), latency_s=latency_s, answer_key=answer_key, clock=clock, faults=faults)
    return EmulatorServer((host, port), emulator, idle_exit_s)


def _faults_arg(text: str) -> dict[str, Any]:
    try:
        return load_plan_arg(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m pipeline.emulator", description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1); a non-loopback one needs --allow-remote")
    parser.add_argument("--allow-remote", action="store_true",
                        help="allow binding a non-loopback --host; the /emulator/* control routes still answer "
                             "only loopback clients")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--state-dir", type=Path, required=True)
    parser.add_argument("--latency", type=float, default=1.0, help="seconds from job create to COMPLETED")
    parser.add_argument("--answer-key", type=Path, default=None,
                        help="directory holding open_book.jsonl and closed_book.jsonl")
    parser.add_argument("--idle-exit", type=float, default=None, help="exit after this many idle seconds")
    parser.add_argument("--faults", type=_faults_arg, default=None,
                        help='fault plan {"rules": [...]} as a JSON string or the path of a JSON file')
    args = parser.parse_args(argv)
    if not args.allow_remote and not _loopback_host(args.host):
        # The emulator has no real auth: exposing it beyond this machine must be a deliberate choice.
        parser.error(f"--host {args.host} is not a loopback address; pass --allow-remote to bind it anyway")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the emulator until SIGTERM / Ctrl-C / idle exit; writes `<state_dir>/server.json` while it runs."""
    args = _parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = make_server(args.host, args.port, args.state_dir, latency_s=args.latency, answer_key=args.answer_key,
                         idle_exit_s=args.idle_exit, faults=args.faults)
    info_path = args.state_dir / "server.json"
    host, port = server.server_address[:2]
    write_json(info_path, {"pid": os.getpid(), "host": host, "port": port, "base_url": server.base_url})

    def stop(signum: int, _frame: Any) -> None:
        log.info("signal %d received, shutting down", signum)
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    log.info("emulator listening on %s (state dir %s)", server.base_url, args.state_dir)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        current = read_json(info_path) if info_path.exists() else None
        if isinstance(current, dict) and current.get("pid") == os.getpid():
            info_path.unlink(missing_ok=True)
    return 0

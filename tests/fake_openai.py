"""A fake OpenAI-compatible chat-completions server for tests (stdlib only).

The real ``openai`` client talks to it over HTTP, so no transport mocking is
needed::

    from fake_openai import FakeOpenAI, Fault   # tests/ is on sys.path under pytest
                                                # (or: from tests.fake_openai import ...)

    with FakeOpenAI(api_key="sk-test") as fake:
        client = openai.OpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0)
        fake.script(Fault.status(429, retry_after=0.1), "a scripted reply")
        ...
        assert fake.requests[-1]["model"] == "..."

Or use the ``fake_openai`` pytest fixture (tests/conftest.py), which yields a
started ``FakeOpenAI()`` with default settings; its attributes may be changed
in the test (``fake_openai.latency = 0.2``, ``fake_openai.api_key = ...``).

``FakeOpenAI(responder=None, *, models=None, api_key=None, latency=0.0)``

* ``base_url``      -- ``"http://127.0.0.1:PORT/v1"`` (set once started).
* ``requests``      -- parsed JSON bodies of every ``POST /v1/chat/completions``
                       (including faulted / rejected ones), in arrival order.
* ``headers``       -- request headers (dict, lower-cased names) of the same
                       requests, index-aligned with ``requests``.
* ``queries``       -- the URL query parameters of the same requests (``parse_qs``).
* ``max_in_flight`` -- highest number of chat requests held (over ``latency``) at once.
* ``latency``       -- seconds slept before answering each chat request.
* ``responder``     -- ``callable(body) -> str | Fault`` giving the assistant
                       content; default :func:`default_responder`
                       (``"what is " + first 6 words`` of the text after a
                       ``Passage:`` marker in the last user message, else of
                       the last user message itself).
* ``models``        -- ``None``: any model is accepted and ``GET /v1/models``
                       lists ``["fake-model"]``; a list: only those are
                       accepted (others get 404 ``model_not_found``) and listed.
* ``api_key``       -- if set, requests lacking ``Authorization: Bearer <key>``
                       get 401 (``invalid_api_key``).
* ``script(*items)``-- queue items consumed one per chat request, before the
                       responder is used. An item is a :class:`Fault` or a
                       ``str`` (shorthand for ``Fault.content(str)``).
* ``pending``       -- number of scripted items not yet consumed.
* ``start()`` / ``stop()`` or use as a context manager.

Order of checks per chat request: record -> api key -> JSON body -> model ->
latency -> scripted item (or responder).

Faults (what the real openai 3.x client raises, with ``max_retries=0``):

* ``Fault.status(code, retry_after=None, message=None)`` -- error status with
  an OpenAI-style ``{"error": {...}}`` body; ``retry_after`` sets both
  ``Retry-After`` and ``retry-after-ms``. 400 -> ``BadRequestError``,
  429 -> ``RateLimitError``, 500/503 -> ``InternalServerError``.
* ``Fault.timeout(seconds, then="reply")`` -- sleep ``seconds`` (should exceed
  the client timeout) then reply normally (``then="close"``: just close)
  -> ``APITimeoutError``. The sleep is cut short when the server stops.
* ``Fault.drop()`` -- close the connection without any response
  -> ``APIConnectionError``.
* ``Fault.malformed_json()`` -- 200, ``application/json`` body that is not JSON
  (the client raises ``json.JSONDecodeError``, a ``ValueError``).
* ``Fault.truncated_body()`` -- 200 with a Content-Length larger than the
  bytes sent, then close -> ``APIConnectionError``.
* ``Fault.content(text, finish_reason="stop")`` -- a normal reply with the
  given content (may be ``None``) and finish_reason.
* ``Fault.empty_choices()`` -- 200 with ``"choices": []``.
* ``Fault.html()`` -- 200 with an HTML page (a proxy's error page) instead of JSON.

``"stream": true`` requests get a minimal SSE stream (one content chunk, one
finish chunk, ``[DONE]``); error faults apply to them too.
``GET /v1/models/{id}`` returns the model or 404 ``model_not_found``.
"""

from __future__ import annotations

import collections
import dataclasses
import http.server
import itertools
import json
import re
import socket
import sys
import threading
import urllib.parse
import time
from typing import Any, Callable, Optional, Union

__all__ = ["FakeOpenAI", "Fault", "default_responder"]

DEFAULT_MODEL = "fake-model"


@dataclasses.dataclass(frozen=True)
class Fault:
    """One scripted server behaviour; build it with the classmethods."""

    kind: str
    code: int = 200
    retry_after: Optional[float] = None
    message: Optional[str] = None
    seconds: float = 0.0
    then: str = "reply"
    text: Optional[str] = None
    finish_reason: str = "stop"

    @classmethod
    def status(cls, code: int, retry_after: Optional[float] = None,
               message: Optional[str] = None) -> "Fault":
        return cls("status", code=code, retry_after=retry_after, message=message)

    @classmethod
    def timeout(cls, seconds: float, then: str = "reply") -> "Fault":
        if then not in ("reply", "close"):
            raise ValueError("then must be 'reply' or 'close'")
        return cls("timeout", seconds=seconds, then=then)

    @classmethod
    def drop(cls) -> "Fault":
        return cls("drop")

    @classmethod
    def malformed_json(cls) -> "Fault":
        return cls("malformed_json")

    @classmethod
    def truncated_body(cls) -> "Fault":
        return cls("truncated_body")

    @classmethod
    def content(cls, text: Optional[str], finish_reason: str = "stop") -> "Fault":
        return cls("content", text=text, finish_reason=finish_reason)

    @classmethod
    def empty_choices(cls) -> "Fault":
        return cls("empty_choices")

    @classmethod
    def html(cls) -> "Fault":
        return cls("html")


Responder = Callable[[dict], Union[str, Fault]]

_ERROR_INFO = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("invalid_request_error", None, "Forbidden."),
    404: ("invalid_request_error", "model_not_found", "Not found."),
    408: ("timeout", None, "Request timed out."),
    409: ("invalid_request_error", None, "Conflict."),
    422: ("invalid_request_error", None, "Unprocessable entity."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached. Please try again later."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The server is overloaded or not ready yet."),
}


def error_body(code: int, message: Optional[str] = None,
               type_: Optional[str] = None, err_code: Optional[str] = None) -> dict:
    t, c, m = _ERROR_INFO.get(code, ("server_error" if code >= 500 else "invalid_request_error", None, f"HTTP {code}"))
    return {"error": {"message": message or m, "type": type_ or t, "param": None, "code": err_code or c}}


def _text_of(content: Any) -> str:
    """Text of a message ``content`` (a string or a list of content parts)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return str(content)


_PASSAGE_RE = re.compile(r"^\s*passage\s*:\s*(.*)\Z", re.IGNORECASE | re.MULTILINE | re.DOTALL)


def default_responder(body: dict) -> str:
    """Deterministic query: ``"what is " + first 6 words`` of the passage
    (text after a ``Passage:`` line marker) or of the last user message."""
    messages = body.get("messages") or []
    users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    text = _text_of(users[-1].get("content")) if users else ""
    m = _PASSAGE_RE.search(text)
    if m:
        text = m.group(1)
    words = text.split()[:6]
    return "what is " + " ".join(words) if words else "what is this"


def _count_words(text: Optional[str]) -> int:
    return len(text.split()) if text else 0


class _Server(http.server.ThreadingHTTPServer):
    request_queue_size = 256  # the default backlog of 5 refuses bursts of concurrent connections
    daemon_threads = True
    allow_reuse_address = True
    fake: "FakeOpenAI"

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that gives up on its calls (cancelled, or stopped) resets its connections: not a server fault.
        if not isinstance(sys.exc_info()[1], (ConnectionResetError, BrokenPipeError)):
            super().handle_error(request, client_address)


class _Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    # Headers and body go out in separate writes: without TCP_NODELAY, Nagle + delayed ACK add ~40 ms.
    disable_nagle_algorithm = True
    server_version = "FakeOpenAI/1.0"
    timeout = 30  # idle keep-alive connections are closed after this

    def log_message(self, format: str, *args: Any) -> None:  # silence stderr
        pass

    @property
    def fake(self) -> "FakeOpenAI":
        return self.server.fake  # type: ignore[attr-defined]

    # ----------------------------------------------------------- helpers
    def _send(self, code: int, payload: Any, headers: Optional[dict] = None,
              content_type: str = "application/json") -> None:
        data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
        try:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(data)))
            self.send_header("x-request-id", f"req_{next(self.fake._ids)}")
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.end_headers()
            self.wfile.write(data)
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError, socket.timeout, OSError):
            self.close_connection = True

    def _error(self, code: int, message: Optional[str] = None, err_code: Optional[str] = None,
               headers: Optional[dict] = None) -> None:
        self._send(code, error_body(code, message, err_code=err_code), headers)

    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def _auth_ok(self) -> bool:
        key = self.fake.api_key
        return key is None or self.headers.get("Authorization", "") == f"Bearer {key}"

    # ----------------------------------------------------------- GET
    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0].rstrip("/")
        if not self._auth_ok():
            return self._error(401)
        fake = self.fake
        if path == "/v1/models":
            data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"}
                    for m in fake.listed_models()]
            return self._send(200, {"object": "list", "data": data})
        if path.startswith("/v1/models/"):
            name = path[len("/v1/models/"):]
            if fake.model_ok(name):
                return self._send(200, {"id": name, "object": "model", "created": 0, "owned_by": "fake"})
            return self._model_not_found(name)
        self._error(404, f"Unknown path {self.path}", err_code="unknown_url")

    def _model_not_found(self, name: Any) -> None:
        self._error(404, f"The model `{name}` does not exist or you do not have access to it.",
                    err_code="model_not_found")

    # ----------------------------------------------------------- POST
    def do_POST(self) -> None:
        raw = self._read_body()
        path = self.path.split("?", 1)[0].rstrip("/")
        if path != "/v1/chat/completions":
            return self._error(404, f"Unknown path {self.path}", err_code="unknown_url")
        fake = self.fake
        try:
            body = json.loads(raw or b"null")
        except ValueError:
            body = None
        fake._record(body if isinstance(body, dict) else {"_raw": raw.decode("utf-8", "replace")},
                     {k.lower(): v for k, v in self.headers.items()}, urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query))
        self._chat(body)

    def _chat(self, body: Any) -> None:
        fake = self.fake
        if not self._auth_ok():
            return self._error(401)
        if not isinstance(body, dict):
            return self._error(400, "We could not parse the JSON body of your request.")
        model = body.get("model")
        if not fake.model_ok(model):
            return self._model_not_found(model)
        # Counted over the wait only: once the reply is being written, the client may already
        # have sent its next request, and counting both would report one call too many.
        fake._enter()
        try:
            if fake.latency > 0:
                fake._stop.wait(fake.latency)
        finally:
            fake._leave()

        item = fake._next_scripted()
        if item is None:
            item = fake.responder(body)
        if isinstance(item, str):
            item = Fault.content(item)
        if not isinstance(item, Fault):
            raise TypeError(f"scripted item / responder result must be str or Fault, got {item!r}")
        self._apply(item, body)

    def _apply(self, f: Fault, body: dict) -> None:
        fake = self.fake
        model = body.get("model") or DEFAULT_MODEL
        if f.kind == "status":
            headers = {}
            if f.retry_after is not None:
                headers["Retry-After"] = f"{f.retry_after:g}"
                headers["retry-after-ms"] = str(int(round(f.retry_after * 1000)))
            return self._error(f.code, f.message, headers=headers)
        if f.kind == "timeout":
            fake._stop.wait(f.seconds)
            if f.then == "close" or fake._stop.is_set():
                self.close_connection = True
                return
            return self._reply(body, self._content_of(body), "stop", model)
        if f.kind == "drop":
            self.close_connection = True  # the server then closes the socket, nothing sent
            return
        if f.kind == "malformed_json":
            return self._send(200, b'{"id": "chatcmpl-broken", "choices": [ this is not json')
        if f.kind == "truncated_body":
            data = json.dumps(fake._completion(body, "truncated", "stop", model)).encode()
            cut = data[: len(data) // 2]
            self.close_connection = True
            try:
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Connection", "close")
                self.end_headers()
                self.wfile.write(cut)
                self.wfile.flush()
            except OSError:
                pass
            return
        if f.kind == "content":
            return self._reply(body, f.text, f.finish_reason, model)
        if f.kind == "html":  # a proxy's or gateway's error page, served as 200
            return self._send(200, b"<html><body><h1>Service temporarily unavailable</h1></body></html>", content_type="text/html")
        if f.kind == "empty_choices":
            payload = fake._completion(body, "", "stop", model)
            payload["choices"] = []
            payload["usage"]["completion_tokens"] = 0
            payload["usage"]["total_tokens"] = payload["usage"]["prompt_tokens"]
            return self._send(200, payload)
        raise ValueError(f"unknown fault kind {f.kind!r}")

    def _content_of(self, body: dict) -> Optional[str]:
        out = self.fake.responder(body)
        return out.text if isinstance(out, Fault) else out

    def _reply(self, body: dict, text: Optional[str], finish_reason: str, model: str) -> None:
        payload = self.fake._completion(body, text, finish_reason, model)
        if not body.get("stream"):
            return self._send(200, payload)
        base = {k: payload[k] for k in ("id", "created", "model")}
        base["object"] = "chat.completion.chunk"
        chunks = [
            dict(base, choices=[{"index": 0, "delta": {"role": "assistant", "content": text},
                                 "finish_reason": None}]),
            dict(base, choices=[{"index": 0, "delta": {}, "finish_reason": finish_reason}],
                 usage=payload["usage"] if (body.get("stream_options") or {}).get("include_usage") else None),
        ]
        sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        self._send(200, sse.encode(), content_type="text/event-stream")


class FakeOpenAI:
    """Fake OpenAI chat-completions server; see the module docstring."""

    def __init__(self, responder: Optional[Responder] = None, *, models: Optional[list] = None,
                 api_key: Optional[str] = None, latency: float = 0.0) -> None:
        self.responder: Responder = responder or default_responder
        self.models = list(models) if models is not None else None
        self.api_key = api_key
        self.latency = float(latency)
        self.requests: list = []
        self.headers: list = []
        self.queries: list = []
        self.max_in_flight = 0
        self.in_flight = 0
        self.base_url: Optional[str] = None
        self._lock = threading.Lock()
        self._script: collections.deque = collections.deque()
        self._stop = threading.Event()
        self._ids = itertools.count(1)
        self._server: Optional[_Server] = None
        self._thread: Optional[threading.Thread] = None

    # ------------------------------------------------------------ public
    def start(self) -> "FakeOpenAI":
        if self._server is not None:
            return self
        self._stop.clear()
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.fake = self
        host, port = self._server.server_address[:2]
        self.base_url = f"http://{host}:{port}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name="FakeOpenAI", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        self._stop.set()  # wakes handlers sleeping in latency / timeout faults
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> "FakeOpenAI":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def script(self, *items: Union[Fault, str]) -> "FakeOpenAI":
        """Queue items consumed one per chat request (then the responder)."""
        for it in items:
            if not isinstance(it, (Fault, str)):
                raise TypeError(f"script items must be Fault or str, got {it!r}")
        with self._lock:
            self._script.extend(items)
        return self

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._script)

    def listed_models(self) -> list:
        return list(self.models) if self.models is not None else [DEFAULT_MODEL]

    def model_ok(self, name: Any) -> bool:
        if self.models is None:
            return isinstance(name, str) and bool(name)
        return name in self.models

    # ------------------------------------------------------------ internal
    def _record(self, body: dict, headers: dict, query: Optional[dict] = None) -> None:
        with self._lock:
            self.requests.append(body)
            self.headers.append(headers)
            self.queries.append(query or {})

    def _enter(self) -> None:
        with self._lock:
            self.in_flight += 1
            self.max_in_flight = max(self.max_in_flight, self.in_flight)

    def _leave(self) -> None:
        with self._lock:
            self.in_flight -= 1

    def _next_scripted(self) -> Optional[Union[Fault, str]]:
        with self._lock:
            return self._script.popleft() if self._script else None

    def _completion(self, body: dict, text: Optional[str], finish_reason: str, model: str) -> dict:
        prompt_tokens = sum(_count_words(_text_of(m.get("content")))
                            for m in body.get("messages") or [] if isinstance(m, dict))
        completion_tokens = _count_words(text)
        return {
            "id": f"chatcmpl-fake{next(self._ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": "fp_fake",
            "choices": [{
                "index": 0,
                "message": {"role": "assistant", "content": text, "refusal": None},
                "logprobs": None,
                "finish_reason": finish_reason,
            }],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens},
        }

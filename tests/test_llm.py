"""The OpenAI-compatible client against the fake server: one retry layer, faults, clear errors."""

import asyncio

import pytest

from embedforge.errors import EmbedforgeError
from embedforge.llm import OpenAIChatModel, make_chat_model, strip_credentials
from fake_openai import Fault

MESSAGES = [{"role": "system", "content": "s"}, {"role": "user", "content": "Passage: hello world of tests"}]


def complete(model):
    return asyncio.run(model.complete(MESSAGES, temperature=0.0, max_tokens=16))


def client(fake, **options):
    return OpenAIChatModel(fake.base_url, "fake-model", api_key="sk-test", timeout=options.pop("timeout", 2.0), max_attempts=options.pop("max_attempts", 4), max_wait=options.pop("max_wait", 0.05), **options)


@pytest.mark.parametrize(
    "fault",
    [Fault.status(429, retry_after=0.01), Fault.status(500), Fault.status(503), Fault.drop(), Fault.malformed_json(), Fault.truncated_body()],
    ids=["429", "500", "503", "drop", "malformed-json", "truncated-body"],
)
def test_transient_faults_are_retried(fake_openai, fault):
    fake_openai.script(fault)
    result = complete(client(fake_openai))
    assert result.text.startswith("what is") and result.attempts == 2
    assert len(fake_openai.requests) == 2


def test_timeout_is_retried(fake_openai):
    fake_openai.script(Fault.timeout(1.0))
    result = complete(client(fake_openai, timeout=0.3))
    assert result.attempts == 2


def test_retry_after_is_honoured(fake_openai):
    import time

    fake_openai.script(Fault.status(429, retry_after=0.4))
    started = time.monotonic()
    complete(client(fake_openai, max_wait=5.0))
    assert time.monotonic() - started >= 0.4


@pytest.mark.parametrize("status, text", [(400, "rejected the request"), (401, "API key"), (403, "refused access"), (404, "not found")])
def test_client_errors_are_not_retried(fake_openai, status, text):
    fake_openai.script(Fault.status(status))
    with pytest.raises(EmbedforgeError, match=text):
        complete(client(fake_openai))
    assert len(fake_openai.requests) == 1


def test_unknown_model_says_so(fake_openai):
    fake_openai.models = ["real-model"]
    with pytest.raises(EmbedforgeError, match="'fake-model'"):
        complete(client(fake_openai))


def test_unreachable_endpoint(fake_openai):
    fake_openai.script(*[Fault.drop()] * 4)
    with pytest.raises(EmbedforgeError, match="unreachable after 4 attempts"):
        complete(client(fake_openai))


def test_empty_choices_and_length_are_reported_not_raised(fake_openai):
    fake_openai.script(Fault.empty_choices(), Fault.content("cut off que", finish_reason="length"))
    assert complete(client(fake_openai)).text is None  # a client per event loop
    assert complete(client(fake_openai)).finish_reason == "length"


def test_concurrency_is_bounded_by_the_caller(fake_openai):
    fake_openai.latency = 0.05
    model = client(fake_openai)

    async def many():
        semaphore = asyncio.Semaphore(3)

        async def one():
            async with semaphore:
                return await model.complete(MESSAGES, temperature=0.0, max_tokens=8)

        return await asyncio.gather(*[one() for _ in range(12)])

    assert len(asyncio.run(many())) == 12
    assert fake_openai.max_in_flight <= 3


def test_calls_that_open_together_look_up_the_platform_once(fake_openai, monkeypatch):
    # The SDK looks it up in a worker thread for each request that starts before its first lookup
    # ends: 16 calls at once would run 16 lookups (reading the Python binary each time).
    import openai._base_client

    from embedforge import llm

    lookups = []
    real = openai._base_client.get_platform
    monkeypatch.setattr(openai._base_client, "get_platform", lambda: lookups.append(1) or real())
    llm._sdk_platform.cache_clear()
    model = client(fake_openai)

    async def together():
        try:
            return await asyncio.gather(*[model.complete(MESSAGES, temperature=0.0, max_tokens=8) for _ in range(16)])
        finally:
            await model.aclose()

    assert len(asyncio.run(together())) == 16
    assert len(lookups) == 1


def test_remote_endpoint_needs_a_key(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(EmbedforgeError, match="OPENAI_API_KEY"):
        make_chat_model("https://api.example.com/v1", "m", "OPENAI_API_KEY", 10, 3, 4, 0)


def test_credentials_are_stripped_from_the_cache_identity():
    assert strip_credentials("https://user:secret@host:8000/v1/?key=abc") == "https://host:8000/v1"

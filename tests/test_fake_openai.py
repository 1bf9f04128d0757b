"""Self-tests for tests/fake_openai.py against the real openai client."""

from __future__ import annotations

import threading
import time

import openai
import pytest

try:
    from .fake_openai import FakeOpenAI, Fault
except ImportError:
    try:
        from fake_openai import FakeOpenAI, Fault
    except ImportError:
        from tests.fake_openai import FakeOpenAI, Fault

MODEL = "gpt-test"
MSGS = [
    {"role": "system", "content": "You write search queries."},
    {"role": "user", "content": "Write a query.\nPassage: The mitochondria is the powerhouse of the cell, really."},
]


def make_client(fake: FakeOpenAI, timeout: float = 5.0) -> openai.OpenAI:
    return openai.OpenAI(base_url=fake.base_url, api_key="sk-test", max_retries=0, timeout=timeout)


def chat(client: openai.OpenAI, **kw):
    return client.chat.completions.create(model=MODEL, messages=MSGS, **kw)


def test_normal_reply_parses(fake_openai):
    fake_openai.api_key = "sk-test"
    client = make_client(fake_openai)
    r = chat(client, temperature=0.2)
    assert r.choices[0].message.content == "what is The mitochondria is the powerhouse of"
    assert r.choices[0].finish_reason == "stop"
    assert r.model == MODEL and r.object == "chat.completion" and r.id
    assert r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens == 4 + 13
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert fake_openai.requests[-1]["temperature"] == 0.2
    assert fake_openai.requests[-1]["messages"] == MSGS
    assert fake_openai.headers[-1]["authorization"] == "Bearer sk-test"


def test_scripted_content_and_custom_responder(fake_openai):
    client = make_client(fake_openai)
    fake_openai.script(Fault.content("cut off", finish_reason="length"), "plain", Fault.empty_choices())
    r = chat(client)
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == ("cut off", "length")
    assert chat(client).choices[0].message.content == "plain"
    assert chat(client).choices == []
    assert fake_openai.pending == 0
    fake_openai.responder = lambda body: body["model"].upper()
    assert chat(client).choices[0].message.content == MODEL.upper()


def test_rate_limit(fake_openai):
    client = make_client(fake_openai)
    fake_openai.script(Fault.status(429, retry_after=0.1))
    with pytest.raises(openai.RateLimitError) as ei:
        chat(client)
    assert ei.value.response.headers["retry-after"] == "0.1"
    assert ei.value.code == "rate_limit_exceeded"
    # With retries enabled, the client honours Retry-After and then succeeds.
    fake_openai.script(Fault.status(429, retry_after=0.1), Fault.status(503, retry_after=0.05))
    retrying = openai.OpenAI(base_url=fake_openai.base_url, api_key="x", max_retries=2, timeout=5)
    assert chat(retrying).choices[0].message.content.startswith("what is")
    assert len(fake_openai.requests) == 4


@pytest.mark.parametrize("code,exc", [(400, openai.BadRequestError), (500, openai.InternalServerError),
                                      (503, openai.InternalServerError)])
def test_status_errors(fake_openai, code, exc):
    fake_openai.script(Fault.status(code, message="boom"))
    with pytest.raises(exc) as ei:
        chat(make_client(fake_openai))
    assert ei.value.status_code == code
    assert ei.value.body["message"] == "boom"


def test_api_key_and_models():
    with FakeOpenAI(api_key="sk-right", models=[MODEL, "other"]) as fake:
        client = make_client(fake)
        with pytest.raises(openai.AuthenticationError):
            chat(client)
        good = openai.OpenAI(base_url=fake.base_url, api_key="sk-right", max_retries=0, timeout=5)
        assert [m.id for m in good.models.list()] == [MODEL, "other"]
        with pytest.raises(openai.NotFoundError) as ei:
            good.chat.completions.create(model="nope", messages=MSGS)
        assert ei.value.code == "model_not_found"
        assert chat(good).choices[0].message.content


def test_drop_raises_connection_error(fake_openai):
    client = make_client(fake_openai)
    fake_openai.script(Fault.drop())
    with pytest.raises(openai.APIConnectionError):
        chat(client)
    assert chat(client).choices[0].message.content  # next request is fine


def test_truncated_and_malformed(fake_openai):
    client = make_client(fake_openai)
    fake_openai.script(Fault.truncated_body())
    with pytest.raises(openai.APIConnectionError):
        chat(client)
    fake_openai.script(Fault.malformed_json())
    with pytest.raises(ValueError):
        chat(client)


def test_timeout(fake_openai):
    client = make_client(fake_openai, timeout=0.3)
    fake_openai.script(Fault.timeout(2.0))
    with pytest.raises(openai.APITimeoutError):
        chat(client)


def test_streaming(fake_openai):
    chunks = list(chat(make_client(fake_openai), stream=True))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "what is The mitochondria is the powerhouse of"
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_max_in_flight(fake_openai):
    fake_openai.latency = 0.3
    client = make_client(fake_openai)
    n = 4
    barrier = threading.Barrier(n)
    results, errors = [], []

    def worker():
        try:
            barrier.wait()
            results.append(chat(client).choices[0].message.content)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not errors and len(results) == n
    assert fake_openai.max_in_flight == n
    # The server decrements after it has written the response, so the client
    # can see its answer a moment before the count drops: wait for it.
    deadline = time.monotonic() + 5
    while fake_openai.in_flight and time.monotonic() < deadline:
        time.sleep(0.01)
    assert fake_openai.in_flight == 0

"""Generate against a hostile endpoint: rate limits are waited out, one failed request does not
end the run, and an endpoint that fails for good ends it with a clear error."""

import asyncio
import itertools
import threading
from collections import Counter

import pytest

from embedforge.config import DEFAULT_PROMPT, GenerateConfig
from embedforge.errors import EmbedforgeError
from embedforge.files import read_jsonl
from embedforge.generate import generate
from embedforge.llm import OpenAIChatModel, _AdaptiveLimit
from embedforge.prompts import load_prompt
from fake_openai import Fault


def many_passages(count: int) -> list[dict]:
    return [{"_id": f"p{index:04d}", "title": "", "text": f"passage {index} tells of orchards rivers engines and the weather in spring"} for index in range(count)]


class EveryThirdAndFifth:
    """Every 3rd request a 429 (Retry-After), every 5th a 500, as a provider under load; counts what it served."""

    def __init__(self, retry_after: float):
        self.retry_after = retry_after
        self.numbers = itertools.count(1)
        self.served = Counter()
        self.lock = threading.Lock()

    def __call__(self, body: dict):
        with self.lock:
            number = next(self.numbers)
            if number % 3 == 0:
                self.served["429"] += 1
                return Fault.status(429, retry_after=self.retry_after)
            if number % 5 == 0:
                self.served["500"] += 1
                return Fault.status(500)
            self.served["200"] += 1
            return f"what about item {number} in detail"


def test_rate_limits_and_server_errors_are_ridden_out(tmp_path, fake_openai):
    endpoint = EveryThirdAndFifth(retry_after=0.01)
    fake_openai.responder = endpoint
    config = GenerateConfig(base_url=fake_openai.base_url, min_pairs=400, concurrency=8, round_trip_k=0, max_rounds=4, max_attempts=6)
    model = OpenAIChatModel(fake_openai.base_url, "fake-model", "k", concurrency=config.concurrency, max_attempts=config.max_attempts, max_wait=0.2)
    stats = generate(many_passages(500), load_prompt(DEFAULT_PROMPT), tmp_path, config, model, seed=0)

    assert len(fake_openai.requests) >= 900
    assert stats["accepted"]["train"] >= config.min_pairs
    rows = read_jsonl(tmp_path / "requests.jsonl")
    answered = [row["request_sha"] for row in rows if not row.get("failed")]
    assert len(answered) == len(set(answered)) == endpoint.served["200"]  # every answer paid once, and kept
    # Every failed attempt is counted by its status, and the rate limits lowered concurrency.
    assert stats["retries"] == {"429": endpoint.served["429"], "500": endpoint.served["500"]}
    assert stats["backoffs"] > 0 and fake_openai.max_in_flight <= config.concurrency


def test_a_request_out_of_attempts_is_recorded_failed_and_asked_again_later(tmp_path, fake_openai):
    fake_openai.responder = lambda body: "what about item " + str(len(fake_openai.requests)) + " here"
    fake_openai.script(*[Fault.status(503)] * 2)  # the first request's two attempts
    config = GenerateConfig(base_url=fake_openai.base_url, min_pairs=20, concurrency=1, round_trip_k=0, max_attempts=2, dev_fraction=0.0, test_fraction=0.0)
    model = OpenAIChatModel(fake_openai.base_url, "fake-model", "k", concurrency=1, max_attempts=2, max_wait=0.01)
    stats = generate(many_passages(20), load_prompt(DEFAULT_PROMPT), tmp_path, config, model, seed=0)
    rows = read_jsonl(tmp_path / "requests.jsonl")
    failed = [row for row in rows if row.get("failed")]
    assert len(failed) == 1 and failed[0]["statuses"] == {"503": 2}
    assert stats["failed_requests"] == 1 and stats["accepted"]["train"] >= 20
    # Its passage was asked again in the next round, with a new sample index.
    again = [row for row in rows if row["passage_id"] == failed[0]["passage_id"] and not row.get("failed")]
    assert [row["sample_index"] for row in again] == [1]


def test_an_endpoint_that_fails_for_good_stops_with_the_statuses_and_the_fix(tmp_path, fake_openai):
    fake_openai.responder = lambda body: Fault.status(500)
    config = GenerateConfig(base_url=fake_openai.base_url, min_pairs=20, concurrency=4, round_trip_k=0, max_attempts=2)
    model = OpenAIChatModel(fake_openai.base_url, "fake-model", "k", concurrency=4, max_attempts=2, max_wait=0.01)
    with pytest.raises(EmbedforgeError) as caught:
        generate(many_passages(100), load_prompt(DEFAULT_PROMPT), tmp_path, config, model, seed=0)
    message = caught.value.message
    assert "The endpoint is failing" in message and "500" in message and fake_openai.base_url in message and "Rerun" in message
    assert len(fake_openai.requests) < 200  # it stopped once the window was mostly failures, not after every passage
    assert all(row.get("failed") for row in read_jsonl(tmp_path / "requests.jsonl"))


def test_adaptive_limit_halves_once_per_burst_and_climbs_back():
    async def scenario():
        limit = _AdaptiveLimit(8)
        generations = [await limit.acquire() for _ in range(8)]
        # A burst: all eight in-flight attempts come back 429; only the first lowers the limit.
        lowered = [limit.release(generation, rate_limited=True) for generation in generations]
        assert lowered == [True] + [False] * 7 and limit.limit == 4 and limit.backoffs == 1
        # While four are in flight, a fifth waits.
        held = [await limit.acquire() for _ in range(4)]
        waiter = asyncio.ensure_future(limit.acquire())
        await asyncio.sleep(0)
        assert not waiter.done()
        limit.release(held[0], rate_limited=False)
        await asyncio.sleep(0)
        assert waiter.done()
        for generation in [*held[1:], waiter.result()]:
            limit.release(generation, rate_limited=False)
        # Answers without a 429 raise the limit by one per `limit` answers, up to the ceiling.
        for _ in range(100):
            limit.release(await limit.acquire(), rate_limited=False)
        assert limit.limit == 8

    asyncio.run(scenario())

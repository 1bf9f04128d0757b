"""--base-url given several times: replicas of one model share the calls and one ledger."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest

from conftest import make_passages, passage_responder, write_corpus
from embedforge import runs
from embedforge.cli import _llm_factory
from embedforge.config import load_config
from embedforge.llm import OpenAIChatModel, ReplicaChatModel, make_chat_model
from fake_openai import FakeOpenAI


def ledger(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "generate" / "requests.jsonl").read_text().splitlines() if line.strip()]


def test_replicas_share_the_calls_and_a_single_endpoint_reuses_every_answer(tmp_path, tiny_model, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    corpus = write_corpus(tmp_path / "corpus.jsonl", make_passages())
    with FakeOpenAI(passage_responder, latency=0.3) as first, FakeOpenAI(passage_responder, latency=0.3) as second:  # long enough that calls pile up on a busy machine
        values = dict(corpus=corpus, run=tmp_path / "run", cache=tmp_path / "cache", base_model=tiny_model, llm_model="fake-model", min_pairs=20,
                      round_trip_k=0, dev_fraction=0.2, test_fraction=0.2, concurrency=20, encode_backend="torch")
        both = load_config(None, {**values, "base_url": [first.base_url, second.base_url]})
        runs.run(both, llm_factory=_llm_factory, echo=lambda line: None, to_stage="generate")
        calls = len(first.requests) + len(second.requests)
        assert calls == len(ledger(tmp_path / "run")) >= 24
        # Least-loaded: both replicas work, each within its own --concurrency, together beyond one's.
        assert min(len(first.requests), len(second.requests)) >= calls // 3
        assert first.max_in_flight <= 20 and second.max_in_flight <= 20 and first.max_in_flight + second.max_in_flight > 20
        assert f'base_url = ["{first.base_url}", "{second.base_url}"]' in (tmp_path / "run" / "config.toml").read_text()

        # The first endpoint alone: the same fingerprint, and forced to regenerate it buys nothing.
        alone = load_config(None, {**values, "base_url": [first.base_url]})
        assert runs.status(alone)["generate"] == "up to date"
        before = len(first.requests)
        runs.run(alone, llm_factory=_llm_factory, echo=lambda line: None, to_stage="generate", force=("generate",))
        assert len(first.requests) == before
        assert runs.llm_note(both.generate) == f"fake-model at {first.base_url} (and 1 replicas)"


def test_a_call_whose_endpoint_is_down_is_answered_by_another():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        dead = f"http://127.0.0.1:{probe.getsockname()[1]}/v1"
    with FakeOpenAI(lambda body: "what about rivers") as alive:
        model = make_chat_model((dead, alive.base_url), "fake-model", "EMBEDFORGE_TEST_NO_KEY", timeout=2.0, max_attempts=1, concurrency=4, seed=0)
        assert isinstance(model, ReplicaChatModel) and model.identity == OpenAIChatModel(dead, "fake-model", "k").identity

        async def ask() -> list:
            try:
                return await asyncio.gather(*(model.complete([{"role": "user", "content": f"passage {i}"}], temperature=0.0, max_tokens=8) for i in range(6)))
            finally:
                await model.aclose()

        completions = asyncio.run(ask())
    assert [completion.text for completion in completions] == ["what about rivers"] * 6
    assert len(alive.requests) == 6 and model.answered == [0, 6]
    failed_over = [completion for completion in completions if completion.retried]
    assert failed_over and all(completion.retried == {"connection": 1} and completion.attempts == 2 for completion in failed_over)


def test_base_url_reads_one_several_or_none(tmp_path):
    from embedforge.errors import EmbedforgeError

    config_file = tmp_path / "embedforge.toml"
    config_file.write_text('[generate]\nbase_url = "http://127.0.0.1:8000/v1"\n')  # as configs before replicas wrote it
    assert load_config(config_file).generate.base_url == ("http://127.0.0.1:8000/v1",)
    assert load_config(None, {"base_url": ["http://a/v1", "http://b/v1"]}).generate.base_url == ("http://a/v1", "http://b/v1")
    assert load_config(None, {"base_url": [""]}).generate.base_url == ()  # an empty --base-url is the local model, as before
    with pytest.raises(EmbedforgeError, match="given twice"):
        load_config(None, {"base_url": ["http://a/v1", "http://a/v1"]})

"""SIGKILL during generate, then rerun: exactly the pairs of an uninterrupted run, nothing paid twice."""

import json
import os
import signal
import subprocess
import sys
import time

from conftest import passage_responder


def command(run_dir, corpus, cache, fake, tiny_model):
    return [
        sys.executable, "-m", "embedforge", "generate", "--corpus", str(corpus), "--run", str(run_dir), "--cache", str(cache),
        "--base-url", fake.base_url, "--llm-model", "fake-model", "--base-model", tiny_model, "--min-pairs", "20",
        "--round-trip-k", "40", "--dev-fraction", "0.2", "--test-fraction", "0.2", "--concurrency", "4", "--encode-backend", "torch",
    ]


ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OPENAI_API_KEY": "sk-test", "TOKENIZERS_PARALLELISM": "false"}


def ledger(run_dir):
    return [json.loads(line) for line in (run_dir / "generate" / "requests.jsonl").read_text().splitlines() if line.strip()]


def test_sigkill_then_resume_gives_the_same_pairs(tmp_path, corpus_file, tiny_model, fake_openai):
    fake_openai.responder = passage_responder
    reference = tmp_path / "reference"
    subprocess.run(command(reference, corpus_file, tmp_path / "cache", fake_openai, tiny_model), env=ENV, check=True, capture_output=True, timeout=300)
    calls_uninterrupted = len(fake_openai.requests)

    fake_openai.latency = 0.05
    killed = tmp_path / "killed"
    process = subprocess.Popen(command(killed, corpus_file, tmp_path / "cache", fake_openai, tiny_model), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    ledger_path = killed / "generate" / "requests.jsonl"
    while time.time() < deadline and (not ledger_path.exists() or len(ledger_path.read_text().splitlines()) < 12):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    answered_before = len(ledger(killed))
    assert 12 <= answered_before < calls_uninterrupted
    assert not (killed / "generate" / "queries.jsonl").exists()

    fake_openai.latency = 0.0
    before_resume = len(fake_openai.requests)
    subprocess.run(command(killed, corpus_file, tmp_path / "cache", fake_openai, tiny_model), env=ENV, check=True, capture_output=True, timeout=300)
    rows = ledger(killed)
    assert len({row["request_sha"] for row in rows}) == len(rows)  # no request answered twice
    # only the calls the killed run had not received are made again (in-flight ones at most)
    assert len(fake_openai.requests) - before_resume <= calls_uninterrupted - answered_before + 4
    assert (killed / "generate" / "queries.jsonl").read_text() == (reference / "generate" / "queries.jsonl").read_text()

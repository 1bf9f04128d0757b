"""Generate against an endpoint under load: every 3rd request 429 (Retry-After: 1 s), every 5th 500.

The case of the hostile-endpoint issue, as a new user met it: 300 passages, --min-pairs 250,
--concurrency 8, defaults otherwise (6 attempts for 5xx, rate limits waited out for up to
--max-wait-total), through the real generate stage and OpenAI client against the tests' fake
OpenAI-compatible server on 127.0.0.1. Before the fix, a request that met 429/500 on each of its
6 attempts ended the run with a RateLimitError traceback.
Default size: 300 passages (about 2 minutes, most of it waiting out Retry-After).
Ends with `RESULT finished=<1|0> wall_seconds=... requests=... answers=... retries_429=... retries_500=...
failed_requests=... backoffs=...`; goal: finished=1 with answers equal to the distinct ledger keys.
"""

from __future__ import annotations

import argparse
import itertools
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from fake_openai import FakeOpenAI, Fault  # noqa: E402

from embedforge.config import DEFAULT_PROMPT, GenerateConfig  # noqa: E402
from embedforge.errors import EmbedforgeError  # noqa: E402
from embedforge.files import read_jsonl  # noqa: E402
from embedforge.generate import generate  # noqa: E402
from embedforge.llm import make_chat_model  # noqa: E402
from embedforge.prompts import load_prompt  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=300)
    parser.add_argument("--min-pairs", type=int, default=250)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--retry-after", type=float, default=1.0)
    arguments = parser.parse_args()

    numbers, lock, answers = itertools.count(1), threading.Lock(), [0]

    def responder(body: dict):
        with lock:
            number = next(numbers)
        if number % 3 == 0:
            return Fault.status(429, retry_after=arguments.retry_after)
        if number % 5 == 0:
            return Fault.status(500)
        with lock:
            answers[0] += 1
        return f"what about item {number} in detail"

    passages = [{"_id": f"p{i:04d}", "title": "", "text": f"passage {i} tells of orchards rivers engines and the weather"} for i in range(arguments.passages)]
    config = GenerateConfig(base_url="http://127.0.0.1/v1", llm_model="fake-model", min_pairs=arguments.min_pairs, concurrency=arguments.concurrency, round_trip_k=0)
    with FakeOpenAI(responder) as fake, tempfile.TemporaryDirectory() as folder:
        model = make_chat_model(fake.base_url, "fake-model", "EMBEDFORGE_BENCH_NO_KEY", config.timeout, config.max_attempts, config.concurrency, 0, config.max_wait_total)
        started = time.perf_counter()
        try:
            stats, finished = generate(passages, load_prompt(DEFAULT_PROMPT), Path(folder), config, model, seed=0), 1
        except EmbedforgeError as error:
            print(f"stopped: {error.message}")
            stats, finished = None, 0
        seconds = time.perf_counter() - started
        rows = read_jsonl(Path(folder) / "requests.jsonl")
        keys = {row["request_sha"] for row in rows if not row.get("failed")}
        print(f"{len(fake.requests)} requests, {answers[0]} answers, {len(keys)} distinct answered ledger keys, {seconds:.1f} s")
        if stats:
            print(f"accepted: {stats['accepted']}; failed attempts by status: {stats['retries']}; failed requests: {stats['failed_requests']}; "
                  f"concurrency lowered {stats['backoffs']} times")
        retries = stats["retries"] if stats else {}
        print(f"RESULT finished={finished} wall_seconds={seconds:.1f} requests={len(fake.requests)} answers={answers[0]} distinct_keys={len(keys)} "
              f"retries_429={retries.get('429', 0)} retries_500={retries.get('500', 0)} failed_requests={stats['failed_requests'] if stats else -1} "
              f"backoffs={stats['backoffs'] if stats else -1}")
    return 0 if finished and answers[0] == len(keys) else 1


if __name__ == "__main__":
    sys.exit(main())

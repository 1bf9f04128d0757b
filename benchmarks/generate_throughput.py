"""Generate throughput against a fake endpoint with a fixed latency per call.

2,000 passages at concurrency 64 through the real generate stage (OpenAI client, ledger,
filters), against a local fake OpenAI-compatible server (its own process, asyncio) that answers every
call 100 ms after it arrives (it prints the mean it achieved).
Prints achieved calls/s, the ideal (concurrency / latency), and a sequential client's calls/s on
the same endpoint (one call at a time, as LlamaIndex's generate_qa_embedding_pairs does).
With `--endpoints N` (e.g. `--endpoints 2 --concurrency 32`), N such servers are replicas of one
model: the stage gets all N as --base-url, each at --concurrency, and the ideal is theirs together.
Default size: 2,000 passages, one endpoint, concurrency 64, 100 ms a call, 40 sequential calls.
Runs the stage --rounds times (5) and ends with `RESULT ratio_to_ideal=<median of achieved / ideal calls per s> speedup_vs_sequential=...`; goal: ratio_to_ideal >= 0.85.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import statistics
import tempfile
import time
from pathlib import Path

import openai

from embedforge.config import DEFAULT_PROMPT, GenerateConfig
from embedforge.generate import generate
from embedforge.llm import make_chat_model
from embedforge.prompts import load_prompt


def responder(body: dict) -> str:
    # A distinct, valid query per passage, so every call yields one accepted pair.
    lines = body["messages"][-1]["content"].splitlines()
    return "find passage " + lines[2].split()[1] + " please"


async def raw_client(base_url: str, passages: list[dict], concurrency: int) -> float:
    client = openai.AsyncOpenAI(base_url=base_url, api_key="not-needed", max_retries=0)
    semaphore = asyncio.Semaphore(concurrency)

    async def one(passage):
        async with semaphore:
            await client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": f"Passage:\n####\n{passage['text']}\n####"}])

    started = time.perf_counter()
    await asyncio.gather(*[one(p) for p in passages])
    return len(passages) / (time.perf_counter() - started)


class _Endpoint(asyncio.Protocol):
    """HTTP/1.1 keep-alive, one connection: parse each request as it arrives, answer it `latency`
    seconds later from a timer. A protocol rather than streams, so that the endpoint's own CPU
    (~0.05 ms a call) does not delay its timers: with streams its answers came 3.7 ms late on
    average, measuring the fake endpoint instead of the client."""

    ids = itertools.count()

    def __init__(self, latency: float, served) -> None:
        self.latency, self.served, self.buffer = latency, served, b""

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while (end := self.buffer.find(b"\r\n\r\n")) >= 0:
            head = self.buffer[:end].split(b"\r\n")
            length = next((int(line.split(b":", 1)[1]) for line in head if line.lower().startswith(b"content-length:")), 0)
            if len(self.buffer) < end + 4 + length:
                return  # the rest of the body is still on its way
            arrived = time.perf_counter()
            body = json.loads(self.buffer[end + 4 : end + 4 + length]) if length else {}
            self.buffer = self.buffer[end + 4 + length :]
            payload = json.dumps({
                "id": f"chatcmpl-{next(self.ids)}", "object": "chat.completion", "created": 0, "model": body.get("model", "fake-model"),
                "choices": [{"index": 0, "message": {"role": "assistant", "content": responder(body)}, "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 100, "completion_tokens": 8, "total_tokens": 108},
            }).encode()
            response = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(payload) + payload
            loop = asyncio.get_running_loop()
            loop.call_at(loop.time() + self.latency - (time.perf_counter() - arrived), self.answer, response, arrived)

    def answer(self, response: bytes, arrived: float) -> None:
        if not self.transport.is_closing():
            self.transport.write(response)
            with self.served.get_lock():  # (calls answered, seconds from request to answer)
                self.served[0] += 1
                self.served[1] += time.perf_counter() - arrived


def serve(latency: float, addresses, served) -> None:
    """The endpoint, in its own process as a real one would be, so that on a 2-core machine it
    measures the client, not the fake endpoint."""

    async def main() -> None:
        server = await asyncio.get_running_loop().create_server(lambda: _Endpoint(latency, served), "127.0.0.1", 0, backlog=1024)
        host, port = server.sockets[0].getsockname()[:2]
        addresses.put(f"http://{host}:{port}/v1")
        await server.serve_forever()

    asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passages", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.1)
    parser.add_argument("--sequential-calls", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=5, help="generate runs in a row; the RESULT is their median (this machine is shared and noisy)")
    parser.add_argument("--endpoints", type=int, default=1, help="replicas of the fake endpoint, each in its own process, each at --concurrency")
    arguments = parser.parse_args()
    passages = [{"_id": f"p{i}", "title": "", "text": f"passage w{i} about topic number {i} and its details"} for i in range(arguments.passages)]
    import multiprocessing

    addresses, counters, servers = multiprocessing.Queue(), [], []
    for _ in range(arguments.endpoints):
        counters.append(multiprocessing.Array("d", 2))
        servers.append(multiprocessing.Process(target=serve, args=(arguments.latency, addresses, counters[-1]), daemon=True))
        servers[-1].start()
    base_urls = tuple(addresses.get(timeout=30) for _ in servers)
    base_url = base_urls[0]
    ideal = arguments.concurrency * arguments.endpoints / arguments.latency
    ratios = []
    for round_number in range(1, arguments.rounds + 1):
        # A fresh run directory each round: no answer is reused from the ledger of the one before.
        with tempfile.TemporaryDirectory() as folder:
            config = GenerateConfig(
                min_pairs=arguments.passages, max_rounds=1, dev_fraction=0.0, test_fraction=0.0, round_trip_k=0, concurrency=arguments.concurrency,
                response_format="text", max_query_words=24, base_url=base_urls,
            )
            # As `embedforge generate --base-url ... [--base-url ...]` builds it (no key for 127.0.0.1).
            llm = make_chat_model(base_urls, "fake-model", "EMBEDFORGE_BENCH_NO_KEY", timeout=30, max_attempts=6, concurrency=arguments.concurrency, seed=0)
            answered_before = [counter[0] for counter in counters]
            started = time.perf_counter()
            stats = generate(passages, load_prompt(DEFAULT_PROMPT), Path(folder), config, llm, seed=0)
            elapsed = time.perf_counter() - started
        answered = [counter[0] - before for counter, before in zip(counters, answered_before)]
        achieved = stats["calls_made"] / elapsed
        ratios.append(achieved / ideal)
        print(f"round {round_number}: generate stage: {stats['calls_made']} calls in {elapsed:.2f}s = {achieved:.1f} calls/s = {achieved / ideal:.3f} of the ideal; "
              f"accepted {stats['accepted'].get('train', 0)}; calls per endpoint: {', '.join(str(int(count)) for count in answered)}")
    endpoint_latency = sum(counter[1] for counter in counters) / max(sum(counter[0] for counter in counters), 1)
    ratio = statistics.median(ratios)
    achieved = ratio * ideal
    print(f"ideal (endpoints x concurrency / latency): {ideal:.1f} calls/s; the endpoints' own mean latency: {endpoint_latency * 1000:.1f} ms; "
          f"median of {len(ratios)} rounds: {achieved:.1f} calls/s")
    raw = asyncio.run(raw_client(base_url, passages, arguments.concurrency))
    print(f"bare AsyncOpenAI client, same concurrency, no ledger or filters: {raw:.1f} calls/s")

    client = openai.OpenAI(base_url=base_url, api_key="not-needed", max_retries=0)
    started = time.perf_counter()
    for passage in passages[: arguments.sequential_calls]:
        client.chat.completions.create(model="fake-model", messages=[{"role": "user", "content": f"Passage:\n####\n{passage['text']}\n####"}])
    sequential = arguments.sequential_calls / (time.perf_counter() - started)
    print(f"sequential client: {sequential:.1f} calls/s")
    for server in servers:
        server.terminate()
    print(f"RESULT ratio_to_ideal={ratio:.3f} speedup_vs_sequential={achieved / sequential:.1f}")


if __name__ == "__main__":
    main()

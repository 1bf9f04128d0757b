"""Stage 1, generate: an LLM writes search queries for passages until enough pairs exist.

Reads:  corpus.jsonl, the prompt file, the chat model, the base model's corpus embeddings.
Writes: generate/requests.jsonl (append-only ledger, one line per answered LLM call),
        generate/queries.jsonl, generate/rejects.jsonl, generate/prompt.toml,
        generate/eval/{queries.jsonl, qrels/dev.tsv, qrels/test.tsv}.
Keeps:  every paid answer: a call is keyed by sha256 of {model, endpoint without credentials,
        messages, sampling parameters, sample index}; a rerun (after a crash, or after a
        prompt edit is reverted) reuses the ledger and only makes missing calls.

Passages are split train/dev/test by a hash of their id. Training pairs come from train
passages in a seeded order, round after round (a new sample index is a new call) until
`min_pairs` pairs pass every filter; dev and test passages get held-out queries once.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import shutil
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from embedforge.config import GenerateConfig
from embedforge.corpus import split_of
from embedforge.errors import EmbedforgeError
from embedforge.files import JsonlAppender, atomic_write, iter_jsonl, sha256_json, write_jsonl
from embedforge.llm import ChatModel, Completion
from embedforge.prompts import Prompt, render_messages

STAGE_VERSION = 1
# Held-out queries also pass the cheap filters, but never the round-trip filter: keeping only
# test queries the base model already answers would flatter the base model.
_META_PATTERNS = re.compile(
    r"^(here (is|are)|sure[,!.]|certainly|as an ai|i'm |i am |i cannot|i can't|sorry|note:|what is the output of|you can|yes[,.!]|no[,.!]|the passage|this passage|passage:|query:|search query:|answer:|question:)"
    r"|\b(as an ai|language model)\b|```|^(import|def|class|from|#include|>>>)\b",
    re.IGNORECASE,
)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|\(\d+\))\s*")


def normalize_query(text: str) -> str:
    return " ".join(re.findall(r"\w+", text.lower()))


def parse_queries(text: str | None, wanted: int) -> list[str]:
    """Queries from a model answer: a JSON list (or {"queries": [...]}), else one per line."""
    if not text or not text.strip():
        return []
    stripped = text.strip()
    try:
        value = json.loads(stripped)
    except json.JSONDecodeError:
        value = None
    if isinstance(value, dict):
        value = value.get("queries")
    if isinstance(value, list):
        candidates = [str(item) for item in value if isinstance(item, (str, int, float))]
    else:
        candidates = [_LIST_MARKER.sub("", line) for line in stripped.splitlines()]
    queries = [candidate.strip().strip("\"'`").strip() for candidate in candidates]
    return [query for query in queries if query][:wanted]


def _longest_common_run(query_tokens: list[str], passage_tokens: list[str]) -> int:
    best, previous = 0, [0] * (len(passage_tokens) + 1)
    for query_token in query_tokens:
        current = [0] * (len(passage_tokens) + 1)
        for j, passage_token in enumerate(passage_tokens, start=1):
            if query_token == passage_token:
                current[j] = previous[j - 1] + 1
                best = max(best, current[j])
        previous = current
    return best


def reject_reason(query: str, passage: str, config: GenerateConfig, truncated: bool = False) -> str | None:
    """Why a query is not worth training on, or None. Pure: the cheap filters only."""
    words = query.split()
    if truncated:
        return "truncated"
    if len(words) < config.min_query_words:
        return "too_short"
    if len(words) > config.max_query_words:
        return "too_long"
    if _META_PATTERNS.search(query):
        return "instruction_or_meta"
    query_tokens = re.findall(r"\w+", query.lower())
    passage_tokens = re.findall(r"\w+", passage.lower())
    if len(query_tokens) >= 4 and _longest_common_run(query_tokens, passage_tokens) / len(query_tokens) >= config.max_copy_overlap:
        return "copied_from_passage"
    return None


def request_key(identity: dict, messages: list, temperature: float, max_tokens: int, sample_index: int) -> str:
    return sha256_json({**identity, "messages": messages, "temperature": temperature, "max_tokens": max_tokens, "sample_index": sample_index})


def run_delimiter(seed: int, prompt_sha: str) -> str:
    # Random-looking and per run, yet reproducible, so a rerun hits the same request keys.
    return "####" + sha256_json({"seed": seed, "prompt": prompt_sha})[:12] + "####"


@dataclass
class _Work:
    passage: dict
    split: str
    sample_index: int


@dataclass
class Stats:
    calls_made: int = 0
    calls_reused: int = 0
    usage: Counter = field(default_factory=Counter)
    generated: int = 0
    accepted: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    rounds: int = 0

    def as_dict(self) -> dict:
        return {
            "calls_made": self.calls_made,
            "calls_reused": self.calls_reused,
            "usage": dict(self.usage),
            "generated": self.generated,
            "accepted": dict(self.accepted),
            "rejected": dict(self.rejected),
            "rounds": self.rounds,
        }


RoundTrip = Callable[[list[str], list[str]], list[int]]  # (queries, passage ids) -> rank of each passage (0-based)


def generate(
    passages: list[dict], prompt: Prompt, out_dir: Path, config: GenerateConfig, llm: ChatModel, seed: int, round_trip: RoundTrip | None = None
) -> dict:
    return asyncio.run(_generate(passages, prompt, Path(out_dir), config, llm, seed, round_trip))


async def _generate(passages, prompt, out_dir, config, llm, seed, round_trip) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger_path = out_dir / "requests.jsonl"
    answered = {row["request_sha"]: row for row in iter_jsonl(ledger_path)} if ledger_path.exists() else {}
    stats = Stats()
    delimiter = run_delimiter(seed, prompt.sha256)

    by_split: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
    for passage in passages:
        by_split[split_of(passage["_id"], config.dev_fraction, config.test_fraction)].append(passage)
    rng = random.Random(seed)
    for split in by_split:
        rng.shuffle(by_split[split])
    per_passage = config.queries_per_passage
    held_out = [_Work(p, "dev", 0) for p in by_split["dev"][: -(-config.max_dev_queries // per_passage)]]
    held_out += [_Work(p, "test", 0) for p in by_split["test"][: -(-config.max_test_queries // per_passage)]]
    if not by_split["train"]:
        raise EmbedforgeError("No passage fell in the train split", where="generate", fix="add passages or lower dev_fraction/test_fraction")

    accepted: list[dict] = []
    rejects: list[dict] = []
    seen_queries: set[str] = set()
    semaphore = asyncio.Semaphore(config.concurrency)
    budget = {"left": config.max_requests}

    async def answer(work: _Work, ledger: JsonlAppender) -> tuple[_Work, str, Completion | None]:
        messages = render_messages(prompt, work.passage["text"], work.passage.get("title", ""), per_passage, delimiter)
        key = request_key(llm.identity, messages, config.temperature, config.max_tokens, work.sample_index)
        if key in answered:
            stats.calls_reused += 1
            row = answered[key]
            return work, key, Completion(text=row["response"], finish_reason=row.get("finish_reason"), usage=row.get("usage", {}))
        if budget["left"] is not None:
            if budget["left"] <= 0:
                return work, key, None
            budget["left"] -= 1
        async with semaphore:
            completion = await llm.complete(messages, temperature=config.temperature, max_tokens=config.max_tokens)
        row = {
            "request_sha": key,
            "passage_id": work.passage["_id"],
            "sample_index": work.sample_index,
            "response": completion.text,
            "finish_reason": completion.finish_reason,
            "usage": completion.usage,
            "latency": round(completion.latency, 4),
            "attempts": completion.attempts,
        }
        ledger.append(row)  # at once: a crash after this line never pays for this call again
        answered[key] = row
        stats.calls_made += 1
        stats.usage.update(completion.usage)
        return work, key, completion

    def reject(work: _Work, text: str, reason: str, key: str) -> None:
        stats.rejected[reason] += 1
        rejects.append({"passage_id": work.passage["_id"], "split": work.split, "text": text, "reason": reason, "request_sha": key})

    async def process(batch: list[_Work], ledger: JsonlAppender, progress) -> None:
        tasks = [asyncio.create_task(answer(work, ledger)) for work in batch]
        try:
            results = [await task for task in tasks]
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        candidates = []  # (work, position, text, key) that passed the cheap filters
        for work, key, completion in sorted(results, key=lambda item: (item[0].passage["_id"], item[0].sample_index)):
            progress.update(1)
            if completion is None:
                continue  # over the request budget
            queries = parse_queries(completion.text, per_passage)
            if not queries:
                reject(work, completion.text or "", "empty_or_unparseable", key)
            truncated = completion.finish_reason == "length"
            for position, query in enumerate(queries):
                stats.generated += 1
                # With finish_reason "length", only the last query can be cut off.
                reason = reject_reason(query, work.passage["text"], config, truncated and position == len(queries) - 1)
                normalized = normalize_query(query)
                if reason is None and normalized in seen_queries:
                    reason = "duplicate"
                if reason:
                    reject(work, query, reason, key)
                    continue
                seen_queries.add(normalized)
                candidates.append((work, position, query, key))
        train_candidates = [c for c in candidates if c[0].split == "train"]
        ranks = round_trip([c[2] for c in train_candidates], [c[0].passage["_id"] for c in train_candidates]) if round_trip and config.round_trip_k and train_candidates else []
        rank_of = {id(c): rank for c, rank in zip(train_candidates, ranks)}
        for candidate in candidates:
            work, position, query, key = candidate
            if id(candidate) in rank_of and rank_of[id(candidate)] >= config.round_trip_k:
                reject(work, query, "round_trip", key)
                continue
            stats.accepted[work.split] += 1
            accepted.append(
                {
                    "_id": f"{work.passage['_id']}-q{work.sample_index * per_passage + position}",
                    "text": query,
                    "passage_id": work.passage["_id"],
                    "split": work.split,
                    "prompt_sha": prompt.sha256,
                    "request_sha": key,
                }
            )

    chunk = max(64, config.concurrency * 4)
    with JsonlAppender(ledger_path) as ledger:
        with tqdm(total=len(held_out), desc="generate held-out queries", unit="passage", disable=None) as progress:
            for start in range(0, len(held_out), chunk):
                await process(held_out[start : start + chunk], ledger, progress)
        with tqdm(total=config.min_pairs, desc="generate training pairs", unit="pair", disable=None) as pairs_bar:
            for sample_index in range(config.max_rounds):
                stats.rounds = sample_index + 1
                train_work = [_Work(p, "train", sample_index) for p in by_split["train"]]
                for start in range(0, len(train_work), chunk):
                    before = stats.accepted["train"]
                    await process(train_work[start : start + chunk], ledger, _NullBar())
                    pairs_bar.update(min(stats.accepted["train"], config.min_pairs) - min(before, config.min_pairs))
                    if stats.accepted["train"] >= config.min_pairs or _budget_spent(budget):
                        break
                if stats.accepted["train"] >= config.min_pairs or _budget_spent(budget):
                    break

    if stats.accepted["train"] < config.min_pairs:
        why = "the request budget (max_requests) is spent" if _budget_spent(budget) else f"{config.max_rounds} rounds over {len(by_split['train'])} train passages are done"
        raise EmbedforgeError(
            f"Only {stats.accepted['train']} training pairs passed the filters, fewer than min_pairs={config.min_pairs}: {why}. "
            f"Rejected so far: {dict(stats.rejected)}",
            where=str(ledger_path),
            fix="raise --max-rounds or --queries-per-passage, add passages, loosen --round-trip-k, or lower --min-pairs; answers already received are kept and reused",
        )

    write_jsonl(out_dir / "queries.jsonl", accepted)
    write_jsonl(out_dir / "rejects.jsonl", rejects)
    shutil.copyfile(prompt.path, out_dir / ".prompt.tmp")
    (out_dir / ".prompt.tmp").replace(out_dir / f"prompt{prompt.path.suffix}")
    write_eval_set(out_dir / "eval", accepted)
    return stats.as_dict()


def _budget_spent(budget: dict) -> bool:
    return budget["left"] is not None and budget["left"] <= 0


class _NullBar:
    def update(self, _: int) -> None:
        pass


def write_eval_set(folder: Path, queries: list[dict]) -> None:
    """Held-out queries in BEIR layout; the corpus is the run's corpus.jsonl."""
    held_out = [q for q in queries if q["split"] in ("dev", "test")]
    write_jsonl(folder / "queries.jsonl", ({"_id": q["_id"], "text": q["text"]} for q in held_out))
    for split in ("dev", "test"):
        with atomic_write(folder / "qrels" / f"{split}.tsv") as handle:
            handle.write("query-id\tcorpus-id\tscore\n")
            for query in held_out:
                if query["split"] == split:
                    handle.write(f"{query['_id']}\t{query['passage_id']}\t1\n")

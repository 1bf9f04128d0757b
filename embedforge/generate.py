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
Imported pairs (`queries`) join first, through the same splits and dedup.
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


def request_key(identity: dict, messages: list, temperature: float, max_tokens: int, sample_index: int, response_format: str = "text", reask: int = 0) -> str:
    sampling = {"temperature": temperature, "max_tokens": max_tokens, "response_format": response_format}
    return sha256_json({**identity, "messages": messages, "sampling": sampling, "sample_index": sample_index, "reask": reask})


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
    cost_usd: float = 0.0
    imported_answers: int = 0

    def as_dict(self) -> dict:
        return {
            "cost_usd": self.cost_usd,
            "imported_answers": self.imported_answers,
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
    if not by_split["train"] and not config.queries:
        raise EmbedforgeError("No passage fell in the train split", where="generate", fix="add passages or lower dev_fraction/test_fraction")

    accepted: list[dict] = []
    rejects: list[dict] = []
    seen_queries: set[str] = set()
    if llm is None and not config.queries:
        raise EmbedforgeError("No LLM and no --queries to import", where="generate", fix="pass --base-url/--llm-model, or --queries FILE")
    semaphore = asyncio.Semaphore(config.concurrency)
    budget = {"calls": 0}
    user_queries = tuple(load_user_queries(config.examples)) if config.examples else ()
    exported: list[dict] | None = [] if config.export_batch else None
    if config.import_batch:
        stats.imported_answers = import_batch_results(config.import_batch, ledger_path, answered)
    if config.queries:
        import_pairs(config.queries, passages, config, seen_queries, accepted, stats)

    async def ask(work: _Work, reask: int, ledger: JsonlAppender) -> tuple[str, Completion | None]:
        messages = render_messages(prompt, work.passage["text"], work.passage.get("title", ""), per_passage, delimiter, user_queries)
        key = request_key(llm.identity, messages, config.temperature, config.max_tokens, work.sample_index, config.response_format, reask)
        if key in answered:
            stats.calls_reused += 1
            row = answered[key]
            return key, Completion(text=row["response"], finish_reason=row.get("finish_reason"), usage=row.get("usage", {}))
        if exported is not None:
            exported.append(batch_request(key, llm.identity["model"], messages, config))
            return key, None
        async with semaphore:
            # Checked once a slot is free, so calls that waited see what the others spent.
            if _budget_spent(budget, stats, config):
                return key, None
            budget["calls"] += 1
            completion = await llm.complete(messages, temperature=config.temperature, max_tokens=config.max_tokens, response_format=config.response_format)
            stats.usage.update(completion.usage)
        row = {
            "request_sha": key,
            "passage_id": work.passage["_id"],
            "sample_index": work.sample_index,
            "reask": reask,
            "response": completion.text,
            "finish_reason": completion.finish_reason,
            "usage": completion.usage,
            "latency": round(completion.latency, 4),
            "attempts": completion.attempts,
        }
        ledger.append(row)  # at once: a crash after this line never pays for this call again
        answered[key] = row
        stats.calls_made += 1
        return key, completion

    async def answer(work: _Work, ledger: JsonlAppender) -> tuple[_Work, str, Completion | None, list[str]]:
        # A malformed answer is re-asked (a new cache key) a bounded number of times, then rejected.
        for reask in range(config.max_reasks + 1):
            key, completion = await ask(work, reask, ledger)
            if completion is None:
                return work, key, None, []
            queries = parse_queries(completion.text, per_passage)
            if queries:
                break
        return work, key, completion, queries

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
        for work, key, completion, queries in sorted(results, key=lambda item: (item[0].passage["_id"], item[0].sample_index)):
            progress.update(1)
            if completion is None:
                continue  # over budget, or exported for the batch API
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
        if llm is not None:
            await _run_loop(held_out, by_split["train"], chunk, process, ledger, stats, budget, config, exported)

    if exported is not None:
        count = write_jsonl(config.export_batch, exported)
        raise BatchExported(
            f"Wrote {count} pending requests as OpenAI Batch API JSONL (answers already in the ledger are not included)",
            where=str(config.export_batch),
            fix="submit it to the Batch API (or `vllm run-batch`), then rerun with --import-batch RESULTS.jsonl",
        )
    if stats.accepted["train"] < config.min_pairs:
        why = "the request budget (max_requests / max_cost) is spent" if _budget_spent(budget, stats, config) else (
            f"{config.max_rounds} rounds over {len(by_split['train'])} train passages are done" if llm is not None else "no LLM is configured (llm_model = none)"
        )
        raise EmbedforgeError(
            f"Only {stats.accepted['train']} training pairs passed the filters, fewer than min_pairs={config.min_pairs}: {why}. "
            f"Rejected so far: {dict(stats.rejected)}",
            where=str(ledger_path),
            fix="raise --max-rounds or --queries-per-passage, add passages, loosen --round-trip-k, or lower --min-pairs; answers already received are kept and reused",
        )

    stats.cost_usd = cost_of(stats.usage, config)
    write_jsonl(out_dir / "queries.jsonl", accepted)
    write_jsonl(out_dir / "rejects.jsonl", rejects)
    shutil.copyfile(prompt.path, out_dir / ".prompt.tmp")
    (out_dir / ".prompt.tmp").replace(out_dir / f"prompt{prompt.path.suffix}")
    write_eval_set(out_dir / "eval", accepted)
    return stats.as_dict()


async def _run_loop(held_out, train_passages, chunk, process, ledger, stats, budget, config, exported) -> None:
    with tqdm(total=len(held_out), desc="generate held-out queries", unit="passage", disable=None) as progress:
        for start in range(0, len(held_out), chunk):
            await process(held_out[start : start + chunk], ledger, progress)
    with tqdm(total=config.min_pairs, initial=min(stats.accepted["train"], config.min_pairs), desc="generate training pairs", unit="pair", disable=None) as pairs_bar:
        # An export cannot know which answers will pass the filters: it writes one full round.
        rounds = 1 if exported is not None else config.max_rounds
        for sample_index in range(rounds):
            if stats.accepted["train"] >= config.min_pairs and exported is None:
                break
            stats.rounds = sample_index + 1
            train_work = [_Work(p, "train", sample_index) for p in train_passages]
            for start in range(0, len(train_work), chunk):
                before = stats.accepted["train"]
                await process(train_work[start : start + chunk], ledger, _NullBar())
                pairs_bar.update(min(stats.accepted["train"], config.min_pairs) - min(before, config.min_pairs))
                if exported is None and (stats.accepted["train"] >= config.min_pairs or _budget_spent(budget, stats, config)):
                    break
            if _budget_spent(budget, stats, config):
                break


class BatchExported(EmbedforgeError):
    """Not a failure: the pending requests were written for the batch API instead of being made."""


def cost_of(usage: Counter | dict, config: GenerateConfig) -> float:
    return round(
        usage.get("prompt_tokens", 0) * config.price_input_per_million / 1e6 + usage.get("completion_tokens", 0) * config.price_output_per_million / 1e6, 6
    )


def _budget_spent(budget: dict, stats: "Stats", config: GenerateConfig) -> bool:
    if config.max_requests is not None and budget["calls"] >= config.max_requests:
        return True
    return config.max_cost is not None and cost_of(stats.usage, config) >= config.max_cost


class _NullBar:
    def update(self, _: int) -> None:
        pass


def batch_request(key: str, model: str, messages: list, config: GenerateConfig) -> dict:
    """One line of an OpenAI Batch API input file (also read by `vllm run-batch`)."""
    return {
        "custom_id": key,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": messages, "temperature": config.temperature, "max_tokens": config.max_tokens},
    }


def import_batch_results(path: Path, ledger_path: Path, answered: dict) -> int:
    """Append Batch API results (`custom_id` = request_sha) to the ledger; returns how many were new."""
    added = 0
    with JsonlAppender(ledger_path) as ledger:
        for line_number, row in enumerate(iter_jsonl(path), start=1):
            key = row.get("custom_id")
            body = ((row.get("response") or {}).get("body")) or {}
            if not key or key in answered or (row.get("response") or {}).get("status_code", 200) != 200 or not body.get("choices"):
                continue  # failed or unknown lines stay pending and are asked again
            choice = body["choices"][0]
            entry = {
                "request_sha": key, "passage_id": None, "sample_index": None, "reask": None,
                "response": (choice.get("message") or {}).get("content"), "finish_reason": choice.get("finish_reason"),
                "usage": {k: v for k, v in (body.get("usage") or {}).items() if isinstance(v, int)}, "latency": None, "attempts": 1, "batch": True,
            }
            ledger.append(entry)
            answered[key] = entry
            added += 1
    return added


def load_user_queries(path: Path, limit: int = 20) -> list[str]:
    """Real user queries for the prompt: a text file (one per line) or JSONL with a 'text' or 'query' field."""
    path = Path(path)
    if path.suffix == ".jsonl":
        queries = [str(row.get("text") or row.get("query") or "").strip() for row in iter_jsonl(path)]
    else:
        try:
            queries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except FileNotFoundError as error:
            raise EmbedforgeError("Examples file not found", where=str(path), fix="check --examples") from error
    queries = [q for q in queries if q]
    if not queries:
        raise EmbedforgeError("The examples file has no queries", where=str(path), fix="one query per line, or JSONL with a 'text' field")
    return queries[:limit]


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(query text, passage id) pairs: a BEIR folder (queries.jsonl + qrels/train.tsv) or a JSONL file."""
    path = Path(path)
    if path.is_dir():
        from embedforge.evaluate import read_qrels

        texts = {str(row["_id"]): row["text"] for row in iter_jsonl(path / "queries.jsonl")}
        qrels = read_qrels(path / "qrels" / "train.tsv")
        return [(texts[query], doc) for query, docs in qrels.items() if query in texts for doc, grade in docs.items() if grade > 0]
    pairs = []
    for line_number, row in enumerate(iter_jsonl(path), start=1):
        text = row.get("query") or row.get("text")
        passage = row.get("passage_id") or row.get("corpus-id")
        if not text or passage is None:
            raise EmbedforgeError("Each imported pair needs 'query' (or 'text') and 'passage_id'", where=f"{path}, line {line_number}", fix="fix that line")
        pairs.append((str(text), str(passage)))
    return pairs


def import_pairs(path: Path, passages: list[dict], config: GenerateConfig, seen: set, accepted: list[dict], stats: "Stats") -> None:
    """Add existing pairs through the same splits and dedup as generated ones (no LLM filters: they are real)."""
    known = {p["_id"] for p in passages}
    counts: Counter = Counter()
    for text, passage_id in read_pairs(path):
        if passage_id not in known:
            stats.rejected["import_unknown_passage"] += 1
            continue
        key = normalize_query(text) + "\t" + passage_id  # one query may have several positives
        if key in seen:
            stats.rejected["duplicate"] += 1
            continue
        seen.add(key)
        seen.add(normalize_query(text))  # generated queries must not repeat an imported one
        split = split_of(passage_id, config.dev_fraction, config.test_fraction)
        accepted.append({"_id": f"{passage_id}-i{counts[passage_id]}", "text": text, "passage_id": passage_id, "split": split, "prompt_sha": None, "request_sha": None, "imported": True})
        counts[passage_id] += 1
        stats.accepted[split] += 1


def write_eval_set(folder: Path, queries: list[dict]) -> None:
    """Held-out queries in BEIR layout (the corpus is the run's corpus.jsonl).

    The same query text in one split is one query with all its passages relevant: imported
    human queries often have several positives.
    """
    grouped: dict[tuple[str, str], dict] = {}
    for query in queries:
        if query["split"] in ("dev", "test"):
            entry = grouped.setdefault((query["split"], normalize_query(query["text"])), {"_id": query["_id"], "text": query["text"], "split": query["split"], "passages": []})
            entry["passages"].append(query["passage_id"])
    write_jsonl(folder / "queries.jsonl", ({"_id": q["_id"], "text": q["text"]} for q in grouped.values()))
    for split in ("dev", "test"):
        with atomic_write(folder / "qrels" / f"{split}.tsv") as handle:
            handle.write("query-id\tcorpus-id\tscore\n")
            for query in grouped.values():
                if query["split"] == split:
                    for passage in query["passages"]:
                        handle.write(f"{query['_id']}\t{passage}\t1\n")

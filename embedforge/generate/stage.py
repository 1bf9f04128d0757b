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


import asyncio
import gc
import logging
import random
import shutil
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from tqdm.auto import tqdm

from embedforge.config import GenerateConfig
from embedforge.corpus import split_of
from embedforge.errors import EmbedforgeError
from embedforge.files import JsonlAppender, iter_jsonl, sha256_json, write_jsonl
from embedforge.generate.filters import normalize_query, parse_queries, reject_reason
from embedforge.generate.sources import batch_request, import_batch_results, import_pairs, load_user_queries, write_eval_set
from embedforge.llm import ChatModel, Completion, RequestFailed
from embedforge.prompts import Prompt, clip_passage, render_messages

logger = logging.getLogger(__name__)
# The endpoint is judged down, and the stage stops, when this many of the last FAILING_WINDOW
# requests failed; isolated failures are recorded and their passages asked again later.
FAILING_WINDOW = 20
FAILING_SHARE = 0.8
STAGE_VERSION = 3  # 2: imported pairs are split by query, not by passage; 3: imported ids from the pair, not its line


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
    usage_reused: Counter = field(default_factory=Counter)  # answers from the ledger, paid for by an earlier run
    generated: int = 0
    accepted: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    rounds: int = 0
    cost_usd: float = 0.0
    cost_usd_reused: float = 0.0
    imported_answers: int = 0
    failed_requests: int = 0
    retries: Counter = field(default_factory=Counter)  # failed attempts that were retried (or ran out), by status
    backoffs: int = 0

    def as_dict(self) -> dict:
        return {
            "failed_requests": self.failed_requests,
            "backoffs": self.backoffs,
            "retries": dict(self.retries),
            "cost_usd": self.cost_usd,
            "cost_usd_reused": self.cost_usd_reused,
            "tokens": self.usage.get("prompt_tokens", 0) + self.usage.get("completion_tokens", 0),
            "imported_answers": self.imported_answers,
            "calls_made": self.calls_made,
            "calls_reused": self.calls_reused,
            "usage": dict(self.usage),
            "usage_reused": dict(self.usage_reused),
            "generated": self.generated,
            "accepted": dict(self.accepted),
            "rejected": dict(self.rejected),
            "rounds": self.rounds,
        }


RoundTrip = Callable[[list[str], list[str]], list[int]]  # (queries, passage ids) -> rank of each passage (0-based)


def generate(
    passages: list[dict], prompt: Prompt, out_dir: Path, config: GenerateConfig, llm: ChatModel, seed: int, round_trip: RoundTrip | None = None
) -> dict:
    # Objects that exist before the calls start (the corpus, the ledger, torch and a model when the
    # round trip is on) live through the whole stage: frozen, the collector stops rescanning them.
    # Unfrozen, each full collection paused every in-flight call (~45 ms on the throughput
    # benchmark); with torch loaded the stage reached 0.74 of the ideal throughput instead of 0.87.
    # A caller that froze objects of its own keeps them frozen, and keeps its own unfreeze.
    freeze = gc.isenabled() and gc.get_freeze_count() == 0
    if freeze:
        gc.freeze()
    try:
        return asyncio.run(_generate(passages, prompt, Path(out_dir), config, llm, seed, round_trip))
    finally:
        if freeze:
            gc.unfreeze()


async def _generate(passages, prompt, out_dir, config, llm, seed, round_trip) -> dict:
    out_dir.mkdir(parents=True, exist_ok=True)
    ledger_path = out_dir / "requests.jsonl"
    # Failed requests are in the ledger too, never as answers: they are asked again.
    answered = {row["request_sha"]: row for row in iter_jsonl(ledger_path) if not row.get("failed")} if ledger_path.exists() else {}
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
        import_pairs(config.queries, passages, config, seen_queries, accepted, rejects, stats)
        _warn_unknown_imports(rejects, config.queries)
    recent: deque[bool] = deque(maxlen=FAILING_WINDOW)  # True for a failed request
    failed_statuses: Counter = Counter()

    def failed(work: _Work, key: str, reask: int, failure: RequestFailed, ledger: JsonlAppender) -> None:
        ledger.append({"request_sha": key, "passage_id": work.passage["_id"], "sample_index": work.sample_index, "reask": reask, "failed": True,
                       "reason": failure.reason, "statuses": failure.statuses, "error": failure.what})
        stats.failed_requests += 1
        stats.retries.update(failure.statuses)
        stats.backoffs += failure.backoffs
        failed_statuses.update(failure.statuses)
        recent.append(True)
        if len(recent) == FAILING_WINDOW and sum(recent) >= FAILING_SHARE * FAILING_WINDOW:
            raise EndpointFailing(
                f"The endpoint is failing: {sum(recent)} of the last {FAILING_WINDOW} requests failed (attempts by status: {_counts(failed_statuses)})",
                where=failure.where,
                fix=f"{failure.fix}. Rerun the same command to resume: the {stats.calls_made} answers received are kept and not paid again",
            )

    async def ask(work: _Work, reask: int, ledger: JsonlAppender) -> tuple[str, Completion | None, str | None]:
        """(request key, the answer or None, why there is none: "failed", "context_length" or None)."""
        text = clip_passage(work.passage["text"], config.max_passage_tokens)
        messages = render_messages(prompt, text, work.passage.get("title", ""), per_passage, delimiter, user_queries)
        key = request_key(llm.identity, messages, config.temperature, config.max_tokens, work.sample_index, config.response_format, reask)
        if key in answered:
            stats.calls_reused += 1
            row = answered[key]
            stats.usage_reused.update(row.get("usage") or {})
            return key, Completion(text=row["response"], finish_reason=row.get("finish_reason"), usage=row.get("usage", {})), None
        if exported is not None:
            exported.append(batch_request(key, llm.identity["model"], messages, config))
            return key, None, None
        async with semaphore:
            # Checked once a slot is free, so calls that waited see what the others spent.
            if _budget_spent(budget, stats, config):
                return key, None, None
            budget["calls"] += 1
            try:
                completion = await llm.complete(
                    messages, temperature=config.temperature, max_tokens=config.max_tokens, response_format=config.response_format, seed=int(key[:8], 16)
                )
            except RequestFailed as failure:
                failed(work, key, reask, failure, ledger)
                return key, None, failure.reason
            recent.append(False)
            stats.usage.update(completion.usage)
            stats.retries.update(completion.retried)
            stats.backoffs += completion.backoffs
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
        return key, completion, None

    async def answer(work: _Work, ledger: JsonlAppender) -> tuple[_Work, str, Completion | None, list[str], str | None]:
        # A malformed answer is re-asked (a new cache key) a bounded number of times, then rejected.
        for reask in range(config.max_reasks + 1):
            key, completion, failure = await ask(work, reask, ledger)
            if completion is None:
                return work, key, None, [], failure
            queries = parse_queries(completion.text, per_passage)
            if queries:
                break
        return work, key, completion, queries, None

    def reject(work: _Work, text: str, reason: str, key: str) -> None:
        stats.rejected[reason] += 1
        rejects.append({"passage_id": work.passage["_id"], "split": work.split, "text": text, "reason": reason, "request_sha": key})

    def launch(batch: list[_Work], ledger: JsonlAppender) -> list[asyncio.Task]:
        return [asyncio.create_task(answer(work, ledger)) for work in batch]

    async def process(batch: list[_Work], ledger: JsonlAppender, progress, tasks: list[asyncio.Task]) -> None:
        """Wait for the answers of `batch` (its launched `tasks`) and filter them, in passage order."""
        try:
            results = [await task for task in tasks]
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        candidates = []  # (work, position, text, key) that passed the cheap filters
        for work, key, completion, queries, failure in sorted(results, key=lambda item: (item[0].passage["_id"], item[0].sample_index)):
            progress.update(1)
            if failure == "context_length":
                reject(work, "", "context_length_exceeded", key)  # this passage, not the stage
            if completion is None:
                continue  # failed (asked again in a later round or run), over budget, or exported for the batch API
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
        # Held-out queries pass the cheap filters but never the round trip: keeping only test
        # queries the base model already answers would flatter the base model.
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

    def write_decided() -> None:
        # Also on a stop short of min_pairs: what was accepted and rejected, and why, is on disk.
        write_jsonl(out_dir / "queries.jsonl", accepted)
        write_jsonl(out_dir / "rejects.jsonl", rejects)

    chunk = max(64, config.concurrency * 4)
    with JsonlAppender(ledger_path) as ledger:
        if llm is not None:
            try:
                await _run_loop(held_out, by_split["train"], chunk, process, launch, ledger, stats, budget, config, exported)
            except EndpointFailing:
                write_decided()
                raise
            finally:
                await llm.aclose()  # its connections belong to this event loop, which ends here
    if stats.failed_requests or stats.retries:
        logger.info("generate: %d failed requests; failed attempts by status: %s; concurrency lowered %d times for rate limits",
                    stats.failed_requests, _counts(stats.retries) or "none", stats.backoffs)

    if exported is not None:
        count = write_jsonl(config.export_batch, exported)
        raise BatchExported(
            f"Wrote {count} pending requests as OpenAI Batch API JSONL (answers already in the ledger are not included)",
            where=str(config.export_batch),
            fix="submit it to the Batch API (or `vllm run-batch`), then rerun with --import-batch RESULTS.jsonl",
        )
    if stats.accepted["train"] < config.min_pairs:
        write_decided()
        if stats.failed_requests and not stats.calls_made and not stats.calls_reused:
            raise EndpointFailing(
                f"Every request failed ({stats.failed_requests} requests; attempts by status: {_counts(failed_statuses)})",
                where=llm.identity["base_url"], fix="check --base-url and that the server answers chat completions, then rerun the same command",
            )
        why = "the request budget (max_requests / max_cost) is spent" if _budget_spent(budget, stats, config) else (
            f"{config.max_rounds} rounds over {len(by_split['train'])} train passages are done" if llm is not None else "no LLM is configured (llm_model = none)"
        )
        if stats.failed_requests:
            why += f"; {stats.failed_requests} requests failed (asked again on a rerun)"
        raise EmbedforgeError(
            f"Only {stats.accepted['train']} training pairs passed the filters, fewer than min_pairs={config.min_pairs}: {why}. "
            f"Rejected so far, by reason: {_counts(stats.rejected) or 'none'} (each in {out_dir / 'rejects.jsonl'})",
            where=str(ledger_path),
            fix=_shortfall_fix(stats, llm is not None),
        )

    stats.cost_usd = cost_of(stats.usage, config)
    stats.cost_usd_reused = cost_of(stats.usage_reused, config)
    write_decided()
    shutil.copyfile(prompt.path, out_dir / ".prompt.tmp")
    (out_dir / ".prompt.tmp").replace(out_dir / f"prompt{prompt.path.suffix}")
    write_eval_set(out_dir / "eval", accepted)
    return stats.as_dict()


async def _in_order(chunks, launch, process, ledger, progress, prefetch, chunk_done) -> None:
    """Filter chunks one after the other, in order, so the outcome does not depend on timing; the
    next chunk's calls start while the current one finishes whenever `prefetch(current)` says that
    chunk is certainly needed, so the endpoint never waits on the filters or on a chunk's last
    answers. Stops when `chunk_done()` says so; calls launched but not needed are cancelled."""
    tasks, pending = None, []
    try:
        for number, batch in enumerate(chunks):
            tasks = tasks or launch(batch, ledger)
            pending = launch(chunks[number + 1], ledger) if number + 1 < len(chunks) and prefetch(batch) else []
            await process(batch, ledger, progress, tasks)
            tasks = pending
            if chunk_done():
                break
    finally:
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


async def _run_loop(held_out, train_passages, chunk, process, launch, ledger, stats, budget, config, exported) -> None:
    def split(work: list[_Work]) -> list[list[_Work]]:
        return [work[start : start + chunk] for start in range(0, len(work), chunk)]

    with tqdm(total=len(held_out), desc="generate held-out queries", unit="passage", disable=None) as progress:
        await _in_order(split(held_out), launch, process, ledger, progress, prefetch=lambda batch: True, chunk_done=lambda: False)
    with tqdm(total=config.min_pairs, initial=min(stats.accepted["train"], config.min_pairs), desc="generate training pairs", unit="pair", disable=None) as pairs_bar:

        def needed_after(batch: list[_Work]) -> bool:
            # Even if every answer of this chunk passed, min_pairs would not be reached: the next is needed.
            return exported is not None or stats.accepted["train"] + len(batch) * config.queries_per_passage < config.min_pairs

        def chunk_done() -> bool:
            pairs_bar.update(min(stats.accepted["train"], config.min_pairs) - pairs_bar.n)
            return exported is None and (stats.accepted["train"] >= config.min_pairs or _budget_spent(budget, stats, config))

        # An export cannot know which answers will pass the filters: it writes one full round.
        rounds = 1 if exported is not None else config.max_rounds
        for sample_index in range(rounds):
            if (stats.accepted["train"] >= config.min_pairs and exported is None) or _budget_spent(budget, stats, config):
                break
            stats.rounds = sample_index + 1
            work = [_Work(p, "train", sample_index) for p in train_passages]
            await _in_order(split(work), launch, process, ledger, _NullBar(), needed_after, chunk_done)


class BatchExported(EmbedforgeError):
    """Not a failure: the pending requests were written for the batch API instead of being made."""


class EndpointFailing(EmbedforgeError):
    """Most recent requests failed: the endpoint is down or refusing, not one request unlucky."""


def _counts(counter: Counter | dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counter.items(), key=lambda item: (-item[1], item[0])))


def _shortfall_fix(stats: Stats, has_llm: bool) -> str:
    """The fix for a stop short of min_pairs, by what threw the most queries away."""
    top = max(stats.rejected, key=stats.rejected.get) if stats.rejected else None
    if top == "truncated":
        return "raise --max-tokens: most answers were cut off before they ended; answers already received are kept and reused"
    if top == "import_unknown_passage":
        return "the imported pairs name passage ids that are not in the corpus: check their passage_id values against the corpus ids (--id-field)"
    if not has_llm:
        return "import more pairs with --queries, or configure an LLM (--base-url/--llm-model) to generate the rest, or lower --min-pairs"
    return "raise --max-rounds or --queries-per-passage, add passages, loosen --round-trip-k, or lower --min-pairs; answers already received are kept and reused"


def _warn_unknown_imports(rejects: list[dict], path: Path) -> None:
    unknown = [row["passage_id"] for row in rejects if row["reason"] == "import_unknown_passage"]
    if unknown:
        logger.warning("%d imported pairs of %s name passages that are not in the corpus (e.g. %s): rejected, see generate/rejects.jsonl",
                       len(unknown), path, ", ".join(sorted(set(unknown))[:3]))


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



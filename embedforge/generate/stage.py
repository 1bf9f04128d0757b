"""Stage 1, generate: an LLM writes search queries for passages until enough pairs exist.

Reads:  corpus.jsonl, the prompt file, the chat model, the base model's corpus embeddings.
Writes: generate/requests.jsonl (append-only ledger, one line per answered LLM call),
        generate/queries.jsonl, generate/rejects.jsonl, generate/prompt.toml (with several
        --prompt files: generate/prompt-1-NAME.toml, ...; with --held-out-prompt,
        generate/prompt-held-out-NAME.toml too),
        generate/eval/{queries.jsonl, qrels/dev.tsv, qrels/test.tsv}.
Keeps:  every paid answer: a call is keyed by sha256 of {model, endpoint without credentials,
        messages, sampling parameters, sample index}; a rerun (after a crash, or after a
        prompt edit is reverted) reuses the ledger and only makes missing calls.

Passages are split train/dev/test by a hash of their id. Training pairs come from train
passages in a seeded order, round after round (a new sample index is a new call) until
`min_pairs` pairs pass every filter; dev and test passages get held-out queries once.
With several prompts, each passage is asked with one of them, by a hash of its id within
`prompt_shares`, so which prompt a passage gets depends on neither order nor the other passages.
A `held_out_prompt` asks every dev and test passage instead, in a style training did not see.
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
from typing import Callable, Sequence

from embedforge.config import GenerateConfig
from embedforge.corpus import split_of, unit_hash
from embedforge.errors import EmbedforgeError
from embedforge.files import JsonlAppender, iter_jsonl, sha256_json, write_jsonl
from embedforge.generate.filters import parse_queries, reject_reason
from embedforge.generate.sources import batch_request, import_batch_results, import_pairs, load_user_queries, write_eval_set
from embedforge.llm import ChatModel, Completion, RequestFailed
from embedforge.progress import progress_bar
from embedforge.prompts import Prompt, clip_passage, render_messages
from embedforge.text import normalize_text

logger = logging.getLogger(__name__)
# The endpoint is judged down, and the stage stops, when this many of the last FAILING_WINDOW
# requests failed; isolated failures are recorded and their passages asked again later.
FAILING_WINDOW = 20
FAILING_SHARE = 0.8
STAGE_VERSION = 4  # 2: imported pairs are split by query, not by passage; 3: imported ids from the pair, not its line;
# 4: the local model's default samples_per_passage is 8 (was 4): a code default, so outside the config's fingerprint


def in_flight(config: GenerateConfig) -> int:
    """Calls in flight at most: --concurrency per endpoint (each replica holds its own); the local
    model batches --concurrency passages, each with its samples (they share one prefill)."""
    if not config.base_url:
        return config.concurrency * config.samples
    return config.concurrency * len(config.base_url)


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
    prompt: int = 0  # index into the stage's prompts


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
    barren_skipped: int = 0  # passage asks left out of a round: earlier rounds of that passage gave nothing
    by_prompt: dict = field(default_factory=dict)  # with several prompts: file name -> Counter of answers, accepted, rejected

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
            "barren_skipped": self.barren_skipped,
            **({"by_prompt": {name: dict(counts) for name, counts in self.by_prompt.items()}} if self.by_prompt else {}),
        }


RoundTrip = Callable[[list[str], list[str]], list[int]]  # (queries, passage ids) -> rank of each passage (0-based)


def prompt_of(passage_id: str, shares: Sequence[float]) -> int:
    """Which of the prompts (by their shares) asks this passage: a hash of its id, salted apart
    from the split's, so each split gets every prompt in its share."""
    value, edge = unit_hash("prompt:" + passage_id), 0.0
    for index, share in enumerate(shares[:-1]):
        edge += share
        if value < edge:
            return index
    return len(shares) - 1


def generate(
    passages: list[dict], prompts: Prompt | Sequence[Prompt], out_dir: Path, config: GenerateConfig, llm: ChatModel, seed: int, round_trip: RoundTrip | None = None
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
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        prompts = (prompts,) if isinstance(prompts, Prompt) else tuple(prompts)
        if len(prompts) != len(config.prompt_files):
            raise ValueError(f"{len(prompts)} prompts for the config's {len(config.prompt_files)} prompt files")
        return asyncio.run(_Generation(passages, prompts, out_dir, config, llm, seed, round_trip).run())
    finally:
        if freeze:
            gc.unfreeze()


class _Generation:
    """One generate stage's state: what was answered, accepted and rejected so far, and the
    budgets; its methods are the steps of the loop. An object rather than closures, so each piece
    of state is named once and every step can be read on its own."""

    def __init__(self, passages, prompts: tuple[Prompt, ...], out_dir: Path, config: GenerateConfig, llm: ChatModel | None, seed: int, round_trip: RoundTrip | None):
        self.passages, self.prompts, self.out_dir, self.config, self.llm, self.round_trip = passages, prompts, out_dir, config, llm, round_trip
        self.ledger_path = out_dir / "requests.jsonl"
        # Failed requests are in the ledger too, never as answers: they are asked again.
        self.answered = {row["request_sha"]: row for row in iter_jsonl(self.ledger_path) if not row.get("failed")} if self.ledger_path.exists() else {}
        self.stats = Stats()
        self.delimiters = [run_delimiter(seed, prompt.sha256) for prompt in prompts]
        self.prompt_index = {p["_id"]: prompt_of(p["_id"], config.shares) for p in passages}  # one prompt: all 0
        self.by_split: dict[str, list[dict]] = {"train": [], "dev": [], "test": []}
        for passage in passages:
            self.by_split[split_of(passage["_id"], config.dev_fraction, config.test_fraction)].append(passage)
        rng = random.Random(seed)
        for split in self.by_split:
            rng.shuffle(self.by_split[split])
        per_passage = config.queries_per_passage
        self.held_out = [self.work(p, "dev", 0) for p in self.by_split["dev"][: -(-config.max_dev_queries // per_passage)]]
        self.held_out += [self.work(p, "test", 0) for p in self.by_split["test"][: -(-config.max_test_queries // per_passage)]]
        self.accepted: list[dict] = []
        self.rejects: list[dict] = []
        self.seen_queries: set[str] = set()
        self.semaphore: asyncio.Semaphore | None = None  # made inside the event loop
        self.calls_started = 0  # new calls counted against max_requests, in flight ones included
        self.user_queries = tuple(load_user_queries(config.examples)) if config.examples else ()
        self.exported: list[dict] | None = [] if config.export_batch else None
        self.recent: deque[bool] = deque(maxlen=FAILING_WINDOW)  # True for a failed request
        self.failed_statuses: Counter = Counter()
        # Replicas add none: where the stage stops must not depend on them. A whole number of
        # passages: a passage's samples are filtered together (see process).
        self.chunk = max(64, config.concurrency * 4) * config.samples
        self.barren: Counter = Counter()  # passage id -> rounds whose answer gave no accepted training query
        self.ledger: JsonlAppender | None = None

    def work(self, passage: dict, split: str, sample_index: int) -> _Work:
        # A held-out prompt, when set, is the last one: dev and test queries in another style, so
        # that the judge is not the style the model was trained on.
        held_out = split != "train" and self.config.held_out_prompt is not None
        return _Work(passage, split, sample_index, len(self.prompts) - 1 if held_out else self.prompt_index[passage["_id"]])

    def count(self, work: _Work, what: str) -> None:
        if len(self.prompts) > 1:
            self.stats.by_prompt.setdefault(self.prompts[work.prompt].path.name, Counter())[what] += 1

    # --- one request --------------------------------------------------------------------------

    def budget_spent(self) -> bool:
        config = self.config
        if config.max_requests is not None and self.calls_started >= config.max_requests:
            return True
        return config.max_cost is not None and cost_of(self.stats.usage, config) >= config.max_cost

    def failed(self, work: _Work, key: str, reask: int, failure: RequestFailed) -> None:
        stats = self.stats
        self.ledger.append({"request_sha": key, "passage_id": work.passage["_id"], "sample_index": work.sample_index, "reask": reask, "failed": True,
                            "reason": failure.reason, "statuses": failure.statuses, "error": failure.what})
        stats.failed_requests += 1
        stats.retries.update(failure.statuses)
        stats.backoffs += failure.backoffs
        self.failed_statuses.update(failure.statuses)
        self.recent.append(True)
        if len(self.recent) == FAILING_WINDOW and sum(self.recent) >= FAILING_SHARE * FAILING_WINDOW:
            raise EndpointFailing(
                f"The endpoint is failing: {sum(self.recent)} of the last {FAILING_WINDOW} requests failed (attempts by status: {_counts(self.failed_statuses)})",
                where=failure.where,
                fix=f"{failure.fix}. Rerun the same command to resume: the {stats.calls_made} answers received are kept and not paid again",
            )

    async def ask(self, work: _Work, reask: int) -> tuple[str, Completion | None, str | None]:
        """(request key, the answer or None, why there is none: "failed", "context_length" or None)."""
        config, stats, llm = self.config, self.stats, self.llm
        text = clip_passage(work.passage["text"], config.passage_tokens)
        messages = render_messages(self.prompts[work.prompt], text, work.passage.get("title", ""), config.queries_per_passage, self.delimiters[work.prompt], self.user_queries)
        key = request_key(llm.identity, messages, config.temperature, config.max_tokens, work.sample_index, config.response_format, reask)
        if key in self.answered:
            stats.calls_reused += 1
            row = self.answered[key]
            stats.usage_reused.update(row.get("usage") or {})
            return key, Completion(text=row["response"], finish_reason=row.get("finish_reason"), usage=row.get("usage", {})), None
        if self.exported is not None:
            self.exported.append(batch_request(key, llm.identity["model"], messages, config))
            return key, None, None
        async with self.semaphore:
            # Checked once a slot is free, so calls that waited see what the others spent.
            if self.budget_spent():
                return key, None, None
            self.calls_started += 1
            try:
                completion = await llm.complete(
                    messages, temperature=config.temperature, max_tokens=config.max_tokens, response_format=config.response_format, seed=int(key[:8], 16)
                )
            except RequestFailed as failure:
                self.failed(work, key, reask, failure)
                return key, None, failure.reason
            self.recent.append(False)
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
        self.ledger.append(row)  # at once: a crash after this line never pays for this call again
        self.answered[key] = row
        stats.calls_made += 1
        return key, completion, None

    async def answer(self, work: _Work) -> tuple[_Work, str, Completion | None, list[str], str | None]:
        # A malformed answer is re-asked (a new cache key) a bounded number of times, then rejected.
        for reask in range(self.config.max_reasks + 1):
            key, completion, failure = await self.ask(work, reask)
            if completion is None:
                return work, key, None, [], failure
            queries = parse_queries(completion.text, self.config.queries_per_passage)
            if queries:
                break
        return work, key, completion, queries, None

    # --- filtering, in passage order ----------------------------------------------------------------

    def reject(self, work: _Work, text: str, reason: str, key: str) -> None:
        self.stats.rejected[reason] += 1
        self.count(work, "rejected")
        self.rejects.append({"passage_id": work.passage["_id"], "split": work.split, "text": text, "reason": reason, "request_sha": key})

    def launch(self, batch: list[_Work], progress) -> list[asyncio.Task]:
        return [asyncio.create_task(self.counted(work, progress)) for work in batch]

    async def counted(self, work: _Work, progress):
        """An answer, counted as it arrives, not when its chunk is filtered: on the embedded model a
        chunk of 512 answers takes minutes, and a log must show a slow run is not a hung one. Counted
        inside the task, so before anything awaiting it sees it done (a done-callback ran later: when a
        batch of answers landed at once, the bar was closed first, at 428 of 433 in the demo)."""
        result = await self.answer(work)
        progress.update(1)
        return result

    async def process(self, batch: list[_Work], tasks: list[asyncio.Task]) -> None:
        """Wait for the answers of `batch` (its launched `tasks`) and filter them, in passage order."""
        config, stats = self.config, self.stats
        try:
            results = [await task for task in tasks]
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        candidates = []  # (work, position, text, key) that passed the cheap filters
        for work, key, completion, queries, failure in sorted(results, key=lambda item: (item[0].passage["_id"], item[0].sample_index)):
            if completion is not None:
                self.count(work, "answers")
            if failure == "context_length":
                self.reject(work, "", "context_length_exceeded", key)  # this passage, not the stage
            if completion is None:
                continue  # failed (asked again in a later round or run), over budget, or exported for the batch API
            if not queries:
                self.reject(work, completion.text or "", "empty_or_unparseable", key)
            truncated = completion.finish_reason == "length"
            for position, query in enumerate(queries):
                stats.generated += 1
                # With finish_reason "length", only the last query can be cut off.
                reason = reject_reason(query, work.passage["text"], config, truncated and position == len(queries) - 1)
                normalized = normalize_text(query)
                if reason is None and normalized in self.seen_queries:
                    reason = "duplicate"
                if reason:
                    self.reject(work, query, reason, key)
                    continue
                self.seen_queries.add(normalized)
                candidates.append((work, position, query, key))
        # Held-out queries pass the cheap filters but never the round trip: keeping only test
        # queries the base model already answers would flatter the base model.
        train_candidates = [c for c in candidates if c[0].split == "train"]
        use_round_trip = self.round_trip and config.round_trip_k and train_candidates
        ranks = self.round_trip([c[2] for c in train_candidates], [c[0].passage["_id"] for c in train_candidates]) if use_round_trip else []
        rank_of = {id(c): rank for c, rank in zip(train_candidates, ranks)}
        ranked_out = _ranked_out(train_candidates, rank_of, config) if config.keep_per_passage else set()
        fruitful = set()  # passage ids with an accepted query from this chunk
        for candidate in candidates:
            work, position, query, key = candidate
            if id(candidate) in rank_of and rank_of[id(candidate)] >= config.round_trip_k:
                self.reject(work, query, "round_trip", key)
                continue
            if id(candidate) in ranked_out:
                self.reject(work, query, "ranked_out", key)
                continue
            fruitful.add(work.passage["_id"])
            stats.accepted[work.split] += 1
            self.count(work, f"accepted_{work.split}")
            self.accepted.append(
                {
                    "_id": f"{work.passage['_id']}-q{work.sample_index * config.queries_per_passage + position}",
                    "text": query,
                    "passage_id": work.passage["_id"],
                    "split": work.split,
                    "prompt_sha": self.prompts[work.prompt].sha256,
                    "request_sha": key,
                }
            )
        # A round of a passage is barren when none of its samples gave a training query.
        answered = {work.passage["_id"] for work, _, completion, _, _ in results if completion is not None and work.split == "train"}
        for passage_id in answered - fruitful:
            self.barren[passage_id] += 1

    # --- the loop --------------------------------------------------------------------------------

    def chunks(self, work: list[_Work]) -> list[list[_Work]]:
        return [work[start : start + self.chunk] for start in range(0, len(work), self.chunk)]

    async def in_order(self, chunks: list[list[_Work]], progress, prefetch: Callable, chunk_done: Callable) -> None:
        """Filter chunks one after the other, in order, so the outcome does not depend on timing; the
        next chunk's calls start while the current one finishes whenever `prefetch(current)` says that
        chunk is certainly needed, so the endpoint never waits on the filters or on a chunk's last
        answers. Stops when `chunk_done()` says so; calls launched but not needed are cancelled."""
        tasks, pending = None, []
        try:
            for number, batch in enumerate(chunks):
                tasks = tasks or self.launch(batch, progress)
                pending = self.launch(chunks[number + 1], progress) if number + 1 < len(chunks) and prefetch(batch) else []
                await self.process(batch, tasks)
                tasks = pending
                if chunk_done():
                    break
        finally:
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

    def enough(self) -> bool:
        return self.exported is None and self.stats.accepted["train"] >= self.config.min_pairs

    async def run_rounds(self) -> None:
        config, stats = self.config, self.stats
        with progress_bar(total=len(self.held_out), desc="generate held-out queries", unit="passage") as progress:
            await self.in_order(self.chunks(self.held_out), progress, prefetch=lambda batch: True, chunk_done=lambda: False)
        with progress_bar(total=config.min_pairs, initial=min(stats.accepted["train"], config.min_pairs), desc="generate training pairs", unit="pair") as pairs_bar:

            def needed_after(batch: list[_Work]) -> bool:
                # Even if every answer of this chunk passed, min_pairs would not be reached: the next is needed.
                return self.exported is not None or stats.accepted["train"] + len(batch) * config.queries_per_passage < config.min_pairs

            def chunk_done() -> bool:
                pairs_bar.update(min(stats.accepted["train"], config.min_pairs) - pairs_bar.n)
                return self.enough() or (self.exported is None and self.budget_spent())

            # An export cannot know which answers will pass the filters: it writes one full round.
            rounds = 1 if self.exported is not None else config.max_rounds
            samples = config.samples
            for round_index in range(rounds):
                if self.enough() or self.budget_spent():
                    break
                stats.rounds = round_index + 1
                # A passage whose answers gave nothing in barren_rounds rounds would most likely give
                # nothing again: on the embedded model, each such ask is seconds of CPU thrown away.
                asked = [p for p in self.by_split["train"] if not config.barren_rounds or self.barren[p["_id"]] < config.barren_rounds]
                stats.barren_skipped += len(self.by_split["train"]) - len(asked)
                # Sample indexes round after round (round r asks r*samples ... r*samples+samples-1):
                # with one sample they are the round numbers, as in ledgers written before.
                work = [self.work(p, "train", round_index * samples + offset) for p in asked for offset in range(samples)]
                # No total: the round stops once the pairs suffice, so an estimate over all of its asks
                # read "2:06:48 left" in the demo's log while the pairs bar said 15 minutes.
                with progress_bar(desc=f"round {round_index + 1} answers (of at most {len(work)})", unit="answer", leave=False) as answers:
                    await self.in_order(self.chunks(work), answers, needed_after, chunk_done)

    def write_decided(self) -> None:
        # Also on a stop short of min_pairs: what was accepted and rejected, and why, is on disk.
        write_jsonl(self.out_dir / "queries.jsonl", self.accepted)
        write_jsonl(self.out_dir / "rejects.jsonl", self.rejects)

    async def run(self) -> dict:
        config, stats, llm, out_dir = self.config, self.stats, self.llm, self.out_dir
        if not self.by_split["train"] and not config.queries:
            raise EmbedforgeError("No passage fell in the train split", where="generate", fix="add passages or lower dev_fraction/test_fraction")
        if llm is None and not config.queries:
            raise EmbedforgeError("No LLM and no --queries to import", where="generate", fix="pass --base-url/--llm-model, or --queries FILE")
        self.semaphore = asyncio.Semaphore(in_flight(config))
        if config.import_batch:
            stats.imported_answers = import_batch_results(config.import_batch, self.ledger_path, self.answered)
        if config.queries:
            import_pairs(config.queries, self.passages, config, self.seen_queries, self.accepted, self.rejects, stats)
            _warn_unknown_imports(self.rejects, config.queries)

        with JsonlAppender(self.ledger_path) as self.ledger:
            if llm is not None:
                try:
                    await self.run_rounds()
                except EndpointFailing:
                    self.write_decided()
                    raise
                finally:
                    await llm.aclose()  # its connections belong to this event loop, which ends here
        if stats.failed_requests or stats.retries:
            logger.info("generate: %d failed requests; failed attempts by status: %s; concurrency lowered %d times for rate limits",
                        stats.failed_requests, _counts(stats.retries) or "none", stats.backoffs)

        if self.exported is not None:
            count = write_jsonl(config.export_batch, self.exported)
            raise BatchExported(
                f"Wrote {count} pending requests as OpenAI Batch API JSONL (answers already in the ledger are not included)",
                where=str(config.export_batch),
                fix="submit it to the Batch API (or `vllm run-batch`), then rerun with --import-batch RESULTS.jsonl",
            )
        if stats.accepted["train"] < config.min_pairs:
            self.write_decided()
            self.raise_shortfall()

        stats.cost_usd = cost_of(stats.usage, config)
        stats.cost_usd_reused = cost_of(stats.usage_reused, config)
        self.write_decided()
        trained_with = len(config.prompt)
        for number, prompt in enumerate(self.prompts, 1):
            if number > trained_with:
                name = f"prompt-held-out-{prompt.path.name}"
            else:
                name = f"prompt{prompt.path.suffix}" if trained_with == 1 else f"prompt-{number}-{prompt.path.name}"
            shutil.copyfile(prompt.path, out_dir / ".prompt.tmp")
            (out_dir / ".prompt.tmp").replace(out_dir / name)
        write_eval_set(out_dir / "eval", self.accepted)
        return stats.as_dict()

    def raise_shortfall(self) -> None:
        config, stats, llm = self.config, self.stats, self.llm
        if stats.failed_requests and not stats.calls_made and not stats.calls_reused:
            raise EndpointFailing(
                f"Every request failed ({stats.failed_requests} requests; attempts by status: {_counts(self.failed_statuses)})",
                where=llm.identity["base_url"], fix="check --base-url and that the server answers chat completions, then rerun the same command",
            )
        why = "the request budget (max_requests / max_cost) is spent" if self.budget_spent() else (
            f"{config.max_rounds} rounds over {len(self.by_split['train'])} train passages are done" if llm is not None else "no LLM is configured (llm_model = none)"
        )
        if stats.failed_requests:
            why += f"; {stats.failed_requests} requests failed (asked again on a rerun)"
        if stats.barren_skipped:
            why += (f"; {stats.barren_skipped} asks were left out, of passages whose answers gave nothing in {config.barren_rounds} rounds "
                    "(--barren-rounds 0 asks every passage every round)")
        raise EmbedforgeError(
            f"Only {stats.accepted['train']} training pairs passed the filters, fewer than min_pairs={config.min_pairs}: {why}. "
            f"Rejected so far, by reason: {_counts(stats.rejected) or 'none'} (each in {self.out_dir / 'rejects.jsonl'})",
            where=str(self.ledger_path),
            fix=_shortfall_fix(stats, llm is not None),
        )


def _ranked_out(candidates: list[tuple], rank_of: dict[int, int], config: GenerateConfig) -> set[int]:
    """The candidates past each passage's best keep_per_passage, by round-trip rank (then sample
    and position, so ties do not depend on timing). A chunk holds all samples of its passages,
    so this is per passage and round. Without ranks (no round trip given) sample order decides."""
    passing: dict[str, list[tuple]] = {}
    for candidate in candidates:
        work, position = candidate[0], candidate[1]
        rank = rank_of.get(id(candidate), 0)
        if rank < config.round_trip_k:
            passing.setdefault(work.passage["_id"], []).append((rank, work.sample_index, position, id(candidate)))
    return {entry[3] for ranked in passing.values() for entry in sorted(ranked)[config.keep_per_passage :]}


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
    if top == "ranked_out":
        return "raise --keep-per-passage, or leave it unset to keep every query that passes; answers already received are kept and reused"
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



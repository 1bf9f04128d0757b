"""Stage 2, mine: hard negatives for every training query from a FAISS index of the corpus.

Reads:  corpus.jsonl, generate/queries.jsonl, the base model's cached corpus embeddings.
Writes: mine/train.jsonl ({"anchor", "positive", "negative_1".."negative_k", "query_id",
        "positive_id", "known_positives", "known_positive_ids", "negative_ids", "positive_score", "negative_scores",
        "others_above_positive"}), mine/stats.json.
Keeps:  nothing beyond the shared embedding cache.

Per query, candidates come from the rank window range_min..range_max, counted over the
candidates that survive the rules below, as sentence-transformers does. The rules, in the order
a dropped candidate is counted under: the positive itself, another known positive of the same
query text (imported `known_only` positives included), the same normalized text as the
positive, a test passage, a score too close to the positive (positive-aware margins,
NV-Retriever's TopK-PercPos), a near-duplicate of the positive (cosine >= duplicate_threshold),
and, with a cross-encoder, a passage it judges relevant. A query with too few
valid candidates keeps what it has and is counted as a shortfall: never padded.

`others_above_positive` measures the corpus for the loss: the share of the other training
positives (as a batch holds them) that the base model scores above this query's own positive.
In a batch of B, about that share of B - 1 in-batch "negatives" are ranked above the positive:
false negatives that GIST's screening removes and plain MNRL trains against.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from embedforge.config import MineConfig
from embedforge.embeddings import CorpusEmbeddings, passage_text
from embedforge.files import write_json, write_jsonl
from embedforge.progress import progress_bar
from embedforge.text import normalize_text, record_of

STAGE_VERSION = 7  # 2: positives and negatives are title + text, as the models encode passages; 3: known_positives; 4: same_record; 5: margins from a known record's best passage; 6: others_above_positive; 7: known_positive_ids
# Other positives each query is scored against for others_above_positive: enough for a share to
# two decimals, few enough that a million pairs cost seconds.
OTHERS_SAMPLE = 4096
RULES = ("positive", "known_positive", "duplicate_text", "same_record", "test_split", "absolute_margin", "relative_margin", "max_score", "duplicate_cosine", "cross_encoder")
KEEP = 0  # rule code of a candidate no rule dropped; rule i of RULES has code i + 1
_CODE = {rule: number for number, rule in enumerate(RULES, start=1)}


def exclusion_codes(candidates: np.ndarray, positive: int, known: np.ndarray, text_group: np.ndarray, in_test: np.ndarray,
                    record_group: np.ndarray | None = None) -> np.ndarray:
    """Per candidate (corpus positions, ranked), the code of the first identity rule that drops it, else KEEP.

    `known` holds the positions of every known positive of the query, `text_group` a number per
    normalized passage text, `record_group` a number per record that the corpus cut into
    passages (the other passages of the positive's document speak of the same thing: likely
    false negatives), `in_test` the test-split passages.
    """
    codes = np.zeros(len(candidates), dtype=np.int8)
    same_record = record_group[candidates] == record_group[positive] if record_group is not None else np.zeros(len(candidates), dtype=bool)
    for rule, hit in (
        ("positive", candidates == positive),
        ("known_positive", np.isin(candidates, known)),
        ("duplicate_text", text_group[candidates] == text_group[positive]),
        ("same_record", same_record),
        ("test_split", in_test[candidates]),
    ):
        codes[(codes == KEEP) & hit] = _CODE[rule]
    return codes


def weakest_record_score(scores: np.ndarray, records: np.ndarray) -> float:
    """The lowest score among the known positive records, each scored by its best passage (as
    evaluation ranks a cut document, MaxP). A cut record's weakest passage (its reference list,
    say) would otherwise set a margin below nearly every candidate: on nfcorpus cut to 256
    tokens, 86% of the human training queries were left short of negatives."""
    best = np.full(int(records.max()) + 1, -np.inf)
    np.maximum.at(best, records, scores)
    return float(best[np.unique(records)].min())


def margin_codes(scores: np.ndarray, codes: np.ndarray, positive_score: float, config: MineConfig) -> np.ndarray:
    """Drop candidates that score too close to the positive (positive-aware margins, NV-Retriever's TopK-PercPos)."""
    codes = codes.copy()
    rules = []
    if config.absolute_margin is not None:
        rules.append(("absolute_margin", scores + config.absolute_margin > positive_score))
    if config.relative_margin is not None:
        rules.append(("relative_margin", scores > positive_score - abs(positive_score) * config.relative_margin))
    if config.max_score is not None:
        rules.append(("max_score", scores > config.max_score))
    for rule, hit in rules:
        codes[(codes == KEEP) & hit] = _CODE[rule]
    return codes


def window(codes: np.ndarray, config: MineConfig, rng: random.Random) -> list[int]:
    """The negatives: ranks range_min..range_max among the candidates no rule dropped, as in
    sentence-transformers' mine_hard_negatives (excluded positives never eat the window), then
    the top num_negatives or a random sample of them, best first."""
    kept = np.flatnonzero(codes == KEEP)[config.range_min : config.range_max].tolist()
    if config.sampling == "random" and len(kept) > config.num_negatives:
        kept = sorted(rng.sample(kept, config.num_negatives))
    return kept[: config.num_negatives]


def dropped_by_rule(codes: np.ndarray) -> Counter:
    counts = np.bincount(codes, minlength=len(RULES) + 1)
    return Counter({rule: int(counts[code]) for rule, code in _CODE.items() if counts[code]})


def _drop_near_duplicates_and_judged(codes, candidates, positive, vectors, config, query_text, passages_by_id, ids, cross_encoder) -> np.ndarray:
    """Among the candidates the cheaper rules kept, drop near-duplicates of the positive (cosine >=
    duplicate_threshold) and, with a cross-encoder, those it judges relevant. Both look only as far
    down the ranking as the window reaches: vectors are gathered, and pairs scored, in blocks."""
    codes = codes.copy()
    open_positions = np.flatnonzero(codes == KEEP)
    start = 0
    while start < len(open_positions):
        survivors = int(np.count_nonzero(codes[open_positions[:start]] == KEEP))
        if survivors >= config.range_max:
            break
        block = open_positions[start : start + config.range_max - survivors + 8]
        similarity = vectors[candidates[block]] @ vectors[positive]
        codes[block[similarity >= config.duplicate_threshold]] = _CODE["duplicate_cosine"]
        if cross_encoder is not None:
            remaining = block[codes[block] == KEEP]
            if len(remaining):
                pairs = [(query_text, passage_text(passages_by_id[ids[candidates[i]]])) for i in remaining]
                relevance = np.asarray(cross_encoder.predict(pairs, show_progress_bar=False), dtype=float)
                codes[remaining[relevance >= config.cross_encoder_threshold]] = _CODE["cross_encoder"]
        start += len(block)
    return codes


def others_above_positive(query_vectors: np.ndarray, vectors: np.ndarray, positives: np.ndarray, seed: int, sample: int = OTHERS_SAMPLE) -> np.ndarray:
    """Per row, the share of the other distinct training positives (at most `sample` of them,
    drawn with `seed`) that score above the row's own positive (`positives`: corpus positions)."""
    distinct = np.unique(positives)
    if len(distinct) > sample:
        distinct = np.sort(np.random.default_rng(seed).choice(distinct, size=sample, replace=False))
    shares = np.zeros(len(positives))
    if len(distinct) < 2:
        return shares
    others = vectors[distinct]
    for start in range(0, len(positives), 1024):
        block = slice(start, start + 1024)
        scores = query_vectors[block] @ others.T
        own = np.einsum("ij,ij->i", query_vectors[block], vectors[positives[block]])
        is_own = distinct[None, :] == positives[block][:, None]
        above = (scores > own[:, None]) & ~is_own
        shares[block] = above.sum(axis=1) / (len(distinct) - is_own.sum(axis=1))
    return shares


def progress_rows(queries: list[dict]):
    return progress_bar(queries, desc="mine", unit="query", show=len(queries) > 1000)


def mine(
    passages: list[dict],
    queries: list[dict],
    embeddings: CorpusEmbeddings,
    query_vectors: np.ndarray,
    out_dir: Path,
    config: MineConfig,
    test_ids: set[str],
    seed: int,
    cross_encoder=None,
) -> dict:
    """Write mine/train.jsonl and mine/stats.json.

    `queries` are the accepted training queries; those marked `known_only` (imported positives
    beyond max_positives_per_query) get no row, but count as known positives of their query.
    `query_vectors` has one row per query that is not `known_only`, in order.
    """
    out_dir = Path(out_dir)
    position = {identifier: i for i, identifier in enumerate(embeddings.ids)}
    passages_by_id = {p["_id"]: p for p in passages}
    groups: dict[str, int] = {}
    text_group = np.array([groups.setdefault(normalize_text(passages_by_id[i]["text"]), len(groups)) for i in embeddings.ids], dtype=np.int64)
    in_test = np.array([i in test_ids for i in embeddings.ids], dtype=bool)
    records: dict[str, int] = {}
    record_group = np.array([records.setdefault(record_of(i), len(records)) for i in embeddings.ids], dtype=np.int64)
    positives_of_text: dict[str, set[str]] = defaultdict(set)
    for query in queries:
        positives_of_text[normalize_text(query["text"])].add(query["passage_id"])
    known_positions = {text: np.array(sorted(position[p] for p in ids), dtype=np.int64) for text, ids in positives_of_text.items()}
    queries = [query for query in queries if not query.get("known_only")]
    normalized = [normalize_text(query["text"]) for query in queries]

    # Rows that share a query text (one per positive) share one search. Known positives are
    # removed from the candidates, so search past the window by their number.
    first_row = {}
    for row_number, query in enumerate(queries):
        first_row.setdefault(query["text"], row_number)
    slot = {text: number for number, text in enumerate(first_row)}
    most_positives = max((len(ids) for ids in positives_of_text.values()), default=1)
    scores, indices = embeddings.search(query_vectors[list(first_row.values())], config.range_max + most_positives)
    vectors = np.asarray(embeddings.vectors)  # a plain view of a memory map: no per-access wrapper
    rng = random.Random(seed)
    rows, dropped_total, shortfalls = [], Counter(), 0
    weakest_positive: dict[str, float] = {}
    positive_scores, negative_scores = [], []
    for row_number, query in enumerate(progress_rows(queries)):
        positive = position[query["passage_id"]]
        positive_score = float(np.dot(query_vectors[row_number], vectors[positive]))
        # Margins count from the weakest known positive of this query text: anything scoring near
        # any known positive is likely a false negative.
        known = known_positions[normalized[row_number]]
        if len(known) == 1:
            margin_reference = positive_score
        else:
            if normalized[row_number] not in weakest_positive:
                weakest_positive[normalized[row_number]] = weakest_record_score(vectors[known] @ query_vectors[row_number], record_group[known])
            margin_reference = weakest_positive[normalized[row_number]]
        found = indices[slot[query["text"]]]
        candidates, candidate_scores = found[found >= 0], scores[slot[query["text"]]][found >= 0]
        codes = margin_codes(candidate_scores, exclusion_codes(candidates, positive, known, text_group, in_test, record_group), margin_reference, config)
        codes = _drop_near_duplicates_and_judged(codes, candidates, positive, vectors, config, query["text"], passages_by_id, embeddings.ids, cross_encoder)
        negatives = window(codes, config, rng)
        dropped_total.update(dropped_by_rule(codes))
        if len(negatives) < config.num_negatives:
            shortfalls += 1
        positive_scores.append(positive_score)
        negative_scores.extend(float(candidate_scores[i]) for i in negatives)
        negative_ids = [embeddings.ids[candidates[i]] for i in negatives]
        row = {"anchor": query["text"], "positive": passage_text(passages_by_id[query["passage_id"]])}
        for number, negative in enumerate(negative_ids, start=1):
            row[f"negative_{number}"] = passage_text(passages_by_id[negative])
        row.update(
            query_id=query["_id"],
            positive_id=query["passage_id"],
            known_positives=len(known),
            known_positive_ids=sorted(positives_of_text[normalized[row_number]]),  # train keeps them out of each other's batches
            negative_ids=negative_ids,
            positive_score=round(positive_score, 6),
            negative_scores=[round(float(candidate_scores[i]), 6) for i in negatives],
        )
        rows.append(row)

    if rows:
        shares = others_above_positive(np.asarray(query_vectors), vectors, np.array([position[r["positive_id"]] for r in rows]), seed)
        for row, share in zip(rows, shares):
            row["others_above_positive"] = round(float(share), 6)
    write_jsonl(out_dir / "train.jsonl", rows)
    bins = np.linspace(-1, 1, 41)
    stats = {
        "queries": len(queries),
        "rows": len(rows),
        "negatives": sum(len(r["negative_ids"]) for r in rows),
        "shortfalls": shortfalls,
        "others_above_positive": round(float(np.mean([r["others_above_positive"] for r in rows])), 6) if rows else 0.0,
        "dropped": {rule: dropped_total.get(rule, 0) for rule in RULES},
        "histogram_bins": [round(float(b), 3) for b in bins],
        "positive_score_histogram": np.histogram(positive_scores, bins=bins)[0].tolist(),
        "negative_score_histogram": np.histogram(negative_scores, bins=bins)[0].tolist(),
    }
    write_json(out_dir / "stats.json", stats)
    return {key: stats[key] for key in ("queries", "rows", "negatives", "shortfalls", "others_above_positive", "dropped")}

"""Stage 2, mine: hard negatives for every training query from a FAISS index of the corpus.

Reads:  corpus.jsonl, generate/queries.jsonl, the base model's cached corpus embeddings.
Writes: mine/train.jsonl ({"anchor", "positive", "negative_1".."negative_k", "query_id",
        "positive_id", "negative_ids", "positive_score", "negative_scores"}), mine/stats.json.
Keeps:  nothing beyond the shared embedding cache.

Imported queries may bring more positives than are trained on (`known_only`): those are
known positives too. Per query, candidates come from the rank window range_min..range_max (counted over the
candidates that survive the rules below, as sentence-transformers does). A candidate is dropped
when it is a known positive of the same query text, a near-duplicate of the positive (same
normalized text, or cosine >= duplicate_threshold), a test passage, or scores too close to
the positive (positive-aware margins, NV-Retriever's TopK-PercPos). A query with too few
valid candidates keeps what it has and is counted as a shortfall: never padded.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np

from embedforge.config import MineConfig
from embedforge.embeddings import CorpusEmbeddings, passage_text
from embedforge.files import write_json, write_jsonl
from embedforge.generate import normalize_query

STAGE_VERSION = 2  # 2: positives and negatives are title + text, as the models encode passages
RULES = ("positive", "known_positive", "duplicate_text", "duplicate_cosine", "test_split", "relative_margin", "absolute_margin", "max_score", "cross_encoder")


def select_negatives(
    candidate_ids: list[str],
    candidate_scores: list[float],
    positive_score: float,
    excluded: dict[str, str],
    duplicate_of_positive: set[str],
    config: MineConfig,
    rng: random.Random,
    judged_relevant: set[str] = frozenset(),
) -> tuple[list[tuple[str, float]], Counter]:
    """Negatives for one query from its ranked candidates (pure: no index, no model).

    `excluded` maps a passage id to the rule that excludes it for this query. The rank window
    range_min..range_max applies to the candidates that survive every rule, as in
    sentence-transformers' mine_hard_negatives, so excluded positives never eat the window.
    """
    dropped: Counter = Counter()
    kept = []
    cap = positive_score - abs(positive_score) * config.relative_margin if config.relative_margin is not None else None
    for candidate, score in zip(candidate_ids, candidate_scores):
        if candidate in excluded:
            dropped[excluded[candidate]] += 1
        elif candidate in duplicate_of_positive:
            dropped["duplicate_cosine"] += 1
        elif config.absolute_margin is not None and score + config.absolute_margin > positive_score:
            dropped["absolute_margin"] += 1
        elif cap is not None and score > cap:
            dropped["relative_margin"] += 1
        elif config.max_score is not None and score > config.max_score:
            dropped["max_score"] += 1
        elif candidate in judged_relevant:
            dropped["cross_encoder"] += 1
        else:
            kept.append((candidate, score))
    kept = kept[config.range_min : config.range_max]
    if config.sampling == "random" and len(kept) > config.num_negatives:
        kept = sorted(rng.sample(kept, config.num_negatives), key=lambda item: -item[1])
    return kept[: config.num_negatives], dropped


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
    normalized_text = {p["_id"]: normalize_query(p["text"]) for p in passages}
    positives_of_text: dict[str, set[str]] = defaultdict(set)
    for query in queries:
        positives_of_text[normalize_query(query["text"])].add(query["passage_id"])
    queries = [query for query in queries if not query.get("known_only")]

    # Known positives are removed from the candidates, so search past the window by their number.
    most_positives = max((len(ids) for ids in positives_of_text.values()), default=1)
    scores, indices = embeddings.search(query_vectors, config.range_max + most_positives)
    vectors = embeddings.vectors
    rng = random.Random(seed)
    rows, dropped_total, shortfalls = [], Counter(), 0
    weakest_positive: dict[str, float] = {}
    positive_scores, negative_scores = [], []
    for row_number, query in enumerate(queries):
        positive = query["passage_id"]
        positive_vector = np.asarray(vectors[position[positive]])
        positive_score = float(np.dot(query_vectors[row_number], positive_vector))
        # Margins count from the weakest known positive of this query text: anything scoring near
        # any known positive is likely a false negative.
        known = positives_of_text[normalize_query(query["text"])]
        if len(known) == 1:
            margin_reference = positive_score
        else:
            cache_key = normalize_query(query["text"])
            if cache_key not in weakest_positive:
                weakest_positive[cache_key] = float((np.asarray(vectors[sorted(position[p] for p in known)]) @ query_vectors[row_number]).min())
            margin_reference = weakest_positive[cache_key]
        candidate_ids = [embeddings.ids[i] for i in indices[row_number] if i >= 0]
        candidate_scores = [float(s) for s, i in zip(scores[row_number], indices[row_number]) if i >= 0]
        excluded = {}
        for candidate in candidate_ids:
            if candidate == positive:
                excluded[candidate] = "positive"
            elif candidate in positives_of_text[normalize_query(query["text"])]:
                excluded[candidate] = "known_positive"
            elif normalized_text[candidate] == normalized_text[positive]:
                excluded[candidate] = "duplicate_text"
            elif candidate in test_ids:
                excluded[candidate] = "test_split"
        candidate_matrix = np.asarray(vectors[[position[c] for c in candidate_ids]]) if candidate_ids else np.zeros((0, len(positive_vector)))
        similarity_to_positive = candidate_matrix @ positive_vector
        duplicates = {c for c, similarity in zip(candidate_ids, similarity_to_positive) if similarity >= config.duplicate_threshold and c != positive}
        judged_relevant = set()
        if cross_encoder is not None:
            window = [c for c in candidate_ids if c not in excluded and c not in duplicates]
            if window:
                relevance = cross_encoder.predict([(query["text"], passage_text(passages_by_id[c])) for c in window], show_progress_bar=False)
                judged_relevant = {c for c, score in zip(window, relevance) if float(score) >= config.cross_encoder_threshold}
        negatives, dropped = select_negatives(candidate_ids, candidate_scores, margin_reference, excluded, duplicates, config, rng, judged_relevant)
        dropped_total.update(dropped)
        if len(negatives) < config.num_negatives:
            shortfalls += 1
        positive_scores.append(positive_score)
        negative_scores.extend(score for _, score in negatives)
        row = {"anchor": query["text"], "positive": passage_text(passages_by_id[positive])}
        for number, (negative, _) in enumerate(negatives, start=1):
            row[f"negative_{number}"] = passage_text(passages_by_id[negative])
        row.update(
            query_id=query["_id"],
            positive_id=positive,
            negative_ids=[n for n, _ in negatives],
            positive_score=round(positive_score, 6),
            negative_scores=[round(s, 6) for _, s in negatives],
        )
        rows.append(row)

    write_jsonl(out_dir / "train.jsonl", rows)
    bins = np.linspace(-1, 1, 41)
    stats = {
        "queries": len(queries),
        "rows": len(rows),
        "negatives": sum(len(r["negative_ids"]) for r in rows),
        "shortfalls": shortfalls,
        "dropped": {rule: dropped_total.get(rule, 0) for rule in RULES},
        "histogram_bins": [round(float(b), 3) for b in bins],
        "positive_score_histogram": np.histogram(positive_scores, bins=bins)[0].tolist(),
        "negative_score_histogram": np.histogram(negative_scores, bins=bins)[0].tolist(),
    }
    write_json(out_dir / "stats.json", stats)
    return {key: stats[key] for key in ("queries", "rows", "negatives", "shortfalls", "dropped")}

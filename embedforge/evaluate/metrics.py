"""IR metrics from ranked id lists, and the paired statistics that compare two models.

Pure functions, checked against hand-computed cases: binary NDCG reproduces sentence-transformers'
InformationRetrievalEvaluator, graded NDCG uses the qrels' grades as linear gains (pytrec_eval / MTEB).
"""

from __future__ import annotations

import math

import numpy as np

METRICS = ("ndcg@1", "ndcg@5", "ndcg@10", "recall@1", "recall@5", "recall@10", "recall@50", "recall@100", "mrr@10", "map@100")


def ir_metrics(ranked: dict[str, list[str]], qrels: dict[str, dict[str, int]], graded: bool = False) -> dict[str, dict[str, float]]:
    """Per-query NDCG@1/5/10, Recall@1/5/10/50/100, MRR@10, MAP@100 from ranked id lists."""
    metrics: dict[str, dict[str, float]] = {}
    for query, relevant in qrels.items():
        ranking = ranked.get(query, [])
        gains = [float(relevant.get(doc, 0)) if graded else float(doc in relevant) for doc in ranking]
        ideal = sorted((float(g) if graded else 1.0 for g in relevant.values()), reverse=True)
        row = {}
        for k in (1, 5, 10):
            dcg = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(gains[:k]))
            idcg = sum(gain / math.log2(rank + 2) for rank, gain in enumerate(ideal[:k]))
            row[f"ndcg@{k}"] = dcg / idcg if idcg else 0.0
        for k in (1, 5, 10, 50, 100):
            row[f"recall@{k}"] = sum(1 for doc in ranking[:k] if doc in relevant) / len(relevant)
        row["mrr@10"] = next((1.0 / (rank + 1) for rank, doc in enumerate(ranking[:10]) if doc in relevant), 0.0)
        hits, precision_sum = 0, 0.0
        for rank, doc in enumerate(ranking[:100]):
            if doc in relevant:
                hits += 1
                precision_sum += hits / (rank + 1)
        row["map@100"] = precision_sum / min(100, len(relevant))
        for name, value in row.items():
            metrics.setdefault(name, {})[query] = value
    return metrics


def paired_bootstrap(differences: np.ndarray, resamples: int = 10_000, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean of paired per-query differences.

    Given plain per-query scores instead of differences, it is the interval of that model's mean.
    """
    differences = np.asarray(differences, dtype=np.float64)
    if differences.size == 0:
        return 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    for start in range(0, resamples, 1000):  # chunks bound memory on large query sets
        count = min(1000, resamples - start)
        means[start : start + count] = differences[rng.integers(0, differences.size, size=(count, differences.size))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(low), float(high)


def randomization_p_value(differences: np.ndarray, resamples: int = 10_000, seed: int = 0) -> float:
    """Two-sided paired randomization (sign-flip) test of a zero mean difference."""
    differences = np.asarray(differences, dtype=np.float64)
    if differences.size == 0 or not differences.any():
        return 1.0
    rng = np.random.default_rng(seed + 1)
    observed = abs(differences.mean())
    extreme = 0
    for start in range(0, resamples, 1000):
        count = min(1000, resamples - start)
        signs = rng.choice((-1.0, 1.0), size=(count, differences.size))
        extreme += int((np.abs((signs * differences).mean(axis=1)) >= observed - 1e-12).sum())
    return (extreme + 1) / (resamples + 1)


def verdict(low: float, high: float, p_value: float | None = None, alpha: float = 0.05) -> str:
    """From the 95% CI of the difference; with a p-value, both tests must agree.

    On small query sets the percentile bootstrap is a little optimistic: a CI that just excludes 0
    next to p = 0.07 is reported as no significant difference rather than as a win.
    """
    if p_value is not None and p_value >= alpha:
        return "no significant difference"
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "no significant difference"

"""Contamination check: does an eval set's test data appear among the training pairs?"""

from __future__ import annotations

from typing import Iterable

from embedforge.evaluate.data import EvalSet
from embedforge.text import normalize_text


def contamination(train_rows: Iterable[dict], eval_set: EvalSet, examples: int = 5) -> dict:
    """Test query texts that are training anchors, and test positives that are training positives.

    `train_rows` are mine/train.jsonl rows (`anchor`, `positive_id`). Positives are compared by
    passage id, so the check bites where the eval set shares the training corpus's ids (the run's
    synthetic test set, or a labelled set over the same corpus).
    """
    rows = list(train_rows)
    anchors = {normalize_text(row["anchor"]) for row in rows if row.get("anchor")}
    positive_ids = {str(row["positive_id"]) for row in rows if row.get("positive_id") is not None}
    shared_queries = [query for query, text in eval_set.queries.items() if normalize_text(text) in anchors]
    test_positives = sorted({doc for docs in eval_set.qrels.values() for doc in docs})
    shared_positives = [doc for doc in test_positives if doc in positive_ids]
    return {
        "train_pairs": len(rows),
        "test_queries": len(eval_set.queries),
        "test_positives": len(test_positives),
        "shared_query_texts": len(shared_queries),
        "shared_positives": len(shared_positives),
        "clean": not shared_queries and not shared_positives,
        "examples": {"query_texts": [eval_set.queries[q] for q in shared_queries[:examples]], "positive_ids": shared_positives[:examples]},
    }


def contamination_line(check: dict | None) -> str:
    """One line for the report: the counts, or a loud warning."""
    if check is None:
        return "contamination: not checked (no training pairs given)"
    if check["clean"]:
        return f"contamination: 0 shared query texts, 0 shared positives (against {check['train_pairs']} training pairs)"
    found = check["examples"]
    shown = "; ".join([*(f"query {text!r}" for text in found["query_texts"]), *(f"passage {doc}" for doc in found["positive_ids"])])
    return (
        f"**⚠ CONTAMINATION: {check['shared_query_texts']} of {check['test_queries']} test query texts are training anchors and "
        f"{check['shared_positives']} of {check['test_positives']} test positives are training positives — the fine-tuned "
        f"model's scores on this set are inflated.** Examples: {shown}"
    )

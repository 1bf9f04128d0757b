"""Pure functions that turn an LLM answer into queries and decide which are worth training on."""

from __future__ import annotations

import json
import re

from embedforge.config import GenerateConfig

# Answers that talk about the task, refuse, or write code instead of a query.
_META_PATTERNS = re.compile(
    r"^(here (is|are)|sure[,!.]|certainly|as an ai|i'm |i am |i cannot|i can't|sorry|note:|what is the output of|you can|yes[,.!]|no[,.!]|the passage|this passage|passage:|query:|search query:|answer:|question:)"
    r"|\b(as an ai|language model)\b|```|^(import|def|class|from|#include|>>>)\b"
    # Prompt injection: text that tells a model what to do, and chat-template role tags.
    r"|\b(ignore|disregard|forget|override)\b.{0,40}\b(instructions?|prompts?|rules|directions)\b"
    r"|\b(reply|respond|answer|say)\s+(only\s+)?with\s+(the\s+word|only)\b|\bsystem\s+prompt\b"
    r"|<\|?/?\s*(im_start|im_end|system|user|assistant|endoftext|eot_id)\s*\|?>|\[/?inst\]|^\s*(system|assistant|user)\s*:",
    re.IGNORECASE,
)
_LIST_MARKER = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|\(\d+\))\s*")


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



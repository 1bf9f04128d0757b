"""Cut texts into passages that fit the encoder: pure functions over a tokenizer's offsets.

A passage longer than the base model's `max_seq_length` is cut by the encoder at mining,
training and evaluation, so a query written about its end trains against text the model never
sees. Cutting by the model's own tokens, at a paragraph or sentence end where one is near, keeps
every passage whole to the encoder and readable to the LLM.
"""

from __future__ import annotations

import re

# A sentence ends at one of these, optionally followed by closing quotes or brackets.
_SENTENCE_END = re.compile(r"[.!?:;…][\"'”’)\]]*$")


def token_spans(text: str, offsets: list[tuple[int, int]], limit: int, overlap: int = 0) -> list[tuple[int, int]]:
    """Character spans of consecutive chunks of at most `limit` tokens (`offsets`: each token's
    (start, end) in `text`, no special tokens). A chunk ends at the latest paragraph break in the
    second half of its window, else the latest sentence end there, else the latest word boundary;
    the next starts `overlap` tokens earlier, at a word's start."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    count = len(offsets)
    if count <= limit:
        return [(0, len(text))]
    overlap = min(overlap, limit // 2)
    spans, start = [], 0
    while start + limit < count:
        end = _cut(text, offsets, start + max(1, limit // 2), start + limit)
        spans.append((offsets[start][0], offsets[end - 1][1]))
        following = end
        if overlap:
            following = max(end - overlap, start + 1)
            while following < end and not _word_starts(text, offsets, following):
                following += 1
        start = following
    spans.append((offsets[start][0], len(text)))
    return spans


def _word_starts(text: str, offsets: list[tuple[int, int]], token: int) -> bool:
    """Whether whitespace comes before `token` (so a cut there does not split a word)."""
    return token == 0 or offsets[token][0] > offsets[token - 1][1] and text[offsets[token - 1][1] : offsets[token][0]].isspace()


def _cut(text: str, offsets: list[tuple[int, int]], low: int, high: int) -> int:
    """The token index in [low, high] to cut before."""
    sentence = word = None
    for token in range(high, low - 1, -1):
        if not _word_starts(text, offsets, token):
            continue
        gap = text[offsets[token - 1][1] : offsets[token][0]]
        if "\n" in gap:
            return token
        if sentence is None and _SENTENCE_END.search(text[offsets[token - 1][0] : offsets[token - 1][1]]):
            sentence = token
        if word is None:
            word = token
    return sentence or word or high


def word_windows(text: str, size: int) -> list[str]:
    """Windows of `size` words (the deprecated `--chunk-words`)."""
    words = text.split()
    return [" ".join(words[start : start + size]) for start in range(0, len(words), size)]

"""Small text helpers shared by the stages (below all of them, so no stage imports another)."""

from __future__ import annotations

import re


def normalize_text(text: str) -> str:
    """Lowercase, punctuation dropped, whitespace collapsed: "What is X?" and "what is  x" are the
    same query. One rule for generate's duplicates, mine's known positives and evaluate's
    contamination check, so the three never disagree on what "the same text" is."""
    return " ".join(re.findall(r"\w+", text.lower()))


def format_duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def passage_text(passage: dict) -> str:
    """What an encoder reads for a passage: its title, a space, its text."""
    title = passage.get("title") or ""
    return f"{title} {passage['text']}".strip()


def record_of(passage_id: str) -> str:
    """The record a passage was cut from: its id without the `#<n>` the corpus reader adds to the
    passages of a record it cut (a passage that is a whole record is its own record)."""
    record, mark, number = passage_id.rpartition("#")
    return record if mark and number.isdigit() else passage_id

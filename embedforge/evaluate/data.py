"""Eval sets in BEIR layout: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

from embedforge.corpus import read_qrels
from embedforge.errors import EmbedforgeError
from embedforge.files import iter_jsonl, sha256_file, sha256_json


SYNTHETIC_TEST = "synthetic-test"  # the run's held-out set of LLM-written queries: every other target set is human-labelled


@dataclass
class EvalSet:
    name: str
    source: str  # where the queries come from, for the report
    passages: list[dict]
    queries: dict[str, str]
    qrels: dict[str, dict[str, int]]
    sha256: str
    # Passage id -> the document (qrels id) it was cut from, when the documents were cut; a
    # document then scores what its best passage scores.
    documents: dict[str, str] | None = None
    # "target": the domain trained for; "regression": another domain, checked for forgetting.
    role: str = "target"


def cut_documents(eval_set: EvalSet, cut: Callable[[list[dict]], list[list[dict]]]) -> EvalSet:
    """The eval set with its documents cut into passages by `cut` (the passages of each document,
    in order); the qrels still name documents. Unchanged when no document was cut."""
    pieces = cut(eval_set.passages)
    if all(len(parts) == 1 for parts in pieces):
        return eval_set
    documents = {part["_id"]: document["_id"] for document, parts in zip(eval_set.passages, pieces) for part in parts}
    passages = [part for parts in pieces for part in parts]
    digest = sha256_json({"eval_set": eval_set.sha256, "passages": sha256_json([[p["_id"], p.get("title", ""), p["text"]] for p in passages])})
    return replace(eval_set, passages=passages, documents=documents, sha256=digest, source=eval_set.source + ", documents cut into passages, each scored by its best")


def load_beir(folder: Path, split: str = "test", passages: list[dict] | None = None, name: str | None = None, source: str | None = None) -> EvalSet:
    """A BEIR folder; `passages` replaces its corpus.jsonl (the run's held-out set uses the run corpus)."""
    folder = Path(folder)
    qrels_path = folder / "qrels" / f"{split}.tsv"
    if not folder.is_dir():
        raise EmbedforgeError("Eval set folder not found", where=str(folder), fix="pass --eval-set with a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    if passages is None:
        passages = [{"_id": str(row["_id"]), "title": row.get("title") or "", "text": row.get("text") or ""} for row in iter_jsonl(folder / "corpus.jsonl")]
    qrels = read_qrels(qrels_path)
    queries = {str(row["_id"]): row["text"] for row in iter_jsonl(folder / "queries.jsonl") if str(row["_id"]) in qrels}
    qrels = {query: {doc: grade for doc, grade in docs.items() if grade > 0} for query, docs in qrels.items() if query in queries}
    qrels = {query: docs for query, docs in qrels.items() if docs}
    if not qrels:
        raise EmbedforgeError(f"No query with a relevant passage in qrels/{split}.tsv", where=str(folder), fix="check that query ids match queries.jsonl")
    digest = sha256_json({"corpus": sha256_json([[p["_id"], p.get("title", ""), p["text"]] for p in passages]), "queries": queries, "qrels": qrels})
    return EvalSet(name=name or folder.name, source=source or f"{folder} (qrels/{split}.tsv)", passages=passages, queries={q: queries[q] for q in qrels}, qrels=qrels, sha256=digest)


def eval_set_files(folder: Path, split: str = "test") -> dict[str, str]:
    """The files of a BEIR eval set, by their names in it, and their hashes: the inputs of a fingerprint."""
    folder = Path(folder)
    return {name: sha256_file(folder / name) for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv") if (folder / name).exists()}


def check_eval_set(folder: Path, split: str = "test", examples: int = 3) -> None:
    """A complete BEIR folder whose qrels name only queries and passages it holds, checked before a
    run pays for anything: a qrels id that matches nothing would score 0 without a word."""
    folder = Path(folder)
    if not folder.is_dir():
        raise EmbedforgeError("Eval set folder not found", where=str(folder), fix="pass --eval-set with a BEIR folder (corpus.jsonl, queries.jsonl, qrels/test.tsv)")
    missing = [name for name in ("corpus.jsonl", "queries.jsonl", f"qrels/{split}.tsv") if not (folder / name).is_file()]
    if missing:
        raise EmbedforgeError(f"The eval set lacks {', '.join(missing)}", where=str(folder), fix="an eval set is a BEIR folder: corpus.jsonl, queries.jsonl and qrels/test.tsv")
    qrels = read_qrels(folder / "qrels" / f"{split}.tsv")
    for name, ids in (("queries.jsonl", set(qrels)), ("corpus.jsonl", {doc for docs in qrels.values() for doc in docs})):
        known = {str(row.get("_id")) for row in iter_jsonl(folder / name)}
        unknown = sorted(ids - known)
        if unknown:
            raise EmbedforgeError(
                f"qrels/{split}.tsv names {len(unknown)} ids that are not in {name} (e.g. {', '.join(unknown[:examples])})",
                where=str(folder / "qrels" / f"{split}.tsv"), fix=f"make the qrels ids match the _id values of {name}",
            )

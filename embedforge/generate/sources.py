"""Where queries come from besides live calls, and where held-out ones go: Batch API files,
imported pairs, real user queries for the prompt, and the BEIR eval layout."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from embedforge.config import GenerateConfig
from embedforge.corpus import read_qrels, split_of, unit_hash
from embedforge.errors import EmbedforgeError
from embedforge.files import JsonlAppender, atomic_write, iter_jsonl, sha256_text, write_jsonl
from embedforge.generate.filters import reject_reason
from embedforge.text import normalize_text, record_of

def batch_request(key: str, model: str, messages: list, config: GenerateConfig) -> dict:
    """One line of an OpenAI Batch API input file (also read by `vllm run-batch`)."""
    return {
        "custom_id": key,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": messages, "temperature": config.temperature, "max_tokens": config.max_tokens},
    }


def import_batch_results(path: Path, ledger_path: Path, answered: dict) -> int:
    """Append Batch API results (`custom_id` = request_sha) to the ledger; returns how many were new."""
    added = 0
    with JsonlAppender(ledger_path) as ledger:
        for line_number, row in enumerate(iter_jsonl(path), start=1):
            key = row.get("custom_id")
            body = ((row.get("response") or {}).get("body")) or {}
            if not key or key in answered or (row.get("response") or {}).get("status_code", 200) != 200 or not body.get("choices"):
                continue  # failed or unknown lines stay pending and are asked again
            choice = body["choices"][0]
            entry = {
                "request_sha": key, "passage_id": None, "sample_index": None, "reask": None,
                "response": (choice.get("message") or {}).get("content"), "finish_reason": choice.get("finish_reason"),
                "usage": {k: v for k, v in (body.get("usage") or {}).items() if isinstance(v, int)}, "latency": None, "attempts": 1, "batch": True,
            }
            ledger.append(entry)
            answered[key] = entry
            added += 1
    return added


def load_user_queries(path: Path, limit: int = 20) -> list[str]:
    """Real user queries for the prompt: a text file (one per line) or JSONL with a 'text' or 'query' field."""
    path = Path(path)
    if path.suffix == ".jsonl":
        queries = [str(row.get("text") or row.get("query") or "").strip() for row in iter_jsonl(path)]
    else:
        try:
            queries = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        except FileNotFoundError as error:
            raise EmbedforgeError("Examples file not found", where=str(path), fix="check --examples") from error
    queries = [q for q in queries if q]
    if not queries:
        raise EmbedforgeError("The examples file has no queries", where=str(path), fix="one query per line, or JSONL with a 'text' field")
    return queries[:limit]


def read_pairs(path: Path) -> list[tuple[str, str]]:
    """(query text, passage id) pairs: a BEIR folder (queries.jsonl + qrels/train.tsv) or a JSONL file."""
    path = Path(path)
    if path.is_dir():
        texts = {str(row["_id"]): row["text"] for row in iter_jsonl(path / "queries.jsonl")}
        qrels = read_qrels(path / "qrels" / "train.tsv")
        return [(texts[query], doc) for query, docs in qrels.items() if query in texts for doc, grade in docs.items() if grade > 0]
    pairs = []
    for line_number, row in enumerate(iter_jsonl(path), start=1):
        text = row.get("query") or row.get("text")
        passage = row.get("passage_id") or row.get("corpus-id")
        if not text or passage is None:
            raise EmbedforgeError("Each imported pair needs 'query' (or 'text') and 'passage_id'", where=f"{path}, line {line_number}", fix="fix that line")
        pairs.append((str(text), str(passage)))
    return pairs


def import_pairs(path: Path, passages: list[dict], config: GenerateConfig, seen: set, accepted: list[dict], rejects: list[dict], stats) -> None:
    """Add existing pairs with the same dedup and, unless `filter_imports` is off, the same cheap
    filters as generated ones (an export can hold junk too); every pair left out is in `rejects`.

    A query keeps all its pairs in one split, chosen by a hash of its text: real queries often have
    several positives, and splitting those by passage would put the same query in training and in
    the held-out sets, whose qrels would then miss most of its positives. In the train split, at
    most `max_positives_per_query` pairs of a query are trained on (chosen by hash); the others
    are kept as known positives (`known_only`), so mining never takes them for negatives.
    A pair naming a record that the corpus cut into passages stands for each of them, the one
    sharing most words with the query first (the one trained on when the cap leaves one).
    """
    text_of = {p["_id"]: p["text"] for p in passages}
    pieces_of = _pieces_by_record(passages)
    by_query: dict[str, list[tuple[str, str, bool]]] = defaultdict(list)

    def reject(text: str, passage_id: str, reason: str) -> None:
        stats.rejected[reason] += 1
        rejects.append({"passage_id": passage_id, "split": None, "text": text, "reason": reason, "request_sha": None, "imported": True})

    for text, named_id in read_pairs(path):
        if named_id in text_of:
            candidates = [named_id]
        elif named_id in pieces_of:
            # A record the corpus cut into passages: each of them belongs to the relevant record; the
            # one sharing most words with the query comes first, so it is the one trained on.
            candidates = sorted(pieces_of[named_id], key=lambda piece: -shared_words(text, text_of[piece]))
        else:
            reject(text, named_id, "import_unknown_passage")
            continue
        for order, passage_id in enumerate(candidates):
            reason = reject_reason(text, text_of[passage_id], config) if config.filter_imports else None
            if reason:
                reject(text, passage_id, reason)
                continue
            key = normalize_text(text) + "\t" + passage_id
            if key in seen:
                reject(text, passage_id, "duplicate")
                continue
            seen.add(key)
            seen.add(normalize_text(text))  # generated queries must not repeat an imported one
            by_query[normalize_text(text)].append((text, passage_id, order == 0))
    cap = config.max_positives_per_query
    for normalized, pairs in by_query.items():
        split = split_of("query:" + normalized, config.dev_fraction, config.test_fraction)
        if split == "train" and cap is not None:
            pairs = sorted(pairs, key=lambda pair: (not pair[2], unit_hash(normalized + "\t" + pair[1])))
        # Ids come from the pair itself, not from its line in the file: reordering the file keeps every id.
        query_hash = sha256_text(normalized)[:12]
        for rank, (text, passage_id, _) in enumerate(pairs):
            row = {"_id": f"{passage_id}-i{query_hash}", "text": text, "passage_id": passage_id, "split": split, "prompt_sha": None, "request_sha": None, "imported": True}
            if split == "train" and cap is not None and rank >= cap:
                row["known_only"] = True
                stats.accepted["known_only"] += 1
            else:
                stats.accepted[split] += 1
            accepted.append(row)


def write_eval_set(folder: Path, queries: list[dict]) -> None:
    """Held-out queries in BEIR layout (the corpus is the run's corpus.jsonl).

    The same query text in one split is one query with all its passages relevant: imported
    human queries often have several positives.
    """
    grouped: dict[tuple[str, str], dict] = {}
    for query in queries:
        if query["split"] in ("dev", "test"):
            entry = grouped.setdefault((query["split"], normalize_text(query["text"])), {"_id": query["_id"], "text": query["text"], "split": query["split"], "passages": []})
            entry["passages"].append(query["passage_id"])
    write_jsonl(folder / "queries.jsonl", ({"_id": q["_id"], "text": q["text"]} for q in grouped.values()))
    for split in ("dev", "test"):
        with atomic_write(folder / "qrels" / f"{split}.tsv") as handle:
            handle.write("query-id\tcorpus-id\tscore\n")
            for query in grouped.values():
                if query["split"] == split:
                    for passage in query["passages"]:
                        handle.write(f"{query['_id']}\t{passage}\t1\n")


def _pieces_by_record(passages: list[dict]) -> dict[str, list[str]]:
    """Record id -> the ids of the passages it was cut into (`<record id>#<n>`, in order)."""
    pieces: dict[str, list[str]] = defaultdict(list)
    for passage in passages:
        if record_of(passage["_id"]) != passage["_id"]:
            pieces[record_of(passage["_id"])].append(passage["_id"])
    return pieces


def shared_words(query: str, text: str) -> int:
    return len(set(normalize_text(query).split()) & set(normalize_text(text).split()))

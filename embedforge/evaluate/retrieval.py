"""Ranked lists per query, dense (a SentenceTransformer + FAISS) or lexical (BM25), cached per model.

A cached result holds the per-query metrics (binary and graded) and the ranked top-100 ids, so the
report's "gained most / lost most" examples can be rebuilt from the cache without a model.
"""

from __future__ import annotations

import collections
from pathlib import Path

from embedforge.backends import vectors_key
from embedforge.evaluate.data import EvalSet
from embedforge.evaluate.metrics import ir_metrics
from embedforge.files import read_json, sha256_json, write_json

METRICS_VERSION = 2  # 2: cached results carry the ranked lists
TOP_K = 100

# The lexical reference. Lucene's defaults (k1 1.2-1.5, b 0.75) and its 33-word English stopword
# list, as Pyserini's BM25 "flat" baseline; no stemmer, so nothing beyond bm25s itself is needed.
BM25_MODEL = "bm25"
BM25_SETTINGS = {"k1": 1.5, "b": 0.75, "method": "lucene", "stopwords": "en", "stemmer": None}


def retrieve(model_name: str, eval_set: EvalSet, cache_dir: Path | None, batch_size: int, prompts: dict[str, str] | None = None,
             encode_backend: str = "torch", engine=None) -> dict[str, list[str]]:
    from embedforge.embeddings.cluster import make_encoder
    from embedforge.embeddings import corpus_embeddings, encode_texts, load_model

    model = load_model(model_name, prompts=prompts, backend=encode_backend, cache_dir=cache_dir)
    embeddings = corpus_embeddings(model_name, eval_set.passages, cache_dir, batch_size=batch_size, model=model, prompts=prompts, encode_backend=encode_backend,
                                   encoder=make_encoder(model, model_name, batch_size, engine, cache_dir=cache_dir))
    query_ids = list(eval_set.queries)
    query_vectors = encode_texts(model, [eval_set.queries[q] for q in query_ids], batch_size, kind="query")
    _, indices = embeddings.search(query_vectors, _depth(eval_set))
    return _documents_ranked(eval_set, {query: [embeddings.ids[i] for i in row if i >= 0] for query, row in zip(query_ids, indices)})


def _depth(eval_set: EvalSet) -> int:
    """How many passages to rank so that TOP_K documents are among them: a document's best
    passage comes before its others, so TOP_K times the most passages of one document is enough."""
    if not eval_set.documents:
        return TOP_K
    most = max(collections.Counter(eval_set.documents.values()).values())
    return min(TOP_K * most, len(eval_set.passages))


def _documents_ranked(eval_set: EvalSet, ranked: dict[str, list[str]]) -> dict[str, list[str]]:
    """Ranked passages as ranked documents (each at the place of its best passage), when the
    eval set's documents were cut; as they are otherwise."""
    if not eval_set.documents:
        return ranked
    return {query: list(dict.fromkeys(eval_set.documents[passage] for passage in passages))[:TOP_K] for query, passages in ranked.items()}


def bm25_retrieve(eval_set: EvalSet, k: int = TOP_K) -> dict[str, list[str]]:
    """BM25 over title + text (the same passage text the dense models encode)."""
    import logging

    import bm25s

    logging.getLogger("bm25s").setLevel(logging.WARNING)  # bm25s sets it to DEBUG when imported

    from embedforge.embeddings import passage_text

    tokenize = {"stopwords": BM25_SETTINGS["stopwords"], "stemmer": None, "show_progress": False}
    retriever = bm25s.BM25(k1=BM25_SETTINGS["k1"], b=BM25_SETTINGS["b"], method=BM25_SETTINGS["method"])
    retriever.index(bm25s.tokenize([passage_text(p) for p in eval_set.passages], **tokenize), show_progress=False)
    query_ids = list(eval_set.queries)
    query_tokens = bm25s.tokenize([eval_set.queries[q] for q in query_ids], return_ids=False, **tokenize)
    documents, scores = retriever.retrieve(query_tokens, k=min(max(k, _depth(eval_set)), len(eval_set.passages)), show_progress=False)
    ids = [p["_id"] for p in eval_set.passages]
    # A passage sharing no term with the query scores 0: it was not retrieved, and the order among
    # such passages is arbitrary, so it is left out rather than ranked.
    return _documents_ranked(eval_set, {query: [ids[d] for d, s in zip(row, row_scores) if s > 0] for query, row, row_scores in zip(query_ids, documents, scores)})


def result_key(model_name: str, eval_set: EvalSet, prompts: dict[str, str] | None = None, encode_backend: str = "torch") -> str:
    if model_name == BM25_MODEL:
        import bm25s

        identity = f"bm25s-{bm25s.__version__}:" + sha256_json(BM25_SETTINGS)
    else:
        from embedforge.embeddings import model_identity

        identity = model_identity(model_name)
    key = {"model": identity, "eval_set": eval_set.sha256, "metrics": METRICS_VERSION, "top_k": TOP_K}
    if prompts:
        key["prompts"] = prompts
    if model_name != BM25_MODEL and vectors_key(encode_backend):
        key["vectors"] = vectors_key(encode_backend)
    return sha256_json(key)


def evaluate_model(model_name: str, eval_set: EvalSet, cache_dir: Path | None, batch_size: int = 64, prompts: dict[str, str] | None = None,
                   encode_backend: str = "torch", engine=None) -> dict:
    """{"binary": per-query metrics, "graded": per-query metrics, "ranked": top-100 ids per query}, cached by content.

    `prompts` override the model's own query/document prompts; `engine` (a `embeddings.cluster.RaySettings`)
    encodes the corpus on Ray, to the same vectors, so it is not part of the key.
    """
    path = Path(cache_dir) / "results" / f"{result_key(model_name, eval_set, prompts, encode_backend)}.json" if cache_dir else None
    if path and path.exists():
        return read_json(path)
    ranked = bm25_retrieve(eval_set) if model_name == BM25_MODEL else retrieve(model_name, eval_set, cache_dir, batch_size, prompts, encode_backend, engine)
    result = {"binary": ir_metrics(ranked, eval_set.qrels), "graded": ir_metrics(ranked, eval_set.qrels, graded=True), "ranked": ranked}
    if path:
        write_json(path, result)
    return result
